# Shared by packaging/build-deb and packaging/build-rpm (sourced, not run).
# shellcheck shell=bash

PKG_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$PKG_DIR/.." && pwd)
PYTHON=/usr/bin/python3   # the interpreter the packages run on: wheels are chosen for it
WHEEL_CACHE=${VEILNET_WHEEL_CACHE:-/var/cache/veilnet-build/wheels}
# The tags of the pinned wheels (requirements-*.txt); pip 23 does not widen a newer manylinux tag to older ones.
WHEEL_TAGS=(--python-version 3.11 --implementation cp --abi cp311
            --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64)
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore PYTHONDONTWRITEBYTECODE=1

die() { echo "${0##*/}: $*" >&2; exit 2; }

# parse_args "$@": sets VERSION, OUT (absolute) and CHECK (0 with --no-check).
parse_args() {
  # shellcheck disable=SC2034  # CHECK is read by the scripts that source this file
  VERSION="" OUT="$REPO/out/packages" CHECK=1
  while (($#)); do
    case $1 in
      --version) VERSION=${2:?--version needs a value}; shift 2 ;;
      --version=*) VERSION=${1#*=}; shift ;;
      --out) OUT=${2:?--out needs a value}; shift 2 ;;
      --out=*) OUT=${1#*=}; shift ;;
      --no-check) CHECK=0; shift ;;
      -h|--help) sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;;
      *) die "unknown argument: $1 (usage: ${0##*/} [--version V] [--out DIR] [--no-check])" ;;
    esac
  done
  if [ -z "$VERSION" ]; then
    VERSION=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$REPO/pyproject.toml" | head -1)
  fi
  # Valid as a Debian upstream version of a native package and as an RPM Version (no '-', no '_').
  [[ $VERSION =~ ^[0-9][0-9A-Za-z.+~]*$ ]] || die "version '$VERSION' must start with a digit and hold only letters, digits and . + ~"
  mkdir -p "$OUT"
  OUT=$(cd "$OUT" && pwd)
}

check_python() {
  [ -x "$PYTHON" ] || die "$PYTHON is missing"
  "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' \
    || die "$PYTHON is not Python 3.11: the pinned wheels (packaging/requirements-*.txt) are for cp311"
}

