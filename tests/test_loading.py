"""The crashers fuzzing found in the loaders (issue #14), each a validation error naming the field now.

Before: YAML constructor errors (explicit tags with bad values, invalid implicit dates, number-shaped
scalars without digits) escaped the spec and state-file loaders as ValueError, KeyError,
AttributeError or IndexError (through ``ApplySpec``: an unhandled exception in the gRPC handler); the
spec's own duplicate-key check crashed on ``!!map``/``!!set`` nodes that were no mappings; invalid
UTF-8 in the state file or the configuration raised UnicodeDecodeError; a 5,000-digit integer made
``tomllib`` raise ValueError; a long YAML tag put 100 kB into one error message. Every case here goes
through the real loader from bytes or text. The inputs live in ``tests/fuzz_corpus/`` (the fuzz
targets replay them too).
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
from factories import state

from veilnet_agent.app.statefile import load_state_file, parse_state_text, read_state_file
from veilnet_agent.control.enrollment import split_endpoint
from veilnet_agent.core import loading
from veilnet_agent.core.config import load_config, parse_config_text
from veilnet_agent.core.errors import MAX_FIELD, MAX_REASON, MAX_SHOWN, ValidationError
from veilnet_agent.core.model import parse_node_state
from veilnet_controller.spec import load_spec_text, parse_spec_text

CORPUS = Path(__file__).parent / "fuzz_corpus"
BOUND = MAX_FIELD + MAX_REASON + MAX_SHOWN + 10
CONFIG = 'node_name = "host-a"\n[underlay]\ninterface = "eth0"\naddress = "192.0.2.1"\n'


def corpus(name: str) -> bytes:
    return (CORPUS / name).read_bytes()


def spec_error(text: str) -> ValidationError:
    with pytest.raises(ValidationError) as info:
        parse_spec_text(text)
    assert len(str(info.value)) <= BOUND
    return info.value


def state_error(data: bytes, fmt: str = "yaml") -> ValidationError:
    with pytest.raises(ValidationError) as info:
        parse_node_state(parse_state_text(data, "/etc/veilnet/state." + fmt, fmt))
    assert len(str(info.value)) <= BOUND
    return info.value


# --------------------------------------------------------------------------- YAML types


@pytest.mark.parametrize(("name", "tag"), [
    ("int-tag-bad-value.yaml", "!!int"),  # ValueError: invalid literal for int()
    ("int-tag-octal-8.yaml", "!!int"),  # ValueError: int('08', 8)
    ("int-tag-empty.yaml", "!!int"),  # IndexError
    ("float-tag-bad-value.yaml", "!!float"),  # ValueError
    ("bool-tag-bad-value.yaml", "!!bool"),  # KeyError
    ("timestamp-tag-bad-value.yaml", "!!timestamp"),  # AttributeError
    ("map-tag-on-a-list.yaml", "!!map"),  # TypeError in the duplicate-key check
    ("map-tag-on-a-scalar.yaml", "!!map"),  # ValueError in the duplicate-key check
    ("set-tag-on-a-scalar.yaml", "!!set"),
])
def test_explicit_yaml_tags_are_refused_naming_the_position(name: str, tag: str) -> None:
    text = corpus("spec/" + name).decode()
    exc = spec_error(text)
    line = next(i for i, row in enumerate(text.splitlines(), 1) if tag in row)
    assert exc.field == "spec" and f"YAML tag '{tag}' at line {line}" in exc.reason, str(exc)
    assert "tags are not accepted" in exc.reason


@pytest.mark.parametrize("text", ["x: !!binary aGVsbG8=", "x: !!set {a, b}", "x: !!omap [a: 1]", "x: !!str 5",
                                  "x: ! 5", "!foo {a: 1}", "%TAG !e! tag:e.com,2000:\n--- !e!x 1"])
def test_every_explicit_tag_is_refused_even_with_a_good_value(text: str) -> None:
    with pytest.raises(ValidationError, match="tags are not accepted"):
        load_spec_text(text)


def test_the_same_tags_in_a_state_file_are_validation_errors_naming_the_file() -> None:
    for name, where in (("int-tag-bad-value.yaml", "line 3, column 8"), ("timestamp-tag-bad-value.yaml",
                                                                           "line 1, column 4")):
        exc = state_error(corpus("state-yaml/" + name))
        assert exc.field == "state-file" and exc.value == "/etc/veilnet/state.yaml"
        assert "YAML tag" in exc.reason and where in exc.reason, str(exc)


def test_implicit_dates_are_strings_for_the_validators_to_judge() -> None:
    # 2023-02-30 made PyYAML's timestamp constructor raise ValueError (day is out of range for month)
    assert load_spec_text(corpus("spec/invalid-implicit-date.yaml").decode()) == {
        "nodes": [{"name": "host-a", "joined": "2023-02-30"}]}
    assert load_spec_text("x: 2023-02-03\ny: 2001-12-14t21:59:43.10-05:00") == {
        "x": "2023-02-03", "y": "2001-12-14t21:59:43.10-05:00"}
    exc = spec_error(corpus("spec/invalid-implicit-date.yaml").decode())
    assert exc.field == "nodes[0].joined" and "unknown key" in exc.reason
    raw = state(peers=1)
    raw["segments"][0]["vni"] = "2023-02-30"
    exc = state_error(json.dumps(raw).replace('"2023-02-30"', "2023-02-30").encode())  # JSON flow is YAML
    assert exc.field == "segments[0].vni" and exc.value == "2023-02-30" and exc.reason == "must be an integer"


@pytest.mark.parametrize(("name", "literal"), [("hex-without-digits.yaml", "0x_"),
                                               ("binary-without-digits.yaml", "0b_")])
def test_number_shaped_scalars_without_digits_are_refused_at_their_position(name: str, literal: str) -> None:
    # YAML 1.1's int pattern takes "0x_" and "0b_"; int('', 16) then raised ValueError
    text = corpus("spec/" + name).decode()
    exc = spec_error(text)
    assert exc.field == "spec" and f"'{literal}' is not an integer" in exc.reason, str(exc)
    assert f"line {len(text.splitlines())}" in exc.reason
    assert "is not an integer" in state_error(corpus("state-yaml/hex-without-digits.yaml")).reason


def test_a_recursive_alias_is_refused() -> None:
    exc = spec_error(corpus("spec/recursive-alias.yaml").decode())
    assert "recursive structure" in exc.reason and "'*a' at line 1, column 8" in exc.reason
    assert "recursive structure" in state_error(corpus("state-yaml/recursive-alias.yaml")).reason


def test_a_long_tag_gives_a_short_message() -> None:
    # "could not determine a constructor for the tag 'ttt...'" quoted all 20,000 characters
    exc = spec_error(corpus("spec/long-tag.yaml").decode())
    assert "(20000 characters)" in exc.reason and len(str(exc)) < 400


def test_the_alias_expansion_error_is_small() -> None:
    # 7 lines expanding to 10 million values; the error once quoted millions of them
    exc = spec_error(corpus("spec/alias-expansion-error-size.yaml").decode())
    assert exc.field == "spec" and "expand to more than 4000000 values" in exc.reason
    assert len(str(exc)) < 200


def test_merge_keys_still_work_and_own_keys_override_them() -> None:
    text = "base: &b {x: 1, y: 1}\nother:\n  <<: *b\n  y: 2\n"
    assert load_spec_text(text) == {"base": {"x": 1, "y": 1}, "other": {"x": 1, "y": 2}}
    assert load_spec_text("a: &a {x: 1}\nb: &b {x: 2}\nc: {<<: [*a, *b]}") == {
        "a": {"x": 1}, "b": {"x": 2}, "c": {"x": 1}}


@pytest.mark.parametrize("text", ["a: 1\na: 2\n", "1: x\n0x1: y\n", "? [1]\n: x\n"])
def test_duplicate_and_unhashable_keys_are_refused(text: str) -> None:
    exc = spec_error(text)
    assert exc.field == "spec" and ("duplicate key" in exc.reason or "unhashable" in exc.reason), str(exc)


# --------------------------------------------------------------------------- the state file


def test_state_file_duplicate_keys_are_refused_in_yaml_and_json(tmp_path: Path) -> None:
    # the last one won silently: a state file could say two things about one field
    exc = state_error(corpus("state-yaml/duplicate-key.yaml"))
    assert "found duplicate key 'node'" in exc.reason and "line 2, column 1" in exc.reason
    exc = state_error(corpus("state-json/duplicate-key.json"), "json")
    assert exc.reason == "not valid JSON: duplicate key 'node'"
    raw = state(peers=2)
    text = json.dumps(raw).replace('"name": "peer-1"', '"name": "peer-1", "name": "peer-0"')
    path = tmp_path / "state.json"
    path.write_text(text)
    with pytest.raises(ValidationError, match="duplicate key 'name'"):
        load_state_file(path)


@pytest.mark.parametrize(("name", "fmt", "where"), [("state-yaml/invalid-utf8.yaml", "yaml", "line 2, column 20"),
                                                    ("state-json/invalid-utf8.json", "json", "line 1, column 16")])
def test_invalid_utf8_in_the_state_file_names_the_file_and_position(tmp_path: Path, name: str, fmt: str,
                                                                    where: str) -> None:
    path = tmp_path / f"state.{fmt}"
    path.write_bytes(corpus(name))
    with pytest.raises(ValidationError) as info:  # UnicodeDecodeError before
        read_state_file(path)
    assert info.value.field == "state-file" and info.value.value == str(path)
    assert info.value.reason.startswith("not valid UTF-8: byte 0xff at " + where), str(info.value)


def test_a_huge_integer_in_a_json_state_file_names_the_field() -> None:
    exc = state_error(corpus("state-json/huge-integer.json"), "json")
    assert exc.field == "segments[0].vni" or exc.field.startswith("segments[0]"), str(exc)


def test_state_file_nesting_does_not_crash_the_process(tmp_path: Path) -> None:
    # libyaml's loader overflowed the C stack (SIGSEGV) on this; the guard refuses it first
    path = tmp_path / "deep.yaml"
    path.write_text("a: " + "[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValidationError, match="nested deeper than 64 levels"):
        read_state_file(path)


@pytest.mark.parametrize(("name", "text"), [
    ("state.yaml", "a: " + "[" * 100_000 + "]" * 100_000),
    ("state.yaml", "node: host-a\nnode: host-b\n"),
    ("state.yaml", "x: !!int foo\n"),
    ("state.json", '{"node": "\\ud800", "node": 1}'),
])
def test_veilnet_agent_check_exits_invalid_not_crashed(tmp_path: Path, name: str, text: str) -> None:
    """The agent's own entry point in a process of its own: exit 2 and one error line (the deep file was a
    SIGSEGV, exit -11, in the C loader; the others tracebacks)."""
    config = tmp_path / "agent.toml"
    config.write_text(CONFIG)
    state_file = tmp_path / name
    state_file.write_text(text)
    done = subprocess.run([sys.executable, "-m", "veilnet_agent.app.cli", "check", "--config", str(config),
                           "--state-file", str(state_file)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert done.stderr.startswith("error: state-file: ") and done.stderr.count("\n") == 1, done.stderr
    assert "Traceback" not in done.stderr


def test_a_huge_integer_in_json_that_falls_back_to_yaml_names_the_field() -> None:
    # not JSON (a trailing comma), so read as YAML flow style: int() of 5,000 digits raised ValueError there
    exc = spec_error(corpus("spec/json-huge-integer-falls-back-to-yaml.json").decode())
    assert exc.field == "segments[0].vni" and exc.reason == "must be in 1..16777215", str(exc)


def test_json_error_positions() -> None:
    exc = state_error(b'{"node": "host-a",\n "x": }', "json")
    assert exc.reason == "not valid JSON at line 2, column 7: Expecting value", exc.reason


def test_a_byte_order_mark_is_not_an_error() -> None:
    raw = state(peers=0)
    assert parse_state_text(b"\xef\xbb\xbf" + json.dumps(raw).encode(), "s.json", "json") == raw


# --------------------------------------------------------------------------- the agent configuration


def test_invalid_utf8_in_the_config_names_the_file_and_position(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_bytes(corpus("config/invalid-utf8.toml"))
    with pytest.raises(ValidationError) as info:  # UnicodeDecodeError before
        load_config(path)
    assert info.value.field == "config" and info.value.value == str(path)
    assert info.value.reason.startswith("not valid UTF-8: byte 0xff at line 1, column 19"), str(info.value)


def test_a_5000_digit_integer_in_the_config_names_the_field() -> None:
    with pytest.raises(ValidationError) as info:  # tomllib's int() raised ValueError before
        parse_config_text(corpus("config/huge-integer.toml"), "agent.toml")
    assert info.value.field == "underlay.mtu" and info.value.reason == "must be in 1280..65535"
    assert str(info.value).endswith("(got 99999999999999999999... (5000 characters))")


@pytest.mark.parametrize("literal", ["9" * 5000, "-" + "9" * 5000, "0x" + "f" * 5000, "0o" + "7" * 5000,
                                     "0b" + "1" * 5000, "1_" * 2500 + "1"])
@pytest.mark.parametrize("where", ["wireguard.listen_port", "resync_interval", "firewall.nflog_group"])
def test_long_integer_literals_anywhere_in_the_config_name_their_field(literal: str, where: str) -> None:
    table, _, key = where.rpartition(".")
    text = CONFIG + (f"[{table}]\n{key} = {literal}\n" if table else "").replace("\n\n", "\n")
    if not table:
        text = f"{key} = {literal}\n" + CONFIG
    with pytest.raises(ValidationError) as info:
        parse_config_text(text, "agent.toml")
    assert info.value.field == where and "must be in" in info.value.reason, str(info.value)


def test_huge_numbers_in_the_config_are_validation_errors() -> None:
    # float() of a huge int overflowed (OverflowError); fixed before this issue, kept as a regression
    for name in ("huge-float.toml", "huge-integer-as-float-field.toml"):
        with pytest.raises(ValidationError) as info:
            parse_config_text(corpus("config/" + name), "agent.toml")
        assert info.value.field == "resync_interval" and info.value.reason == "must be in 0.2..86400.0"


def test_long_digit_runs_in_strings_comments_and_keys_are_left_alone() -> None:
    digits = "1" * 500
    text = (f'# {digits}\nnode_name = "host-a"\nstate_dir = "/var/{digits}"\n'
            f"[underlay]\ninterface = 'eth0'\naddress = \"\"\"192.0.2.1\"\"\"\n")
    config = parse_config_text(text, "agent.toml")
    assert str(config.state_dir) == f"/var/{digits}"
    with pytest.raises(ValidationError) as info:
        parse_config_text(CONFIG + f"{digits} = 1\n", "agent.toml")
    assert info.value.field.startswith("underlay.'11111") and "unknown key" in info.value.reason
    assert loading.load_toml_text(f"[t]\n{digits} = 1\n", "config", None) == {"t": {digits: 1}}
    assert loading.load_toml_text(f"a = [{digits}, 2]\n", "config", None)["a"][1] == 2


def test_toml_errors_are_validation_errors() -> None:
    for text in ("node_name = \n", "a = " + "[" * 5000 + "]" * 5000, "x = 1979-05-27T07:32:00+99:00"):
        with pytest.raises(ValidationError) as info:
            parse_config_text(text, "agent.toml")
        assert info.value.field == "config" and "not valid TOML" in info.value.reason


# --------------------------------------------------------------------------- other parsers


@pytest.mark.parametrize("text", ["ctl:\u00b2", "ctl:\u0663\u0663", "ctl:" + "9" * 5000, "ctl:", ":80", "ctl:0"])
def test_controller_endpoint_ports_are_ascii_and_bounded(text: str) -> None:
    # '²'.isdigit() is True and int('²') raises ValueError
    with pytest.raises(ValidationError) as info:
        split_endpoint(text)
    assert info.value.field == "--controller"


def test_port_range_with_superscript_digits_is_a_validation_error() -> None:
    exc = spec_error(corpus("spec/port-range-superscript-digits.yaml").decode())
    assert exc.field == "policies[0].source.segment" or exc.field == "policies[0].ports[0]", str(exc)
    raw = state(peers=0)
    raw["policies"] = [{"name": "p", "source": {"segment": "blue"}, "destination": {"segment": "blue"},
                        "protocol": "tcp", "ports": ["\u00b2-\u00b3"]}]
    exc = state_error(json.dumps(copy.deepcopy(raw)).encode(), "json")
    assert exc.field == "policies[0].ports[0]" and "must be a port or a range" in exc.reason


def test_every_corpus_input_is_refused_with_a_bounded_validation_error() -> None:
    readers = {
        "spec": lambda data: parse_spec_text(data.decode()),
        "state-yaml": lambda data: parse_node_state(parse_state_text(data, "s.yaml", "yaml")),
        "state-json": lambda data: parse_node_state(parse_state_text(data, "s.json", "json")),
        "config": lambda data: parse_config_text(data, "agent.toml"),
    }
    seen = 0
    for target, read in readers.items():
        for path in sorted((CORPUS / target).iterdir()):
            with pytest.raises(ValidationError) as info:
                read(path.read_bytes())
            assert len(str(info.value)) <= BOUND, path
            seen += 1
    assert seen >= 30
