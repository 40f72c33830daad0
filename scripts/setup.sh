#!/usr/bin/env bash
# Installs what Isthmus needs on Debian 12 (as root) and builds it.
#   scripts/setup.sh            runtime + build
#   scripts/setup.sh --test     also the test peers (etcd, openstack CLI, tempest, podman,
#                               the reference CNI plugins, busybox and QEMU for test images and VMs)
set -euo pipefail
cd "$(dirname "$0")/.."

# libprotobuf-dev carries the well-known .proto files (descriptor.proto) the etcd client's build imports;
# protobuf-compiler only recommends it, and recommends are not installed here.
want=(ca-certificates gcc libc6-dev iproute2 nftables protobuf-compiler libprotobuf-dev)
if [ "${1:-}" = "--test" ]; then
  want+=(etcd-server etcd-client python3-openstackclient python3-tempest
         podman runc containernetworking-plugins busybox-static iputils-ping qemu-system-x86)
fi
missing=()
for p in "${want[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# Debian starts etcd as a service on install; tests run their own on free ports.
if systemctl is-active --quiet etcd 2>/dev/null; then systemctl disable --now etcd >/dev/null 2>&1 || true; fi

if ! command -v cargo >/dev/null; then
  echo "setup: cargo not found; install Rust (rustup) first" >&2
  exit 1
fi
cargo build --release --workspace --bins
echo "setup: built target/release/isthmus"
