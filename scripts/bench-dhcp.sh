#!/usr/bin/env bash
# DHCP response latency (needs root): 1,000 DISCOVER/REQUEST exchanges between a client on a VM
# port's tap and the node's agent. See docs/benchmarks.md.
# Knob: ISTHMUS_BENCH_EXCHANGES (1000).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/bench.sh
needs_root bench-dhcp "network namespaces"
cargo build --release -p isthmus-cli --bin isthmus
export ISTHMUS_BIN="$PWD/target/release/isthmus"
echo "machine: $(nproc) CPUs, $(uname -sr); load: $(cut -d' ' -f1-3 /proc/loadavg)"
exec cargo test --release -p isthmus-agent --test dhcp -- --ignored --nocapture --test-threads=1 dhcp_latency "$@"
