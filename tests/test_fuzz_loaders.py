"""Fuzz targets over the texts that come from outside: spec text, state file bytes, agent configuration.

Each input is either accepted or refused with the project's ValidationError (bounded, printable,
naming a field); anything else is a finding. Inputs start from valid documents written in every form
(JSON, block and flow YAML, TOML) and are mutated below the structure (YAML tokens, tags, anchors, every
number form YAML has, bytes that are no UTF-8), plus plain random text. The crashers of issue #14
(``tests/fuzz_corpus/``) are replayed as explicit examples of each target.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

from factories import state
from fuzzing import (
    FORMS,
    JSON_VALUES,
    YAML_TOKENS,
    check_refusal,
    count,
    dump,
    fuzz_settings,
    mutated,
    mutated_bytes,
    mutated_text,
    outcome,
    valid_spec,
    valid_state,
)
from hypothesis import example, given
from hypothesis import strategies as st

from veilnet_agent.app.statefile import parse_state_text
from veilnet_agent.core import loading
from veilnet_agent.core.config import parse_config_text
from veilnet_agent.core.errors import ValidationError, shown
from veilnet_agent.core.model import parse_node_state
from veilnet_controller.spec import canonical_text, load_spec_text, parse_spec, parse_spec_text

CORPUS = Path(__file__).parent / "fuzz_corpus"
EXAMPLE_SPEC = (Path(__file__).parents[1] / "examples" / "network.yaml").read_text()
EXAMPLE_CONFIG = (Path(__file__).parents[1] / "examples" / "agent.toml").read_text()


def _corpus(target: str) -> list[bytes]:
    return [p.read_bytes() for p in sorted((CORPUS / target).iterdir())]


def with_corpus(target: str, decode: bool = False) -> Any:
    """Decorator: every corpus input of ``target`` as an explicit example (run in every profile)."""
    def apply(test: Any) -> Any:
        for data in _corpus(target):
            test = example(data.decode() if decode else data)(test)
        return test
    return apply


# --------------------------------------------------------------------------- spec text

SPEC_TEXTS = st.one_of(
    st.builds(dump, valid_spec().flatmap(lambda s: mutated(s, 2, text=True)), FORMS).flatmap(mutated_text),
    mutated_text(EXAMPLE_SPEC),
    st.builds(dump, JSON_VALUES, FORMS).flatmap(mutated_text),
    st.lists(st.sampled_from([*YAML_TOKENS, "a", "b", "x: ", "nodes", "1", "-1.5"]), max_size=30).map("".join),
    st.text(max_size=200),
)


@fuzz_settings(ci_examples=900, campaign_examples=5000)
@with_corpus("spec", decode=True)
@given(SPEC_TEXTS)
def test_fuzz_spec_text(text: str) -> None:
    """Spec text (as ``ApplySpec`` receives it): accepted whole or one bounded ValidationError; an accepted
    spec's canonical text reads back as the same spec and is a fixed point."""
    count("spec-text")
    accepted, result = outcome(lambda: parse_spec_text(text), ValidationError)
    if not accepted:
        check_refusal(result)
        return
    canonical = canonical_text(result.raw)
    again = parse_spec_text(canonical)
    assert again == result
    assert canonical_text(again.raw) == canonical


# --------------------------------------------------------------------------- state file

def _state_bytes(draw: st.DrawFn) -> tuple[bytes, str]:
    fmt = draw(st.sampled_from(["json", "yaml"]))
    form = draw(FORMS) if fmt == "yaml" else draw(st.sampled_from(["json", "json-pretty"]))
    base = draw(st.one_of(valid_state(), st.just(state(peers=2)), JSON_VALUES))
    text = dump(draw(mutated(base, 2, text=True)), form)
    if draw(st.booleans()):
        text = draw(mutated_text(text))
    data = text.encode("utf-8", "surrogatepass")
    if draw(st.integers(0, 3)) == 0:
        data = draw(mutated_bytes(data))
    return data, fmt


STATE_FILES = st.one_of(st.composite(_state_bytes)(), st.tuples(st.binary(max_size=200), st.sampled_from(["json",
                                                                                                         "yaml"])))


@fuzz_settings(ci_examples=1000, campaign_examples=5000)
@given(STATE_FILES)
def test_fuzz_state_file(case: tuple[bytes, str]) -> None:
    """State-file bytes through the same path as ``run --state-file``: loaded and validated, or refused."""
    count("state-file")
    data, fmt = case
    accepted, result = outcome(lambda: parse_node_state(parse_state_text(data, f"state.{fmt}", fmt)),
                               ValidationError)
    if not accepted:
        check_refusal(result)


def test_state_file_corpus_is_refused() -> None:
    for target, fmt in (("state-yaml", "yaml"), ("state-json", "json")):
        for data in _corpus(target):
            accepted, result = outcome(lambda: parse_node_state(parse_state_text(data, "s", fmt)),  # noqa: B023
                                       ValidationError)
            assert not accepted
            check_refusal(result)


# --------------------------------------------------------------------------- agent configuration

def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value) if not isinstance(value, float) or value == value else "nan"
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string (JSON's escapes are TOML's, but for \ud800)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {toml_value(v)}" for k, v in value.items()) + "}"
    return '""'


