#!/usr/bin/env bash
# Distributed routing benchmarks (needs root): routed vs bridged TCP throughput between two
# nodes of the test bed (iperf3, interleaved rounds), floating IP (from the external host)
# vs routed throughput into one workload, and how long after add_router_interface
# every node's workload reaches the new subnet (10 nodes). See docs/benchmarks.md, "Routers".
#   scripts/bench-l3.sh
# Knobs (environment): ISTHMUS_BENCH_NODES (10), ISTHMUS_BENCH_ROUNDS (3; convergence rounds
# are ten per three), ISTHMUS_BENCH_IPERF_SECS (3).
# Ends with one line: BENCH_JSON {"routed_ratio":..,"fip_ratio":..,"converge_p99_ms":..,...}.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/bench.sh
needs_root bench-l3 "network namespaces"
apt_ensure iperf3 iperf3
cargo build --release -p isthmus-cli --bin isthmus
export ISTHMUS_BIN="$PWD/target/release/isthmus"
machine_line

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
cargo test --release -p isthmus-agent --test bench_l3 -- --ignored --nocapture --test-threads=1 \
    2>&1 | tee "$out/tests"
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"

fig() { figure_of bench-l3 L3_FIGURE "$1" "$out/tests"; }
echo "BENCH_JSON $(jq -c -n --argjson ratio "$(fig routed_ratio)" --argjson routed "$(fig routed_gbps)" \
    --argjson bridged "$(fig bridged_gbps)" --argjson fip "$(fig fip_ratio)" --argjson fipg "$(fig fip_gbps)" \
    --argjson p50 "$(fig converge_p50_ms)" --argjson p99 "$(fig converge_p99_ms)" \
    '{routed_ratio: $ratio, routed_gbps: $routed, bridged_gbps: $bridged, fip_ratio: $fip, fip_gbps: $fipg, converge_p50_ms: $p50, converge_p99_ms: $p99}')"
