#!/usr/bin/env bash
# VM boot-to-IP time (needs root, qemu-system-x86): a QEMU guest (-accel tcg) on a VM port of a
# test-bed node, from spawning QEMU to the DHCP lease applied in the guest. See
# docs/benchmarks.md.   Knob: ISTHMUS_BENCH_ROUNDS (3).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/bench.sh
needs_root bench-vm "network namespaces"
scripts/vm-image.sh
cargo build --release -p isthmus-cli --bin isthmus
export ISTHMUS_BIN="$PWD/target/release/isthmus"
echo "machine: $(nproc) CPUs, $(uname -sr); load: $(cut -d' ' -f1-3 /proc/loadavg)"
exec cargo test --release -p isthmus-agent --test vm_e2e -- --ignored --nocapture --test-threads=1 vm_boot_to_ip "$@"
