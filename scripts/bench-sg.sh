#!/usr/bin/env bash
# Security group benchmarks (needs root): firewall programming cost (`isthmus-bench firewall`:
# 1,000 ports, 20 groups x 50 rules, a 5,000-member remote group, from an empty table), TCP
# throughput with a 100-rule group vs port security off (iperf3, two nodes of the test bed),
# and how long a new rule / a new remote group member takes to reach every node's firewall
# (10 nodes). See docs/benchmarks.md, "Security groups".
#   scripts/bench-sg.sh
# Knobs (environment): ISTHMUS_BENCH_NODES (10), ISTHMUS_BENCH_ROUNDS (3; propagation rounds
# are ten times as many).
# Ends with one line: BENCH_JSON {"throughput_ratio":..,"program_ms":..,"rule_p99_ms":..,
# "member_p99_ms":..,"nft_objects":..,"product_objects":..}
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/bench.sh
needs_root bench-sg "network namespaces, nftables"
apt_ensure iperf3 iperf3
cargo build --release -p isthmus-cli --bin isthmus -p isthmus-bench --bin isthmus-bench
export ISTHMUS_BIN="$PWD/target/release/isthmus"
machine_line

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

target/release/isthmus-bench firewall | tee "$out/firewall"
fw=$(grep '^{' "$out/firewall" | tail -1)

cargo test --release -p isthmus-agent --test bench_sg -- --ignored --nocapture --test-threads=1 \
    2>&1 | tee "$out/tests"
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"

fig() { figure_of bench-sg SG_FIGURE "$1" "$out/tests"; }
ratio=$(fig throughput_ratio)
rule=$(fig rule_p99_ms)
member=$(fig member_p99_ms)
echo "BENCH_JSON $(jq -c -n --argjson fw "$fw" --argjson ratio "$ratio" --argjson rule "$rule" --argjson member "$member" \
    '{throughput_ratio: $ratio, program_ms: $fw.program_ms, rule_p99_ms: $rule, member_p99_ms: $member,
      nft_objects: $fw.nft_objects, product_objects: $fw.product_objects}')"
