"""Shared machinery of the fuzz targets (``tests/test_fuzz_*.py``): profiles, input counts, strategies.

Profiles (``VEILNET_FUZZ``): ``ci`` (the default; a bounded number of inputs per target, about a minute
and a half for all of them on a 2-core machine) and ``campaign`` (many inputs per run; ``scripts/fuzz``
repeats runs per target for a time budget). ``VEILNET_FUZZ_EXAMPLES`` overrides the number of inputs per
run. Every input has a time bound: hypothesis' deadline (``VEILNET_FUZZ_DEADLINE_MS``, default 5 s), far
above what any input takes (milliseconds) and far below what a quadratic blow-up would.

Each target calls ``count(name)`` once per input; ``COUNTS`` is reported at the end of a pytest run
(``tests/conftest.py``) and by the campaign.

The strategies build inputs the way an attacker or a careless operator would: valid documents (so the
acceptance paths and round trips are exercised, with values in every spelling the validators accept),
then mutated (a value replaced by anything JSON-like, a key dropped or added, an entry duplicated),
and texts mutated below the structure (YAML tokens, tags, anchors, numbers of every YAML form, bytes
that are no UTF-8).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import yaml
from factories import wg_key
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from veilnet.v1 import state_pb2 as spb
from veilnet_agent.control import wire

PROFILE = os.environ.get("VEILNET_FUZZ", "ci")
COUNTS: Counter[str] = Counter()
# Inputs per run in the CI profile are set per target (about 5 s each here, about a minute for all).
_CI_EXAMPLES = int(os.environ.get("VEILNET_FUZZ_EXAMPLES", "0")) or None
DEADLINE = timedelta(milliseconds=int(os.environ.get("VEILNET_FUZZ_DEADLINE_MS", "5000")))

settings.register_profile(
    "veilnet-fuzz-ci", deadline=DEADLINE, database=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
                           HealthCheck.large_base_example],
)
settings.register_profile(
    "veilnet-fuzz-campaign", deadline=DEADLINE, database=None, print_blob=True,
    suppress_health_check=list(HealthCheck),
)


def fuzz_settings(ci_examples: int, campaign_examples: int = 5000) -> settings:
    """The settings of one target: its number of inputs per run under the active profile."""
    if PROFILE == "campaign":
        return settings(settings.get_profile("veilnet-fuzz-campaign"),
                        max_examples=_CI_EXAMPLES or campaign_examples)
    return settings(settings.get_profile("veilnet-fuzz-ci"), max_examples=_CI_EXAMPLES or ci_examples)


def count(target: str) -> None:
    COUNTS[target] += 1


# --------------------------------------------------------------------------- JSON-like values

_EDGE_TEXT = ["", " ", "\n", "\x00", "\ud800", "é", "\u00b2", "\u0663", "0", "-1", "1e999", "NaN", "null", "true",
              "yes", "~", "2023-02-30", "0x_", "1:2:3", "::", "::ffff:1.2.3.4", "fe80::1%eth0", "127.1",
              "10.0.0.0/8", "02:00:00:00:00:01", "02-00-00-00-00-01", "8000-8080", "9000-8000", "\u00b2-\u00b3",
              "a" * 64, "x" * 300, "node.zone", "blue", "host-a", "eth0", "..", "-", "a/b", "{}", "[]",
              wg_key("x"), wg_key("x").replace("=", "A"), wg_key("x") + "\n"]
SCALARS = st.one_of(
    st.none(), st.booleans(),
    st.integers(-(2**70), 2**70), st.sampled_from([0, 1, -1, 65535, 65536, 16777215, 16777216]),
    st.integers(1, 9).map(lambda d: d * 10**400),  # longer than any literal the loaders convert
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20), st.sampled_from(_EDGE_TEXT),
)
KEYS = st.one_of(st.text(max_size=12), st.sampled_from(["name", "vni", "segments", "nodes", "labels", "ports",
                                                        "node.zone", "app", "mac", "ipv4", "<<", "peers"]))
JSON_VALUES: st.SearchStrategy[Any] = st.recursive(
    SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(KEYS, inner, max_size=4)),
    max_leaves=12)


def paths(data: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path to a value inside ``data`` (dict keys and list indexes)."""
    found = [prefix]
    if isinstance(data, dict):
        for key, item in data.items():
            found += paths(item, (*prefix, key))
    elif isinstance(data, list):
        for i, item in enumerate(data):
            found += paths(item, (*prefix, i))
    return found


