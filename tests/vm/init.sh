#!/bin/busybox sh
# PID 1 of a test guest (busybox, in the initramfs). Loads the 9p/virtio modules, mounts the host's
# root read-only (tag "host") and the writable per-guest share (tag "hvo"), then either chroots into
# the host root and runs the command loop, or (overlay/systemd modes) switch_roots into an overlay of
# the host root with a tmpfs upper layer. Boot settings come from the share's boot.env, written by the
# host: HVO_MODE (plain|overlay|systemd), HVO_ROOT_CACHE (9p cache mode of the read-only root).
/bin/busybox mkdir -p /bin /proc /sys /dev
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
exec </dev/console >/dev/console 2>&1

fail() {
    echo "hvo-init: FAILED: $*"
    poweroff -f
}

echo "hvo-init: loading modules"
for m in $(cat /modules.order); do
    insmod "/modules/$m" || fail "insmod $m"
done

P9="trans=virtio,version=9p2000.L,msize=512000"
mkdir -p /share /host
mount -t 9p -o "$P9" hvo /share || fail "mount of the share (tag hvo)"
. /share/boot.env || fail "reading boot.env from the share"
mount -t 9p -o "$P9,ro,cache=${HVO_ROOT_CACHE:-none}" host /host || fail "mount of the host root (tag host)"

# API filesystems inside a root directory ($1), for the modes that do not hand over to systemd.
api_mounts() {
    r=$1
    mount --bind /proc "$r/proc" || fail "bind /proc"
    mount --bind /sys "$r/sys" || fail "bind /sys"
    mount --bind /dev "$r/dev" || fail "bind /dev"
    mount -t devpts -o gid=5,mode=620,ptmxmode=000 devpts "$r/dev/pts"
    mount -t tmpfs -o mode=1777 tmpfs "$r/dev/shm"
    mount -t tracefs tracefs "$r/sys/kernel/tracing" || fail "mount tracefs"
    mount -t debugfs debugfs "$r/sys/kernel/debug" || fail "mount debugfs"
    mount -t bpf bpf "$r/sys/fs/bpf" || echo "hvo-init: no bpffs"
}

# Empty scratch directories: the host's /tmp must not show through (systemd-tmpfiles would walk and
# clean it over 9p for minutes). The share appears at /run/hvo; systemd keeps an existing /run.
# HVO_KEEP (the checkout) is carried over when it lives under one of them.
scratch_mounts() {
    r=$1
    keep=""
    case "$HVO_KEEP" in
    /tmp/* | /var/tmp/* | /run/*)
        keep=$HVO_KEEP
        mkdir -p /keep
        mount --bind "$r$keep" /keep || fail "bind of $keep"
        ;;
    esac
    mount -t tmpfs -o mode=1777 tmpfs "$r/tmp" || fail "tmpfs /tmp"
    mount -t tmpfs -o mode=1777 tmpfs "$r/var/tmp" || fail "tmpfs /var/tmp"
    mount -t tmpfs -o mode=755,nosuid,nodev tmpfs "$r/run" || fail "tmpfs /run"
    if [ -n "$keep" ]; then
        mkdir -p "$r$keep"
        mount --move /keep "$r$keep" || fail "moving $keep back"
    fi
    mkdir -p "$r/run/hvo"
    mount --move /share "$r/run/hvo" || fail "moving the share to /run/hvo"
}

case "$HVO_MODE" in
plain)
    api_mounts /host
    scratch_mounts /host
    echo "hvo-init: chroot into the host root"
    chroot /host /bin/sh /run/hvo/loop.sh
    echo "hvo-init: command loop ended ($?)"
    poweroff -f
    ;;
overlay | systemd)
    grep -q overlay /proc/filesystems || fail "overlayfs not available"
    mkdir -p /ovl /newroot
    mount -t tmpfs -o mode=755 tmpfs /ovl || fail "tmpfs for the overlay"
    mkdir -p /ovl/upper /ovl/work
    # Files the host put into the share's upper/ tree (units, configuration) start in the upper layer.
    if [ -d /share/upper ]; then
        cp -a /share/upper/. /ovl/upper/ || fail "copying the share's upper/ into the upper layer"
    fi
    # The host root may be a container image: hide its marker so that systemd treats the guest as a
    # machine (reads the kernel command line, runs udev) instead of a docker container.
    if [ -e /host/.dockerenv ]; then
        mknod /ovl/upper/.dockerenv c 0 0 || fail "whiteout for /.dockerenv"
    fi
    mount -t overlay overlay -o lowerdir=/host,upperdir=/ovl/upper,workdir=/ovl/work /newroot \
        || fail "mount of the overlay root"
    scratch_mounts /newroot
    if [ "$HVO_MODE" = systemd ]; then
        echo "hvo-init: switch_root into systemd"
        mount --move /dev /newroot/dev
        mount --move /proc /newroot/proc
        mount --move /sys /newroot/sys
        exec switch_root /newroot /lib/systemd/systemd
    fi
    api_mounts /newroot
    echo "hvo-init: chroot into the overlay root"
    chroot /newroot /bin/sh /run/hvo/loop.sh
    echo "hvo-init: command loop ended ($?)"
    poweroff -f
    ;;
*)
    fail "unknown HVO_MODE '$HVO_MODE'"
    ;;
esac
