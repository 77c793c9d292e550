"""Values that name the same kernel object are one value to the validators (issue #8, item 2).

A validator that matched with ``re.match(...$)`` accepted a trailing newline
and returned it, so ``02:00:00:0a:00:01`` and ``02:00:00:0a:00:01\\n`` were two
MACs to the controller's uniqueness checks and one to the kernel (and a key
with a newline one more key to the controller, the same key to ``wg``). Each
test here is a claim that used to be accepted: another endpoint's MAC, another
node's key or address, written a little differently. Every one must now be
refused, naming the field. tests/test_canonical_properties.py checks the
general rule with generated spellings.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from factories import state, wg_key

from veilnet.v1 import state_pb2
from veilnet_agent.app.statefile import StateFileTracker, load_state_file
from veilnet_agent.control import wire
from veilnet_agent.core.errors import ValidationError
from veilnet_agent.core.model import parse_node_state, update_peers
from veilnet_controller.compile import compile_nodes
from veilnet_controller.spec import (
    AttachedClaims,
    EndpointSpec,
    load_spec_text,
    parse_attached_endpoint,
    parse_spec,
    validate_attached_endpoints,
)

EXAMPLE: dict[str, Any] = load_spec_text(  # type: ignore[assignment]
    (Path(__file__).resolve().parents[1] / "examples" / "network.yaml").read_text()
)
A_WEB_MAC = "02:00:00:0a:00:01"  # endpoints[0], host-a, blue
B_WEB_MAC = "02:00:00:0b:00:01"  # endpoints[2], host-b, blue


def spec_raw() -> dict[str, Any]:
    return copy.deepcopy(EXAMPLE)


def new_endpoint(name: str, node: str = "host-b", **fields: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {"name": name, "node": node, "segment": "blue", "mac": "02:00:00:ff:00:01",
                           "ipv4": "203.0.113.50", "netns": name}
    raw.update(fields)
    return {k: val for k, val in raw.items() if val is not None}


def spec_rejects(raw: dict[str, Any], field: str, reason: str) -> None:
    with pytest.raises(ValidationError) as info:
        parse_spec(raw)
    assert info.value.field == field, str(info.value)
    assert reason in info.value.reason, str(info.value)


# --------------------------------------------------------------------------- the network spec


@pytest.mark.parametrize("mac", [A_WEB_MAC + "\n", A_WEB_MAC + "\r\n", A_WEB_MAC + " ", A_WEB_MAC + "\x00",
                                 "\n" + A_WEB_MAC])
def test_spec_mac_of_another_nodes_endpoint_but_for_whitespace_is_refused(mac: str) -> None:
    raw = spec_raw()
    raw["endpoints"].append(new_endpoint("b-new", mac=mac))  # host-b claims host-a's a-web MAC in blue
    spec_rejects(raw, "endpoints[5].mac", "must be a MAC address")


def test_spec_mac_of_another_nodes_endpoint_in_other_case_is_refused() -> None:
    raw = spec_raw()
    raw["endpoints"].append(new_endpoint("b-new", mac=A_WEB_MAC.upper()))
    spec_rejects(raw, "endpoints[5].mac", "is already used by endpoints[0].mac")
    raw["endpoints"][5]["mac"] = "02:56:4E:00:00:64"  # blue's gateway MAC
    spec_rejects(raw, "endpoints[5].mac", "is already used by the gateway of segment blue")


def test_spec_stores_the_canonical_mac() -> None:
    raw = spec_raw()
    raw["endpoints"][0]["mac"] = "02:00:00:0A:00:01"
    raw["segments"][0]["gateway_mac"] = "02:56:4E:00:00:AA"
    spec = parse_spec(raw)
    assert spec.endpoints[0].mac == A_WEB_MAC and spec.segments[0].gateway_mac == "02:56:4e:00:00:aa"
    assert spec.raw["segments"][0]["gateway_mac"] == "02:56:4e:00:00:aa"


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("endpoints[0].name", "a-web\n", "lowercase letters"),
        ("endpoints[0].netns", "a-web\n", "network namespace name"),
        ("endpoints[0].ifname", "eth0\n", "interface name"),
        ("endpoints[0].ifname", "..", "interface name"),
        ("endpoints[0].labels.app", "web\n", "letters, digits"),
        ("endpoints[0].node", "host-a\n", "lowercase letters"),
        ("endpoints[0].segment", "blue\n", "lowercase letters"),
        ("nodes[0].name", "host-a\n", "lowercase letters"),
        ("nodes[0].segments[0]", "blue\n", "lowercase letters"),
        ("nodes[0].labels.zone", "a\n", "letters, digits"),
        ("segments[0].name", "blue\n", "lowercase letters"),
        ("policies[0].name", "web-to-api\n", "lowercase letters"),
        ("policies[0].source.match_labels.app", "web\n", "letters, digits"),
    ],
)
def test_spec_names_with_a_trailing_newline_are_refused(field: str, value: str, reason: str) -> None:
    raw = spec_raw()
    _set(raw, field, value)
    spec_rejects(raw, field, reason)


def test_spec_label_key_with_a_trailing_newline_is_refused() -> None:
    raw = spec_raw()
    raw["endpoints"][0]["labels"] = {"app\n": "web"}
    # the path quotes the key, escaped: an error line never carries the newline itself
    spec_rejects(raw, "endpoints[0].labels.'app\\n'", "letters, digits")


def test_spec_scoped_ipv6_transport_address_is_refused() -> None:
    # ipaddress keeps "%eth0" and compares it: fd00:7::1%eth0 was another address than fd00:7::1,
    # so two nodes got the same transport address (and the agents refused their states).
    raw = spec_raw()
    for i, node in enumerate(raw["nodes"]):
        node["transport_address"] = f"fd00:7::{i + 1}/64"
    raw["nodes"][1]["transport_address"] = "fd00:7::1%eth0/64"
    spec_rejects(raw, "nodes[1].transport_address", "address with prefix length")


def test_spec_ipv4_mapped_underlay_of_another_node_is_refused() -> None:
    raw = spec_raw()
    raw["nodes"][1]["underlay_address"] = "::ffff:192.0.2.11"  # host-a's, port 51820 too
    spec_rejects(raw, "nodes[1].underlay_address", "IPv4-mapped IPv6 address")


@pytest.mark.parametrize(("field", "value"), [("segments[0].ipv6_subnet", "fd00:b1::%1/64"),
                                              ("policies[0].source", {"cidr": "fd00:b1::%eth0/64"})])
def test_spec_scoped_networks_are_refused(field: str, value: object) -> None:
    raw = spec_raw()
    _set(raw, field, value)
    spec_rejects(raw, field if isinstance(value, str) else field + ".cidr", "network in CIDR form")


def test_spec_ipv6_endpoint_address_spelled_differently_is_the_same_address() -> None:
    raw = spec_raw()
    raw["endpoints"].append(new_endpoint("b-new", ipv4=None, ipv6="FD00:00B1:0:0:0:0:0:0010"))  # a-web's
    spec_rejects(raw, "endpoints[5].ipv6", "is already used by endpoints[0].ipv6")


# --------------------------------------------------------------------------- WireGuard keys


def test_compile_refuses_another_nodes_key_but_for_a_trailing_newline() -> None:
    spec = parse_spec(spec_raw())
    key = wg_key("host-a")
    for variant in (key + "\n", key + " ", key + "\r\n"):
        with pytest.raises(ValidationError) as info:  # both were peers before: one key to wg, two to us
            compile_nodes(spec, {"host-a": key, "host-b": variant, "host-c": wg_key("host-c")}, {})
        assert info.value.field == "public_keys.host-b", str(info.value)


def test_non_canonical_base64_key_is_refused() -> None:
    key = wg_key("host-a")
    # The last character before '=' carries 4 key bits and 2 unused ones: with those set, lenient decoders
    # give the same 32 bytes, wg refuses the key. Try every unused-bit pattern.
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    last = alphabet.index(key[42])
    assert last & 3 == 0
    spec = parse_spec(spec_raw())
    for bits in (1, 2, 3):
        variant = key[:42] + alphabet[last | bits] + "="
        with pytest.raises(ValidationError) as info:
            compile_nodes(spec, {"host-a": key, "host-b": variant}, {})
        assert info.value.field == "public_keys.host-b" and "not canonical base64" in info.value.reason


# --------------------------------------------------------------------------- attached endpoints


def attached(name: str, **fields: Any) -> dict[str, Any]:
    raw = new_endpoint(name, **fields)
    del raw["node"]
    return raw


def claims_reject(raw: dict[str, Any], field: str, reason: str, node: str = "host-c") -> None:
    """The hub's path: parse_attached_endpoint, then AttachedClaims.check against the spec."""
    table = AttachedClaims(parse_spec(spec_raw()))
    with pytest.raises(ValidationError) as info:
        table.check(parse_attached_endpoint(node, raw, "endpoints[0]"), "endpoints[0]")
    assert info.value.field == field, str(info.value)
    assert reason in info.value.reason, str(info.value)


