#!/usr/bin/env bash
# All-in-one: install, build, and run Isthmus (identity + network API, embedded store).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec target/release/isthmus up --data-dir "${ISTHMUS_DATA_DIR:-/var/lib/isthmus}" "$@"