def _parent(data: Any, path: tuple[Any, ...]) -> Any:
    for key in path[:-1]:
        data = data[key]
    return data


@st.composite
def mutated(draw: st.DrawFn, base: Any, max_mutations: int = 3, text: bool = False) -> Any:
    """``base`` (a JSON-like document) with up to ``max_mutations`` random changes; possibly none."""
    data = copy.deepcopy(base)
    for _ in range(draw(st.integers(0, max_mutations))):
        where = [p for p in paths(data) if p]
        if not where:
            break
        path = draw(st.sampled_from(where))
        parent = _parent(data, path)
        key = path[-1]
        action = draw(st.sampled_from(["replace", "replace", "replace", "delete", "add", "duplicate", "nearby"]))
        if action == "replace":
            parent[key] = draw(st.one_of(JSON_VALUES, LITERALS) if text else JSON_VALUES)
        elif action == "nearby":  # a value taken from elsewhere in the document: plausible, often conflicting
            other = draw(st.sampled_from(paths(data)))
            with contextlib.suppress(KeyError, IndexError, TypeError):
                parent[key] = copy.deepcopy(_parent(data, other)[other[-1]]) if other else copy.deepcopy(data)
        elif action == "delete":
            del parent[key]
        elif action == "add" and isinstance(parent, dict):
            parent[draw(KEYS)] = draw(JSON_VALUES)
        elif action == "duplicate" and isinstance(parent, list):
            parent.append(copy.deepcopy(parent[key]))
    return data


# --------------------------------------------------------------------------- spellings of valid values

def _cased(draw: st.DrawFn, text: str) -> str:
    return text.upper() if draw(st.booleans()) else text


@st.composite
def mac(draw: st.DrawFn, seed: int) -> str:
    return _cased(draw, f"02:00:00:{(seed >> 16) & 255:02x}:{(seed >> 8) & 255:02x}:{seed & 255:02x}")


@st.composite
def port_item(draw: st.DrawFn) -> int | str:
    first = draw(st.integers(1, 65535))
    if draw(st.booleans()):
        return first
    last = draw(st.integers(first, 65535))
    return "0" * draw(st.integers(0, 2)) + f"{first}-{last}"


# --------------------------------------------------------------------------- valid specs

SEGMENT_NAMES = ["blue", "green", "red", "db"]
NODE_NAMES = ["host-a", "host-b", "host-c", "host-d", "host-e"]
LABEL_VALUES = ["web", "db", "a", "b"]


@st.composite
def selector(draw: st.DrawFn, segments: list[str]) -> dict[str, Any]:
    kind = draw(st.sampled_from(["segment", "labels", "both", "cidr", "expression"]))
    if kind == "cidr":
        # one family (IPv4) on both sides: a pair of families is refused, and so is ICMP to an IPv6 network
        return {"cidr": draw(st.sampled_from(["198.51.100.0/24", "10.0.0.0/8", "192.0.2.0/255.255.255.0"]))}
    out: dict[str, Any] = {}
    if kind in ("segment", "both"):
        out["segment"] = draw(st.sampled_from(segments))
    if kind in ("labels", "both"):
        out["match_labels"] = {"app": draw(st.sampled_from(LABEL_VALUES))}
    if kind == "expression":
        out["match_expressions"] = [{"key": "app", "operator": draw(st.sampled_from(["in", "notin"])),
                                     "values": draw(st.lists(st.sampled_from(LABEL_VALUES), min_size=1, max_size=3))}]
    return out


@st.composite
def policies(draw: st.DrawFn, segments: list[str]) -> list[dict[str, Any]]:
    out = []
    for i in range(draw(st.integers(0, 3))):
        protocol = draw(st.sampled_from(["tcp", "udp", "icmp", "any", None]))
        policy: dict[str, Any] = {"name": f"p-{i}", "source": draw(selector(segments)),
                                  "destination": draw(selector(segments))}
        if protocol is not None:
            policy["protocol"] = protocol
        if protocol in ("tcp", "udp") and draw(st.booleans()):
            policy["ports"] = draw(st.lists(port_item(), min_size=1, max_size=3))
        out.append(policy)
    return out


