#!/usr/bin/env bash
# Datapath benchmarks in network namespaces (needs root): TCP throughput with iperf3 over
# Isthmus (agents' bridge + VXLAN), over the same constructs built by hand, and over a bare
# veth; and FDB convergence across nodes after POST /v2.0/ports. See docs/benchmarks.md.
#   scripts/bench-datapath.sh [test name filter: throughput | convergence]
# Knobs (environment): ISTHMUS_BENCH_NODES (10), ISTHMUS_BENCH_PORTS (40), ISTHMUS_BENCH_ROUNDS (3).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
    echo "bench-datapath: needs root (network namespaces)" >&2
    exit 1
fi
if ! command -v iperf3 >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y iperf3 >/dev/null \
        || { apt-get update >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y iperf3 >/dev/null; }
fi
cargo build --release -p isthmus-cli --bin isthmus
export ISTHMUS_BIN="$PWD/target/release/isthmus"
echo "machine: $(nproc) CPUs, $(uname -sr); load: $(cut -d' ' -f1-3 /proc/loadavg); $(iperf3 --version | head -1)"
exec cargo test --release -p isthmus-agent --test bench_datapath -- --ignored --nocapture --test-threads=1 "$@"
