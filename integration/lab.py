"""A multi-host lab made of network and mount namespaces, for tests, the demo and benchmarks.

Layout for a lab with prefix ``P``::

    P-ul            underlay namespace, bridge br0 joining every host's ul0
    P-<host>        a simulated host: veth ul0 on the underlay (192.0.2.0/24,
                    optionally 2001:db8::/64), the agent runs here
    P-<endpoint>    an endpoint (container) namespace, empty until the agent
                    moves its interface in
    /run/P-mnt/<host>   the host's private mount namespace (tmpfs on
                    /run/wireguard, so every host can run its own wireguard-go
                    with the same interface name)
    /run/P/<host>/  config, state file, state dir and agent log of a host

Everything is created inside namespaces the lab owns; the root namespace's
interfaces, routes and firewall are never touched. ``Lab`` is a context
manager that always tears everything down (exceptions, Ctrl-C, SIGTERM via
``install_signal_handlers``), and removes leftovers of a crashed run with the
same prefix before it starts.

Run ``python integration/lab.py self-test`` to check the lab without the agent
and ``python integration/lab.py cleanup --prefix P`` to remove a crashed lab.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import dataclasses
import ipaddress
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
NETNS_DIR = Path("/run/netns")
UNDERLAY_BRIDGE = "br0"
UNDERLAY_PREFIXLEN_V4 = 24
UNDERLAY_PREFIXLEN_V6 = 64
WG_PORT = 51820
UNDERLAY_BRIDGE_MAC = "02:00:00:00:00:fe"
CONTROLLER_IP = "192.0.2.2"  # the lab controller, on the underlay switch
VXLAN_PORT = 4789

Cmd = str | Sequence[str]
# Every deadline below is multiplied by this: a guest kernel under qemu TCG (integration/vm) runs the same
# scenarios several times slower. Deadlines only, never assertions about speed.
TIME_SCALE = float(os.environ.get("VEILNET_TIME_SCALE", "1"))


def results_dir() -> Path:
    """Where failure diagnostics go: ``$VEILNET_RESULTS`` or ``out/`` in the repository."""
    return Path(os.environ.get("VEILNET_RESULTS") or REPO_ROOT / "out")


# Run with the bindings' Python in a namespace: takes ``inet veilnet`` with ``flags owner`` (only this process
# may change it, and it goes when the process ends), prints "holding", and holds it until stdin closes.
TABLE_HOLDER = r"""
import sys, nftables
nft = nftables.Nftables()
rc, _, err = nft.cmd("add table inet veilnet\ndelete table inet veilnet\nadd table inet veilnet { flags owner; }")
if rc:
    print(err, file=sys.stderr, flush=True)
    sys.exit(1)
print("holding", flush=True)
sys.stdin.read()
"""


def dump_commands(run: Callable[..., subprocess.CompletedProcess[str]], commands: Mapping[str, Sequence[str]],
                  dest: Path, header: str = "") -> None:
    """Each command's output (and its exit status and stderr when it failed) into ``dest/<name>``. Never raises:
    a vanished namespace must not hide the rest."""
    for name, argv in commands.items():
        try:
            res = run(argv, check=False, timeout=20)
            text = res.stdout + (f"\n(exit {res.returncode}) {res.stderr}" if res.returncode else "")
        except Exception as exc:
            text = f"could not run {argv}: {exc}"
        (dest / name).write_text(header + text)


class LabError(RuntimeError):
    pass


def find_agent_bin() -> Path:
    """The ``veilnet-agent`` entry point: $VEILNET_AGENT, the repo's venv, or next to python."""
    env = os.environ.get("VEILNET_AGENT")
    candidates = [Path(env)] if env else []
    candidates += [
        REPO_ROOT / ".venv" / "bin" / "veilnet-agent",
        Path(sys.executable).parent / "veilnet-agent",
    ]
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return c
    found = shutil.which("veilnet-agent")
    if found:
        return Path(found)
    raise LabError(
        "veilnet-agent not found (looked in "
        + ", ".join(str(c) for c in candidates)
        + "); run ./scripts/bootstrap as root"
    )


def _argv(cmd: Cmd) -> list[str]:
    if isinstance(cmd, str):
        return ["sh", "-c", cmd]
    return [str(c) for c in cmd]


def sh(
    cmd: Cmd,
    *,
    check: bool = True,
    timeout: float = 30,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command, capture text output; on failure raise LabError with its output."""
    argv = _argv(cmd)
    timeout *= TIME_SCALE
    try:
        res = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, input=input, check=False
        )
    except subprocess.TimeoutExpired as e:
        raise LabError(f"timed out after {timeout}s: {shlex.join(argv)}") from e
    if check and res.returncode != 0:
        raise LabError(
            f"command failed ({res.returncode}): {shlex.join(argv)}\n"
            f"stdout: {res.stdout.strip()}\nstderr: {res.stderr.strip()}"
        )
    return res


def wait_until(
    cond: Callable[[], Any], timeout: float, interval: float = 0.2, what: str = "condition"
) -> Any:
    """Poll ``cond`` until it returns something truthy; return it, or raise TimeoutError."""
    timeout *= TIME_SCALE
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what} not met within {timeout}s")
        time.sleep(interval)


def _ns_id(path: str | Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def namespace_processes(namespaces: Iterable[Path]) -> list[int]:
    """PIDs (other than ours) living in any of these network or mount namespace files."""
    ids = {i for p in namespaces if (i := _ns_id(p))}
    ids -= {_ns_id("/proc/1/ns/net"), _ns_id("/proc/1/ns/mnt")}
    pids = []
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        if any(_ns_id(f"/proc/{entry}/ns/{kind}") in ids for kind in ("net", "mnt")):
            pids.append(int(entry))
    return pids


def kill_namespace_processes(namespaces: Iterable[Path], timeout: float = 5) -> None:
    """SIGTERM, then SIGKILL, every process in these namespaces (wireguard-go daemonises: it must go too)."""
    paths = list(namespaces)
    deadline = time.monotonic() + timeout
    sig = signal.SIGTERM
    while pids := namespace_processes(paths):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        time.sleep(0.2)
        sig = signal.SIGKILL  # one polite chance
        if time.monotonic() > deadline:
            break


def delete_netns(name: str) -> None:
    """Kill every process in network namespace ``name``, then delete it; nothing if it does not exist."""
    path = NETNS_DIR / name
    if path.exists():
        kill_namespace_processes([path])
        sh(["ip", "netns", "delete", name], check=False)


def read_log(path: Path, since: int = 0) -> str:
    """A log file's text from byte offset ``since`` ("" if it does not exist yet)."""
    try:
        with open(path, "rb") as f:
            f.seek(since)
            return f.read().decode(errors="replace")
    except FileNotFoundError:
        return ""


def json_lines(text: str) -> list[dict[str, Any]]:
    """The JSON objects among ``text``'s lines (structlog events); other lines are skipped."""
    events = []
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        with contextlib.suppress(ValueError):
            obj = json.loads(line)
            if isinstance(obj, dict):
                events.append(obj)
    return events


def _alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _is_mountpoint(path: Path) -> bool:
    return sh(["mountpoint", "-q", str(path)], check=False).returncode == 0


def _umount_all(path: Path) -> None:
    """Unmount ``path`` until it is no longer a mount point (bind mounts may be stacked)."""
    for _ in range(10):
        if not _is_mountpoint(path):
            return
        if sh(["umount", str(path)], check=False).returncode != 0:
            sh(["umount", "-l", str(path)], check=False)


# --------------------------------------------------------------------------- topology


@dataclass(frozen=True)
class SegmentSpec:
    name: str
    vni: int
    ipv4_subnet: str
    ipv4_gateway: str
    ipv6_subnet: str | None = None
    ipv6_gateway: str | None = None
    encapsulation: str = "vxlan"
    mode: str | None = None  # "isolated" (the agent's default) or "default-deny"; None: not written
    # e.g. {"new_connections_per_second": 20, "burst": 20, "icmp_per_second": 5}; None: no limits
    rate_limit: Mapping[str, Any] | None = field(default=None, hash=False)

    def state(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "name": self.name,
            "vni": self.vni,
            "encapsulation": self.encapsulation,
            "ipv4_subnet": self.ipv4_subnet,
            "ipv4_gateway": self.ipv4_gateway,
        }
        if self.ipv6_subnet:
            d["ipv6_subnet"] = self.ipv6_subnet
            d["ipv6_gateway"] = self.ipv6_gateway
        if self.mode is not None:
            d["mode"] = self.mode
        if self.rate_limit is not None:
            d["rate_limit"] = dict(self.rate_limit)
        return d


@dataclass(frozen=True)
class HostSpec:
    name: str
    underlay_ipv4: str
    transport_address: str  # with prefix length, e.g. 198.51.100.11/24
    underlay_ipv6: str | None = None
    listen_port: int = WG_PORT
    ipv6_underlay: bool = False  # peers reach this host's WireGuard over its IPv6 underlay address

    @property
    def transport_ip(self) -> str:
        return self.transport_address.split("/")[0]

    @property
    def underlay_address(self) -> str:
        if self.ipv6_underlay:
            assert self.underlay_ipv6 is not None, f"{self.name}: ipv6_underlay needs underlay_ipv6"
            return self.underlay_ipv6
        return self.underlay_ipv4


@dataclass(frozen=True)
class EndpointSpec:
    name: str
    host: str
    segment: str
    mac: str
    ipv4: str
    ipv6: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict, hash=False)  # written only if non-empty

    @property
    def ips(self) -> list[str]:
        return [self.ipv4] + ([self.ipv6] if self.ipv6 else [])

    def label_state(self) -> dict[str, Any]:
        return {"labels": dict(self.labels)} if self.labels else {}


