"""A fuzz campaign: every fuzz target (``tests/test_fuzz_*.py``) run again and again for a time budget.

Run through ``scripts/fuzz``::

    scripts/fuzz                         # every target, 20 minutes in all
    scripts/fuzz --minutes 60 --target spec-text --target config
    scripts/fuzz --list
    scripts/fuzz --atheris spec-text -- -max_total_time=600   # coverage-guided (pip install atheris)

Each run of a target is one hypothesis run of ``--chunk`` inputs with a fresh random seed (profile
``campaign``: no example database, so every input is new); runs repeat until the target's share of the
budget is used. A failure prints hypothesis' falsifying example (and the blob that reproduces it) and
the campaign goes on with the next target; the exit status is 1 if anything failed. At the end it
prints, per target, how many inputs ran, and writes the same as JSON (``--report``).

With ``--atheris``, libFuzzer drives one target through hypothesis' ``fuzz_one_input`` (its bytes are
hypothesis' choices, so the inputs keep the target's structure) with coverage of the project's code.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
MODULES = ("test_fuzz_loaders", "test_fuzz_models", "test_fuzz_messages")


def _targets() -> dict[str, Any]:
    """Fuzz targets by name: a test function ``test_fuzz_<name>`` with ``_`` as ``-``."""
    found: dict[str, Any] = {}
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        for name, value in vars(module).items():
            if name.startswith("test_fuzz_") and hasattr(value, "hypothesis"):
                found[name.removeprefix("test_fuzz_").replace("_", "-")] = value
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/fuzz", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=20.0, help="time budget for all targets (default 20)")
    parser.add_argument("--target", action="append", default=[], help="a target to run (default: all)")
    parser.add_argument("--chunk", type=int, default=500, help="inputs per hypothesis run (default 500)")
    parser.add_argument("--report", type=Path, default=None, help="write the counts as JSON here")
    parser.add_argument("--list", action="store_true", help="list the targets and exit")
    parser.add_argument("--atheris", metavar="TARGET", help="run TARGET under atheris (libFuzzer) instead")
    parser.add_argument("libfuzzer", nargs="*", help="arguments for libFuzzer (after --)")
    args = parser.parse_args(argv)

    os.environ["VEILNET_FUZZ"] = "campaign"
    os.environ["VEILNET_FUZZ_EXAMPLES"] = str(args.chunk)
    sys.path.insert(0, str(HERE))
    if args.atheris:
        return _atheris(args.atheris, args.libfuzzer)
    import structlog

    structlog.configure(logger_factory=structlog.ReturnLoggerFactory())  # the targets' logs are not output
    import fuzzing

    targets = _targets()
    if args.list:
        print("\n".join(sorted(targets)))
        return 0
    chosen = args.target or sorted(targets)
    unknown = [t for t in chosen if t not in targets]
    if unknown:
        parser.error(f"unknown target(s) {', '.join(unknown)}; --list shows them")
    share = args.minutes * 60 / len(chosen)
    results: dict[str, dict[str, Any]] = {}
    failed = False
    for name in chosen:
        test = targets[name]
        before = dict(fuzzing.COUNTS)
        started = time.monotonic()
        runs, failures = 0, 0
        while time.monotonic() - started < share:
            runs += 1
            try:
                test()
            except BaseException as exc:  # a finding: report it, go on with the next target
                if isinstance(exc, KeyboardInterrupt):
                    raise
                failures += 1
                failed = True
                print(f"\n=== {name}: FAILED in run {runs}", file=sys.stderr)
                traceback.print_exception(exc, file=sys.stderr)
                break
        counted = {k: n - before.get(k, 0) for k, n in fuzzing.COUNTS.items() if n != before.get(k, 0)}
        seconds = time.monotonic() - started
        results[name] = {"inputs": sum(counted.values()), "runs": runs, "seconds": round(seconds, 1),
                         "failures": failures}
        print(f"{name:32} {results[name]['inputs']:>10,} inputs {runs:>5} runs {seconds:>8.1f} s"
              f"{'  FAILED' if failures else ''}", flush=True)
    total = sum(r["inputs"] for r in results.values())
    print(f"{'total':32} {total:>10,} inputs")
    if args.report is not None:
        args.report.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    return 1 if failed else 0


def _atheris(name: str, libfuzzer: list[str]) -> int:
    try:
        import atheris
    except ImportError:
        print("scripts/fuzz --atheris: install atheris first (.venv/bin/pip install atheris)", file=sys.stderr)
        return 2
    with atheris.instrument_imports(include=["veilnet_agent", "veilnet_controller"]):
        import veilnet_agent.core.loading  # noqa: F401 - imported here to be instrumented
        import veilnet_controller.spec  # noqa: F401
        targets = _targets()
    if name not in targets:
        print(f"unknown target {name}; scripts/fuzz --list shows them", file=sys.stderr)
        return 2
    atheris.Setup([sys.argv[0], *libfuzzer], targets[name].hypothesis.fuzz_one_input)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main())
