#!/usr/bin/env bash
# Containers nested in a VM (needs root, QEMU with TCG): a nested-vlan container's TCP
# throughput to a bare-metal container on another node against the VM's own untagged traffic
# on the same path (iperf3 inside the guest, interleaved rounds), and the nested plugin's ADD
# latency inside the VM (spawn to exit; 20 sequential, then 10 parallel). See
# docs/benchmarks.md, "Nested containers".
#   scripts/bench-nested.sh
# Knobs (environment): ISTHMUS_BENCH_ROUNDS (3), ISTHMUS_BENCH_IPERF_SECS (5).
# Ends with one line: BENCH_JSON {"throughput_ratio":..,"add_seq_p50_ms":..,"add_par_p99_ms":..,...}.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/bench.sh
needs_root bench-nested "network namespaces and QEMU"
apt_ensure iperf3 iperf3
apt_ensure qemu-system-x86_64 qemu-system-x86
cargo build --release -p isthmus-cli --bin isthmus -p isthmus-cni
export ISTHMUS_BIN="$PWD/target/release/isthmus"
export ISTHMUS_CNI_BIN="$PWD/target/release/isthmus-cni"
machine_line

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
cargo test --release -p isthmus-agent --test nested_e2e -- --ignored --nocapture --test-threads=1 nested_bench \
    2>&1 | tee "$out/tests"
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
line=$(grep -o 'BENCH_JSON {.*}' "$out/tests" | tail -1)
[ -n "$line" ] || { echo "bench-nested: no figures (see the output above)" >&2; exit 1; }
echo "$line"