@dataclass(frozen=True)
class Topology:
    """One description of the whole network; every host's state file is derived from it."""

    hosts: tuple[HostSpec, ...]
    segments: tuple[SegmentSpec, ...]
    endpoints: tuple[EndpointSpec, ...]
    # Segmentation policies, written verbatim into every host's state file (only if non-empty).
    policies: tuple[Mapping[str, Any], ...] = field(default=(), hash=False)
    # host -> the segments it carries; a host not named carries every segment.
    carries: Mapping[str, tuple[str, ...]] = field(default_factory=dict, hash=False)
    # The network's encryption (network_spec only: IPsec needs the controller) and its IPsec settings.
    encryption: str = "wireguard"
    ipsec: Mapping[str, Any] | None = field(default=None, hash=False)

    def carried(self, host: str) -> list[SegmentSpec]:
        names = self.carries.get(host)
        return [s for s in self.segments if names is None or s.name in names]

    def host(self, name: str) -> HostSpec:
        return next(h for h in self.hosts if h.name == name)

    def segment(self, name: str) -> SegmentSpec:
        return next(s for s in self.segments if s.name == name)

    def endpoint(self, name: str) -> EndpointSpec:
        return next(e for e in self.endpoints if e.name == name)

    def endpoints_of(self, host: str) -> list[EndpointSpec]:
        return [e for e in self.endpoints if e.host == host]

    def with_endpoint(self, ep: EndpointSpec) -> Topology:
        return dataclasses.replace(self, endpoints=(*self.endpoints, ep))

    def without_endpoint(self, name: str) -> Topology:
        return dataclasses.replace(
            self, endpoints=tuple(e for e in self.endpoints if e.name != name)
        )

    def with_labels(self, endpoint: str, labels: Mapping[str, str]) -> Topology:
        """The same topology with ``endpoint``'s labels replaced by ``labels``."""
        if endpoint not in {e.name for e in self.endpoints}:
            raise KeyError(endpoint)
        return dataclasses.replace(self, endpoints=tuple(
            dataclasses.replace(e, labels=dict(labels)) if e.name == endpoint else e
            for e in self.endpoints
        ))

    def with_segment(self, name: str, **changes: Any) -> Topology:
        """The same topology with fields of segment ``name`` changed (``mode=...``, ``rate_limit=...``)."""
        if name not in {s.name for s in self.segments}:
            raise KeyError(name)
        return dataclasses.replace(self, segments=tuple(
            dataclasses.replace(s, **changes) if s.name == name else s for s in self.segments
        ))

    def with_policies(self, policies: Iterable[Mapping[str, Any]]) -> Topology:
        return dataclasses.replace(self, policies=tuple(policies))

    def with_host(self, host: HostSpec) -> Topology:
        return dataclasses.replace(self, hosts=(*self.hosts, host))

    def without_host(self, name: str) -> Topology:
        return dataclasses.replace(
            self,
            hosts=tuple(h for h in self.hosts if h.name != name),
            endpoints=tuple(e for e in self.endpoints if e.host != name),
        )

    def state_for(
        self,
        host: str,
        public_keys: dict[str, str],
        netns_of: Callable[[str], str],
    ) -> dict[str, Any]:
        """The state file of ``host``: its segments, the peers sharing one (with their endpoints there), the
        policies about its segments only, as the controller would compile it."""
        me = self.host(host)
        mine = [s.name for s in self.carried(host)]

        def shared(peer: str) -> list[str]:
            theirs = {s.name for s in self.carried(peer)}
            return [s for s in mine if s in theirs]

        def about_mine(policy: Mapping[str, Any]) -> bool:
            refs = {side.get("segment") for side in (policy.get("source", {}), policy.get("destination", {}))}
            return refs - {None} <= set(mine)

        policies = [copy.deepcopy(dict(p)) for p in self.policies if about_mine(p)]
        return {
            "node": me.name,
            "transport_address": me.transport_address,
            "segments": [s.state() for s in self.carried(host)],
            "endpoints": [
                {
                    "name": e.name,
                    "segment": e.segment,
                    "mac": e.mac,
                    "ipv4": e.ipv4,
                    **({"ipv6": e.ipv6} if e.ipv6 else {}),
                    "netns": netns_of(e.name),
                    **e.label_state(),
                }
                for e in self.endpoints_of(host)
            ],
            "peers": [
                {
                    "name": p.name,
                    "underlay_address": p.underlay_address,
                    "underlay_port": p.listen_port,
                    "public_key": public_keys[p.name],
                    "transport_address": p.transport_ip,
                    "segments": shared(p.name),
                    "endpoints": [
                        {"segment": e.segment, "mac": e.mac, "ips": e.ips, **e.label_state()}
                        for e in self.endpoints_of(p.name) if e.segment in shared(p.name)
                    ],
                }
                for p in self.hosts
                if p.name != host and shared(p.name)
            ],
            **({"policies": policies} if policies else {}),
        }