def toml_text(config: dict[str, Any]) -> str:
    top = [f"{k} = {toml_value(v)}" for k, v in config.items() if not isinstance(v, dict)]
    tables = [f"[{k}]\n" + "\n".join(f"{json.dumps(str(kk))} = {toml_value(vv)}" for kk, vv in v.items())
              for k, v in config.items() if isinstance(v, dict)]
    return "\n".join(top + tables) + "\n"


TOML_TOKENS = ["9" * 120, "-" + "9" * 5000, "0x" + "f" * 200, "0o7", "0b1", "1_000", "1e400", "nan", "-inf",
               "1979-05-27T07:32:00Z", "07:32:00", "1979-05-27", "true", '"""', "'''", '"', "'", "#", "[", "]",
               "[[", "]]", "{", "}", "=", ",", ".", "\n", "\\u00e9", "\\ud800", "é", "\x00", "\r\n"]
CONFIGS = st.fixed_dictionaries({
    "node_name": st.sampled_from(["host-a", "Host_A", ""]),
    "underlay": st.fixed_dictionaries({"interface": st.sampled_from(["eth0", "x" * 16]),
                                       "address": st.sampled_from(["192.0.2.1", "2001:db8::1", "192.0.2.300"])},
                                      optional={"mtu": st.integers(0, 70000)}),
}, optional={
    "resync_interval": st.one_of(st.integers(-5, 100_000), st.floats()),
    "log_format": st.sampled_from(["json", "console", "xml"]),
    "wireguard": st.fixed_dictionaries({}, optional={"backend": st.sampled_from(["auto", "kernel", "magic"]),
                                                     "listen_port": st.integers(0, 70000)}),
    "firewall": st.fixed_dictionaries({}, optional={"nflog_group": st.integers(0, 70000),
                                                    "log_per_second": st.integers(0, 20000)}),
    "controller": st.fixed_dictionaries({}, optional={"local_socket": st.sampled_from(["/run/x.sock", "rel"]),
                                                      "socket_group": st.sampled_from(["veilnet", "bad\n"]),
                                                      "reconnect_max_seconds": st.floats(0, 5000)}),
})


@st.composite
def config_bytes(draw: st.DrawFn) -> bytes:
    text = draw(st.one_of(CONFIGS.map(toml_text), st.just(EXAMPLE_CONFIG)))
    text = draw(mutated_text(text, TOML_TOKENS))
    data = text.encode("utf-8", "surrogatepass")
    return draw(mutated_bytes(data)) if draw(st.integers(0, 3)) == 0 else data


@fuzz_settings(ci_examples=1200, campaign_examples=5000)
@with_corpus("config")
@given(st.one_of(config_bytes(), st.binary(max_size=100)))
def test_fuzz_config(data: bytes) -> None:
    """The agent configuration (TOML bytes): accepted, or refused with a ValidationError naming the key or
    the position."""
    count("config")
    accepted, result = outcome(lambda: parse_config_text(data, "agent.toml"), ValidationError)
    if not accepted:
        check_refusal(result)


@fuzz_settings(ci_examples=1500, campaign_examples=5000)
@given(st.one_of(CONFIGS.map(toml_text), st.just(EXAMPLE_CONFIG)).flatmap(lambda t: mutated_text(t, TOML_TOKENS)))
def test_fuzz_toml_differential(text: str) -> None:
    """The bounded TOML loader reads exactly what tomllib reads, but for long integers (then OversizedInteger,
    each where tomllib has the integer) and where tomllib itself fails with something else than its error."""
    count("toml-differential")
    try:
        expected: Any = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        expected = "refused"
    except (ValueError, RecursionError):
        expected = "crash"  # what the loader must turn into a ValidationError
    accepted, got = outcome(lambda: loading.load_toml_text(text, "config", "agent.toml"), ValidationError)
    if not accepted:
        check_refusal(got)
        assert expected in ("refused", "crash"), f"tomllib read {expected!r}, the loader refused: {got}"
        return
    assert expected != "refused", f"the loader accepted what tomllib refuses: {got!r}"
    if expected != "crash":
        assert _unbounded(got) == _unbounded(expected)


def _unbounded(value: Any) -> Any:
    """``value`` with every OversizedInteger converted back, as tomllib would have read it (NaN comparable)."""
    from veilnet_agent.core.validate import OversizedInteger

    if isinstance(value, dict):
        return {k: _unbounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unbounded(v) for v in value]
    if isinstance(value, OversizedInteger):
        return int(value.text.replace("_", ""), 0)
    if isinstance(value, float) and value != value:
        return "nan"  # NaN equals nothing, not even itself
    return value


# --------------------------------------------------------------------------- errors themselves

@fuzz_settings(ci_examples=1500, campaign_examples=5000)
@given(st.text(max_size=400), JSON_VALUES, st.text(max_size=2000))
def test_fuzz_error_rendering(field: str, value: Any, reason: str) -> None:
    """Whatever a validator quotes (a value from any input, a path holding any key, a parser's words), the
    error is one bounded printable line that the controller and the agent can log and send."""
    count("error-rendering")
    check_refusal(ValidationError(field, value, reason))
    assert len(shown(value)[0]) <= 200


def test_spec_structure_through_the_loader_equals_the_structure() -> None:
    """Sanity for the targets above: the loader and the validators see one spec whatever the form."""
    raw = load_spec_text(EXAMPLE_SPEC)
    for form in ("json", "json-pretty", "flow", "block"):
        assert parse_spec_text(dump(raw, form)) == parse_spec(raw)
