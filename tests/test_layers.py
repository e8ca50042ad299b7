"""The house's layering: each module imports only its own layer and those below it.

errors/reporting → io → store → the plugin contract → models → learning → merging →
plugins → app (and the demo) → api (and the façade, and the one-release shims) → cli.
Imports inside functions count too: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = [
    ("errors and reporting", {"errors", "reporting", "sizes", "allocator"}),
    ("io", {"io"}),
    ("store", {"store"}),
    ("the plugin contract", {"hookspecs", "method", "registry"}),
    ("models", {"models"}),
    ("learning", {"learning"}),
    ("merging", {"merging"}),
    ("plugins", {"plugins"}),
    ("app", {"app", "demo"}),
    ("api", {"api", "__init__", "sources", "modeling", "blockwise", "tasks", "training", "refs"}),
    ("cli", {"cli", "__main__"}),
]
LEVEL = {name: i for i, (_, names) in enumerate(LAYERS) for name in names}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[0] in ("plugins", "store"):
        parts = ["compressor", *parts]
    return ".".join(parts).removesuffix(".__init__")


def _level(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "compressor":
        return None
    return LEVEL["__init__"] if len(parts) == 1 else LEVEL.get(parts[1])


def _imports(path: Path, module: str):
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == "compressor":  # `from compressor import X`: X's own layer
                yield from (f"compressor.{a.name}" for a in node.names)
            else:
                yield target


def _modules():
    for top in ("compressor", "plugins", "store"):
        yield from sorted((ROOT / top).rglob("*.py"))


def test_every_module_is_in_a_layer():
    unplaced = [str(p.relative_to(ROOT)) for p in _modules() if _level(_module_name(p)) is None]
    assert unplaced == []


def test_no_module_imports_from_a_layer_above_its_own():
    upward = []
    for path in _modules():
        module = _module_name(path)
        mine = _level(module)
        for target in _imports(path, module):
            theirs = _level(target)
            if theirs is not None and theirs > mine:
                upward.append(
                    f"{module} ({LAYERS[mine][0]}) imports {target} ({LAYERS[theirs][0]})"
                )
    assert upward == []


def test_the_root_holds_few_modules_and_no_module_is_long():
    root = sorted(p.name for p in (ROOT / "compressor").glob("*.py"))
    assert len(root) <= 16, root
    packages = [p for p in (ROOT / "compressor").iterdir() if (p / "__init__.py").is_file()]
    assert len(packages) >= 6
    long = {
        str(p.relative_to(ROOT)): n
        for p in _modules()
        if (n := len(p.read_text().splitlines())) > 700
    }
    assert long == {}


def test_no_package_shadows_a_facade_function():
    """``compressor.merge`` is the API function even after the merge loop is imported: a
    subpackage of the same name would replace the façade's attribute on first import."""
    import compressor
    import compressor.merging.loop  # noqa: F401  (what loading any merge plugin does)
    from compressor import api

    packages = {p.name for p in (ROOT / "compressor").iterdir() if (p / "__init__.py").is_file()}
    api_names = {n for n in dir(api) if not n.startswith("_") and callable(getattr(api, n))}
    assert packages & api_names == set()
    assert compressor.merge is api.merge