@st.composite
def segment(draw: st.DrawFn, i: int, name: str) -> dict[str, Any]:
    out: dict[str, Any] = {"name": name, "vni": 100 + i}
    if draw(st.booleans()) or i == 0:
        out["ipv4_subnet"], out["ipv4_gateway"] = f"10.{i}.0.0/24", f"10.{i}.0.1"
    if draw(st.booleans()) or "ipv4_subnet" not in out:
        out["ipv6_subnet"] = _cased(draw, f"fd00:{i + 1}::/64")
        out["ipv6_gateway"] = draw(st.sampled_from([f"fd00:{i + 1}::1", f"FD00:{i + 1}:0::1",
                                                    f"fd00:{i + 1}:0:0:0:0:0:1"]))
    if draw(st.booleans()):
        out["mode"] = draw(st.sampled_from(["isolated", "default-deny"]))
    if draw(st.integers(0, 3)) == 0:
        out["rate_limit"] = {"new_connections_per_second": draw(st.integers(1, 100))}
    if draw(st.integers(0, 3)) == 0:
        out["gateway_mac"] = draw(mac(0xFF00 + i))
    if draw(st.integers(0, 4)) == 0:
        out["encapsulation"] = draw(st.sampled_from(["vxlan", "geneve"]))
    return out


@st.composite
def valid_spec(draw: st.DrawFn) -> dict[str, Any]:
    """A spec that is valid by construction (before any mutation), written in varied spellings."""
    n_segments = draw(st.integers(1, len(SEGMENT_NAMES)))
    segments = [draw(segment(i, SEGMENT_NAMES[i])) for i in range(n_segments)]
    names = [s["name"] for s in segments]
    nodes = []
    endpoints = []
    for i in range(draw(st.integers(1, len(NODE_NAMES)))):
        carried = draw(st.lists(st.sampled_from(names), unique=True, max_size=n_segments))
        node: dict[str, Any] = {"name": NODE_NAMES[i], "underlay_address": f"192.0.2.{i + 1}",
                                "transport_address": f"198.51.100.{i + 1}/24", "segments": carried}
        if draw(st.booleans()):
            node["labels"] = {"zone": draw(st.sampled_from(["a", "b"]))}
        if draw(st.integers(0, 3)) == 0:
            node["keepalive"] = draw(st.integers(0, 65535))
        nodes.append(node)
        for segment_name in carried:
            s = segments[names.index(segment_name)]
            for _ in range(draw(st.integers(0, 2))):
                k = len(endpoints)
                e: dict[str, Any] = {"name": f"e-{k}", "node": node["name"], "segment": segment_name,
                                     "mac": draw(mac(k + 1)), "netns": f"ns-{k}"}
                index = names.index(segment_name)
                if "ipv4_subnet" in s:
                    e["ipv4"] = f"10.{index}.0.{10 + k}"
                if "ipv6_subnet" in s and (draw(st.booleans()) or "ipv4" not in e):
                    e["ipv6"] = draw(st.sampled_from([f"fd00:{index + 1}::{10 + k:x}",
                                                      f"FD00:{index + 1}:0::{10 + k:X}"]))
                if draw(st.booleans()):
                    e["labels"] = {"app": draw(st.sampled_from(LABEL_VALUES))}
                endpoints.append(e)
    spec: dict[str, Any] = {"segments": segments, "nodes": nodes, "endpoints": endpoints,
                            "policies": draw(policies(names))}
    if draw(st.booleans()):
        spec["encryption"] = "wireguard"
    return spec


# --------------------------------------------------------------------------- valid node states

