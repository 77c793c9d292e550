"""The shipped examples stay valid."""

from pathlib import Path

from veilnet_agent.app.statefile import load_state_file
from veilnet_agent.core.config import load_config
from veilnet_agent.core.firewall_compiler import compile_firewall

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_examples_parse_and_compile() -> None:
    config = load_config(EXAMPLES / "agent.toml")
    state = load_state_file(EXAMPLES / "state.yaml")
    assert state.node == config.node_name
    assert [p.name for p in state.policies] == ["web-to-api", "ops-ping"]
    firewall = compile_firewall(state)
    assert firewall.elements["allow4_ports"], "web-to-api expands to tuples"
    assert firewall.elements["allow4_proto_iv"], "the CIDR policy goes to an interval map"
