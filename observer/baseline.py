"""How many huge pages are vmemmap-optimized right now, from the kernel's counters alone.

The daemon cannot have seen the events of pages optimized before it started (boot-time
``hugepages=``, earlier sysctl writes, a daemon restart), so its start-up state comes from here.

6.11+ kernels count the live vmemmap (``nr_memmap_pages + nr_memmap_boot_pages``); the pages HVO
saved are ``S = full - live``. With ``n_h`` optimized pages of hstate ``h`` freeing ``f_h`` pages each,
``sum(n_h * f_h) = S`` and ``0 <= n_h <= pool_h``. With a single pool (or none) the answer is unique.
With several it can be ambiguous: on x86-64 ``585 * 7 = 4095``, so 585 optimized 2 MiB pages free
exactly what one optimized 1 GiB page frees. No interface shows the per-page flag
(``HPG_vmemmap_optimized`` lives in ``folio->private``; /proc/kpageflags does not export it, and the
kernel hides the remapped "fake head" from it), so an ambiguous split is resolved by a stated rule
and reported as not exact:

1. prefer splits in which every pool is all-or-nothing optimized (HVO settings change rarely, so
   mixed pools are the exception);
2. then the split that attributes more pages to the larger hstate.

The counters are global, so the per-node split is exact only when a pool lives on one node or is
all-or-nothing optimized; otherwise optimized pages are spread over nodes in proportion to the
pool (largest remainder) and reported as not exact.

Before 6.11 there is no byte truth at all: pools are assumed optimized when HVO is on now (sysctl, or
the boot parameter on kernels without the sysctl) and not otherwise; always reported as not exact.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

# Enumerating splits is cheap for real pools (the loop runs over all but the smallest hstate); this
# bound keeps a pathological input (thousands of pages in several large hstates) from stalling.
MAX_STEPS = 200_000


@dataclass(frozen=True)
class Split:
    counts: dict[str, int]  # optimized pages per hstate
    exact: bool  # the only split consistent with the counters
    candidates: int  # how many splits fit the counters (capped by MAX_STEPS)
    residual_pages: int  # saved pages the split does not explain (0 when the counters fit)
    note: str


def split_saved_pages(saved_pages: int, pools: Mapping[str, int], freeable: Mapping[str, int]) -> Split:
    """Optimized pages per hstate explaining ``saved_pages``; see the module docstring for the rules."""
    names = sorted((h for h in pools if freeable.get(h, 0) > 0 and pools[h] > 0),
                   key=lambda h: freeable[h], reverse=True)
    zero = {h: 0 for h in pools}
    if not names:
        note = "no pool can be optimized" if saved_pages == 0 else "saved pages but no optimizable pool"
        return Split(zero, saved_pages == 0, 1, saved_pages, note)

    solutions: list[dict[str, int]] = []
    best_miss: tuple[int, dict[str, int]] | None = None
    steps = 0
    truncated = False

    def walk(i: int, remaining: int, chosen: dict[str, int]) -> None:
        nonlocal steps, best_miss, truncated
        h = names[i]
        f, cap = freeable[h], pools[h]
        if i == len(names) - 1:
            n = min(max(remaining // f, 0), cap)
            for cand in {n, min(n + 1, cap)}:  # nearest counts below and above, for the residual
                miss = remaining - cand * f
                full = {**chosen, h: cand}
                if miss == 0:
                    solutions.append(full)
                elif best_miss is None or abs(miss) < abs(best_miss[0]):
                    best_miss = (miss, full)
            return
        for n in range(min(cap, max(remaining // f, 0)), -1, -1):
            steps += 1
            if steps > MAX_STEPS:
                truncated = True
                return
            walk(i + 1, remaining - n * f, {**chosen, h: n})

    walk(0, saved_pages, {})
    if not solutions:
        assert best_miss is not None
        miss, counts = best_miss
        return Split({**zero, **counts}, False, 0, miss,
                     f"the counters fit no split: {miss} saved page(s) unexplained (pages optimized "
                     "outside the pools, memory hotplug, or counters read mid-operation)")
    if len(solutions) == 1 and not truncated:
        return Split({**zero, **solutions[0]}, True, 1, 0, "the only split that fits the counters")

    def preference(s: dict[str, int]) -> tuple[int, ...]:
        uniform = sum(1 for h in names if s[h] in (0, pools[h]))
        return (uniform, *(s[h] for h in names))  # names: largest freeable first

    best = max(solutions, key=preference)
    shown = ", ".join(f"{h}={best[h]}" for h in names)
    return Split({**zero, **best}, False, len(solutions), 0,
                 f"{len(solutions)}{'+' if truncated else ''} splits fit the counters; chose {shown} "
                 "(all-or-nothing pools first, then larger pages)")


def split_by_node(optimized: int, node_pools: Mapping[int, int]) -> tuple[dict[int, int], bool]:
    """Spread ``optimized`` pages of one hstate over its nodes; second value: whether that is exact."""
    nodes = {n: p for n, p in node_pools.items() if p > 0}
    total = sum(nodes.values())
    result = {n: 0 for n in node_pools}
    if optimized <= 0 or total == 0:
        return result, optimized <= 0
    if optimized >= total:
        result.update(nodes)
        return result, optimized == total
    if len(nodes) == 1:
        (n,) = nodes
        result[n] = optimized
        return result, True
    # Largest remainder: proportional to the pool on each node.
    shares = {n: optimized * p / total for n, p in nodes.items()}
    for n, s in shares.items():
        result[n] = int(s)
    left = optimized - sum(result[n] for n in nodes)
    for n in sorted(nodes, key=lambda n: (shares[n] - int(shares[n]), -n), reverse=True)[:left]:
        result[n] += 1
    return result, False


def assume_from_setting(pools: Mapping[str, int], freeable: Mapping[str, int], hvo_on: bool) -> Split:
    """Kernels without vmemmap counters: assume every optimizable pool follows the current setting."""
    counts = {h: (p if hvo_on and freeable.get(h, 0) > 0 else 0) for h, p in pools.items()}
    return Split(counts, False, 0, 0,
                 "no vmemmap counters (kernel < 6.11): pools assumed "
                 f"{'optimized (HVO is on)' if hvo_on else 'not optimized (HVO is off)'}")
