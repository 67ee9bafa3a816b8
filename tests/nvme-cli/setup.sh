#!/usr/bin/env bash
# Prepare everything the nvme-cli QEMU harness needs on a Debian 12 host:
#   * apt packages (qemu, nvme-cli, fio, busybox-static, cpio, kmod, ..., etcd-server for the
#     management state in etcd, protobuf-compiler for the etcd client's build)
#   * a Debian kernel (vmlinuz + modules) unpacked into the cache directory
#   * a base initramfs (busybox, nvme, fio, blkdiscard, modules, libraries,
#     /init from guest-init.sh)
#
# Idempotent: every step is skipped when its output already exists and is
# up to date.  Prints KEY=VALUE lines at the end (consumed by run.py).
#
# Environment:
#   TESSERA_GUEST_CACHE   cache dir (default: $REPO/target/nvme-cli-guest)
#   TESSERA_GUEST_REBUILD=1  force a rebuild of the base initramfs
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
CACHE="${TESSERA_GUEST_CACHE:-$REPO/target/nvme-cli-guest}"

log() { echo "[setup] $*" >&2; }
die() { echo "[setup] ERROR: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || SUDO=sudo
SUDO="${SUDO:-}"

# ---------------------------------------------------------------- packages --
APT_PKGS=(qemu-system-x86 nvme-cli fio busybox-static cpio kmod util-linux xz-utils python3 etcd-server protobuf-compiler)
APT_UPDATED=0
apt_update_once() {
    if [ "$APT_UPDATED" = 0 ]; then
        log "apt-get update"
        $SUDO apt-get update -q >&2 || die "apt-get update failed"
        APT_UPDATED=1
    fi
}

missing=()
for p in "${APT_PKGS[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$p")
    fi
done
if [ "${#missing[@]}" -gt 0 ]; then
    log "installing: ${missing[*]}"
    apt_update_once
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        "${missing[@]}" >&2 || die "apt-get install failed"
fi
for c in qemu-system-x86_64 nvme fio cpio depmod modprobe blkdiscard ldd; do
    command -v "$c" >/dev/null || die "command $c not found after install"
done
BUSYBOX=/bin/busybox
[ -x "$BUSYBOX" ] || die "$BUSYBOX missing (busybox-static)"
# busybox-static must be the static one: the guest runs it before any lib dir
# layout matters, and it is our /bin/sh.
if ldd "$BUSYBOX" >/dev/null 2>&1; then
    die "$BUSYBOX is dynamically linked; install busybox-static"
fi

mkdir -p "$CACHE"

# ------------------------------------------------------------------ kernel --
KDIR="$CACHE/kernel"
if [ ! -s "$CACHE/kver" ] || [ ! -s "$CACHE/vmlinuz" ] || [ ! -d "$KDIR/lib/modules/$(cat "$CACHE/kver")" ]; then
    kpkg=""
    for attempt in 1 2; do
        kpkg="$(apt-cache depends linux-image-amd64 2>/dev/null \
                 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')"
        [ -n "$kpkg" ] && break
        apt_update_once
    done
    [ -n "$kpkg" ] || die "cannot resolve the kernel package linux-image-amd64 depends on"
    log "downloading kernel package $kpkg"
    dl="$CACHE/dl"
    rm -rf "$dl" "$KDIR"
    mkdir -p "$dl"
    # apt's sandbox user cannot write into root-owned dirs; that is only a warning.
    (cd "$dl" && apt-get download "$kpkg" >&2) || { apt_update_once; (cd "$dl" && apt-get download "$kpkg" >&2); }
    deb="$(ls "$dl"/*.deb | head -n1)"
    [ -f "$deb" ] || die "kernel .deb not downloaded"
    log "unpacking $(basename "$deb")"
    mkdir -p "$KDIR.tmp"
    dpkg-deb -x "$deb" "$KDIR.tmp"
    mv "$KDIR.tmp" "$KDIR"
    # some releases ship modules under usr/lib/modules (merged /usr)
    if [ ! -d "$KDIR/lib/modules" ] && [ -d "$KDIR/usr/lib/modules" ]; then
        mkdir -p "$KDIR/lib"; ln -s ../usr/lib/modules "$KDIR/lib/modules"
    fi
    kver="$(ls "$KDIR/lib/modules" | head -n1)"
    [ -n "$kver" ] || die "no modules directory in kernel package"
    cp "$KDIR/boot/vmlinuz-$kver" "$CACHE/vmlinuz"
    depmod -b "$KDIR" "$kver"
    echo "$kver" > "$CACHE/kver"
    rm -rf "$dl"
fi
KVER="$(cat "$CACHE/kver")"

# -------------------------------------------------------- base initramfs --
# Modules needed by the initiator (host side of the test) ...
INIT_MODS=(virtio_pci virtio_net virtio_blk crc32c_generic crc32c-intel nvme-tcp)
# ... and, optionally, by a Linux nvmet target (run.py --reference; brd for --kernel-compare).
NVMET_MODS=(configfs null_blk brd nvmet nvmet-tcp)

STAMP_SRC="$( { cat "$HERE/setup.sh" "$HERE/guest-init.sh"; echo "$KVER";
               for b in "$BUSYBOX" "$(command -v nvme)" "$(command -v fio)" "$(command -v blkdiscard)"; do
                   sha256sum "$b"; done; } | sha256sum | cut -c1-16)"
BASE="$CACHE/base.cpio"
if [ "${TESSERA_GUEST_REBUILD:-0}" != 1 ] && [ -s "$BASE" ] && [ "$(cat "$CACHE/base.stamp" 2>/dev/null)" = "$STAMP_SRC" ]; then
    log "base initramfs up to date ($BASE)"