def network_spec(topo: Topology, netns_of: Callable[[str], str]) -> dict[str, Any]:
    """The controller's network spec for ``topo``: every host carries every segment (as ``state_for``)."""
    return {
        "encryption": topo.encryption,
        **({"ipsec": dict(topo.ipsec)} if topo.ipsec else {}),
        "segments": [s.state() for s in topo.segments],
        "nodes": [
            {
                "name": h.name,
                "underlay_address": h.underlay_address,
                "underlay_port": h.listen_port,
                "transport_address": h.transport_address,
                "segments": [s.name for s in topo.carried(h.name)],
            }
            for h in topo.hosts
        ],
        "endpoints": [
            {
                "name": e.name, "node": e.host, "segment": e.segment, "mac": e.mac, "ipv4": e.ipv4,
                **({"ipv6": e.ipv6} if e.ipv6 else {}), "netns": netns_of(e.name), **e.label_state(),
            }
            for e in topo.endpoints
        ],
        **({"policies": [copy.deepcopy(dict(p)) for p in topo.policies]} if topo.policies else {}),
    }


def standard_topology() -> Topology:
    """3 hosts, blue (VNI 100, dual-stack) and green (VNI 200, IPv4), endpoints on every host."""
    hosts = tuple(
        HostSpec(f"host-{c}", f"192.0.2.{11 + i}", f"198.51.100.{11 + i}/24")
        for i, c in enumerate("abc")
    )
    blue = SegmentSpec(
        "blue", 100, "203.0.113.0/26", "203.0.113.1", "fd00:b1::/64", "fd00:b1::1"
    )
    green = SegmentSpec("green", 200, "203.0.113.64/26", "203.0.113.65")
    eps = (
        EndpointSpec("a-web", "host-a", "blue", "02:00:00:0a:00:01", "203.0.113.10", "fd00:b1::10"),
        EndpointSpec("a-db", "host-a", "green", "02:00:00:0a:00:02", "203.0.113.74"),
        EndpointSpec("b-web", "host-b", "blue", "02:00:00:0b:00:01", "203.0.113.20", "fd00:b1::20"),
        EndpointSpec("b-db", "host-b", "green", "02:00:00:0b:00:02", "203.0.113.84"),
        EndpointSpec("c-web", "host-c", "blue", "02:00:00:0c:00:01", "203.0.113.30", "fd00:b1::30"),
    )
    return Topology(hosts, (blue, green), eps)


def ipv6_topology() -> Topology:
    """2 hosts over an IPv6 underlay with IPv6 WireGuard transport: the largest overheads (80 + 70)."""
    hosts = tuple(
        HostSpec(f"host-{c}", f"192.0.2.{21 + i}", f"fd00:7::{21 + i}/64", f"2001:db8::{21 + i}",
                 ipv6_underlay=True)
        for i, c in enumerate("ab")
    )
    blue = SegmentSpec("blue", 100, "203.0.113.0/26", "203.0.113.1", "fd00:b1::/64", "fd00:b1::1")
    eps = (
        EndpointSpec("a-web", "host-a", "blue", "02:00:00:1a:00:01", "203.0.113.10", "fd00:b1::10"),
        EndpointSpec("b-web", "host-b", "blue", "02:00:00:1b:00:01", "203.0.113.20", "fd00:b1::20"),
    )
    return Topology(hosts, (blue,), eps)


# --------------------------------------------------------------------------- namespaces


