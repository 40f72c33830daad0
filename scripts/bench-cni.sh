#!/usr/bin/env bash
# CNI ADD latency on one test-bed node (needs root): isthmus-cni with and without the agent's
# port pool, against the reference bridge + host-local plugins, 100 sequential and 20 parallel
# ADDs each. See docs/benchmarks.md.   Knobs: ISTHMUS_BENCH_POOL (pool size, default 24),
# ISTHMUS_BENCH_SAMPLES=1 (also print every sequential sample).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/bench.sh
needs_root bench-cni "network namespaces"
if [ ! -x /usr/lib/cni/bridge ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends containernetworking-plugins >/dev/null
fi
cargo build --release -p isthmus-cli --bin isthmus -p isthmus-cni --bin isthmus-cni
export ISTHMUS_BIN="$PWD/target/release/isthmus" ISTHMUS_CNI_BIN="$PWD/target/release/isthmus-cni"
echo "machine: $(nproc) CPUs, $(uname -sr); load: $(cut -d' ' -f1-3 /proc/loadavg)"
exec cargo test --release -p isthmus-agent --test bench_cni -- --ignored --nocapture --test-threads=1 "$@"
