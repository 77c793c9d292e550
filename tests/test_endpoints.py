"""Where agents dial: advertised control endpoints and the controller's defaults for them."""

from __future__ import annotations

import pytest

from veilnet_agent.control.enrollment import check_ca_hash, resolve_control_endpoint, split_endpoint
from veilnet_agent.core.errors import ValidationError
from veilnet_controller.cli import _default_advertise, parse_duration


@pytest.mark.parametrize(("listen", "advertised"), [
    ("0.0.0.0:7443", ":7443"),
    ("[::]:7443", ":7443"),
    ("192.0.2.2:7443", "192.0.2.2:7443"),
    ("ctl.example.org:7443", "ctl.example.org:7443"),
])
def test_a_wildcard_listen_advertises_only_its_port(listen: str, advertised: str) -> None:
    assert _default_advertise(listen) == advertised


@pytest.mark.parametrize(("advertised", "bootstrap", "dial"), [
    (":7443", "192.0.2.2:7444", "192.0.2.2:7443"),
    (":7443", "[2001:db8::2]:7444", "[2001:db8::2]:7443"),
    (":7443", "ctl.example.org:7444", "ctl.example.org:7443"),
    ("other.example.org:9443", "ctl.example.org:7444", "other.example.org:9443"),
    ("", "ctl.example.org:7444", "ctl.example.org:7444"),
])
def test_agents_fill_in_the_host_they_joined_through(advertised: str, bootstrap: str, dial: str) -> None:
    assert resolve_control_endpoint(advertised, bootstrap) == dial


@pytest.mark.parametrize("bad", ["ctl.example.org", "ctl:0", "ctl:70000", ":7444", "ctl:https"])
def test_bad_controller_addresses_are_refused_naming_the_flag(bad: str) -> None:
    with pytest.raises(ValidationError) as e:
        split_endpoint(bad)
    assert e.value.field == "--controller"


@pytest.mark.parametrize("bad", ["", "sha256:", "sha256:" + "A" * 64, "md5:" + "0" * 64, "sha256:" + "0" * 63])
def test_bad_ca_hashes_are_refused(bad: str) -> None:
    with pytest.raises(ValidationError) as e:
        check_ca_hash(bad)
    assert e.value.field == "--ca-hash"


def test_durations() -> None:
    assert parse_duration("24h", "x").total_seconds() == 86400
    assert parse_duration("90s", "x").total_seconds() == 90
    for bad in ("0h", "1w", "h", "-1s", "1.5h"):
        with pytest.raises(ValidationError):
            parse_duration(bad, "--certificate-lifetime")
