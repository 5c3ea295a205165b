#!/bin/sh
# Command loop of a test guest, run by /bin/sh of the guest root (from init, or from hvo-loop.service
# in systemd mode). The host puts command n into /run/hvo/cmd/<n>/{script,env} and then writes "n" to
# the second serial port (a FIFO on the host): a blocking read costs no CPU, while polling the share
# from a TCG guest would burn most of a host core. The script runs with cmd/<n> as working directory
# and $HVO_OUT; stdout, stderr and finally rc (renamed into place, so the host never reads a partial
# exit code) are written next to it.
share=/run/hvo
ctl=/dev/ttyS1
. "$share/guest.env"
stty -F "$ctl" raw -echo || exit 1
exec 3<"$ctl"
uname -r >"$share/ready.tmp" && mv "$share/ready.tmp" "$share/ready"
echo "HVO-GUEST-READY $(uname -r)" >/dev/console
while read -r n <&3; do
    d="$share/cmd/$n"
    [ -f "$d/script" ] || continue
    (
        cd "$d" || exit 125
        export HVO_OUT="$d"
        . "$d/env"
        # A script with its own #! line runs with that interpreter, any other with /bin/sh.
        if [ "$(head -c 2 script)" = "#!" ]; then
            exec "$d/script"
        fi
        exec /bin/sh "$d/script"
    ) </dev/null >"$d/stdout" 2>"$d/stderr" 3<&-
    echo "$?" >"$d/rc.tmp"
    mv "$d/rc.tmp" "$d/rc"
done
