"""``hvo-observer run``: probes -> reconciliation model -> /metrics and the JSON API.

Start-up: read the kernel facts, bind the HTTP port (so a busy port fails fast), compile and attach
the probes, take the baseline from the kernel's counters, then tell systemd READY=1. The main loop
polls the probes (events go to the model and the event ring), takes a kernel snapshot every
``SNAPSHOT_INTERVAL_S`` (the model decides when the kernel is quiet and reconciles), feeds the
systemd watchdog and handles signals: SIGHUP re-reads the config file (a bad file keeps the running
configuration), SIGTERM/SIGINT interrupt the poll and stop the daemon within the time to detach the
probes.

Idle: once the model has settled and no event record has arrived for ``IDLE_AFTER_S``, the loop polls
for ``IDLE_POLL_MS`` and takes a snapshot every ``SNAPSHOT_IDLE_S`` instead; a record (the poll
returns as soon as one arrives) or any change the model sees ends it at once. Most of an idle
daemon's CPU time is these wake-ups and readings.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import signal
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

from observer import __version__, config, logsetup, sd_notify
from observer.config import Config
from observer.errors import ObserverError
from observer.eventlog import EventLog
from observer.model import Model, ProbeState, Runtime
from observer.probes.events import Event
from observer.report import view_to_json

log = logging.getLogger("hvo-observer")

POLL_MS = 100
SNAPSHOT_INTERVAL_S = 0.2  # the settle window is measured at this granularity
# Idle: the probe sets' deferred work (1 GiB candidates, vmemmap inference windows) is done within a
# few seconds of the last record; a change that comes with no record is seen within SNAPSHOT_IDLE_S.
IDLE_AFTER_S = 5.0
IDLE_POLL_MS = 2000
SNAPSHOT_IDLE_S = 2.0
AGGREGATES_INTERVAL_S = 2.0
LAYOUT_INTERVAL_S = 30.0  # full layout re-read; hot-add/removal is followed at every snapshot (probe)
STALL_S = 5.0  # /healthz fails when the main loop has not turned for this long
MODE_RANK = {"fentry": 0, "kprobe": 1, "tracepoint": 2}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, metavar="FILE",
                   help="TOML file whose keys are these flags' names (flags override it); re-read on SIGHUP")
    p.add_argument("--listen", metavar="HOST:PORT",
                   help=f"address of /metrics and the JSON API (default 127.0.0.1:{config.DEFAULT_PORT})")
    p.add_argument("--mode", metavar="MODE", help="auto (default), fentry, kprobe or tracepoint")
    p.add_argument("--settle-seconds", type=float, metavar="S",
                   help="quiet time (no event, no counter change) before drift is evaluated (default 1)")
    p.add_argument("--ring-buffer-bytes", type=int, metavar="N",
                   help="BPF ring buffer size, a power-of-two number of pages (default 4194304)")
    p.add_argument("--log-level", metavar="LEVEL", help="debug, info (default), warning or error")
    p.add_argument("--recent-events", type=int, metavar="N",
                   help="events kept for /api/v1/events (default 4096)")
    p.add_argument("--max-clients", type=int, metavar="N", help="concurrent HTTP requests (default 16)")
    p.add_argument("--max-streams", type=int, metavar="N", help="concurrent event streams (default 8)")
    p.add_argument("--web.config.file", "--web-config-file", dest="web_config_file", metavar="FILE",
                   help="exporter-toolkit web config securing the TCP listener (TLS, basic auth); "
                        "re-read on SIGHUP")
    p.add_argument("--api-socket", metavar="PATH",
                   help="Unix socket of the JSON API (default /run/hvo-observer/api.sock; '' for none)")
    p.add_argument("--api-socket-group", metavar="GROUP",
                   help="group that may use the API socket besides root")
    p.add_argument("--tcp-api", action="store_true", default=None,
                   help="also serve the JSON API on the TCP listener (behind the web config)")


def run(args: argparse.Namespace) -> int:
    overrides = {k: getattr(args, k, None) for k in config.KEYS}
    cfg = config.resolve(args.config, overrides)
    logsetup.setup(cfg.log_level)
    try:
        return Daemon(cfg, args.config, overrides).serve()
    except ObserverError:
        raise  # one line from the CLI
    except Exception:  # a bug: one log record (traceback folded into it), then a failure exit
        log.exception("unexpected error, exiting")
        return 1


def trim_heap() -> None:
    """Hand the C heap's free memory back to the kernel. bcc's compile (clang/LLVM) frees tens of
    MiB when it is done, but glibc keeps freed memory mapped in its arenas, where it would count as
    the daemon's private memory for as long as it runs; malloc_trim(0) releases every free page."""
    import ctypes

    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim): nothing to do
        return
    trim.argtypes = (ctypes.c_size_t,)
    trim.restype = ctypes.c_int
    t0 = time.monotonic()
    trim(0)
    log.debug("malloc_trim: %.1f ms", (time.monotonic() - t0) * 1e3)