class _InNamespaces:
    """Runs commands inside a simulated machine's namespaces; ``cmd`` says which."""

    def cmd(self, cmd: Cmd) -> list[str]:
        raise NotImplementedError

    def run(
        self, cmd: Cmd, *, check: bool = True, timeout: float = 30, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        return sh(self.cmd(cmd), check=check, timeout=timeout, input=input)

    def popen(self, cmd: Cmd, **kw: Any) -> subprocess.Popen[Any]:
        return subprocess.Popen(self.cmd(cmd), **kw)


class Endpoint(_InNamespaces):
    """An endpoint (container) network namespace."""

    def __init__(self, lab: Lab, name: str) -> None:
        self.lab = lab
        self.name = name
        self.netns = f"{lab.prefix}-{name}"

    def cmd(self, cmd: Cmd) -> list[str]:
        return ["nsenter", f"--net={NETNS_DIR / self.netns}", "--", *_argv(cmd)]

    def ping(
        self, dst: str, *, count: int = 1, wait: float = 1, args: Sequence[str] = ()
    ) -> subprocess.CompletedProcess[str]:
        argv = ["ping", "-n", "-c", str(count), "-W", str(wait), *args, dst]
        return self.run(argv, check=False, timeout=count * (wait + 1) + 10)

    def wait_ping(self, dst: str, timeout: float = 20) -> bool:
        """True once one ping to ``dst`` is answered (first packets may be lost to handshakes)."""
        try:
            wait_until(lambda: self.ping(dst).returncode == 0, timeout, 0.1, f"ping {dst}")
        except TimeoutError:
            return False
        return True


class Host(_InNamespaces):
    """A simulated host: its own network namespace and mount namespace, config, state, agent."""

    def __init__(self, lab: Lab, name: str, ipv4: str, ipv6: str | None) -> None:
        self.lab = lab
        self.name = name
        self.ipv4 = ipv4
        self.ipv6 = ipv6
        self.netns = f"{lab.prefix}-{name}"
        self.mnt = lab.mnt_dir / name
        self.dir = lab.run_dir / name
        self.state_dir = self.dir / "state"
        self.config_path = self.dir / "agent.toml"
        self.state_path = self.dir / "state.json"
        self.log_path = self.dir / "agent.log"
        self.local_socket = self.dir / "agent.sock"
        self.controlled = False  # True once joined: the agent takes its state from the controller
        self.proc: subprocess.Popen[bytes] | None = None
        self.agent_starts: list[int] = []  # log offsets where each agent start began
        self.public_key: str | None = None

    # -- commands in the host (both namespaces)
    def cmd(self, cmd: Cmd) -> list[str]:
        return [
            "nsenter",
            f"--mount={self.mnt}",
            f"--net={NETNS_DIR / self.netns}",
            "--",
            *_argv(cmd),
        ]

    # -- files
    def write_config(
        self,
        *,
        resync_interval: float = 2.0,
        log_format: str = "json",
        log_level: str = "info",
        backend: str = "auto",
        listen_port: int = WG_PORT,
        underlay_address: str | None = None,
        extra: str = "",
    ) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        text = (
            f'node_name = "{self.name}"\n'
            f'state_dir = "{self.state_dir}"\n'
            f"resync_interval = {float(resync_interval)}\n"
            f'log_format = "{log_format}"\n'
            f'log_level = "{log_level}"\n'
            "\n[underlay]\n"
            'interface = "ul0"\n'
            f'address = "{underlay_address or self.ipv4}"\n'
            "\n[wireguard]\n"
            f'backend = "{backend}"\n'
            f"listen_port = {listen_port}\n"
            "\n[controller]\n"
            f'local_socket = "{self.local_socket}"\n'
            "reconnect_max_seconds = 2.0\n"
            f"{extra}"
        )
        _atomic_write(self.config_path, text)
        return self.config_path

    def write_state(self, state: dict[str, Any] | str, path: Path | None = None) -> Path:
        """Write the state file atomically (JSON from a dict, or text as given)."""
        text = state if isinstance(state, str) else json.dumps(state, indent=2) + "\n"
        target = path or self.state_path
        _atomic_write(target, text)
        return target

    def read_state(self) -> dict[str, Any]:
        return dict(json.loads(self.state_path.read_text()))

    # -- agent
    def agent_argv(self, sub: str, *args: str) -> list[str]:
        return [str(self.lab.agent_bin), sub, "--config", str(self.config_path), *args]

    def identity(self) -> str:
        out = self.run(self.agent_argv("identity")).stdout.strip().splitlines()
        if not out:
            raise LabError(f"{self.name}: veilnet-agent identity printed nothing")
        self.public_key = out[-1].strip()
        return self.public_key

    def check(self, state_file: Path | None = None) -> subprocess.CompletedProcess[str]:
        return self.run(
            self.agent_argv("check", "--state-file", str(state_file or self.state_path)),
            check=False,
        )

    def join(self, ctl: Any, token: str | None = None, ca_hash: str | None = None,
             check: bool = True) -> subprocess.CompletedProcess[str]:
        """``veilnet-agent join`` against the lab's controller; afterwards the agent runs in controller mode.

        The token goes on standard input (``--token-file -``), never on the command line."""
        secret = token or ctl.token(self.name)
        res = self.run(self.agent_argv(
            "join", "--controller", ctl.bootstrap_endpoint, "--token-file", "-",
            "--ca-hash", ca_hash or ctl.ca_hash), check=False, input=secret + "\n")
        if check and res.returncode != 0:
            raise LabError(f"{self.name}: join failed: {res.stderr.strip()}")
        if res.returncode == 0:
            self.controlled = True
        return res

    def agent(self, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        """Run a ``veilnet-agent`` subcommand (status, attach, ...) in the host."""
        return self.run([str(self.lab.agent_bin), args[0], "--config", str(self.config_path), *args[1:]],
                        check=check)

    def agent_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start_agent(self, *, wait_ready: bool = True, timeout: float = 30) -> None:
        if self.agent_running():
            raise LabError(f"{self.name}: agent already running")
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            offset = log.tell()
            self.agent_starts.append(offset)
            run_args = () if self.controlled else ("--state-file", str(self.state_path))
            self.proc = self.popen(
                self.agent_argv("run", *run_args),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        if wait_ready:
            self.wait_for_log("ready", timeout=timeout, since=offset)

    def stop_agent(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int | None:
        """Send ``sig`` and wait; SIGKILL if it does not exit. Returns the exit code."""
        if self.proc is None:
            return None
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
            try:
                proc.wait(timeout * TIME_SCALE)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5 * TIME_SCALE)
        return proc.returncode

    def restart_agent(self, sig: int = signal.SIGTERM, **kw: Any) -> None:
        self.stop_agent(sig)
        self.start_agent(**kw)

    def sighup(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGHUP)

    def agent_log(self) -> Path:
        return self.log_path

    def log_offset(self) -> int:
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def log_text(self, since: int = 0) -> str:
        return read_log(self.log_path, since)

    def log_events(self, since: int = 0) -> list[dict[str, Any]]:
        """The agent's JSON log lines from byte offset ``since`` (non-JSON lines skipped)."""
        return json_lines(self.log_text(since))

    def wait_for_log(
        self,
        event: str,
        predicate: Callable[[dict[str, Any]], bool] | None = None,
        timeout: float = 10,
        since: int | None = None,
    ) -> dict[str, Any]:
        """Wait for a log line with ``event`` (and ``predicate``) after offset ``since``."""
        start = self.agent_starts[-1] if since is None and self.agent_starts else (since or 0)
        timeout *= TIME_SCALE
        deadline = time.monotonic() + timeout
        while True:
            for ev in self.log_events(start):
                if ev.get("event") == event and (predicate is None or predicate(ev)):
                    return ev
            if self.proc is not None and self.proc.poll() is not None:
                raise LabError(
                    f"{self.name}: agent exited with {self.proc.returncode} while waiting for "
                    f"{event!r}; log tail:\n{tail(self.log_text(start), 40)}"
                )
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"{self.name}: no {event!r} log event within {timeout}s; log tail:\n"
                    f"{tail(self.log_text(start), 40)}"
                )
            time.sleep(0.1)

    def wait_resyncs(self, since: int, count: int = 2, timeout: float | None = None) -> list[dict[str, Any]]:
        """Wait for ``count`` completed resyncs (``resynced`` events) logged after offset ``since``.

        A resync logged after ``since`` may have started before it; the second one started after the first
        ended, so ``count=2`` (the default) proves a whole resync ran after ``since``. The deadline covers
        ``count + 1`` resync intervals at the configured rate and then some, for a loaded machine.
        """
        interval = float(self._config_value("resync_interval") or 2.0)
        limit = timeout if timeout is not None else (count + 1) * interval + 20

        def done() -> list[dict[str, Any]] | None:
            found = [e for e in self.log_events(since) if e.get("event") == "resynced"]
            if len(found) >= count:
                return found
            if self.proc is not None and self.proc.poll() is not None:
                raise LabError(f"{self.name}: agent exited ({self.proc.returncode}) while waiting for resyncs")
            return None

        found: list[dict[str, Any]] = wait_until(done, limit, 0.1, f"{self.name}: {count} resyncs")
        return found

    def _config_value(self, key: str) -> str | None:
        try:
            text = self.config_path.read_text()
        except FileNotFoundError:
            return None
        for line in text.splitlines():
            name, sep, value = line.partition("=")
            if sep and name.strip() == key:
                return value.strip().strip('"')
        return None

    def collect_diagnostics(self, dest: Path) -> None:
        """Everything needed to understand a failure, into ``dest``: the agent log, the nft ruleset,
        ``wg show`` (public keys only), links, addresses, FDB and neighbour entries. Never raises."""
        dest.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):
            if self.log_path.exists():
                shutil.copyfile(self.log_path, dest / "agent.log")
        running = "running" if self.agent_running() else "NOT running"
        commands = {
            "nft-ruleset.txt": ["nft", "list", "ruleset"],
            "wg-show.txt": ["wg", "show", "all"],
            "links.txt": ["ip", "-d", "link", "show"],
            "addresses.txt": ["ip", "addr", "show"],
            "routes.txt": ["sh", "-c", "ip route show; ip -6 route show"],
            "fdb.txt": ["bridge", "fdb", "show"],
            "neigh.txt": ["sh", "-c", "ip neigh show; ip -6 neigh show"],
            "sockets.txt": ["ss", "-tanp"],
            "nft-counters.txt": ["nft", "list", "counters"],
        }
        dump_commands(self.run, commands, dest, header=f"# agent {running}\n")

    # -- inspection (no private keys ever leave these)
    def wg_show(self, ifname: str = "vnwg0") -> str:
        """``wg show`` output: public keys, endpoints, handshakes (the private key is hidden).

        Raises LabError if ``wg`` fails (no such interface, no socket): "a key is absent" must never be
        what a failed read looks like."""
        return self.run(["wg", "show", ifname]).stdout

    def wg_peers(self, ifname: str = "vnwg0") -> dict[str, dict[str, str]]:
        """Public key -> {endpoints, allowed_ips, latest_handshakes}.

        Read with public-only ``wg show`` subcommands (never ``dump``, which prints the private key).
        Raises LabError if ``wg`` fails, so a missing key means the interface has no such peer.
        """
        peers: dict[str, dict[str, str]] = {}
        for what in ("endpoints", "allowed-ips", "latest-handshakes"):
            res = self.run(["wg", "show", ifname, what])
            for line in res.stdout.splitlines():
                key, _, value = line.partition("\t")
                if key:
                    peers.setdefault(key, {})[what.replace("-", "_")] = value.strip()
        return peers

    def links(self) -> dict[str, dict[str, Any]]:
        """name -> ``ip -j link`` object for every link in the host namespace."""
        out = self.run(["ip", "-j", "-d", "link", "show"]).stdout
        return {link["ifname"]: link for link in json.loads(out or "[]")}

    def ifindexes(self, prefix: str = "") -> dict[str, int]:
        return {
            name: int(link["ifindex"])
            for name, link in self.links().items()
            if name.startswith(prefix)
        }

    def snapshot(self) -> dict[str, Any]:
        """The parts of the data plane the agent owns, for before/after comparisons.

        Dynamic state (learned FDB entries, non-permanent neighbours, handshake
        times) is left out because it changes on its own.
        """
        links = {
            name: (link["ifindex"], link.get("linkinfo", {}).get("info_kind"), link.get("mtu"),
                   link.get("master"), link.get("ifalias"), link.get("address"))
            for name, link in self.links().items()
        }
        fdb = sorted(
            line.strip()
            for line in self.run(["bridge", "fdb", "show"]).stdout.splitlines()
            if "permanent" in line or "static" in line
        )
        neigh = sorted(
            line.strip()
            for line in self.run(["ip", "neigh", "show", "nud", "permanent"]).stdout.splitlines()
        ) + sorted(
            line.strip()
            for line in self.run(
                ["ip", "-6", "neigh", "show", "nud", "permanent"]
            ).stdout.splitlines()
        )
        # "tentative" (IPv6 DAD still running on a new link) is the kernel's transient, not ours.
        addrs = sorted(
            line.split("\\")[0].replace(" tentative", "").strip()
            for line in self.run(["ip", "-o", "addr", "show"]).stdout.splitlines()
        )
        peers = {
            k: {"endpoint": v.get("endpoints"), "allowed_ips": v.get("allowed_ips")}
            for k, v in self.wg_peers().items()
        }
        return {"links": links, "fdb": fdb, "neigh": neigh, "addrs": addrs, "wg_peers": peers}

    def nft_counter(self, name: str) -> int:
        """Packets counted by the named counter of ``inet veilnet``."""
        out = self.run(["nft", "-j", "list", "counter", "inet", "veilnet", name]).stdout
        return next(int(o["counter"]["packets"]) for o in json.loads(out)["nftables"] if "counter" in o)

    def snmp_counter(self, table: str, name: str) -> int:
        """A counter from /proc/net/snmp (``Ip``, ``FragCreates``) or snmp6 (``Ip6``, ``Ip6FragCreates``)."""
        if table == "Ip6":
            for line in self.run(["cat", "/proc/net/snmp6"]).stdout.splitlines():
                k, _, v = line.partition(" ")
                if k == name:
                    return int(v.strip())
            raise KeyError(name)
        lines = [
            line.split()
            for line in self.run(["cat", "/proc/net/snmp"]).stdout.splitlines()
            if line.startswith(table + ":")
        ]
        header, values = lines[0], lines[1]
        return int(values[header.index(name)])


def tail(text: str, n: int) -> str:
    return "\n".join(text.splitlines()[-n:])


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class Lab:
    """Namespaces for an underlay, hosts and endpoints; always torn down on exit."""

    def __init__(self, prefix: str = "vnl", *, agent_bin: Path | str | None = None) -> None:
        # $VEILNET_LAB_TAG lets two checkouts run their suites side by side without sharing namespaces.
        prefix = os.environ.get("VEILNET_LAB_TAG", "") + prefix
        if not prefix or "/" in prefix or len(prefix) > 12:
            raise ValueError(f"bad lab prefix {prefix!r}")
        self.prefix = prefix
        self._agent_bin = Path(agent_bin) if agent_bin else None
        self.underlay_ns = f"{prefix}-ul"
        self.run_dir = Path(f"/run/{prefix}")
        self.mnt_dir = Path(f"/run/{prefix}-mnt")
        self.hosts: dict[str, Host] = {}
        self.endpoints: dict[str, Endpoint] = {}
        self.topology: Topology | None = None
        self.controller: Any = None  # ctl.ControllerProcess, once started
        self._port_seq = 0
        self._active = False

    @property
    def agent_bin(self) -> Path:
        if self._agent_bin is None:
            self._agent_bin = find_agent_bin()
        return self._agent_bin

    # -- lifecycle
    def __enter__(self) -> Lab:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        if exc_type is not None and self._active:
            # A failure while building (a fixture's setup) never reaches the test report hook:
            # keep the evidence here, before teardown removes it.
            stamp = time.strftime("%H%M%S")
            dest = results_dir() / "failures"
            with contextlib.suppress(Exception):
                self.collect_diagnostics(dest / f"lab-{self.prefix}-{exc_type.__name__}-{stamp}")
        self.teardown()

    def start(self) -> None:
        if os.geteuid() != 0:
            raise LabError("the lab needs root")
        self.cleanup_leftovers()
        self._active = True
        atexit.register(self.teardown)
        try:
            self._make_netns(self.underlay_ns)
            # The underlay switch itself speaks no IPv6 (no router solicitations on the wire).
            for conf in ("all", "default"):
                self.run_ul(["sysctl", "-qw", f"net.ipv6.conf.{conf}.disable_ipv6=1"])
            # A fixed MAC: a bridge without one takes its lowest port's, so it changed whenever a host was
            # added, and hosts that had already resolved the controller (192.0.2.2, on this bridge) kept
            # sending to the old MAC, which the bridge's IP stack drops as "other host" until the ARP entry
            # expires (up to ~45 s of SYNs lost; seen as control_e2e setup timeouts in CI).
            self.run_ul(["ip", "link", "add", UNDERLAY_BRIDGE, "address", UNDERLAY_BRIDGE_MAC, "type", "bridge"])
            self.run_ul(["ip", "link", "set", UNDERLAY_BRIDGE, "up"])
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.mnt_dir.mkdir(parents=True, exist_ok=True)
            # A private bind mount: the mount-namespace files below must not propagate.
            sh(["mount", "--bind", str(self.mnt_dir), str(self.mnt_dir)])
            sh(["mount", "--make-private", str(self.mnt_dir)])
        except BaseException:
            self.teardown()
            raise

    def ul_cmd(self, cmd: Cmd) -> list[str]:
        """``cmd`` to run in the underlay switch's namespace (for ``capture``)."""
        return ["nsenter", f"--net={NETNS_DIR / self.underlay_ns}", "--", *_argv(cmd)]

    def run_ul(self, cmd: Cmd, **kw: Any) -> subprocess.CompletedProcess[str]:
        return sh(self.ul_cmd(cmd), **kw)

    def _make_netns(self, name: str) -> None:
        sh(["ip", "netns", "add", name])
        sh(["ip", "-n", name, "link", "set", "lo", "up"])

    # -- building
    def add_host(self, name: str, ipv4: str, ipv6: str | None = None) -> Host:
        if name in self.hosts:
            raise LabError(f"host {name} exists")
        ip4 = ipaddress.IPv4Address(ipv4)
        if ip4 not in ipaddress.IPv4Network("192.0.2.0/24"):
            raise LabError(f"underlay IPv4 must be in 192.0.2.0/24, got {ipv4}")
        if ipv6 is not None and ipaddress.IPv6Address(ipv6) not in ipaddress.IPv6Network(
            "2001:db8::/64"
        ):
            raise LabError(f"underlay IPv6 must be in 2001:db8::/64, got {ipv6}")
        host = Host(self, name, ipv4, ipv6)
        self.hosts[name] = host
        ns = host.netns
        self._make_netns(ns)
        self._port_seq += 1
        port = f"ulp{self._port_seq}"
        self.run_ul(["ip", "link", "add", port, "type", "veth", "peer", "name", "ul0", "netns", ns])
        self.run_ul(["ip", "link", "set", port, "master", UNDERLAY_BRIDGE, "up"])
        n = ["ip", "-n", ns]
        if ipv6 is None:
            sh(["nsenter", f"--net={NETNS_DIR / ns}", "--",
                "sysctl", "-qw", "net.ipv6.conf.ul0.disable_ipv6=1"])
        sh([*n, "addr", "add", f"{ipv4}/{UNDERLAY_PREFIXLEN_V4}", "dev", "ul0"])
        if ipv6 is not None:
            sh([*n, "addr", "add", f"{ipv6}/{UNDERLAY_PREFIXLEN_V6}", "dev", "ul0", "nodad"])
        sh([*n, "link", "set", "ul0", "up"])
        # Private mount namespace: its own /run/wireguard (wireguard-go's socket directory).
        # Slave propagation keeps namespaces added later under /run/netns visible inside.
        host.mnt.touch()
        sh([
            "unshare", f"--mount={host.mnt}", "--propagation", "slave",
            "sh", "-c",
            "mkdir -p /run/wireguard && mount -t tmpfs -o mode=0700 none /run/wireguard",
        ])
        host.dir.mkdir(parents=True, exist_ok=True)
        return host

    def add_endpoint(self, name: str) -> Endpoint:
        if name in self.endpoints:
            raise LabError(f"endpoint {name} exists")
        ep = Endpoint(self, name)
        self.endpoints[name] = ep
        self._make_netns(ep.netns)
        return ep

    def host(self, name: str) -> Host:
        return self.hosts[name]

    def endpoint(self, name: str) -> Endpoint:
        return self.endpoints[name]

    # -- topology
    def netns_of(self, endpoint: str) -> str:
        return f"{self.prefix}-{endpoint}"

    def build(
        self,
        topo: Topology,
        *,
        resync_interval: float = 2.0,
        log_level: str = "info",
        backend: str = "auto",
        start_agents: bool = True,
        ready_timeout: float = 30,
    ) -> None:
        """Create the hosts and endpoints of ``topo``, identities, configs, state files; start agents."""
        self._config_args = {
            "resync_interval": resync_interval, "log_level": log_level, "backend": backend,
        }
        self.apply_topology(topo, start_new_agents=False)
        if start_agents:
            self.start_agents(ready_timeout=ready_timeout)

    def apply_topology(self, topo: Topology, *, start_new_agents: bool = True) -> list[Host]:
        """Make ``topo`` current: create missing hosts/endpoints, rewrite every state file.

        Returns the hosts created now (their agents are started if ``start_new_agents``).
        """
        new_hosts = []
        for h in topo.hosts:
            if h.name not in self.hosts:
                host = self.add_host(h.name, h.underlay_ipv4, h.underlay_ipv6)
                host.write_config(
                    listen_port=h.listen_port, underlay_address=h.underlay_address,
                    **getattr(self, "_config_args", {}),
                )
                host.identity()
                new_hosts.append(host)
        for e in topo.endpoints:
            if e.name not in self.endpoints:
                self.add_endpoint(e.name)
        keys = {h.name: self.hosts[h.name].public_key or "" for h in topo.hosts}
        for h in topo.hosts:
            self.hosts[h.name].write_state(topo.state_for(h.name, keys, self.netns_of))
        self.topology = topo
        if start_new_agents:
            for host in new_hosts:
                host.start_agent()
        return new_hosts

    def configure_host(self, spec: HostSpec, **config: Any) -> Host:
        """Create the host's namespaces and write its agent config (the lab's defaults, overridden by ``config``)."""
        host = self.add_host(spec.name, spec.underlay_ipv4, spec.underlay_ipv6)
        args = {**getattr(self, "_config_args", {}), **config}
        host.write_config(listen_port=spec.listen_port, underlay_address=spec.underlay_address, **args)
        return host

    def start_controller(self, **kw: Any) -> Any:
        """A real controller in the underlay namespace at 192.0.2.2 (ports 7443 mutual TLS, 7444 join)."""
        from ctl import ControllerProcess

        self.run_ul(["ip", "addr", "add", f"{CONTROLLER_IP}/24", "dev", UNDERLAY_BRIDGE])
        ctl = ControllerProcess(self.run_dir / "controller", host=CONTROLLER_IP, netns=self.underlay_ns,
                                server_names=[CONTROLLER_IP], control_port=7443, bootstrap_port=7444, **kw)
        self.controller = ctl
        ctl.init()
        ctl.start()
        return ctl

    def write_spec(self, topo: Topology, name: str = "spec.json") -> Path:
        path = self.run_dir / name
        _atomic_write(path, json.dumps(network_spec(topo, self.netns_of), indent=2) + "\n")
        return path

    def build_controlled(self, topo: Topology, *, resync_interval: float = 2.0, log_level: str = "info",
                         ready_timeout: float = 30, apply_timeout: float = 60, **controller_kw: Any) -> Any:
        """Like ``build``, but a controller distributes the state: start it, join every host with a token,
        start the agents in controller mode and apply ``topo`` as the network spec (waiting for every ack)."""
        self._config_args = {"resync_interval": resync_interval, "log_level": log_level, "backend": "auto"}
        ctl = self.start_controller(**controller_kw)
        for h in topo.hosts:
            self.configure_host(h).join(ctl)
        for e in topo.endpoints:
            self.add_endpoint(e.name)
        for host in self.hosts.values():
            host.start_agent(wait_ready=False)
        for host in self.hosts.values():
            host.wait_for_log("control_connected", timeout=ready_timeout)
        self.apply_spec(topo, message="lab build", wait=apply_timeout)
        return ctl

    def apply_spec(self, topo: Topology, *, message: str = "test", wait: float = 60) -> int:
        """Apply ``topo`` through veilctl as the controller's spec; returns the revision once all nodes applied it."""
        revision = int(self.controller.apply(self.write_spec(topo), message=message, wait=wait))
        self.topology = topo
        return revision

    def start_agents(self, ready_timeout: float = 30) -> None:
        for host in self.hosts.values():
            if not host.agent_running():
                host.start_agent(wait_ready=False)
        for host in self.hosts.values():
            host.wait_for_log("ready", timeout=ready_timeout)

    def wait_connectivity(self, timeout: float = 30) -> None:
        """Wait until every pair of endpoints on the same segment, across hosts, answers pings."""
        assert self.topology is not None
        topo = self.topology
        for a in topo.endpoints:
            for b in topo.endpoints:
                if a.name < b.name and a.segment == b.segment and a.host != b.host:
                    for ip in b.ips:
                        if not self.endpoint(a.name).wait_ping(ip, timeout):
                            raise LabError(f"{a.name} cannot reach {b.name} at {ip}")

    def collect_diagnostics(self, dest: Path) -> None:
        """Every host's diagnostics (``Host.collect_diagnostics``) and the controller's log under ``dest``."""
        for name, host in self.hosts.items():
            host.collect_diagnostics(dest / name)
        dest.mkdir(parents=True, exist_ok=True)
        dump_commands(self.run_ul, {"underlay-links.txt": ["ip", "-d", "link", "show"],
                                    "underlay-addresses.txt": ["ip", "addr", "show"],
                                    "underlay-sockets.txt": ["ss", "-tanp"],
                                    "underlay-fdb.txt": ["bridge", "fdb", "show"],
                                    "underlay-neigh.txt": ["ip", "neigh", "show"]}, dest)
        if self.controller is not None:
            with contextlib.suppress(OSError):
                if self.controller.log_path.exists():
                    dest.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(self.controller.log_path, dest / "controller.log")

    def logs(self, since: dict[str, int] | None = None) -> str:
        """Every host's agent log (for test failure reports)."""
        parts = []
        for name, host in self.hosts.items():
            parts.append(f"===== {name} agent log ({host.log_path}) =====")
            parts.append(host.log_text((since or {}).get(name, 0)) or "(empty)")
        return "\n".join(parts)

    # -- attackers
    def add_attacker(self, ipv4: str = "192.0.2.99", v6: bool = False) -> tuple[str, str]:
        """A namespace on the underlay switch, outside the overlay: (namespace, the MAC of its interface).
        Its name has the lab's prefix, so teardown removes it even if the test does not."""
        ns = f"{self.prefix}-atk"
        sh(["ip", "netns", "add", ns])
        self.run_ul(["ip", "link", "add", "ulatk", "type", "veth", "peer", "name", "ul0", "netns", ns])
        self.run_ul(["ip", "link", "set", "ulatk", "master", UNDERLAY_BRIDGE, "up"])
        sh(["ip", "-n", ns, "addr", "add", f"{ipv4}/24", "dev", "ul0"])
        if v6:
            sh(["ip", "-n", ns, "addr", "add", "2001:db8::99/64", "dev", "ul0", "nodad"])
        sh(["ip", "-n", ns, "link", "set", "ul0", "up"])
        mac = json.loads(sh(["ip", "-n", ns, "-j", "link", "show", "ul0"]).stdout)[0]["address"]
        return ns, mac

    def drop_attacker(self, ns: str) -> None:
        self.run_ul(["ip", "link", "del", "ulatk"], check=False)
        sh(["ip", "netns", "delete", ns], check=False)

    # -- teardown
    def _own_netns(self) -> list[str]:
        try:
            names = os.listdir(NETNS_DIR)
        except FileNotFoundError:
            return []
        return sorted(n for n in names if n.startswith(self.prefix + "-"))

    def _own_mntns(self) -> list[Path]:
        try:
            return sorted(p for p in self.mnt_dir.iterdir() if p.is_file())
        except (FileNotFoundError, NotADirectoryError):
            return []

    def lab_processes(self) -> list[int]:
        """PIDs whose network or mount namespace belongs to this lab."""
        return namespace_processes([NETNS_DIR / n for n in self._own_netns()] + self._own_mntns())

    def kill_lab_processes(self, timeout: float = 5) -> None:
        kill_namespace_processes([NETNS_DIR / n for n in self._own_netns()] + self._own_mntns(), timeout)
        # Reap our own children so they do not linger as zombies.
        for host in self.hosts.values():
            if host.proc is not None:
                with contextlib.suppress(Exception):
                    host.proc.wait(1)

    def teardown(self) -> None:
        """Stop agents, kill every process in the lab's namespaces, delete everything.

        Ctrl-C/SIGTERM are held back while this runs so a second one cannot
        interrupt the cleanup half-way.
        """
        held = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, held)
        try:
            for host in self.hosts.values():
                with contextlib.suppress(Exception):
                    host.stop_agent(signal.SIGTERM, timeout=5)
            if self.controller is not None:
                with contextlib.suppress(Exception):
                    self.controller.stop()
            self.cleanup_leftovers()
            if self._active:
                atexit.unregister(self.teardown)
            self._active = False
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)

    def cleanup_leftovers(self) -> None:
        """Remove everything with this lab's prefix (also from a crashed earlier run)."""
        with contextlib.suppress(Exception):
            self.kill_lab_processes()
        for ns in self._own_netns():
            if sh(["ip", "netns", "delete", ns], check=False).returncode != 0:
                path = NETNS_DIR / ns
                _umount_all(path)
                with contextlib.suppress(OSError):
                    path.unlink()
        for p in self._own_mntns():
            _umount_all(p)
        if self.mnt_dir.exists():
            _umount_all(self.mnt_dir)
            shutil.rmtree(self.mnt_dir, ignore_errors=True)
        shutil.rmtree(self.run_dir, ignore_errors=True)

    def leftovers(self) -> list[str]:
        """What of this lab still exists (empty after a clean teardown)."""
        left = [f"netns {n}" for n in self._own_netns()]
        findmnt = sh(["findmnt", "-rn", "-o", "TARGET"], check=False).stdout.splitlines()
        left += [
            f"mount {m}" for m in findmnt
            if m == str(self.mnt_dir) or m.startswith(f"{self.mnt_dir}/")
            or m.startswith(f"{self.run_dir}/") or m == str(self.run_dir)
            or m.startswith(f"{NETNS_DIR}/{self.prefix}-")
        ]
        left += [f"process {p}" for p in self.lab_processes()]
        left += [f"path {p}" for p in (self.run_dir, self.mnt_dir) if p.exists()]
        return left