# fetch_wheels: every pinned wheel into $WHEEL_CACHE, from the cache alone when it has them all
# (a second build needs no network), otherwise from the configured index; sha256-checked either way.
fetch_wheels() {
  mkdir -p "$WHEEL_CACHE"
  local req
  for req in "$PKG_DIR"/requirements-agent.txt "$PKG_DIR"/requirements-controller.txt; do
    if "$PYTHON" -m pip download --isolated --quiet --no-index --find-links "$WHEEL_CACHE" --no-deps \
         --only-binary=:all: --require-hashes "${WHEEL_TAGS[@]}" -d "$WHEEL_CACHE" -r "$req" >/dev/null 2>&1; then
      continue
    fi
    echo "${0##*/}: downloading the wheels of ${req##*/} into $WHEEL_CACHE"
    "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --require-hashes "${WHEEL_TAGS[@]}" \
      -d "$WHEEL_CACHE" -r "$req" 2> >(grep -v "is neither a file nor a directory" >&2) \
      || die "pip download failed for ${req##*/}"
  done
}

# copy_sources DIR: the files the build needs (no tests, no caches, no .git) into DIR.
copy_sources() {
  local dest=$1
  mkdir -p "$dest"
  (cd "$REPO" && tar -c --exclude=__pycache__ --exclude='*.pyc' \
      agent/veilnet agent/veilnet_agent controller/veilnet_controller controller/README.md \
      systemd README.md docs pyproject.toml \
      packaging/stage packaging/requirements-agent.txt packaging/requirements-controller.txt \
      packaging/conf packaging/man packaging/sysusers packaging/teardown-on-remove) | tar -x -C "$dest"
  # the wheels the build installs: the whole cache (pip picks the pinned ones by hash), hard-linked if it can
  mkdir -p "$dest/wheels"
  cp -l "$WHEEL_CACHE"/*.whl "$dest/wheels/" 2>/dev/null || cp "$WHEEL_CACHE"/*.whl "$dest/wheels/"
}

# smoke_test ROOT COMPONENT: run the vendored tree of an extracted package (imports, --help, the conffile).
smoke_test() {
  local root=$1 component=$2 lib
  lib=$root/usr/lib/veilnet/$component
  if [ "$component" = agent ]; then
    "$PYTHON" -I - "$lib" "$root/etc/veilnet/agent.toml" <<'EOF'
import re, sys
sys.path.insert(0, sys.argv[1])
import cryptography, grpc, google.protobuf, nftables, pyroute2, structlog, yaml  # noqa: F401,E401
import veilnet_agent.app.cli, veilnet_agent.app.controlled, veilnet_agent.drivers.firewall  # noqa: F401,E401
import veilnet_agent.drivers.links, veilnet_agent.drivers.wireguard, veilnet_agent.drivers.xfrm  # noqa: F401,E401
from veilnet.v1 import agent_pb2_grpc, controller_pb2_grpc  # noqa: F401
from veilnet_agent.core.config import parse_config_text
# the conffile: every key commented out; uncommented, it must parse and give the code's defaults
text = open(sys.argv[2]).read()
body = "\n".join(re.sub(r"^# ?(?=[a-z_]+ = |\[)", "", line) for line in text.splitlines())
conf = parse_config_text(body, "agent.toml (uncommented)")
got = (str(conf.state_dir), conf.resync_interval, conf.log_format, conf.log_level, conf.wireguard.backend,
       conf.wireguard.listen_port, conf.firewall.nflog_group, conf.firewall.log_per_second,
       str(conf.control.local_socket), conf.control.reconnect_max_seconds)
want = ("/var/lib/veilnet", 30, "json", "info", "auto", 51820, 7410, 10, "/run/veilnet/agent.sock", 30)
assert got == want, f"the conffile's commented values are not the defaults: {got} != {want}"
print(f"vendored agent tree ok: grpc {grpc.__version__}, protobuf {google.protobuf.__version__}, "
      f"pyroute2 {pyroute2.__version__}, cryptography {cryptography.__version__}, nftables from "
      f"{nftables.__file__}; conffile parses uncommented")
EOF
  else
    "$PYTHON" -I - "$lib" <<'EOF'
import pkgutil, sys, importlib
sys.path.insert(0, sys.argv[1])
import veilnet_controller
for mod in pkgutil.iter_modules(veilnet_controller.__path__):
    importlib.import_module(f"veilnet_controller.{mod.name}")
assert "pyroute2" not in sys.modules
print("vendored controller tree ok: every veilnet_controller module imports (without pyroute2)")
EOF
  fi
}

# check_teardown_config ROOT SCRIPTLET: the agent's removal scriptlet runs the packaged teardown-on-remove,
# and the minimal configuration that script falls back to (its printf line) is one the packaged agent accepts.
check_teardown_config() {
  local root=$1 scriptlet=$2 script text
  script=$root/usr/lib/veilnet/agent/teardown-on-remove
  grep -q "/usr/lib/veilnet/agent/teardown-on-remove" "$scriptlet" || die "${scriptlet##*/} does not run teardown-on-remove"
  [ -x "$script" ] || die "the package has no executable teardown-on-remove"
  text=$(sh -c "$(grep -o "printf '[^']*'" "$script" | head -1)")
  [ -n "$text" ] || die "no fallback configuration found in $script"
  "$PYTHON" -I -c 'import sys; sys.path.insert(0, sys.argv[1])
from veilnet_agent.core.config import parse_config_text
parse_config_text(sys.argv[2], "teardown fallback")' "$root/usr/lib/veilnet/agent" "$text"
  echo "teardown-on-remove is run by ${scriptlet##*/}; its fallback configuration is valid"
}

# run_wrapper ROOT NAME ARGS...: an extracted package's /usr/bin wrapper, pointed at ROOT's tree.
run_wrapper() {
  local root=$1 name=$2; shift 2
  sed "s#\"/usr/lib/veilnet/#\"$root/usr/lib/veilnet/#" "$root/usr/bin/$name" >"$root/$name.test"
  "$PYTHON" -I "$root/$name.test" "$@"
}

# source_date_epoch: the commit's date (reproducible builds), or now outside a git checkout.
source_date_epoch() {
  git -C "$REPO" log -1 --format=%ct 2>/dev/null || date +%s
}

elapsed() { echo "$(( $(date +%s) - $1 )) s"; }
