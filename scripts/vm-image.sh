#!/usr/bin/env bash
# Builds the test VM: Debian's kernel and a busybox initramfs, from Debian packages.
#   scripts/vm-image.sh [OUT_DIR]        (default: target/vm; skips the work if already built)
# Produces OUT_DIR/vmlinuz and OUT_DIR/initramfs.gz. The guest loads virtio-net, runs udhcpc
# on eth0, prints what it got between markers on its serial console, then runs the command
# given on the kernel command line (isthmus.cmd=<base64>, or isthmus.cmdz=<base64 of gzip>) and powers off. isthmus.tries=N sets
# how many DISCOVERs udhcpc sends (default 20, one a second).
# For containers nested in the guest it also loads 8021q and macvlan, has unshare/nsenter, and
# carries isthmus-cni as /bin/isthmus-cni ($ISTHMUS_GUEST_CNI, default target/release/isthmus-cni,
# stripped, with the shared libraries it needs). A second NIC (eth1, the tests' management
# path over QEMU's user network) gets 10.0.2.15/24 statically.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-target/vm}
cni=${ISTHMUS_GUEST_CNI:-target/release/isthmus-cni}
[ -x "$cni" ] || { echo "vm-image: $cni missing (cargo build --release -p isthmus-cni, or set ISTHMUS_GUEST_CNI)" >&2; exit 1; }
# Rebuilt when this script or the plugin changes.
stamp="$(cksum <scripts/vm-image.sh) $(cksum <"$cni")"
if [ -s "$out/vmlinuz" ] && [ -s "$out/initramfs.gz" ] && [ "$(cat "$out/stamp" 2>/dev/null)" = "$stamp" ]; then
    exit 0