else
    log "building base initramfs"
    ROOT="$CACHE/rootfs"
    rm -rf "$ROOT"
    mkdir -p "$ROOT"/{bin,sbin,etc/nvme,proc,sys,dev,tmp,run,root,mnt,var/log,lib/x86_64-linux-gnu,lib64}
    mkdir -p "$ROOT/usr"
    ln -s ../lib "$ROOT/usr/lib"          # merged-usr: /usr/lib == /lib
    ln -s ../bin "$ROOT/usr/bin"
    ln -s ../sbin "$ROOT/usr/sbin"

    cp "$BUSYBOX" "$ROOT/bin/busybox"
    for applet in $("$BUSYBOX" --list); do
        case "$applet" in busybox) continue ;; esac
        [ -e "$ROOT/bin/$applet" ] || ln -s busybox "$ROOT/bin/$applet"
    done
    # real binaries override busybox applets of the same name
    for b in nvme fio blkdiscard; do
        rm -f "$ROOT/bin/$b"
        cp -L "$(command -v "$b")" "$ROOT/bin/$b"
    done

    # shared libraries (+ the dynamic loader) as ldd reports them
    copy_lib() {
        local src="$1" rel dst
        rel="${src#/}"
        case "$rel" in usr/lib/*) rel="lib/${rel#usr/lib/}" ;; esac
        dst="$ROOT/$rel"
        [ -e "$dst" ] && return 0
        mkdir -p "$(dirname "$dst")"
        cp -L "$src" "$dst"
    }
    for b in nvme fio blkdiscard; do
        ldd "$ROOT/bin/$b" | awk '/=> \// {print $3} /^[[:space:]]*\/[^ ]+ \(/ {print $1}' \
        | while read -r lib; do copy_lib "$lib"; done
    done
    # loader at the path ELF interpreters name, plus the multiarch one
    interp=/lib64/ld-linux-x86-64.so.2
    cp -L "$interp" "$ROOT/lib64/ld-linux-x86-64.so.2"
    [ -e "$ROOT/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2" ] || \
        cp -L "$interp" "$ROOT/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
    mkdir -p "$ROOT/etc"
    printf '/lib/x86_64-linux-gnu\n/lib/x86_64-linux-gnu/ceph\n' > "$ROOT/etc/ld.so.conf"
    ldconfig -r "$ROOT" 2>/dev/null || true

    # kernel modules in dependency order, decompressed if needed
    MODDIR="$KDIR/lib/modules/$KVER"
    mkdir -p "$ROOT/lib/modules/$KVER"
    : > "$ROOT/etc/modules.order"
    : > "$ROOT/etc/modules-nvmet.order"
    add_mods() {
        local list="$1"; shift
        modprobe -S "$KVER" -d "$KDIR" --show-depends -a "$@" \
        | awk '$1 == "insmod" {print $2}' \
        | while read -r ko; do
            rel="${ko#"$MODDIR"/}"
            out="${rel%.xz}"; out="${out%.zst}"; out="${out%.gz}"
            if [ ! -e "$ROOT/lib/modules/$KVER/$out" ]; then
                mkdir -p "$(dirname "$ROOT/lib/modules/$KVER/$out")"
                case "$ko" in
                    *.xz)  xz -dc "$ko" > "$ROOT/lib/modules/$KVER/$out" ;;
                    *.zst) zstd -dc "$ko" > "$ROOT/lib/modules/$KVER/$out" ;;
                    *.gz)  gzip -dc "$ko" > "$ROOT/lib/modules/$KVER/$out" ;;
                    *)     cp "$ko" "$ROOT/lib/modules/$KVER/$out" ;;
                esac
            fi
            grep -qxF "$out" "$ROOT/etc/modules.order" "$list" 2>/dev/null || echo "$out" >> "$list"
        done
    }
    add_mods "$ROOT/etc/modules.order" "${INIT_MODS[@]}"
    add_mods "$ROOT/etc/modules-nvmet.order" "${NVMET_MODS[@]}"
    for m in "${INIT_MODS[@]}" "${NVMET_MODS[@]}"; do
        mm="$(echo "$m" | tr - _)"
        grep -q "/${m}.ko\|/${mm}.ko" "$ROOT/etc/modules.order" "$ROOT/etc/modules-nvmet.order" \
            || die "module $m not found in kernel $KVER"
    done
    cp "$MODDIR"/modules.builtin* "$ROOT/lib/modules/$KVER/" 2>/dev/null || true
    cp "$MODDIR"/modules.order "$ROOT/lib/modules/$KVER/" 2>/dev/null || true
    depmod -b "$ROOT" "$KVER"

    cp "$HERE/guest-init.sh" "$ROOT/init"
    chmod 755 "$ROOT/init"
    echo "$KVER" > "$ROOT/etc/kver"

    # sanity (needs root for chroot): every binary's libraries resolve inside the rootfs
    [ "$(id -u)" = 0 ] && for b in nvme fio blkdiscard; do
        if ! chroot "$ROOT" /bin/$b --version >/dev/null 2>&1 && \
           ! chroot "$ROOT" /bin/$b version >/dev/null 2>&1; then
            die "$b does not run inside the staged rootfs (missing library?)"
        fi
    done

    (cd "$ROOT" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet) > "$BASE.tmp"
    mv "$BASE.tmp" "$BASE"
    echo "$STAMP_SRC" > "$CACHE/base.stamp"
    rm -rf "$ROOT"
    log "base initramfs: $BASE ($(du -h "$BASE" | cut -f1))"
fi

echo "KERNEL=$CACHE/vmlinuz"
echo "INITRD=$BASE"
echo "KVER=$KVER"