def install_signal_handlers() -> None:
    """Turn SIGINT/SIGTERM/SIGHUP into KeyboardInterrupt so ``with Lab(...)`` tears down.

    SIGINT is set explicitly because a parent may have left it ignored (background jobs).
    """

    def _raise(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, _raise)


class Pinger:
    """A ping that runs until stopped, for "no packet lost while X happened" measurements.

    ``ping -i INTERVAL`` without a count: the measurement window is not a guess of how long X takes.
    The test waits for X to be over (an observable event), then for ``after`` more replies, then
    stops it. Loss is read per sequence number: every request below the highest one answered must
    have been answered (the last request in flight when ping is stopped is not a loss).
    """

    def __init__(self, endpoint: Endpoint, dst: str, interval: float = 0.02, deadline: float = 300) -> None:
        import re
        import threading

        self._seq_re = re.compile(r"icmp_seq=(\d+)")
        self.replies: set[int] = set()
        self.lines: list[str] = []
        self.proc = endpoint.popen(["ping", "-n", "-i", str(interval), "-W", "1", "-w", str(int(deadline)), dst],
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip())
            m = self._seq_re.search(line)
            if m and " bytes from " in line:
                self.replies.add(int(m.group(1)))

    def running(self) -> bool:
        return self.proc.poll() is None

    def highest(self) -> int:
        return max(self.replies, default=0)

    def wait_replies(self, n: int, timeout: float = 30, what: str = "ping replies") -> int:
        """Wait until ``n`` more replies than now have arrived; returns the new highest sequence number."""
        target = len(self.replies) + n
        wait_until(lambda: len(self.replies) >= target or not self.running(), timeout, 0.02, what)
        if not self.running():
            raise LabError(f"ping ended early:\n{self.output()}")
        return self.highest()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._reader.join(5)

    def lost(self) -> list[int]:
        """Sequence numbers sent and never answered, below the highest answered one."""
        return [s for s in range(1, self.highest() + 1) if s not in self.replies]  # ping counts from 1

    def output(self) -> str:
        return "\n".join(self.lines[-30:])

    def __enter__(self) -> Pinger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


