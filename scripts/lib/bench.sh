# Sourced by the benchmark scripts: the checks and installs they share.

# needs_root NAME WHY: exit with a clear message unless running as root.
needs_root() {
    if [ "$(id -u)" -ne 0 ]; then
        echo "$1: needs root ($2)" >&2
        exit 1
    fi
}

# apt_ensure COMMAND PACKAGE: install PACKAGE if COMMAND is missing (refreshing the package
# lists only if the first try fails).
apt_ensure() {
    command -v "$1" >/dev/null && return 0
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$2" >/dev/null \
        || { apt-get update >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$2" >/dev/null; }
}

# machine_line: one line of what the figures ran on.
machine_line() {
    echo "machine: $(nproc) CPUs, $(uname -sr); load: $(cut -d' ' -f1-3 /proc/loadavg); $(iperf3 --version 2>/dev/null | head -1)"
}

# figure_of NAME TAG KEY FILE: the last value of a "TAG KEY VALUE" line in FILE; exits with a
# message naming NAME if there is none (a test failed?).
figure_of() {
    local v
    v=$(awk -v t="$2" -v k="$3" '$1 == t && $2 == k { v = $3 } END { print v }' "$4")
    if [ -z "$v" ]; then
        echo "$1: no figure $3 (a test failed?)" >&2
        exit 1
    fi
    echo "$v"
}
