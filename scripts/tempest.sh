#!/usr/bin/env bash
# Runs OpenStack's tempest network API tests against a fresh `isthmus up`.
#   scripts/tempest.sh [REGEX]   (TEMPEST_EXCLUDE: a regex of tests to leave out; '' for none)
# Needs python3-tempest and python3-openstackclient (scripts/setup.sh --test).
# Prints "tempest: N passed, N failed, N skipped" last; exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
regex=${1:-'^tempest\.api\.network\.'}
# Tests to leave out (a regex), each for a reason:
# - test_routers_dvr's centralized router: every router here is distributed, and
#   `distributed: false` is refused rather than accepted and ignored.
exclude=${TEMPEST_EXCLUDE-'^tempest\.api\.network\.admin\.test_routers_dvr\.RoutersTestDVR\.test_centralized_router_creation\b'}
workers=${TEMPEST_WORKERS:-8}
bin=$root/target/release/isthmus
[ -x "$bin" ] || cargo build --release -p isthmus-cli
export PATH=/usr/bin:$PATH   # Debian's python carries tempest

ws=$(mktemp -d /tmp/isthmus-tempest.XXXXXX)
data=$ws/data
adminpw=admin-$RANDOM-$RANDOM
id_port=${ISTHMUS_TEMPEST_ID_PORT:-5000}
net_port=${ISTHMUS_TEMPEST_NET_PORT:-9696}
auth=http://127.0.0.1:$id_port/v3

# API tests only: no node agent (nothing of the host's own network is touched).
ISTHMUS_LOG=${ISTHMUS_LOG:-warn} "$bin" up --data-dir "$data" --admin-password "$adminpw" --no-agent \
  --identity-listen 127.0.0.1:$id_port --network-listen 127.0.0.1:$net_port >"$ws/server.log" 2>&1 &
server=$!
cleanup() { kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; }
trap cleanup EXIT
for _ in $(seq 1 100); do
  curl -sf "http://127.0.0.1:$id_port/v3" >/dev/null 2>&1 && break
  kill -0 "$server" 2>/dev/null || { cat "$ws/server.log"; echo "tempest: server did not start"; exit 1; }
  sleep 0.1
done

osc() {
  openstack --os-auth-url "$auth" --os-identity-api-version 3 --os-username admin --os-password "$adminpw" \
    --os-project-name admin --os-user-domain-name Default --os-project-domain-name Default "$@"
}

# Test accounts: tempest locks one per test class, so give it a few more than workers; admin
# test classes lock an admin account each too. Made through the identity API in one process
# (an openstack CLI call per step would take minutes).
pw=tempest-$RANDOM-$RANDOM
acc=$ws/accounts.yaml
python3 - "$auth" "$adminpw" "$pw" $((workers * 2 + 2)) $((workers + 2)) >"$acc" <<'PY'
import json, sys, urllib.request

auth, adminpw, pw, members, admins = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])

def call(method, path, body=None, token=None):
    req = urllib.request.Request(auth + path, method=method,
                                 data=json.dumps(body).encode() if body is not None else None)
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("X-Auth-Token", token)
    with urllib.request.urlopen(req) as r:
        data = r.read()
        return r.headers, (json.loads(data) if data else None)

h, _ = call("POST", "/auth/tokens", {"auth": {
    "identity": {"methods": ["password"], "password": {"user": {
        "name": "admin", "domain": {"name": "Default"}, "password": adminpw}}},
    "scope": {"project": {"name": "admin", "domain": {"name": "Default"}}}}})
tok = h["X-Subject-Token"]
roles = {r["name"]: r["id"] for r in call("GET", "/roles", token=tok)[1]["roles"]}
admin_project = call("GET", "/projects?name=admin", token=tok)[1]["projects"][0]["id"]

def user(name, project):
    return call("POST", "/users", {"user": {"name": name, "password": pw, "domain_id": "default",
                                            "default_project_id": project}}, tok)[1]["user"]["id"]

out = []
for i in range(1, members + 1):
    p = call("POST", "/projects", {"project": {"name": f"tp{i}", "domain_id": "default"}}, tok)[1]["project"]["id"]
    call("PUT", f"/projects/{p}/users/{user(f'tu{i}', p)}/roles/{roles['member']}", token=tok)
    out.append(f"- username: tu{i}\n  project_name: tp{i}\n  password: {pw}\n  domain_name: Default\n  roles: [member]\n")
