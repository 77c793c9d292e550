"""The agent's layers, checked on the source: the pure core never reaches I/O code.

Every import of every module is read with ``ast`` (also those inside functions
and ``if TYPE_CHECKING`` blocks), and followed transitively through the
package's own modules: a core module importing another core module that
imports pyroute2 fails as well as a direct import would.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

PACKAGE = "veilnet_agent"
ROOT = Path(__file__).resolve().parent.parent / "agent" / PACKAGE

# layer -> what no module in it may reach (third-party top-level names and veilnet_agent subpackages)
FORBIDDEN = {
    "core": {"pyroute2", "nftables", "grpc", "veilnet", f"{PACKAGE}.drivers", f"{PACKAGE}.dataplane",
             f"{PACKAGE}.control", f"{PACKAGE}.app"},
    # orchestration talks to the drivers through the ports only
    "dataplane": {"pyroute2", "nftables", "grpc", f"{PACKAGE}.drivers", f"{PACKAGE}.control", f"{PACKAGE}.app"},
    # the control client (and with it the controller) never needs the data plane
    "control": {"pyroute2", "nftables", f"{PACKAGE}.drivers", f"{PACKAGE}.dataplane", f"{PACKAGE}.app"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in ROOT.rglob("*.py")}


@cache
def direct_imports(module: str) -> frozenset[str]:
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            found.add(target)
            # `from . import naming` imports a module, not a name
            found.update(f"{target}.{alias.name}" for alias in node.names if f"{target}.{alias.name}" in MODULES)
    return frozenset(found)


def reachable(module: str) -> dict[str, list[str]]:
    """Every name imported from ``module`` on, transitively within the package, with the chain that imports it."""
    chains: dict[str, list[str]] = {module: [module]}
    todo = [module]
    while todo:
        current = todo.pop()
        for name in direct_imports(current):
            if name in chains:
                continue
            chains[name] = [*chains[current], name]
            if name in MODULES:
                todo.append(name)
    return chains


def is_forbidden(name: str, forbidden: set[str]) -> bool:
    return any(name == f or name.startswith(f + ".") for f in forbidden)


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports_nothing_below_it(layer: str) -> None:
    members = sorted(m for m in MODULES if m == f"{PACKAGE}.{layer}" or m.startswith(f"{PACKAGE}.{layer}."))
    assert members, f"no modules found in {PACKAGE}.{layer}"
    problems = []
    for module in members:
        for name, chain in reachable(module).items():
            if is_forbidden(name, FORBIDDEN[layer]):
                problems.append(" -> ".join(chain))
    assert not problems, f"{layer} reaches what it must not:\n" + "\n".join(sorted(set(problems)))


def test_the_check_sees_a_violation() -> None:
    """The walker finds both a direct import and one through another module."""
    chains = reachable(f"{PACKAGE}.drivers.links")
    assert "pyroute2" in chains
    assert is_forbidden("pyroute2.netlink.exceptions", FORBIDDEN["core"])
    assert f"{PACKAGE}.core.objects" in reachable(f"{PACKAGE}.dataplane.reconciler")