@pytest.mark.parametrize("mac", [B_WEB_MAC + "\n", B_WEB_MAC + "\t", " " + B_WEB_MAC])
def test_attached_endpoint_mac_of_a_spec_endpoint_but_for_whitespace_is_refused(mac: str) -> None:
    claims_reject(attached("c-new", mac=mac), "endpoints[0].mac", "must be a MAC address")


def test_attached_endpoint_mac_of_a_spec_endpoint_in_other_case_is_refused() -> None:
    claims_reject(attached("c-new", mac=B_WEB_MAC.upper()), "endpoints[0].mac",
                  "is already used by the spec's endpoints[2].mac")


@pytest.mark.parametrize(("fields", "field", "reason"), [
    ({"ipv4": "203.0.113.20\n"}, "endpoints[0].ipv4", "IPv4 or IPv6 address"),
    ({"ipv4": None, "ipv6": "fd00:b1:0000::0020"}, "endpoints[0].ipv6", "is already used by the spec's endpoints[2]"),
    ({"ipv4": None, "ipv6": "FD00:B1::20"}, "endpoints[0].ipv6", "is already used by the spec's endpoints[2]"),
    ({"ipv4": None, "ipv6": "fd00:b1::20\n"}, "endpoints[0].ipv6", "IPv4 or IPv6 address"),
    ({"ipv4": None, "ipv6": "fd00:b1::20%eth0"}, "endpoints[0].ipv6", "IPv4 or IPv6 address"),
    ({"netns": "c-web\n", "ifname": "eth0"}, "endpoints[0].netns", "network namespace name"),
    ({"ifname": "eth0\n"}, "endpoints[0].ifname", "interface name"),
    ({"name": "c-web\n"}, "endpoints[0].name", "lowercase letters"),
    ({"segment": "blue\n"}, "endpoints[0].segment", "lowercase letters"),
])
def test_attached_endpoint_claims_written_differently_are_refused(
    fields: dict[str, Any], field: str, reason: str
) -> None:
    raw = attached("c-new")
    raw.update(fields)
    claims_reject({k: val for k, val in raw.items() if val is not None}, field, reason)


