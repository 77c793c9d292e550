"""``encryption: ipsec`` and the ``ipsec:`` settings in the network spec: validation, compiled states, fan-out."""

from __future__ import annotations

import asyncio
import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from factories import wg_key
from test_rpc_guard import Harness, status_of

from veilnet.v1 import admin_pb2 as apb
from veilnet.v1 import controller_pb2 as cpb
from veilnet_agent.control import wire
from veilnet_agent.core.errors import ValidationError
from veilnet_controller.compile import compile_nodes
from veilnet_controller.hub import Hub
from veilnet_controller.spec import canonical_text, load_spec_text, parse_spec, summarize_changes
from veilnet_controller.store import SQLiteStore

EXAMPLE_TEXT = (Path(__file__).resolve().parents[1] / "examples" / "network.yaml").read_text()
BASE: dict[str, Any] = load_spec_text(EXAMPLE_TEXT)  # type: ignore[assignment]
KEYS = {n: wg_key(n) for n in ("host-a", "host-b", "host-c")}


def base(**top: Any) -> dict[str, Any]:
    raw = copy.deepcopy(BASE)
    raw.update(top)
    return {k: val for k, val in raw.items() if val is not None}


def compiled(raw: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compile_nodes(parse_spec(raw), KEYS, {})


# --------------------------------------------------------------------------- accepted


def test_ipsec_is_accepted_without_settings_and_every_node_state_says_so() -> None:
    spec = parse_spec(base(encryption="ipsec"))
    assert spec.encryption == "ipsec" and spec.ipsec is None
    states = compiled(base(encryption="ipsec"))
    assert set(states) == {"host-a", "host-b", "host-c"}
    for state in states.values():
        assert state["encryption"] == "ipsec"
        assert "ipsec" not in state  # nothing given: the agent's defaults


def test_ipsec_settings_given_reach_every_node_state_as_given() -> None:
    settings = {"replay_window": 1024, "rotation_seconds": 600}
    spec = parse_spec(base(encryption="ipsec", ipsec=settings))
    assert spec.ipsec == settings
    for state in compiled(base(encryption="ipsec", ipsec=settings)).values():
        assert state["encryption"] == "ipsec" and state["ipsec"] == settings
    only_one = compiled(base(encryption="ipsec", ipsec={"rotation_seconds": 60}))
    assert all(s["ipsec"] == {"rotation_seconds": 60} for s in only_one.values())


@pytest.mark.parametrize("settings", [
    {"replay_window": 32, "rotation_seconds": 60},        # the lower bounds
    {"replay_window": 4096, "rotation_seconds": 86400},   # the upper bounds
    {},                                                   # empty: the defaults
    {"replay_window": None},                              # null: not given
])
def test_ipsec_bounds_are_inclusive(settings: dict[str, Any]) -> None:
    spec = parse_spec(base(encryption="ipsec", ipsec=settings))
    given = {k: val for k, val in settings.items() if val is not None}
    assert spec.ipsec == (given or None)
    state = compiled(base(encryption="ipsec", ipsec=settings))["host-a"]
    assert state.get("ipsec") == (given or None)


def test_wireguard_states_are_unchanged_by_ipsec_support() -> None:
    """No encryption key at all for WireGuard (explicit or by default): byte-identical to before."""
    explicit = compiled(base(encryption="wireguard"))
    default = compiled(base(encryption=None))
    assert json.dumps(explicit, sort_keys=True) == json.dumps(default, sort_keys=True)
    for state in explicit.values():
        assert "encryption" not in state and "ipsec" not in state
        assert wire.state_to_proto(state).HasField("encryption") is False


def test_compiled_ipsec_state_survives_the_wire() -> None:
    settings = {"replay_window": 2048, "rotation_seconds": 900}
    state = compiled(base(encryption="ipsec", ipsec=settings))["host-c"]
    back = wire.state_from_proto(wire.state_to_proto(state))
    assert back["encryption"] == "ipsec" and back["ipsec"] == settings


def test_ipsec_settings_are_part_of_the_canonical_text() -> None:
    """So a change of only the settings is a new revision with a diff, not "unchanged"."""
    one = canonical_text(parse_spec(base(encryption="ipsec", ipsec={"rotation_seconds": 600})).raw)
    two = canonical_text(parse_spec(base(encryption="ipsec", ipsec={"rotation_seconds": 900})).raw)
    assert one != two and "rotation_seconds: 600" in one


# --------------------------------------------------------------------------- refused

Mutation = Callable[[dict[str, Any]], object]

BAD: list[tuple[str, dict[str, Any], str, object, str]] = [
    # name, top-level keys set, field, value, reason
    ("ipsec settings with wireguard", {"encryption": "wireguard", "ipsec": {"replay_window": 64}}, "ipsec",
     {"replay_window": 64}, "ipsec settings need encryption: ipsec (encryption is wireguard)"),
    ("ipsec settings with the default", {"encryption": None, "ipsec": {}}, "ipsec", {},
     "ipsec settings need encryption: ipsec (encryption is wireguard)"),
    ("unknown encryption", {"encryption": "aes"}, "encryption", "aes", "must be one of wireguard, ipsec"),
    ("encryption not a string", {"encryption": ["ipsec"]}, "encryption", ["ipsec"], "must be one of"),
    ("ipsec not a mapping", {"encryption": "ipsec", "ipsec": [4096]}, "ipsec", [4096], "must be a mapping"),
    ("unknown ipsec key", {"encryption": "ipsec", "ipsec": {"cipher": "aes"}}, "ipsec.cipher", "aes",
     "unknown key (allowed: replay_window, rotation_seconds)"),
    ("replay window too small", {"encryption": "ipsec", "ipsec": {"replay_window": 31}}, "ipsec.replay_window",
     31, "must be in 32..4096"),
    ("replay window too large", {"encryption": "ipsec", "ipsec": {"replay_window": 4097}},
     "ipsec.replay_window", 4097, "must be in 32..4096"),
    ("replay window a string", {"encryption": "ipsec", "ipsec": {"replay_window": "4096"}},
     "ipsec.replay_window", "4096", "must be an integer"),
    ("replay window a boolean", {"encryption": "ipsec", "ipsec": {"replay_window": True}},
     "ipsec.replay_window", True, "must be an integer"),
    ("rotation too short", {"encryption": "ipsec", "ipsec": {"rotation_seconds": 59}}, "ipsec.rotation_seconds",
     59, "must be in 60..86400"),
    ("rotation too long", {"encryption": "ipsec", "ipsec": {"rotation_seconds": 86401}},
     "ipsec.rotation_seconds", 86401, "must be in 60..86400"),
    ("rotation a float", {"encryption": "ipsec", "ipsec": {"rotation_seconds": 600.5}},
     "ipsec.rotation_seconds", 600.5, "must be an integer"),
    ("rotation negative", {"encryption": "ipsec", "ipsec": {"rotation_seconds": -1}},
     "ipsec.rotation_seconds", -1, "must be in 60..86400"),
]


@pytest.mark.parametrize(("top", "field", "value", "reason"), [case[1:] for case in BAD],
                         ids=[case[0] for case in BAD])
def test_bad_encryption_settings_are_refused_naming_field_and_value(top: dict[str, Any], field: str,
                                                                   value: object, reason: str) -> None:
    with pytest.raises(ValidationError) as info:
        parse_spec(base(**top))  # a None drops the key
    assert info.value.field == field, str(info.value)
    assert str(info.value.value) == str(value), str(info.value)  # non-scalars are kept as their rendering
    assert reason in info.value.reason, str(info.value)


def test_a_yaml_spec_names_the_nested_field_and_value() -> None:
    text = EXAMPLE_TEXT.replace("encryption: wireguard", "encryption: ipsec\nipsec: {replay_window: 100000}")
    with pytest.raises(ValidationError) as info:
        parse_spec(load_spec_text(text))
    assert (info.value.field, info.value.value) == ("ipsec.replay_window", 100000)


def test_a_refused_spec_changes_nothing(tmp_path: Path) -> None:
    """Through ApplySpec: INVALID_ARGUMENT naming the field and value; no revision, the states as they were."""
    async def scenario(h: Harness) -> None:
        first = await h.admin.ApplySpec(apb.ApplySpecRequest(spec_yaml=EXAMPLE_TEXT))
        states = copy.deepcopy(h.hub.states)
        bad = EXAMPLE_TEXT.replace("encryption: wireguard",
                                   "encryption: wireguard\nipsec: {rotation_seconds: 600}")
        code, details = await status_of(h.admin.ApplySpec(apb.ApplySpecRequest(spec_yaml=bad)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert details.startswith("ipsec: ipsec settings need encryption: ipsec"), details
        assert "rotation_seconds" in details
        bad = EXAMPLE_TEXT.replace("encryption: wireguard", "encryption: ipsec\nipsec: {replay_window: 8}")
        code, details = await status_of(h.admin.ApplySpec(apb.ApplySpecRequest(spec_yaml=bad)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert details == "ipsec.replay_window: must be in 32..4096 (got 8)", details
        assert h.hub.spec_revision == first.revision
        assert h.hub.store.revision() is not None and h.hub.store.revision().number == first.revision  # type: ignore[union-attr]
        assert h.hub.states == states

    async def main() -> None:
        async with Harness(tmp_path) as h:
            await scenario(h)

    asyncio.run(main())


# --------------------------------------------------------------------------- switching a running network


def _drain(session: Any) -> list[cpb.ControllerMessage]:
    out = []
    while (m := session.next_message()) is not None:
        out.append(m)
    return out


def test_switching_modes_reaches_every_connected_agent_as_a_delta(tmp_path: Path) -> None:
    hub = Hub(SQLiteStore(tmp_path / "c.db"))
    hub.load()

    def apply(raw: dict[str, Any]) -> int:
        record = hub.store.add_revision(yaml.safe_dump(raw), "test", "")
        hub.set_spec(parse_spec(raw), record.number)
        return record.number

    async def scenario() -> None:
        apply(base())
        sessions = {n: hub.connect(n, "s-" + n, cpb.Hello(wireguard_public_key=KEYS[n])) for n in KEYS}
        await asyncio.sleep(0)
        hub.recompile_now()
        for s in sessions.values():
            _drain(s)
        settings = {"replay_window": 512, "rotation_seconds": 120}
        revision = apply(base(encryption="ipsec", ipsec=settings))
        for name, s in sessions.items():
            (msg,) = _drain(s)
            assert msg.update.spec_revision == revision
            delta = wire.delta_from_proto(msg.update.delta)
            assert delta.encryption == {"encryption": "ipsec", "ipsec": settings}, name
            assert delta.peers_only is False and not delta.peer_upserts and delta.segments is None
        # only the settings change: again a delta, with both keys (replaced whole)
        apply(base(encryption="ipsec", ipsec={"replay_window": 512, "rotation_seconds": 300}))
        for s in sessions.values():
            (msg,) = _drain(s)
            assert wire.delta_from_proto(msg.update.delta).encryption == {
                "encryption": "ipsec", "ipsec": {"replay_window": 512, "rotation_seconds": 300}}
        # and back to WireGuard: the keys go away ({} is "the default")
        apply(base())
        for s in sessions.values():
            (msg,) = _drain(s)
            assert wire.delta_from_proto(msg.update.delta).encryption == {}
            assert "encryption" not in s.sent_state  # type: ignore[operator]
        # a node connecting afterwards in IPsec mode gets it in its snapshot
        apply(base(encryption="ipsec"))
        for s in sessions.values():
            _drain(s)
        late = hub.connect("host-a", "s-a2", cpb.Hello(wireguard_public_key=KEYS["host-a"]))
        (msg,) = _drain(late)
        snapshot = wire.state_from_proto(msg.update.snapshot)
        assert snapshot["encryption"] == "ipsec" and "ipsec" not in snapshot

    asyncio.run(scenario())


def test_a_mode_or_settings_change_shows_in_the_change_summary() -> None:
    wg, ipsec = parse_spec(base()), parse_spec(base(encryption="ipsec"))
    tuned = parse_spec(base(encryption="ipsec", ipsec={"rotation_seconds": 600}))
    assert summarize_changes(wg, ipsec) == {"encryption": {"changed": ["ipsec"]}}
    assert summarize_changes(ipsec, tuned) == {"encryption": {"changed": ["ipsec"]}}
    assert summarize_changes(ipsec, wg) == {"encryption": {"changed": ["wireguard"]}}
    assert summarize_changes(tuned, parse_spec(base(encryption="ipsec", ipsec={"rotation_seconds": 600}))) == {}
