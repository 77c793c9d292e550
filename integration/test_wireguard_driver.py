"""WireGuardDriver against the real kernel and wireguard-go (no mocks).

Each simulated host is a network namespace (``vnt-wg-*``) plus a persistent
private mount namespace with its own tmpfs on /run/wireguard, because
wireguard-go's control socket path is the same in every network namespace.
The driver runs in a fresh process per call (``wg_driver_host.py``) entered
into both namespaces, so every call is also an agent restart.

Addresses: 192.0.2.0/24 underlay (veth between the hosts), 198.51.100.0/24
and 2001:db8::/32 transport, 198.18.0.0/15 for bulk fake peers.
"""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import itertools
import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from veilnet_agent.core.naming import OWNER_MARK, WG_IFNAME

pytestmark = pytest.mark.root

PYTHON = sys.executable
HERE = Path(__file__).resolve().parent
HOST_HELPER = HERE / "wg_driver_host.py"
KERNEL_MESSAGE = 'WireGuard kernel module not available; use backend = "userspace" or "auto"'
_names = itertools.count(1)

Json = dict[str, Any]


def _require_root() -> None:
    # conftest.py refuses to run root tests without root; this guards direct use.
    assert os.geteuid() == 0, "needs root"


def sh(*argv: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(argv), input=input, capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr}")
    return proc


# ---------------------------------------------------------------- simulated hosts


@dataclass
class SimHost:
    netns: str
    mnt: Path
    state_dir: Path
    net_ino: int = 0
    mnt_ino: int = 0
    outputs: list[str] = field(default_factory=list)

    def enter(self, *argv: str) -> list[str]:
        return ["nsenter", f"--mount={self.mnt}", f"--net=/run/netns/{self.netns}", *argv]

    def run(self, *argv: str, check: bool = True, input: str | None = None
            ) -> subprocess.CompletedProcess[str]:
        return sh(*self.enter(*argv), check=check, input=input)

    def private_key(self) -> str | None:
        key_file = self.state_dir / "wireguard.key"
        return key_file.read_text().strip() if key_file.exists() else None

    def driver(self, command: str, payload: Any = None, backend: str = "auto") -> Json:
        """One driver call in a fresh process; checks it never shows the private key."""
        proc = self.run(
            PYTHON, str(HOST_HELPER), command, "--state-dir", str(self.state_dir),
            "--ifname", WG_IFNAME, "--backend", backend,
            input=None if payload is None else json.dumps(payload), check=False,
        )
        self.outputs.extend([proc.stdout, proc.stderr])
        key = self.private_key()
        assert key is None or (key not in proc.stdout and key not in proc.stderr)
        assert proc.returncode == 0, proc.stderr
        result: Json = json.loads(proc.stdout)
        return result

    def pubkey(self) -> str:
        return str(self.driver("pubkey")["public_key"])

    def apply(self, ops: list[Json], backend: str = "auto") -> Json:
        return self.driver("apply", ops, backend=backend)

    def observe(self) -> Json:
        return self.driver("observe")

    def wireguard_go_pids(self) -> list[int]:
        return [pid for pid in _pids_in(self.net_ino, self.mnt_ino) if _comm(pid) == "wireguard-go"]


