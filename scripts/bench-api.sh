#!/usr/bin/env bash
# API benchmarks against real release binaries: builds isthmus and isthmus-bench, then runs
# `isthmus-bench ports` (both store backends, 1 and 8 clients, 2,000 ports per run).
#   scripts/bench-api.sh [extra isthmus-bench ports flags, e.g. --backend embedded --ports 5000]
# Needs etcd for the etcd backend (apt-get install -y etcd-server, or set ISTHMUS_ETCD_BIN).
# Prints a table and one JSON line per run; exits non-zero if any request failed.
# See docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p isthmus-cli -p isthmus-bench
echo "machine: $(nproc) CPUs, $(uname -sr); load: $(cut -d' ' -f1-3 /proc/loadavg)"
exec target/release/isthmus-bench ports --isthmus-bin target/release/isthmus "$@"
