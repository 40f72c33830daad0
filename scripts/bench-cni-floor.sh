#!/usr/bin/env bash
# The kernel's share of 20 parallel CNI ADDs, with no control plane and no plugin processes:
# 20 veth pairs (host end in a bridge, peer born in its own namespace) made by one `ip -batch`,
# which the kernel serialises under its routing lock, then each peer's address, links and
# default route. Prints milliseconds per round. See docs/benchmarks.md ("CNI: ADD latency").
# Knobs: N (pairs, default 20), ROUNDS (default 5). Needs root.
set -euo pipefail
N=${N:-20}
ROUNDS=${ROUNDS:-5}
. scripts/lib/bench.sh
needs_root bench-cni-floor "network namespaces"
tag="isthfl$$"
work=$(mktemp -d)
cleanup() {
    for i in $(seq 1 "$N"); do ip netns del "$tag-c$i" 2>/dev/null || true; done
    ip netns del "$tag-node" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
now_us() { echo $(( $(date +%s%N) / 1000 )); }
echo "machine: $(nproc) CPUs, $(uname -sr); load: $(cut -d' ' -f1-3 /proc/loadavg)"
for r in $(seq 1 "$ROUNDS"); do
    ip netns add "$tag-node"
    ip -n "$tag-node" link add br0 type bridge
    ip -n "$tag-node" link set br0 up
    : > "$work/pairs"
    for i in $(seq 1 "$N"); do
        ip netns add "$tag-c$i"
        echo "link add v$i mtu 1450 master br0 up type veth peer name eth0 netns $tag-c$i" >> "$work/pairs"
        printf 'addr add 10.9.0.%d/24 dev eth0\nlink set lo up\nlink set eth0 up\nroute add default via 10.9.0.254 dev eth0\n' "$i" > "$work/in$i"
    done
    t0=$(now_us)
    ip -n "$tag-node" -batch "$work/pairs"
    t1=$(now_us)
    # Inside each namespace, one after another (one ip process each: what spawning costs is
    # in the CNI benchmark's floor row).
    for i in $(seq 1 "$N"); do ip -n "$tag-c$i" -batch "$work/in$i"; done
    t2=$(now_us)
    awk -v r="$r" -v n="$N" -v a="$((t1 - t0))" -v b="$((t2 - t1))" \
        'BEGIN { printf "round %d: %d pairs %.1f ms (%.2f ms each); inside, %d ip processes in turn %.1f ms\n", r, n, a/1000, a/1000/n, n, b/1000 }'
    cleanup
    work=$(mktemp -d)
done