CAPTURES: list[Path] = []  # every pcap written by ``capture`` (the failure report keeps a test's own)


@contextlib.contextmanager
def capture(
    ns_cmd: Callable[[Cmd], list[str]],
    iface: str,
    pcap: Path,
    bpf: str = "",
    snaplen: int = 0,
) -> Iterator[Path]:
    """Run tcpdump on ``iface`` (in the namespace of ``ns_cmd``) while the block runs."""
    # --immediate-mode: otherwise packets sit in the ring buffer for up to 1 s and a short capture misses them.
    argv = ["tcpdump", "-i", iface, "-n", "-U", "--immediate-mode", "-w", str(pcap)]
    if snaplen:
        argv += ["-s", str(snaplen)]
    if bpf:
        argv += [bpf]
    errlog = pcap.with_suffix(".err")
    CAPTURES.append(pcap)
    with open(errlog, "wb") as err:
        proc = subprocess.Popen(ns_cmd(argv), stdout=subprocess.DEVNULL, stderr=err)
    try:
        wait_until(
            lambda: b"listening on" in errlog.read_bytes() or proc.poll() is not None,
            10, 0.05, "tcpdump start",
        )
        if proc.poll() is not None:
            raise LabError(f"tcpdump failed: {errlog.read_text()}")
        yield pcap
    finally:
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def read_pcap(pcap: Path, bpf: str = "") -> list[str]:
    """Decoded one-line summaries of the packets in ``pcap`` matching ``bpf``.

    Raises LabError when tcpdump cannot read the file (missing, truncated, a bad filter): an empty list
    always means "no such packet was captured", never "the capture failed".
    """
    argv = ["tcpdump", "-r", str(pcap), "-nn"] + ([bpf] if bpf else [])
    res = sh(argv)
    return [line for line in res.stdout.splitlines() if line.strip()]


