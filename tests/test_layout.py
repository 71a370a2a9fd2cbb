"""The package's layout is its architecture: each folder imports only what its docstring allows.

The rules are the drawing in docs/architecture.md, checked on the
code's own imports: ``core`` is pure and imports nothing of ours; ``store``
(Datastore) and ``cache`` (memcache) know nothing of each other or of the
shell above them; ``paths`` (the sync shell) sits on both; ``patterns`` sit on
the counter; nothing in the library imports ``tools``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "sharded_counter"

# What every layer above the base may import: the pure core, the errors, the settings,
# the telemetry hooks and what this process owns (process.py: forgotten at a fork).
_BASE = {"core", "errors", "settings", "telemetry", "process"}

# layer -> the layers it may import.
ALLOWED: dict[str, set[str]] = {
    "core": {"core"},
    "errors": set(),
    "process": {"errors"},
    "_version": set(),
    "telemetry": {"_version"},
    "settings": {"core", "errors"},
    # In-memory models of Datastore and memcached: the simulator's (tools/simulate), and
    # the memory:// backends the store and the caches may choose.
    "memory": {"memory", *_BASE},
    "store": {"store", "memory", *_BASE},
    "cache": {"cache", "memory", *_BASE},
    "paths": {"paths", "store", "cache", *_BASE},
    "counter": {"paths", "store", "cache", *_BASE},
    "bounded": {"counter", "paths", "store", "cache", *_BASE},
    "patterns": {"patterns", "counter", "paths", "cache", *_BASE},
    # asyncio: the paths' steps driven by a shell of its own; nothing imports it.
    "aio": {"aio", "counter", "patterns", "paths", "store", "cache", "memory", *_BASE},
    "__init__": {"counter", "bounded", "patterns", "paths", "cache", "_version", *_BASE},
    "tools": {
        "tools",
        "__init__",
        "counter",
        "bounded",
        "patterns",
        "paths",
        "store",
        "cache",
        "aio",
        "memory",
        "_version",
        *_BASE,
    },
    "__main__": {"tools"},
}


def layer_of(module: str) -> str:
    """``sharded_counter.store.shards`` -> ``store``; the package itself, and a name it
    defines (``__version__``), -> ``__init__``."""
    parts = module.split(".")
    if len(parts) == 1:
        return "__init__"
    top = PACKAGE / parts[1]
    return parts[1] if top.is_dir() or top.with_suffix(".py").is_file() else "__init__"


def imports_of(path: Path) -> set[str]:
    """Every module of the package that ``path`` imports (relative imports resolved)."""
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    package = list(rel.parts[:-1])  # a module's package; an __init__'s is its own folder
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join([*base, *([node.module] if node.module else [])])
                names = [target] if node.module else [f"{target}.{a.name}" for a in node.names]
            else:
                names = [node.module or ""]
            found |= {n for n in names if n.split(".")[0] == "sharded_counter"}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "sharded_counter"}
    return found


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_each_module_imports_only_what_its_layer_may(path: Path) -> None:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    layer = layer_of(".".join(rel.parts))
    if rel.name == "__init__" and len(rel.parts) > 2:
        layer = rel.parts[1]  # a folder's own docstring module belongs to its folder
    forbidden = {
        target for target in imports_of(path) if layer_of(target) not in ALLOWED[layer] | {layer}
    }
    assert not forbidden, f"{rel} ({layer}) may not import {sorted(forbidden)}"


def test_every_layer_is_drawn() -> None:
    layers = {
        layer_of(".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts)) for p in MODULES
    }
    assert layers <= set(ALLOWED), layers - set(ALLOWED)