def test_attached_endpoint_claiming_another_attached_endpoints_mac_is_refused() -> None:
    spec = parse_spec(spec_raw())
    elsewhere = {"host-b": [parse_attached_endpoint("host-b", attached("b-new", mac="02:00:00:EE:00:01"),
                                                    "endpoints[0]")]}
    assert elsewhere["host-b"][0].mac == "02:00:00:ee:00:01"
    for mac, reason in (("02:00:00:ee:00:01", "endpoint b-new attached on host-b"),
                        ("02:00:00:Ee:00:01", "endpoint b-new attached on host-b"),
                        ("02:00:00:ee:00:01\n", "must be a MAC address")):
        with pytest.raises(ValidationError) as info:
            validate_attached_endpoints(spec, "host-c", [attached("c-new", mac=mac, ipv4="203.0.113.51")],
                                        elsewhere)
        assert info.value.field == "endpoints[0].mac" and reason in info.value.reason, str(info.value)


def test_attached_endpoint_from_the_wire_is_stored_canonically() -> None:
    message = state_pb2.LocalEndpoint(name="c-new", segment="blue", mac="02:00:00:FF:00:0A",
                                      ipv6="FD00:B1:0::99", netns="c-new")
    e = parse_attached_endpoint("host-c", wire.endpoint_from_proto(message), "endpoints[0]")
    assert e == EndpointSpec("c-new", "host-c", "blue", "02:00:00:ff:00:0a", None, e.ipv6, "c-new")
    assert str(e.ipv6) == "fd00:b1::99"


