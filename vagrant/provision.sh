#!/bin/sh
# Provision one lab VM from the packages: provision.sh NODE ADDRESS CONTROLLER_ADDRESS (run by vagrant as root).
# host-a (ADDRESS = CONTROLLER_ADDRESS) also installs and starts the controller, applies
# examples/network.yaml and makes one single-use token per host in /veilnet/vagrant/.lab/.
set -eu
node=$1 address=$2 controller=$3
repo=/veilnet
lab=$repo/vagrant/.lab
data=/var/lib/veilnet-controller
export DEBIAN_FRONTEND=noninteractive

ls "$repo"/out/packages/veilnet-agent_*_amd64.deb >/dev/null 2>&1 \
  || { echo "provision: no package in out/packages: run packaging/build-deb before vagrant up" >&2; exit 1; }
newest() { ls -v "$repo"/out/packages/"$1"_*_amd64.deb | tail -1; }

apt-get update -qq
# the kernel of debian/bookworm64 has WireGuard: wireguard-go (Recommends) is not needed
apt-get install -y -qq --no-install-recommends "$(newest veilnet-agent)" iputils-ping

if [ "$address" = "$controller" ]; then
  apt-get install -y -qq --no-install-recommends "$(newest veilnet-controller)"
  if [ ! -f "$data/ca/ca.crt" ]; then   # init once (it refuses an initialized directory)
    runuser -u veilnet -- veilnet-controller init --data-dir "$data" --trust-domain veilnet.lab \
      --server-name "$controller" | tee /root/controller-init.txt
  fi
  systemctl enable --now veilnet-controller   # is-active only once it serves (Type=notify)
  install -d -m 0700 "$lab"
  sed -n 's/^ca hash: //p' /root/controller-init.txt >"$lab/ca-hash"
  export VEILCTL_CONTROLLER=$controller:7443 VEILCTL_CREDENTIALS=$data/operators/admin
  veilctl apply -f "$repo/examples/network.yaml" -m "vagrant lab"
  for host in host-a host-b host-c; do
    veilctl -o json token create "$host" --ttl 3600 \
      | /usr/bin/python3 -c 'import json, sys; print(json.load(sys.stdin)["token"])' >"$lab/token-$host.tmp"
    chmod 0600 "$lab/token-$host.tmp" && mv "$lab/token-$host.tmp" "$lab/token-$host"
  done
fi

# the underlay: the interface holding this host's lab address
ifname=$(ip -o addr show | awk -v a="$address" '{split($4, p, "/")} p[1] == a {print $2; exit}')
[ -n "$ifname" ] || { echo "provision: no interface has $address" >&2; exit 1; }
if ! grep -q '^node_name' /etc/veilnet/agent.toml; then
  # the conffile keeps its commented defaults; the three required keys go first
  { printf 'node_name = "%s"\n[underlay]\ninterface = "%s"\naddress = "%s"\n\n' "$node" "$ifname" "$address"
    cat /etc/veilnet/agent.toml; } >/etc/veilnet/agent.toml.new && mv /etc/veilnet/agent.toml.new /etc/veilnet/agent.toml
fi

# the endpoints' namespaces this host has in the spec (the agent wires them, it does not create them)
/usr/bin/python3 -I - "$repo/examples/network.yaml" "$node" <<'PY' | while read -r ns; do ip netns add "$ns" 2>/dev/null || true; done
import sys
sys.path.insert(0, "/usr/lib/veilnet/agent")
import yaml
spec = yaml.safe_load(open(sys.argv[1]))
print("\n".join(e["netns"] for e in spec.get("endpoints", []) if e["node"] == sys.argv[2]))
PY

if [ ! -f /var/lib/veilnet/identity/node.crt ]; then
  for _ in $(seq 120); do [ -f "$lab/token-$node" ] && break; sleep 2; done
  [ -f "$lab/token-$node" ] || { echo "provision: no token for $node (is host-a up?)" >&2; exit 1; }
  veilnet-agent join --controller "$controller:7444" --ca-hash "$(cat "$lab/ca-hash")" --token-file "$lab/token-$node"
  rm -f "$lab/token-$node"
fi
systemctl enable --now veilnet-agent   # returns once the data plane is in place (Type=notify)
veilnet-agent status