class Daemon:
    def __init__(self, cfg: Config, config_path: Path | None, overrides: dict[str, object]) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self.overrides = overrides
        self.events = EventLog(cfg.recent_events)
        self.model: Model | None = None
        self.exposition: Any = None
        self.session: Any = None
        self.server: Any = None
        self.api_server: Any = None
        self.web = self._load_web(cfg)  # a broken web config fails here, before the probes are built
        self._facts: Any = None
        self._reader: Any = None
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._reload = False
        self._last_tick = time.monotonic()

    # --- Backend for the HTTP server -------------------------------------------------------
    def metrics(self, accept: str) -> tuple[bytes, str]:
        return self.exposition.render(accept)

    def health(self) -> tuple[bool, str]:
        if self._stop.is_set():
            return False, "stopping"
        if not self._ready.is_set():
            return False, "starting: attaching probes and taking the baseline"
        stalled = time.monotonic() - self._last_tick
        if stalled > STALL_S:
            return False, f"main loop stalled for {stalled:.0f} s"
        return True, "ok"

    def status(self) -> dict[str, Any]:
        if self.model is None:
            return {"version": __version__, "ready": False}
        return {**view_to_json(self.model.view()), "ready": self._ready.is_set(),
                "listen": self.server.listen, "api_socket": self.cfg.api_socket or None}

    # --- lifecycle -------------------------------------------------------------------------
    def serve(self) -> int:
        self._install_signals()
        keepalive = threading.Thread(target=self._startup_watchdog, name="startup-watchdog", daemon=True)
        keepalive.start()
        try:
            self._start()
            if not self._stop.is_set():  # SIGTERM while compiling: never claim readiness
                self._ready.set()
                sd_notify.notify("READY=1", f"STATUS={self._status_line()}")
                log.info("ready: %s", self._status_line())
                self._loop()
        finally:
            sd_notify.notify("STOPPING=1")
            self._stop.set()
            self._shutdown()
        log.info("stopped")
        return 0

    def _install_signals(self) -> None:
        def stop(signum: int, frame: FrameType | None) -> None:
            self._stop.set()

        def reload(signum: int, frame: FrameType | None) -> None:
            self._reload = True

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGHUP, reload)

    def _start(self) -> None:
        from exporters.prometheus.collector import Exposition
        from observer.kernel.facts import gather
        from observer.snapshot import SnapshotReader

        self._facts = facts = gather()
        self.model = Model.for_facts(facts, self.cfg.settle_seconds)
        specs = self.model.hstates
        self.exposition = Exposition(self.model.view)
        self.server = self._bind(self.cfg)
        self.api_server = self._bind_socket(self.cfg)
        self.server.start()
        log.info("listening on %s (/metrics, /healthz%s): %s", self.server.listen,
                 ", /api/v1" if self.cfg.tcp_api else "", self.web.describe())
        if self.api_server is not None:
            self.api_server.start()
            log.info("JSON API on %s", self.api_server.listen)
        self._reader = SnapshotReader(facts.root, facts.page_size, facts.struct_page_size or 64)
        self.session = self._start_session(self.cfg)
        if self._stop.is_set():
            return
        snap = self._reader.read()
        info = self.model.take_baseline(snap, self.session.aggregates())
        view = self.model.view()
        pools = ", ".join(f"{h} {view.optimized(h)}/{snap.pool_pages(h)} optimized" for h in specs)
        log.info("baseline: %s (%s)", pools or "no hstates",
                 "exact" if info.exact else f"not exact: {info.note}")
        self._release_startup_memory()

    @staticmethod
    def _load_web(cfg: Config) -> Any:
        from observer import web_config

        return web_config.load(Path(cfg.web_config_file)) if cfg.web_config_file else web_config.WebConfig()

    def _bind(self, cfg: Config) -> Any:
        from observer.http_api import ApiServer

        try:
            return ApiServer(cfg.address, self, cfg.max_clients, api=cfg.tcp_api, web=self.web,
                             max_streams=cfg.max_streams)
        except OSError as e:
            raise ObserverError(f"cannot listen on {cfg.listen}: {e.strerror or e}") from None

    def _bind_socket(self, cfg: Config) -> Any:
        """The JSON API's Unix socket (None when ``api_socket`` is empty)."""
        from observer.http_api import SocketGroupError, UnixApiServer

        if not cfg.api_socket:
            return None
        gid = _group_id(cfg.api_socket_group)
        try:
            return UnixApiServer(Path(cfg.api_socket), self, cfg.max_clients, max_streams=cfg.max_streams,
                                 gid=gid)
        except SocketGroupError as e:
            raise ObserverError(f"api_socket_group = {cfg.api_socket_group!r}: cannot give {cfg.api_socket} "
                                f"to that group ({e.strerror}; the daemon must be a member of it: "
                                "SupplementaryGroups= in the unit)") from None
        except OSError as e:
            missing = e.errno == errno.ENOENT
            hint = " (the unit's RuntimeDirectory= creates /run/hvo-observer)" if missing else ""
            raise ObserverError(f"cannot listen on {cfg.api_socket}: {e.strerror or e}{hint}") from None

    def _start_session(self, cfg: Config) -> Any:
        from observer.probes.session import ProbeSession, select_mode

        session = ProbeSession(cfg.mode, self._facts, self._on_event, cfg.ring_buffer_bytes)
        failed = True
        with logsetup.captured_stderr() as compiler_output:
            try:
                session.start()
                failed = False
            finally:
                lines = [line.strip() for line in compiler_output if line.strip()]
                if lines:  # warnings are routine; the verifier's log matters when loading failed
                    log.log(logging.WARNING if failed else logging.DEBUG,
                            "bcc/clang output while loading the probes: %s", " | ".join(lines))
        degraded = any(not a.ok for a in session.attachments) or bool(session.degraded_reasons)
        if cfg.mode != "auto" and not degraded:
            try:
                with logsetup.captured_stderr():  # the trial loads of better modes may print verifier logs
                    best, _ = select_mode(self._facts)
                degraded = MODE_RANK[session.mode] > MODE_RANK[best]
            except ObserverError as e:
                log.info("could not tell the best mode for this kernel (%s)", e)
        probes = tuple(ProbeState(a.target, a.event.label, a.mode, a.ok, a.reason)
                       for a in session.attachments)
        for p in probes:
            if not p.attached:
                log.warning("probe %s (%s) not attached: %s", p.probe, p.event, p.reason)
        assert self.model is not None
        self.model.set_runtime(Runtime(__version__, self._facts.release, session.mode, session.mode_reason,
                                       degraded, probes, degraded_reasons=tuple(session.degraded_reasons),
                                       nodes_known=session.nodes_known))
        log.info("probes: mode %s, %d/%d attached in %.1f s%s", session.mode, sum(p.attached for p in probes),
                 len(probes), session.startup_s, " (degraded)" if degraded else "")
        return session

    def _release_startup_memory(self) -> None:
        """Private memory the running daemon does not need. Resolving and compiling the probes
        needs the kernel's BTF (parsed, about 35 MiB of Python objects for a 6.x vmlinux) and, in
        function modes, kallsyms; nothing uses them afterwards. Deleting a KernelFacts cached
        property drops its value: a reload that restarts the probes reads them again."""
        for name in ("btf", "kallsyms"):
            with contextlib.suppress(AttributeError):  # never read (tracepoint mode: no kallsyms)
                delattr(self._facts, name)
        trim_heap()

    def _on_event(self, ev: Event) -> None:
        assert self.model is not None
        self.model.on_event(ev)
        self.events.append(ev, self.model.hstate_of_order(ev.order))

    def _loop(self) -> None:
        assert self.model is not None
        watchdog = sd_notify.watchdog_seconds()
        last_snap, next_agg, next_wd = float("-inf"), 0.0, 0.0
        agg_ns = 0
        next_layout = time.monotonic() + LAYOUT_INTERVAL_S
        layout_seen = self._reader.layout_generation
        records, active = self.session.records, time.monotonic()  # last record, or the model unsettled
        while not self._stop.is_set():
            if self.session.records != records or not self.model.settled:
                records, active = self.session.records, time.monotonic()
            idle = time.monotonic() - active >= IDLE_AFTER_S
            self.session.poll(IDLE_POLL_MS if idle else POLL_MS)
            now = time.monotonic()
            self._last_tick = now
            if now >= next_layout:
                self._reader.refresh_layout()
                next_layout = now + LAYOUT_INTERVAL_S
            if now - last_snap >= (SNAPSHOT_IDLE_S if idle else SNAPSHOT_INTERVAL_S):
                agg = None
                # Reading the per-CPU aggregates costs a ms (tens when the histogram moved): every
                # AGGREGATES_INTERVAL_S, and once more right before a quiet moment is evaluated, so a
                # loss is never judged on stale data.
                # One instant for both decisions: were the quiet moment judged later than the
                # aggregates were considered (a slow snapshot read), it could settle on stale counts.
                snap, judged_at = self._reader.read(), time.monotonic_ns()
                if self._reader.layout_generation != layout_seen:  # memory hot-added or removed
                    layout_seen = self._reader.layout_generation
                    self.session.refresh_node_map(self._reader.layout)
                due, quiet_since = self.model.settle_due(judged_at)
                if now >= next_agg or (due and agg_ns < quiet_since):
                    agg, agg_ns = self.session.aggregates(), time.monotonic_ns()
                    next_agg = now + AGGREGATES_INTERVAL_S
                self.model.observe(snap, agg, judged_at)
                last_snap = now
            if watchdog and now >= next_wd:
                sd_notify.notify("WATCHDOG=1")
                next_wd = now + watchdog / 2
            if self._reload:
                self._reload = False
                self._do_reload()

    def _startup_watchdog(self) -> None:
        """Keep systemd's watchdog fed while compiling/attaching (one blocking call); the main loop
        takes over at READY, so a hung loop is still caught."""
        watchdog = sd_notify.watchdog_seconds()
        while watchdog and not self._ready.wait(watchdog / 2) and not self._stop.is_set():
            sd_notify.notify("WATCHDOG=1")

    def _shutdown(self) -> None:
        if self.server is not None:
            self.server.stop()
        if self.api_server is not None:
            self.api_server.stop()
        if self.session is not None:
            self.session.close()

    # --- SIGHUP ----------------------------------------------------------------------------
    def _do_reload(self) -> None:
        sd_notify.notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")
        try:
            new = config.resolve(self.config_path, self.overrides)
            web = self._load_web(new)
            if web.fingerprint != self.web.fingerprint or web.path != self.web.path:
                self.web = self.server.web = web  # the next connections use it
                log.info("reload: TCP listener %s", web.describe())
            self._apply(new)
        except ObserverError as e:
            log.error("reload failed, keeping the running configuration: %s", e)
        finally:
            sd_notify.notify("READY=1", f"STATUS={self._status_line()}")

    def _apply(self, new: Config) -> None:
        old = self.cfg
        if new == old:
            log.info("reload: configuration unchanged")
            return
        assert self.model is not None
        changed = [k for k in config.KEYS if getattr(new, k) != getattr(old, k)]
        server = api_server = None
        if (new.listen, new.max_clients, new.max_streams, new.tcp_api) != (
                old.listen, old.max_clients, old.max_streams, old.tcp_api):
            server = self._bind(new)  # raises, keeping the old server, when the new address is busy
        socket_keys = ("api_socket", "api_socket_group", "max_clients", "max_streams")
        if any(getattr(new, k) != getattr(old, k) for k in socket_keys):
            if self.api_server is not None and new.api_socket == old.api_socket:
                self.api_server.stop()  # the same path: the old socket goes first
                self.api_server = None
            try:
                api_server = self._bind_socket(new)
            except ObserverError:
                if server is not None:
                    server.server_close()
                raise
        if new.mode != old.mode or new.ring_buffer_bytes != old.ring_buffer_bytes:
            try:
                self._restart_session(old, new)
            except ObserverError:
                for s in (server, api_server):
                    if s is not None:
                        s.server_close()
                raise
        if server is not None:
            server.start()
            self.server.stop()
            self.server = server
            log.info("listening on %s", server.listen)
        if any(getattr(new, k) != getattr(old, k) for k in socket_keys):
            if self.api_server is not None:
                self.api_server.stop()
            self.api_server = api_server
            if api_server is not None:
                api_server.start()
                log.info("JSON API on %s", api_server.listen)
        logsetup.set_level(new.log_level)
        self.model.set_settle_seconds(new.settle_seconds)
        self.events.resize(new.recent_events)
        self.cfg = new
        log.info("reload: applied %s", ", ".join(f"{k}={getattr(new, k)!r}" for k in changed))

    def _restart_session(self, old: Config, new: Config) -> None:
        assert self.model is not None
        self.session.close()
        self.model.session_restarted()
        try:
            self.session = self._start_session(new)
            self._release_startup_memory()
        except ObserverError as e:
            log.error("reload: cannot start probes in %s mode (%s); back to %s", new.mode, e, old.mode)
            self.session = self._start_session(old)  # if this fails too, the daemon exits with the reason
            raise ObserverError(f"probes for mode {new.mode!r} failed to start") from None

    def _status_line(self) -> str:
        if self.model is None or self.session is None:
            return "starting"
        v = self.model.view()
        opt = ", ".join(f"{s.name} {v.optimized(s.name)}/{v.pool_pages(s.name)}" for s in v.hstates)
        return f"mode {v.runtime.mode}, optimized {opt or 'none'}, listening on {self.server.listen}"


def _group_id(name: str) -> int:
    """The gid of ``api_socket_group`` (a name or a number); -1 for "" (root's group)."""
    import grp

    if not name:
        return -1
    if name.isdigit():
        return int(name)
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise ObserverError(f"api_socket_group = {name!r}: no such group") from None