@st.composite
def valid_state(draw: st.DrawFn, peer_ids: list[int] | None = None) -> dict[str, Any]:
    """An agent state that is valid by construction: two segments, local endpoints, peers with endpoints."""
    segments: list[dict[str, Any]] = [
        {"name": "blue", "vni": 100, "ipv4_subnet": "203.0.113.0/24", "ipv4_gateway": "203.0.113.1",
         "ipv6_subnet": draw(st.sampled_from(["fd00:b1::/64", "FD00:B1::/64"])), "ipv6_gateway": "fd00:b1::1"},
        {"name": "green", "vni": 200, "ipv4_subnet": "198.18.0.0/24", "ipv4_gateway": "198.18.0.1"},
    ]
    if draw(st.booleans()):
        segments[1]["mode"] = "default-deny"
    endpoints = [{"name": f"local-{i}", "segment": "blue" if i % 2 == 0 else "green",
                  "mac": draw(mac(0x0A00 + i)), "ipv4": f"{'203.0.113' if i % 2 == 0 else '198.18.0'}.{10 + i}",
                  "netns": f"ns-{i}", **({"labels": {"app": "web"}} if i == 0 else {})}
                 for i in range(draw(st.integers(0, 3)))]
    ids = peer_ids if peer_ids is not None else draw(st.lists(st.integers(0, 30), unique=True, max_size=6))
    peers = [peer_of(i, draw(st.integers(0, 1)), draw(st.booleans())) for i in ids]
    out: dict[str, Any] = {"node": "host-a", "transport_address": "fd00:7::1/64", "segments": segments,
                           "endpoints": endpoints, "peers": peers,
                           "policies": draw(policies(["blue", "green"]))}
    if draw(st.booleans()):
        out["node_labels"] = {"node.zone": "a"}
    return out


def peer_of(i: int, variant: int = 0, with_segments: bool = True) -> dict[str, Any]:
    """Peer ``i`` of a state; ``variant`` changes a mutable attribute (its keepalive, an endpoint's label)."""
    peer: dict[str, Any] = {
        "name": f"peer-{i}", "underlay_address": f"192.0.2.{i + 10}", "public_key": wg_key(f"peer-{i}"),
        "transport_address": f"fd00:7::{i + 2:x}",
        "endpoints": [{"segment": "blue", "mac": f"02:01:00:00:{i:02x}:01", "ips": [f"203.0.113.{100 + i}"],
                       "labels": {"app": "db" if variant else "web"}}],
    }
    if variant:
        peer["keepalive"] = 25
    if with_segments:
        peer["segments"] = ["blue", "green"] if i % 2 else ["blue"]
    return peer


# --------------------------------------------------------------------------- texts

YAML_TOKENS = ["!!int ", "!!float ", "!!bool ", "!!timestamp ", "!!binary ", "!!set ", "!!map ", "!!str ", "! ",
               "!foo ", "&a ", "*a", "&b ", "*b", "<<: ", "? ", ": ", "- ", "---\n", "...\n", "%TAG ! tag:x,2000:\n",
               "%YAML 1.1\n", "[", "]", "{", "}", ",", "\n", "  ", "\t", "#", "'", '"', "\\u00e9", "\\ud800",
               "0x_", "0b_", "0o7", "0x1F", "017", "08", "1_000", "1:2:3", "190:20:30.15", ".inf", "-.nan", "._",
               "2023-02-30", "2001-12-14t21:59:43.10-05:00", "yes", "off", "~", "null", "=", "9" * 120,
               "0x" + "f" * 120, "\ufeff", "\x00", "\x85", "\u2028", "é", "|\n", ">-\n"]


@st.composite
def mutated_text(draw: st.DrawFn, text: str, tokens: list[str] = YAML_TOKENS) -> str:
    """``text`` with a few insertions (tokens or random characters), deletions and duplicated lines."""
    for _ in range(draw(st.integers(0, 4))):
        at = draw(st.integers(0, len(text)))
        action = draw(st.sampled_from(["token", "token", "chars", "delete", "line"]))
        if action == "token":
            text = text[:at] + draw(st.sampled_from(tokens)) + text[at:]
        elif action == "chars":
            text = text[:at] + draw(st.text(max_size=4)) + text[at:]
        elif action == "delete":
            text = text[:at] + text[at + draw(st.integers(1, 8)):]
        else:
            lines = text.split("\n")
            i = draw(st.integers(0, len(lines) - 1))
            lines.insert(i, lines[i])
            text = "\n".join(lines)
    return text


