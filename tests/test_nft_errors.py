"""nft's refusals, as the agent reports them: what was wrong and the input it was wrong in (no carets)."""

from __future__ import annotations

from veilnet_agent.drivers.firewall import _clean_error


def test_an_error_names_the_part_and_the_line_nft_refused() -> None:
    text = ("internal:3:32-35: Error: Could not resolve protocol name\n"
            "add rule inet t c meta l4proto tcpx accept\n"
            "                               ^^^^\n")
    assert _clean_error(text) == ('Error: Could not resolve protocol name '
                                  '(at "tcpx" in: add rule inet t c meta l4proto tcpx accept)')


def test_a_long_line_is_cut_and_repeats_are_dropped() -> None:
    line = "add element inet veilnet s { " + ", ".join(f"192.0.2.{i}" for i in range(60)) + " }"
    block = f"internal:1:30-38: Error: Conflicting intervals\n{line}\n{' ' * 29}^^^^^^^^^\n"
    cleaned = _clean_error(block + block)
    assert cleaned.count("Error:") == 1, cleaned
    assert cleaned.startswith('Error: Conflicting intervals (at "192.0.2.0" in: add element inet veilnet s {')
    assert cleaned.endswith("...)") and len(cleaned) < 260, cleaned


def test_errors_without_an_echo_stay_as_they_are() -> None:
    assert _clean_error("Error: Could not process rule: No such file or directory\n") == (
        "Error: Could not process rule: No such file or directory")
    assert _clean_error("") == "nft failed without a message"
    two = "internal:1:1-3: Error: a\nx\n^\ninternal:2:1-3: Error: b\n"
    assert _clean_error(two) == 'Error: a (at "x" in: x); Error: b'