def _ns_inode(path: str | Path) -> int:
    return os.stat(path).st_ino


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _is_live(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _pids_in(net_ino: int, mnt_ino: int) -> list[int]:
    """Live processes in the given network or mount namespace."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            net = os.stat(f"/proc/{entry}/ns/net").st_ino
            mnt = os.stat(f"/proc/{entry}/ns/mnt").st_ino
        except OSError:
            continue
        if (net == net_ino or mnt == mnt_ino) and _is_live(int(entry)):
            found.append(int(entry))
    return found


def _kill_all(pids: list[int]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and any(_is_live(p) for p in pids):
            time.sleep(0.05)
        pids = [p for p in pids if _is_live(p)]
        if not pids:
            return


def _create_host(mount_dir: Path, state_root: Path, hosts: list[SimHost]) -> SimHost:
    """Set up a host; it is registered first so a half-made host is still cleaned up."""
    name = f"vnt-wg-{os.getpid()}-{next(_names)}"
    host = SimHost(netns=name, mnt=mount_dir / name, state_dir=state_root / name / "state")
    hosts.append(host)
    sh("ip", "netns", "add", name)
    host.net_ino = _ns_inode(f"/run/netns/{name}")
    sh("ip", "-n", name, "link", "set", "lo", "up")
    host.mnt.touch()
    sh("unshare", f"--mount={host.mnt}", "--propagation", "slave", "sh", "-c",
       "mkdir -p /run/wireguard && mount -t tmpfs -o mode=0755 none /run/wireguard")
    host.mnt_ino = _ns_inode(host.mnt)
    return host


def _destroy_host(host: SimHost) -> None:
    """Kill whatever runs in the host (wireguard-go), drop its namespaces."""
    if host.net_ino or host.mnt_ino:
        _kill_all(_pids_in(host.net_ino, host.mnt_ino))
    if Path(f"/run/netns/{host.netns}").exists():
        sh("ip", "netns", "del", host.netns, check=False)
    if host.mnt.exists():
        sh("umount", str(host.mnt), check=False)
        host.mnt.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def mount_dir() -> Iterator[Path]:
    """A private bind mount to hold the mount-namespace files."""
    _require_root()
    path = Path(f"/run/vnt-wg-mnt-{os.getpid()}")
    path.mkdir(mode=0o700, exist_ok=True)
    sh("mount", "--bind", str(path), str(path))
    sh("mount", "--make-private", str(path))
    try:
        yield path
    finally:
        sh("umount", str(path), check=False)
        path.rmdir()


@pytest.fixture
def make_host(mount_dir: Path, tmp_path: Path) -> Iterator[Callable[[], SimHost]]:
    hosts: list[SimHost] = []
    try:
        yield lambda: _create_host(mount_dir, tmp_path, hosts)
    finally:
        for host in hosts:
            _destroy_host(host)


@pytest.fixture
def host(make_host: Callable[[], SimHost]) -> SimHost:
    return make_host()


@pytest.fixture
def pair(make_host: Callable[[], SimHost]) -> tuple[SimHost, SimHost]:
    """Two hosts joined by a veth underlay: 192.0.2.1 <-> 192.0.2.2."""
    h1, h2 = make_host(), make_host()
    sh("ip", "-n", h1.netns, "link", "add", "u0", "type", "veth", "peer", "name", "u0",
       "netns", h2.netns)
    for index, h in enumerate((h1, h2), start=1):
        sh("ip", "-n", h.netns, "addr", "add", f"192.0.2.{index}/24", "dev", "u0")
        sh("ip", "-n", h.netns, "link", "set", "u0", "up")
    return h1, h2


# ---------------------------------------------------------------- state builders


def fake_key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


def iface(public_key: str, port: int = 51820, mtu: int = 1420,
          addresses: tuple[str, ...] = ("198.51.100.1/24",)) -> Json:
    return {"name": WG_IFNAME, "listen_port": port, "public_key": public_key, "mtu": mtu,
            "addresses": sorted(addresses)}


def peer(public_key: str, endpoint: str = "", allowed: tuple[str, ...] = (),
         keepalive: int = 0) -> Json:
    return {"public_key": public_key, "endpoint": endpoint, "allowed_ips": sorted(allowed),
            "keepalive": keepalive}


def ensure(target: Json, create: bool = True) -> Json:
    return {"op": "ensure", "create": create, "target": target}


def sync(upserts: Sequence[Json] = (), removes: Sequence[str] = ()) -> Json:
    return {"op": "sync", "upserts": list(upserts), "removes": list(removes)}


def bulk_peers(count: int, keepalive: int = 0) -> list[Json]:
    base = int(ipaddress.ip_address("198.18.0.0"))
    return [
        peer(fake_key(), f"192.0.2.{i % 250 + 3}:{20000 + i}",
             (f"{ipaddress.ip_address(base + i)}/32",), keepalive)
        for i in range(count)
    ]


def by_key(peers: list[Json]) -> Json:
    return {p["public_key"]: p for p in peers}


def link_flags(h: SimHost) -> list[str]:
    out = sh("ip", "-n", h.netns, "-j", "link", "show", WG_IFNAME).stdout
    flags: list[str] = json.loads(out)[0]["flags"]
    return flags


def ping(h: SimHost, address: str, attempts: int = 10) -> bool:
    ping_once = ("ping", "-c", "1", "-W", "1", address)
    return any(h.run(*ping_once, check=False).returncode == 0 for _ in range(attempts))


# ---------------------------------------------------------------- tests


def test_private_key_created_0600_and_reused(host: SimHost) -> None:
    assert not host.state_dir.exists()
    first = host.pubkey()
    key_file = host.state_dir / "wireguard.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(host.state_dir.stat().st_mode) == 0o700
    assert host.pubkey() == first  # a restart keeps the identity
    derived = sh("wg", "pubkey", input=key_file.read_text()).stdout.strip()
    assert derived == first
    assert [p for p in host.state_dir.iterdir()] == [key_file]  # no temp files left


def test_kernel_backend_fails_clearly(host: SimHost) -> None:
    result = host.apply([ensure(iface(host.pubkey()))], backend="kernel")
    assert result["applied"] == 0
    assert result["failed"] == [KERNEL_MESSAGE]
    assert host.observe()["interface"] is None
    assert host.wireguard_go_pids() == []


def test_two_hosts_handshake_and_ping(pair: tuple[SimHost, SimHost]) -> None:
    h1, h2 = pair
    k1, k2 = h1.pubkey(), h2.pubkey()
    t1 = iface(k1, addresses=("198.51.100.1/24",))
    t2 = iface(k2, addresses=("198.51.100.2/24",))
    p_on_1 = peer(k2, "192.0.2.2:51820", ("198.51.100.2/32",), keepalive=25)
    p_on_2 = peer(k1, "192.0.2.1:51820", ("198.51.100.1/32",), keepalive=25)
    for h, target, p in ((h1, t1, p_on_1), (h2, t2, p_on_2)):
        result = h.apply([ensure(target), sync([p])])
        assert result["failed"] == [] and result["applied"] == 2

    assert ping(h1, "198.51.100.2"), "no ping through the WireGuard tunnel"
    assert ping(h2, "198.51.100.1")

    for h, target, p in ((h1, t1, p_on_1), (h2, t2, p_on_2)):
        obs = h.observe()  # a new process: wireguard-go outlived the one that started it
        assert obs["backend"] == "userspace"
        assert obs["interface"] == target
        assert obs["peers"] == {p["public_key"]: p}
        assert obs["handshakes"][p["public_key"]] > 0
        shown = h.run("wg", "show", WG_IFNAME, "latest-handshakes").stdout.split()
        assert shown[0] == p["public_key"] and int(shown[1]) > 0
        assert "UP" in link_flags(h)
        alias = json.loads(sh("ip", "-n", h.netns, "-j", "-d", "link", "show", WG_IFNAME)
                           .stdout)[0]["ifalias"]
        assert alias.startswith(OWNER_MARK)


def test_observe_round_trips_everything_applied(host: SimHost) -> None:
    target = iface(host.pubkey(), port=40123, mtu=1380,
                   addresses=("198.51.100.1/24", "198.51.100.129/25", "2001:db8:1::1/64"))
    peers = [
        peer(fake_key(), "192.0.2.2:51820", ("198.51.100.2/32", "2001:db8:1::2/128"), 25),
        peer(fake_key(), "[2001:db8::2]:51821", ("198.51.100.64/26",), 0),
        peer(fake_key(), "", ("198.51.100.3/32",), 10),  # no endpoint: it will call us
        peer(fake_key(), "192.0.2.4:1", (), 0),  # no allowed-ips
    ]
    result = host.apply([ensure(target), sync(peers)])
    assert result["failed"] == []
    obs = host.observe()
    assert obs["interface"] == target
    assert obs["peers"] == by_key(peers)
    assert obs["handshakes"] == {p["public_key"]: 0 for p in peers}
    # IPv6 address added without DAD: usable at once, never "tentative".
    addr = host.run("ip", "-6", "addr", "show", "dev", WG_IFNAME, "scope", "global").stdout
    assert "2001:db8:1::1/64" in addr and "tentative" not in addr


def test_allowed_ips_and_endpoint_are_normalised(host: SimHost) -> None:
    host.apply([ensure(iface(host.pubkey()))])
    key = fake_key()
    raw = peer(key, "[2001:DB8:0::2]:51820", ("198.51.100.77/24", "2001:DB8:0:0::5/128"))
    assert host.apply([sync([raw])])["failed"] == []
    assert host.observe()["peers"][key] == peer(
        key, "[2001:db8::2]:51820", ("198.51.100.0/24", "2001:db8::5/128"))


def test_one_peer_sync_changes_only_that_peer(host: SimHost) -> None:
    host.apply([ensure(iface(host.pubkey()))])
    peers = bulk_peers(50, keepalive=25)
    assert host.apply([sync(peers)]) == {"applied": 1, "failed": [], "requests": 50}
    before = host.observe()

    changed = dict(peers[7], endpoint="192.0.2.200:4000", keepalive=0,
                   allowed_ips=sorted(["198.51.100.8/29", "198.51.100.200/32"]))
    assert host.apply([sync([changed])]) == {"applied": 1, "failed": [], "requests": 1}
    after = host.observe()

    key = changed["public_key"]
    assert after["peers"][key] == changed  # allowed-ips replaced, not added to
    assert {k: v for k, v in after["peers"].items() if k != key} == {
        k: v for k, v in before["peers"].items() if k != key
    }
    assert after["interface"] == before["interface"]

    new = peer(fake_key(), "192.0.2.201:1", ("198.51.100.201/32",))
    assert host.apply([sync([new])])["requests"] == 1
    assert host.observe()["peers"] == {**after["peers"], new["public_key"]: new}


def test_remove_peer(host: SimHost) -> None:
    host.apply([ensure(iface(host.pubkey()))])
    peers = bulk_peers(20)
    host.apply([sync(peers)])
    gone = peers[3]["public_key"]
    assert host.apply([sync(removes=[gone])]) == {"applied": 1, "failed": [], "requests": 1}
    remaining = host.observe()["peers"]
    assert remaining == {k: v for k, v in by_key(peers).items() if k != gone}

    # Upsert and remove in one op; removing an absent peer is not an error.
    extra = peer(fake_key(), "192.0.2.9:9", ("198.51.100.9/32",))
    result = host.apply([sync([extra], removes=[peers[4]["public_key"], gone])])
    assert result["failed"] == []
    expected = {k: v for k, v in remaining.items() if k != peers[4]["public_key"]}
    assert host.observe()["peers"] == {**expected, extra["public_key"]: extra}


def test_many_removes_are_chunked(host: SimHost) -> None:
    host.apply([ensure(iface(host.pubkey()))])
    peers = bulk_peers(2500)
    assert host.apply([sync(peers)])["requests"] == 2500
    assert len(host.observe()["peers"]) == 2500
    result = host.apply([sync(removes=[p["public_key"] for p in peers])])
    assert result == {"applied": 1, "failed": [], "requests": 2500}
    assert host.observe()["peers"] == {}


def test_bad_peer_fails_clearly_and_others_apply(host: SimHost) -> None:
    host.apply([ensure(iface(host.pubkey()))])
    good = bulk_peers(3)
    bad = peer("not-a-key", "192.0.2.9:9", ("198.51.100.9/32",))
    result = host.apply([sync([good[0], bad, good[1], good[2]])])
    assert result["applied"] == 0 and result["requests"] == 3
    assert len(result["failed"]) == 1 and "not-a-key" in result["failed"][0]
    assert host.observe()["peers"] == by_key(good)


def test_applying_same_state_twice_is_stable(host: SimHost) -> None:
    target = iface(host.pubkey(), addresses=("198.51.100.1/24", "2001:db8:1::1/64"))
    peers = bulk_peers(10, keepalive=25)
    assert host.apply([ensure(target), sync(peers)])["failed"] == []
    first = host.observe()
    again = host.apply([ensure(target, create=False)])
    assert again == {"applied": 1, "failed": [], "requests": 0}  # nothing to change
    assert host.apply([sync(peers)])["failed"] == []
    second = host.observe()
    assert second["interface"] == first["interface"] == target
    assert second["peers"] == first["peers"] == by_key(peers)  # a planner would emit nothing


def test_existing_interface_is_brought_to_target(host: SimHost, tmp_path: Path) -> None:
    target = iface(host.pubkey(), port=51820, mtu=1420,
                   addresses=("198.51.100.1/24", "2001:db8:1::1/64"))
    host.apply([ensure(target)])
    other_key = tmp_path / "other.key"
    other_key.write_text(sh("wg", "genkey").stdout)
    host.run("wg", "set", WG_IFNAME, "private-key", str(other_key), "listen-port", "40000")
    host.run("ip", "link", "set", WG_IFNAME, "mtu", "1300")
    host.run("ip", "addr", "add", "198.51.100.99/24", "dev", WG_IFNAME)
    host.run("ip", "addr", "del", "2001:db8:1::1/64", "dev", WG_IFNAME)
    host.run("ip", "link", "set", WG_IFNAME, "down")
    drifted = host.observe()["interface"]
    assert drifted["public_key"] != target["public_key"] and drifted["listen_port"] == 40000

    result = host.apply([ensure(target, create=False)])
    assert result["failed"] == [] and result["requests"] == 6  # key+port, mtu, 2 addrs, up
    assert host.observe()["interface"] == target
    assert "UP" in link_flags(host)


def test_remove_interface_only_when_owned(host: SimHost) -> None:
    host.apply([ensure(iface(host.pubkey()))])
    assert host.wireguard_go_pids()
    host.driver("remove")
    assert host.observe()["interface"] is None
    deadline = time.monotonic() + 5
    while host.wireguard_go_pids() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert host.wireguard_go_pids() == []  # wireguard-go exits with its link
    assert host.run("ls", "/run/wireguard").stdout.split() == []

    host.apply([ensure(iface(host.pubkey()))])
    host.run("ip", "link", "set", WG_IFNAME, "alias", "")  # no longer ours
    host.driver("remove")
    assert host.observe()["interface"] is not None


def test_private_key_never_printed(pair: tuple[SimHost, SimHost], tmp_path: Path) -> None:
    h1, h2 = pair
    k1 = h1.pubkey()
    target = iface(k1)
    h1.apply([ensure(target), sync([peer(h2.pubkey(), "192.0.2.2:51820", ("198.51.100.2/32",))])])
    other_key = tmp_path / "other.key"
    other_key.write_text(sh("wg", "genkey").stdout)
    h1.run("wg", "set", WG_IFNAME, "private-key", str(other_key))  # force a key re-apply
    h1.apply([ensure(target, create=False)])
    h1.apply([sync([peer("not-a-key")])])  # an error path
    h1.observe()
    h1.driver("remove")
    secret = h1.private_key()
    assert secret and len(secret) == 44
    log = "".join(h1.outputs)
    assert "wg set" in log and "wireguard_key_generated" in log  # logs were captured
    assert secret not in log
    assert secret.rstrip("=") not in log