for i in range(1, admins + 1):
    call("PUT", f"/projects/{admin_project}/users/{user(f'tadmin{i}', admin_project)}/roles/{roles['admin']}", token=tok)
    out.append(f"- username: tadmin{i}\n  project_name: admin\n  password: {pw}\n  domain_name: Default\n  roles: [admin]\n")
sys.stdout.write("".join(out))
PY

# The external network routers get their gateways on and floating IPs come from: flat, on a
# documentation range, no DHCP.
osc network create --external --provider-network-type flat --provider-physical-network public public >/dev/null
osc subnet create --network public --subnet-range 203.0.113.0/24 --gateway 203.0.113.1 --no-dhcp public-v4 >/dev/null
public_id=$(osc network show public -f value -c id)

# Tell tempest exactly the extensions the server advertises.
token=$(osc token issue -f value -c id)
exts=$(curl -sf -H "X-Auth-Token: $token" "http://127.0.0.1:$net_port/v2.0/extensions" |
  python3 -c 'import json,sys; print(",".join(e["alias"] for e in json.load(sys.stdin)["extensions"]))')

tempest init --workspace-path "$ws/workspaces.yaml" --name "isthmus-$(basename "$ws")" "$ws/tws" >"$ws/init.log" 2>&1 || { cat "$ws/init.log"; exit 1; }
cat >"$ws/tws/etc/tempest.conf" <<CONF
[DEFAULT]
log_dir = $ws/tws/logs
log_file = tempest.log
[auth]
use_dynamic_credentials = false
test_accounts_file = $acc
default_credentials_domain_name = Default
create_isolated_networks = false
admin_username = admin
admin_project_name = admin
admin_password = $adminpw
admin_domain_name = Default
[identity]
auth_version = v3
uri_v3 = $auth
region = RegionOne
[identity-feature-enabled]
api_v2 = false
[service_available]
neutron = true
nova = false
glance = false
cinder = false
swift = false
[network]
project_network_cidr = 10.100.0.0/16
project_network_mask_bits = 28
project_network_v6_cidr = 2001:db8::/48
project_network_v6_mask_bits = 64
project_networks_reachable = false
public_network_id = $public_id
floating_network_name = public
[network-feature-enabled]
ipv6 = true
ipv6_subnet_attributes = true
api_extensions = $exts
[validation]
run_validation = false
CONF

# Debian's tempest sleeps 10 s before every subnet delete, to let a real Neutron finish
# tearing down ports first; here a delete is complete when it answers, and those sleeps were
# two thirds of the run. The tempest processes load this hook first and call the same delete
# without the sleep; nothing else of tempest changes.
mkdir -p "$ws/py"
cat >"$ws/py/sitecustomize.py" <<'PY'
try:
    from tempest.lib.services.network import subnets_client as _subnets

    def _delete_subnet(self, subnet_id):
        return self.delete_resource('/subnets/%s' % subnet_id)

    _subnets.SubnetsClient.delete_subnet = _delete_subnet
except Exception:  # a tempest without that client: nothing to change
    pass
PY

cd "$ws/tws"
set +e
PYTHONPATH=$ws/py${PYTHONPATH:+:$PYTHONPATH} TEMPEST_CONFIG_DIR=$ws/tws/etc tempest run --regex "$regex" ${exclude:+--exclude-regex "$exclude"} \
  --concurrency "$workers" >"$ws/run.log" 2>&1
set -e
grep -E '^\{[0-9]+\} .*(FAILED|ok|SKIPPED)' "$ws/run.log" | grep -v ' ok$' | tail -n 60 || true
grep -A30 -E '^(FAIL|ERROR):|Traceback' "$ws/run.log" | head -n 200 || true
num() { grep -Eo -- "- $1: [0-9]+" "$ws/run.log" | grep -Eo '[0-9]+' | tail -1; }
p=$(num Passed); f=$(num Failed); s=$(num Skipped)
echo "tempest workspace: $ws (run.log, tws/logs/tempest.log, server.log)"
echo "tempest extensions: $exts"
echo "tempest: ${p:-0} passed, ${f:-0} failed, ${s:-0} skipped"
[ "${f:-1}" = 0 ] && [ "${p:-0}" -gt 0 ]
