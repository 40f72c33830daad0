#!/usr/bin/env bash
# Sets up and runs every test: formatting, lints, unit and integration tests (embedded store and
# a real etcd), the openstack CLI, and tempest's network API tests against `isthmus up`.
# Last line: "N passed, N failed".
set -uo pipefail
cd "$(dirname "$0")/.."
mkdir -p target
log=target/test-results.log
# A one-shot run on a fresh clone gains nothing from incremental state, which would double the
# target directory's size on disk.
[ "${CI:-}" = true ] && export CARGO_INCREMENTAL=0
: >"$log"
failed_steps=()

step() { # name, command...
  local name=$1 start=$SECONDS; shift
  echo "== $name"
  if "$@"; then echo "== $name: ok ($((SECONDS - start)) s)"
  else echo "== $name: FAILED ($((SECONDS - start)) s)"; failed_steps+=("$name"); fi
}

scripts/setup.sh --test || { echo "setup failed"; echo "0 passed, 1 failed"; exit 1; }
echo "== setup: ok ($SECONDS s)"
# Tests that run the executables take the ones setup just built from these sources, rather
# than each building its own debug copy (with other features, so with its own dependencies).
export ISTHMUS_BIN=${ISTHMUS_BIN:-$PWD/target/release/isthmus}
export ISTHMUS_CNI_BIN=${ISTHMUS_CNI_BIN:-$PWD/target/release/isthmus-cni}
step "format" cargo fmt --all --check
step "clippy" cargo clippy --workspace --all-targets -- -D warnings
step "import cycles" bash -c 'python3 scripts/check-import-cycles.py crates/agent/src &&
  python3 scripts/check-import-cycles.py crates/server/src --under neutron'
step "cargo test" bash -c 'set -o pipefail; cargo test --workspace 2>&1 | tee -a target/test-results.log'
step "tempest" bash -c 'set -o pipefail; scripts/tempest.sh 2>&1 | tee -a target/test-results.log'

# One closing line over everything that ran.
read -r passed failed < <(awk '
  /^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed;?$/) p += $i; if ($(i+1) ~ /^failed;?$/) f += $i } }
  /^tempest: [0-9]+ passed/ { p += $2; f += $4 }
  END { print p + 0, f + 0 }' "$log")
failed=$((failed + ${#failed_steps[@]}))
[ ${#failed_steps[@]} -eq 0 ] || echo "failed steps: ${failed_steps[*]}"
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