# --------------------------------------------------------------------------- the agent's state (file and controller)


LOCAL_MAC = "02:00:00:0a:00:01"  # factories.state(): endpoints[0] a-web, blue


def state_rejects(raw: dict[str, Any], field: str, reason: str, tmp_path: Path) -> None:
    """Through parse_node_state and through both state-file formats."""
    with pytest.raises(ValidationError) as info:
        parse_node_state(raw)
    assert info.value.field == field and reason in info.value.reason, str(info.value)
    for suffix, text in ((".json", json.dumps(raw)), (".yaml", yaml.safe_dump(raw))):
        path = tmp_path / f"state{suffix}"
        path.write_text(text)
        with pytest.raises(ValidationError) as info:
            load_state_file(path)
        assert info.value.field == field and reason in info.value.reason, str(info.value)


@pytest.mark.parametrize("mac", [LOCAL_MAC + "\n", LOCAL_MAC + " ", LOCAL_MAC + "\x00"])
def test_state_peer_endpoint_mac_of_a_local_endpoint_but_for_whitespace_is_refused(mac: str, tmp_path: Path) -> None:
    raw = state(peers=2)
    raw["peers"][0]["endpoints"][0]["mac"] = mac
    state_rejects(raw, "peers[0].endpoints[0].mac", "must be a MAC address", tmp_path)


def test_state_peer_endpoint_mac_of_a_local_endpoint_in_other_case_is_refused(tmp_path: Path) -> None:
    raw = state(peers=2)
    raw["peers"][0]["endpoints"][0]["mac"] = LOCAL_MAC.upper()
    state_rejects(raw, "peers[0].endpoints[0].mac", "is already used by endpoints[0].mac", tmp_path)


@pytest.mark.parametrize("suffix", ["\n", " ", "\r\n"])
def test_state_peer_key_of_another_peer_but_for_whitespace_is_refused(suffix: str, tmp_path: Path) -> None:
    raw = state(peers=2)
    raw["peers"][1]["public_key"] = raw["peers"][0]["public_key"] + suffix
    state_rejects(raw, "peers[1].public_key", "WireGuard public key", tmp_path)


def test_state_peer_key_variant_in_a_delta_is_refused() -> None:
    raw = state(peers=2)
    tracker = StateFileTracker()
    tracker.commit(tracker.prepare(raw))  # type: ignore[arg-type]
    changed = copy.deepcopy(raw)
    changed["peers"][1]["public_key"] = raw["peers"][0]["public_key"] + "\n"
    with pytest.raises(ValidationError) as info:  # the peers-only path (update_peers) as well
        tracker.prepare(changed)
    assert info.value.field == "peers[1].public_key"
    base = parse_node_state(raw)
    moved = copy.deepcopy(raw["peers"][1])
    moved["endpoints"][0]["mac"] = raw["peers"][0]["endpoints"][0]["mac"].upper()
    with pytest.raises(ValidationError) as info:
        update_peers(base, [("peers[1]", moved)], [])
    assert info.value.field == "peers[1].endpoints[0].mac" and "already used by peers[0]" in info.value.reason