def wait_pcap(pcap: Path, cond: Callable[[list[str]], Any], timeout: float = 10, bpf: str = "",
              what: str = "packet captured") -> list[str]:
    """Poll a capture still being written until ``cond(lines)`` holds; return the lines.

    The positive control of a negative check: once the control (sent after the probes, on the same
    path) is in the file, anything the probes would have caused is in it too. A read of the live file
    may fail on a packet written half-way: that poll counts as "not yet".
    """
    def poll() -> list[str] | None:
        try:
            lines = read_pcap(pcap, bpf)
        except LabError:
            return None
        return lines if cond(lines) else None

    found: list[str] = wait_until(poll, timeout, 0.05, f"{pcap.name}: {what}")
    return found


# --------------------------------------------------------------------------- self-test


def self_test(prefix: str = "vnlst") -> None:
    """Check the lab without the agent: underlay, two wireguard-go at once, clean teardown."""

    def step(msg: str) -> None:
        print(f"--- {msg}", flush=True)

    t0 = time.monotonic()
    with Lab(prefix) as lab:
        step("three hosts on the underlay")
        hosts = [
            lab.add_host("host-a", "192.0.2.11", "2001:db8::11"),
            lab.add_host("host-b", "192.0.2.12", "2001:db8::12"),
            lab.add_host("host-c", "192.0.2.13"),
        ]
        ep = lab.add_endpoint("x-ep")
        bridge = json.loads(lab.run_ul(["ip", "-j", "link", "show", UNDERLAY_BRIDGE]).stdout)[0]
        if bridge["address"] != UNDERLAY_BRIDGE_MAC:  # a MAC that moves as hosts join strands their ARP entries
            raise LabError(f"underlay bridge MAC {bridge['address']}, not the fixed {UNDERLAY_BRIDGE_MAC}")
        for h in hosts:
            for other in hosts:
                if other is not h:
                    h.run(["ping", "-n", "-c", "1", "-W", "2", other.ipv4])
        hosts[0].run(["ping", "-n", "-c", "1", "-W", "2", "2001:db8::12"])
        step("endpoint namespace created later is visible in the hosts' mount namespaces")
        for h in hosts:
            h.run(["test", "-e", str(NETNS_DIR / ep.netns)])
            h.run(["ip", "-n", ep.netns, "link", "show", "lo"])
        step("wireguard-go vnwg0 in two hosts at once, tunnel between them")
        keys = {}
        for i, h in enumerate(hosts[:2]):
            priv = sh(["wg", "genkey"]).stdout.strip()
            keyfile = h.dir / "wg.key"
            keyfile.write_text(priv + "\n")
            os.chmod(keyfile, 0o600)
            keys[h.name] = sh(["wg", "pubkey"], input=priv).stdout.strip()
            h.run(["wireguard-go", "vnwg0"])
            h.run(["wg", "set", "vnwg0", "private-key", str(keyfile), "listen-port", str(WG_PORT)])
            h.run(["ip", "addr", "add", f"198.51.100.{11 + i}/24", "dev", "vnwg0"])
            h.run(["ip", "link", "set", "vnwg0", "up"])
        a, b = hosts[0], hosts[1]
        a.run(["wg", "set", "vnwg0", "peer", keys["host-b"], "endpoint", f"{b.ipv4}:{WG_PORT}",
               "allowed-ips", "198.51.100.12/32"])
        b.run(["wg", "set", "vnwg0", "peer", keys["host-a"], "endpoint", f"{a.ipv4}:{WG_PORT}",
               "allowed-ips", "198.51.100.11/32"])
        wait_until(
            lambda: a.run(["ping", "-n", "-c", "1", "-W", "1", "198.51.100.12"],
                          check=False).returncode == 0,
            15, 0.1, "ping over wireguard-go",
        )
        assert "private key" not in a.wg_show() or "(hidden)" in a.wg_show()
        assert lab.hosts["host-a"].wg_peers()[keys["host-b"]]["endpoints"] == f"{b.ipv4}:{WG_PORT}"
        wg_pids = sh(["pgrep", "-x", "wireguard-go"], check=False).stdout.split()
        ours = set(map(str, lab.lab_processes()))
        assert len(ours & set(wg_pids)) == 2, (wg_pids, ours)
        print(a.wg_show())
    step("teardown")
    left = lab.leftovers()
    assert not left, left
    netns = sh(["ip", "netns", "list"]).stdout
    assert f"{prefix}-" not in netns, netns
    assert prefix not in sh(["findmnt"]).stdout
    # Killed daemons may linger a moment as zombies until init reaps them.
    ours_left = {p for p in ours if _alive(int(p))}
    assert not ours_left, ours_left
    print(f"lab self-test passed in {time.monotonic() - t0:.1f}s")


def main(argv: Iterable[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    st = sub.add_parser("self-test", help="check the lab without the agent")
    st.add_argument("--prefix", default="vnlst")
    cl = sub.add_parser("cleanup", help="remove everything a crashed lab left behind")
    cl.add_argument("--prefix", required=True)
    args = p.parse_args(list(argv) if argv is not None else None)
    install_signal_handlers()
    if args.cmd == "self-test":
        self_test(args.prefix)
    else:
        lab = Lab(args.prefix)
        lab.cleanup_leftovers()
        left = lab.leftovers()
        print("clean" if not left else "left: " + ", ".join(left))
        return 1 if left else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
