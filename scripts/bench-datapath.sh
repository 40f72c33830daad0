#!/usr/bin/env bash
# Datapath benchmarks in network namespaces (needs root): TCP throughput with iperf3 over
# Isthmus (agents' bridge + VXLAN), over the same constructs built by hand, and over a bare
# veth; and FDB convergence across nodes after POST /v2.0/ports. See docs/benchmarks.md.
#   scripts/bench-datapath.sh [test name filter: throughput | convergence]
# Knobs (environment): ISTHMUS_BENCH_NODES (10), ISTHMUS_BENCH_PORTS (40), ISTHMUS_BENCH_ROUNDS (3).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/bench.sh
needs_root bench-datapath "network namespaces"
apt_ensure iperf3 iperf3
cargo build --release -p isthmus-cli --bin isthmus
export ISTHMUS_BIN="$PWD/target/release/isthmus"
machine_line
exec cargo test --release -p isthmus-agent --test bench_datapath -- --ignored --nocapture --test-threads=1 "$@"