@pytest.mark.parametrize(("field", "value", "reason"), [
    ("transport_address", "fd00:7::1%eth0/64", "address with prefix length"),
    ("peers[1].transport_address", "fd00:7::2%1", "IPv4 or IPv6 address"),
    ("peers[1].transport_address", "FD00:7:0::2", "duplicate transport address"),
    ("peers[1].underlay_address", "::ffff:192.0.2.1", "IPv4-mapped"),  # peers[0]'s, same port
    ("peers[1].name", "peer-0\n", "lowercase letters"),
    ("endpoints[0].netns", "ep-a-web\n", "network namespace name"),
    ("endpoints[0].ifname", "eth0\n", "interface name"),
    ("segments[0].gateway_mac", "02:56:4e:00:00:64\n", "MAC address"),
    ("segments[0].ipv6_subnet", "fd00:b1::%x/64", "network in CIDR form"),
])
def test_state_values_written_differently_are_refused(field: str, value: str, reason: str, tmp_path: Path) -> None:
    raw = state(peers=2)
    raw["peers"][1]["underlay_port"] = raw["peers"][0]["underlay_port"]
    _set(raw, field, value)
    state_rejects(raw, field, reason, tmp_path)


# --------------------------------------------------------------------------- what the controller sends


def test_compiled_states_carry_one_spelling_whatever_the_spec_wrote() -> None:
    plain = spec_raw()
    respelled = spec_raw()
    respelled["segments"][0].update(ipv6_subnet="FD00:B1:0:0::/64", ipv6_gateway="fd00:00b1::0001",
                                    gateway_mac="02:56:4E:00:00:64")
    respelled["segments"][1]["ipv4_subnet"] = "203.0.113.64/255.255.255.192"
    respelled["endpoints"][0].update(mac="02:00:00:0A:00:01", ipv6="FD00:B1::10")
    respelled["nodes"][0]["transport_address"] = "198.51.100.11/255.255.255.0"
    respelled["policies"][0]["ports"] = ["08080-08080"]
    plain["segments"][0]["gateway_mac"] = "02:56:4e:00:00:64"
    plain["policies"][0]["ports"] = ["8080-8080"]
    keys = {name: wg_key(name) for name in ("host-a", "host-b", "host-c")}
    before = compile_nodes(parse_spec(plain), keys, {})
    after = compile_nodes(parse_spec(respelled), keys, {})
    assert after == before  # so an operator's respelling sends nothing to any node
    for name in before:
        assert wire.diff_states(before[name], after[name]).is_empty()
        back = wire.state_from_proto(state_pb2.NodeState.FromString(wire.state_to_proto(after[name])
                                                                     .SerializeToString()))
        assert parse_node_state(back) == parse_node_state(before[name])
    assert after["host-a"]["segments"][0]["ipv6_subnet"] == "fd00:b1::/64"
    assert after["host-a"]["endpoints"][0]["mac"] == "02:00:00:0a:00:01"


def _set(data: Any, path: str, value: object) -> None:
    keys = [int(part) if part.isdigit() else part for part in path.replace("]", "").replace("[", ".").split(".")]
    for key in keys[:-1]:
        data = data[key]
    data[keys[-1]] = value


def test_key_reader_accepts_exactly_the_canonical_encodings() -> None:
    import binascii

    from veilnet_agent.core import validate as v

    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    for prefix in (wg_key("a")[:42], wg_key("b")[:42], "A" * 42, "/" * 42):
        for last in alphabet:
            text = prefix + last + "="
            canonical = binascii.b2a_base64(binascii.a2b_base64(text), newline=False).decode()
            try:
                got = v.wg_public_key(text, "k")
            except ValidationError as exc:
                assert canonical != text and canonical in exc.reason
            else:
                assert got == text == canonical