fi
mkdir -p "$out"
need=()
command -v busybox >/dev/null && [ -x /bin/busybox ] || need+=(busybox-static)
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
if [ ${#need[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null \
        || { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null; }
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# The kernel package linux-image-amd64 points at, downloaded and unpacked (not installed).
pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-/ {print $2; exit}')
[ -n "$pkg" ] || { echo "vm-image: cannot resolve linux-image-amd64" >&2; exit 1; }
(cd "$work" && { apt-get download "$pkg" >/dev/null 2>&1 || { apt-get update -qq && apt-get download "$pkg" >/dev/null; }; })
dpkg-deb -x "$work"/"$pkg"_*.deb "$work/k"
cp "$work"/k/boot/vmlinuz-* "$out/vmlinuz"
kver=$(basename "$work"/k/lib/modules/*)

root="$work/root"
mkdir -p "$root"/{bin,dev,proc,sys,etc,tmp,run,modules,usr/share/udhcpc}
cp /bin/busybox "$root/bin/busybox"
for tool in sh ip ping ping6 udhcpc insmod lsmod cat echo sleep mount base64 poweroff ifconfig route hostname nc \
    unshare nsenter mkdir kill ls grep sed wget chmod rm ps timeout env stat gunzip awk seq wc cut; do
    ln -s busybox "$root/bin/$tool"
done
# The plugin and what the dynamic linker needs for it (libc, libgcc_s, the loader itself).
strip -o "$root/bin/isthmus-cni" "$cni"
# iperf3 for the nested benchmark (scripts/bench-nested.sh), when the host has it.
bins=("$cni")
if command -v iperf3 >/dev/null; then
    cp "$(command -v iperf3)" "$root/bin/iperf3"
    bins+=("$(command -v iperf3)")
fi
for lib in $(for b in "${bins[@]}"; do ldd "$b"; done | grep -o '/[^ ]*' | sort -u); do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
done
# virtio-net is a module in Debian's kernel; these are its dependencies, in load order. Then
# 802.1Q (llc, stp, garp, mrp before it) and macvlan, for nested containers.
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci failover net_failover virtio_net \
    llc stp garp mrp 8021q macvlan; do
    f=$(find "$work/k/lib/modules/$kver" -name "$m.ko*" | head -1)
    [ -n "$f" ] || { echo "vm-image: module $m not found in $pkg" >&2; exit 1; }
    case "$f" in
        *.xz) xz -dc "$f" >"$root/modules/$m.ko" ;;
        *.zst) zstd -qdc "$f" >"$root/modules/$m.ko" ;;
        *) cp "$f" "$root/modules/$m.ko" ;;
    esac
done

cat >"$root/usr/share/udhcpc/default.script" <<'EOS'
#!/bin/sh
# udhcpc hook: apply the lease (address, MTU, routes incl. option 121, DNS).
action=$1
case "$action" in
    deconfig) ip addr flush dev "$interface"; ip link set "$interface" up ;;
    bound|renew)
        ip addr flush dev "$interface"
        ip addr add "$ip/$mask" dev "$interface"
        [ -n "$mtu" ] && ip link set "$interface" mtu "$mtu"
        if [ -n "$staticroutes" ]; then
            set -- $staticroutes
            while [ $# -ge 2 ]; do ip route add "$1" via "$2" dev "$interface"; shift 2; done
        elif [ -n "$router" ]; then
            for r in $router; do ip route add default via "$r" dev "$interface"; break; done
        fi
        : >/etc/resolv.conf
        for d in $dns; do echo "nameserver $d" >>/etc/resolv.conf; done
        echo "ISTHMUS-LEASE $action ip=$ip mask=$mask mtu=$mtu router=$router lease=$lease"
        ;;
esac
exit 0
EOS
chmod +x "$root/usr/share/udhcpc/default.script"

cat >"$root/init" <<'EOS'
#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci failover net_failover virtio_net \
    llc stp garp mrp 8021q macvlan; do
    insmod /modules/$m.ko
done
ip link set lo up
ip link set eth0 up
# The management NIC, when the test gave one: QEMU's user network, no DHCP needed.
if [ -e /sys/class/net/eth1 ]; then
    ip link set eth1 up
    ip addr add 10.0.2.15/24 dev eth1
    echo "ISTHMUS-MGMT up"
fi
echo "ISTHMUS-BOOTED"
tries=$(sed -n 's/.*isthmus\.tries=\([0-9]*\).*/\1/p' /proc/cmdline)
if udhcpc -i eth0 -s /usr/share/udhcpc/default.script -t "${tries:-20}" -T 1 -A 1 -n; then echo "ISTHMUS-DHCP ok"; else echo "ISTHMUS-DHCP failed"; fi
echo "ISTHMUS-STATE-BEGIN"
ip -4 addr show dev eth0
ip -4 route
cat /sys/class/net/eth0/mtu | sed 's/^/mtu /'
cat /etc/resolv.conf
echo "ISTHMUS-STATE-END"
cmd=$(sed -n 's/.*isthmus\.cmd=\([^ ]*\).*/\1/p' /proc/cmdline | base64 -d 2>/dev/null)
# A longer command comes gzipped (the kernel command line holds 2 KiB).
[ -n "$cmd" ] || cmd=$(sed -n 's/.*isthmus\.cmdz=\([^ ]*\).*/\1/p' /proc/cmdline | base64 -d 2>/dev/null | gunzip 2>/dev/null)
if [ -n "$cmd" ]; then
    echo "ISTHMUS-CMD-BEGIN"
    sh -c "$cmd"
    echo "ISTHMUS-CMD-END rc=$?"
fi
echo "ISTHMUS-DONE"
poweroff -f
EOS
chmod +x "$root/init"

(cd "$root" && find . | busybox cpio -o -H newc 2>/dev/null | gzip -1) >"$out/initramfs.gz.tmp"
mv "$out/initramfs.gz.tmp" "$out/initramfs.gz"
echo "$stamp" >"$out/stamp"
echo "vm-image: $out/vmlinuz ($pkg) and $out/initramfs.gz"
