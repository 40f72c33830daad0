#!/usr/bin/env bash
# The first experience: one network with a VM and a container on it, pinging each other.
# Needs `scripts/up.sh` running in another shell (as root: it runs this machine's node agent).
#   scripts/demo.sh          create (or reuse) the demo and show the pings
#   scripts/demo.sh --clean  remove what the demo made
set -euo pipefail
cd "$(dirname "$0")/.."
data=${ISTHMUS_DATA_DIR:-/var/lib/isthmus}
[ -f "$data/openrc" ] || { echo "demo: $data/openrc missing; start scripts/up.sh first" >&2; exit 1; }
# shellcheck disable=SC1091
source "$data/openrc"
[ "$(id -u)" -eq 0 ] || { echo "demo: run as root (QEMU, podman)" >&2; exit 1; }

demo="$data/demo"
mkdir -p "$demo/net.d" "$demo/bin"
export CONTAINERS_CONF="$demo/containers.conf"
cat >"$CONTAINERS_CONF" <<EOF
[network]
network_backend = "cni"
cni_plugin_dirs = ["$demo/bin", "/usr/lib/cni"]
network_config_dir = "$demo/net.d"
EOF
podman_run=(podman run --runtime /usr/sbin/runc --ulimit nofile=1024:1024 --ulimit nproc=1000:1000)

if [ "${1:-}" = "--clean" ]; then
    podman rm -f -t 0 isthmus-demo-ctr >/dev/null 2>&1 || true
    [ -f "$demo/qemu.pid" ] && kill "$(cat "$demo/qemu.pid")" 2>/dev/null || true
    openstack port delete demo-vm >/dev/null 2>&1 || true
    # The node's ready container ports go too (the agent may make a new one meanwhile: retry).
    for _ in 1 2 3 4 5; do
        openstack port list --network demo-net -f value -c ID 2>/dev/null | xargs -r openstack port delete >/dev/null 2>&1 || true
        openstack network delete demo-net >/dev/null 2>&1 && break
        sleep 1
    done
    rm -rf "$demo"
    echo "demo: removed"
    exit 0
fi

for tool in qemu-system-x86_64 podman openstack; do
    command -v "$tool" >/dev/null || { echo "demo: $tool missing; run scripts/setup.sh --test" >&2; exit 1; }
done
step() { printf '\n== %s\n' "$*"; }

step "a network with DHCP"
openstack network show demo-net >/dev/null 2>&1 || openstack network create demo-net >/dev/null
openstack subnet show demo-subnet >/dev/null 2>&1 \
    || openstack subnet create --network demo-net --subnet-range 10.99.0.0/24 --dns-nameserver 10.99.0.1 demo-subnet >/dev/null
openstack network show demo-net -c id -c name -c mtu -c provider:segmentation_id

step "a VM port on this node (as a compute service would create it)"
openstack port show demo-vm >/dev/null 2>&1 \
    || openstack port create --network demo-net --device-owner compute:demo --host local demo-vm >/dev/null
port_id=$(openstack port show demo-vm -f value -c id)
vm_mac=$(openstack port show demo-vm -f value -c mac_address)
vm_ip=$(openstack port show demo-vm -f json -c fixed_ips | python3 -c 'import json,sys; print(json.load(sys.stdin)["fixed_ips"][0]["ip_address"])')
tap="tap${port_id:0:11}"
for _ in $(seq 100); do ip link show "$tap" >/dev/null 2>&1 && break; sleep 0.1; done
echo "port $port_id  mac $vm_mac  ip $vm_ip  tap $tap (made by the agent)"

step "a container on the same network (podman, CNI backend, isthmus-cni)"
cp target/release/isthmus-cni "$demo/bin/isthmus-cni"
cat >"$demo/net.d/isthmus-demo.conflist" <<EOF
{"cniVersion": "1.0.0", "name": "isthmus-demo",
 "plugins": [{"type": "isthmus-cni", "network": "demo-net", "project": "admin",
              "socket": "/run/isthmus/agent.sock", "capabilities": {"ips": true, "mac": true}}]}
EOF
if ! podman image exists localhost/isthmus-busybox; then
    root=$(mktemp -d); mkdir -p "$root/bin"; cp /bin/busybox "$root/bin/"
    for t in sh ip ping sleep; do ln -s busybox "$root/bin/$t"; done
    tar -C "$root" -c . | podman import - localhost/isthmus-busybox >/dev/null; rm -rf "$root"
fi
if ! podman container exists isthmus-demo-ctr; then
    "${podman_run[@]}" -d --name isthmus-demo-ctr --cap-add NET_RAW --network isthmus-demo \
        localhost/isthmus-busybox sleep 86400 >/dev/null
fi
ctr_ip=$(podman exec isthmus-demo-ctr ip -4 -o addr show eth0 | awk '{print $4}' | cut -d/ -f1)
echo "container isthmus-demo-ctr  ip $ctr_ip"

step "boot the VM (QEMU, TCG); it gets its address by DHCP from this node's agent"
scripts/vm-image.sh
[ -f "$demo/qemu.pid" ] && kill "$(cat "$demo/qemu.pid")" 2>/dev/null && sleep 1
cmd=$(printf 'ping -c 3 -W 2 %s; sleep 600' "$ctr_ip" | base64 -w0)
: >"$demo/console.log"
qemu-system-x86_64 -accel tcg -m 192 -no-reboot -display none -monitor none \
    -kernel target/vm/vmlinuz -initrd target/vm/initramfs.gz \
    -append "console=ttyS0 quiet panic=-1 isthmus.cmd=$cmd" \
    -netdev "tap,id=n0,ifname=$tap,script=no,downscript=no" -device "virtio-net-pci,netdev=n0,mac=$vm_mac" \
    -serial "file:$demo/console.log" -pidfile "$demo/qemu.pid" -daemonize
for _ in $(seq 600); do grep -q 'packet loss' "$demo/console.log" && break; sleep 0.2; done
sed -n '/ISTHMUS-LEASE/p; /ISTHMUS-STATE-BEGIN/,/ISTHMUS-STATE-END/p; /PING/,/packet loss/p' "$demo/console.log" \
    | grep -v '^ISTHMUS-STATE'

step "and the container pings the VM back"
podman exec isthmus-demo-ctr ping -c 3 -W 2 "$vm_ip"

step "the ports: the VM's and the container's ACTIVE (the others: the node's pool of ready container ports)"
openstack port list --network demo-net -c ID -c "Fixed IP Addresses" -c Status
echo
echo "VM console: $demo/console.log.  Clean up: scripts/demo.sh --clean"