@st.composite
def mutated_bytes(draw: st.DrawFn, data: bytes) -> bytes:
    """``data`` with a few bytes inserted or replaced (often making it invalid UTF-8)."""
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(data)))
        piece = draw(st.one_of(st.binary(min_size=1, max_size=3),
                               st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xef\xbb\xbf", b"\x00"])))
        data = data[:at] + piece + data[at + draw(st.integers(0, 1)):]
    return data


class Literal(str):
    """Text that ``dump`` writes as it is, unquoted: a number literal no Python int can be written as (5,000
    digits), or one in a notation only YAML has."""


LITERALS = st.sampled_from(["9" * 5000, "-" + "7" * 5000, "0x" + "f" * 5000, "0" + "7" * 5000, "0b" + "1" * 5000,
                            "1" + ":59" * 2000, "1_" * 3000 + "1", "1e99999", "0x_", "2023-02-30"]).map(Literal)


def dump(data: Any, form: str) -> str:
    """``data`` as text in one of several forms: JSON, block YAML, flow YAML (``Literal`` values unquoted)."""
    literals: list[str] = []

    def marked(value: Any) -> Any:
        if isinstance(value, Literal):
            literals.append(str(value))
            return f"LITERAL-{len(literals) - 1}-MARK"
        if isinstance(value, dict):
            return {k: marked(v) for k, v in value.items()}
        if isinstance(value, list):
            return [marked(v) for v in value]
        return value

    data = marked(data)
    if form == "json":
        text = json.dumps(data)
    elif form == "json-pretty":
        text = json.dumps(data, indent=2)
    elif form == "flow":
        text = yaml.safe_dump(data, default_flow_style=True, width=60)
    else:
        text = yaml.safe_dump(data, default_flow_style=False, sort_keys=False)
    for i, literal in enumerate(literals):
        text = text.replace(f'"LITERAL-{i}-MARK"', literal).replace(f"LITERAL-{i}-MARK", literal)
    return text


FORMS = st.sampled_from(["json", "json-pretty", "flow", "block"])


def outcome(run: Callable[[], Any], refused: type[BaseException]) -> tuple[bool, Any]:
    """(True, result) or (False, the ``refused`` exception); any other exception propagates: a finding."""
    try:
        return True, run()
    except refused as exc:
        return False, exc


# --------------------------------------------------------------------------- protobuf messages

def _peer_messages() -> st.SearchStrategy[spb.Peer]:
    text = st.one_of(st.text(max_size=12), st.sampled_from(["peer-1", "192.0.2.11", "fd00:7::3", wg_key("peer-1"),
                                                             "blue", "02:01:00:00:01:01", "203.0.113.101"]))
    endpoint = st.builds(spb.RemoteEndpoint, segment=text, mac=text, ips=st.lists(text, max_size=2),
                         labels=st.dictionaries(text, text, max_size=2))
    return st.builds(spb.Peer, name=text, underlay_address=text, underlay_port=st.integers(0, 2**32 - 1),
                     public_key=text, transport_address=text, keepalive=st.integers(0, 2**32 - 1),
                     endpoints=st.lists(endpoint, max_size=2), segments=st.lists(text, max_size=2))


@st.composite
def delta_messages(draw: st.DrawFn) -> spb.StateDelta:
    """A StateDelta as a hostile controller could send it: structured, or any bytes protobuf decodes."""
    if draw(st.integers(0, 3)) == 0:
        try:
            return spb.StateDelta.FromString(draw(st.binary(max_size=120)))
        except Exception:
            return spb.StateDelta()
    upserts = draw(st.lists(st.one_of(_peer_messages(), st.integers(0, 40).map(
        lambda i: wire.peer_to_proto(peer_of(i)))), max_size=3))
    msg = spb.StateDelta(peer_upserts=upserts, peer_removes=draw(st.lists(st.sampled_from(
        ["peer-0", "peer-1", "peer-2", "nobody", ""]), max_size=2)))
    if draw(st.booleans()):
        msg.transport_address = draw(st.sampled_from(["fd00:7::1/64", "fd00:8::1/64", "x", "198.51.100.1/24"]))
    if draw(st.booleans()):
        msg.policies.SetInParent()
    if draw(st.booleans()):
        msg.node_labels.SetInParent()
        msg.node_labels.items.update(draw(st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=2)))
    return msg


def check_refusal(exc: BaseException) -> None:
    """What every refusal must be: the project's ValidationError, bounded, one printable line, encodable."""
    from veilnet_agent.core.errors import MAX_FIELD, MAX_REASON, MAX_SHOWN, ValidationError

    assert isinstance(exc, ValidationError), repr(exc)
    text = str(exc)
    assert len(text) <= MAX_FIELD + MAX_REASON + MAX_SHOWN + 10, len(text)
    assert text.isprintable(), repr(text)
    text.encode("utf-8")
    assert text == f"{exc.field}: {exc.reason} (got {exc.value!r})"
