"""The package's architecture, read from the source (ast): no import cycles (function-level
imports included), no module importing another module's underscore names unless that module is
a declared private module (``_name.py``), private modules of a subpackage used only inside it,
and each layer importing only from the layers below it (docs/architecture.md)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "mechicl"

# Layers, lowest first: a module may import modules of its own layer or lower ones.
LAYERS: list[tuple[str, ...]] = [
    ("mechicl._checks", "mechicl._io", "mechicl._batching", "mechicl._version", "mechicl.stats"),
    ("mechicl.model",),
    ("mechicl.inputs",),
    ("mechicl.results", "mechicl.plotting"),
    ("mechicl.analyses",),
    ("mechicl.experiments", "mechicl.interop"),
    ("mechicl.report",),
    ("mechicl.cli",),
]
ASIDE = {"mechicl.testing": 1}  # test models: need only the model layer


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def imports(path: Path, known: set[str]) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every import of mechicl modules in
    the file, at any depth (functions and ``if TYPE_CHECKING:`` blocks included)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    this = module_name(path)
    out = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("mechicl"):
                    out.append((alias.name, [], node.lineno))
        elif isinstance(node, ast.ImportFrom) and node.module:
            base = node.module
            if node.level:  # relative imports
                package = this if path.name == "__init__.py" else this.rsplit(".", 1)[0]
                for _ in range(node.level - 1):
                    package = package.rsplit(".", 1)[0]
                base = f"{package}.{node.module}"
            if base.startswith("mechicl"):
                names = []
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    if sub in known:  # "from package import module"
                        out.append((sub, [], node.lineno))
                    else:
                        names.append(alias.name)
                if names or not node.names:
                    out.append((base, names, node.lineno))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: {target for target, _, _ in imports(path, set(mods))
                   if target in mods and target != name}
            for name, path in mods.items()}


def layer_of(name: str) -> int | None:
    if name in ASIDE:
        return ASIDE[name]
    for i, prefixes in enumerate(LAYERS):
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return i
    return None


def test_every_module_has_a_layer():
    missing = [m for m in modules() if m != "mechicl" and layer_of(m) is None]
    assert not missing, f"modules outside the declared layers: {missing}"


def test_no_import_cycles():
    edges = graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def strongconnect(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in edges[v]:
                cycles.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            strongconnect(v)
    assert not cycles, f"import cycles: {cycles}"


def test_the_cycle_finder_finds_a_cycle(tmp_path, monkeypatch):
    """The check above can fail: a two-module cycle written to a scratch package is found."""
    pkg = tmp_path / "mechicl"
    (pkg / "a").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a" / "__init__.py").write_text("")
    (pkg / "a" / "x.py").write_text("def f():\n    from mechicl.a.y import g\n")
    (pkg / "a" / "y.py").write_text("from mechicl.a import x\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", pkg)
    with pytest.raises(AssertionError, match="import cycles"):
        test_no_import_cycles()


def test_private_modules_stay_in_their_package():
    """A private module of a subpackage (``mechicl/analyses/_engine.py``) is imported only by
    modules of that subpackage; the package-level ones (``mechicl/_io.py``) by any module."""
    mods = modules()
    bad = []
    for name, path in mods.items():
        for target, _, line in imports(path, set(mods)):
            package, _, leaf = target.rpartition(".")
            if leaf.startswith("_") and package != "mechicl" and not (
                    name == package or name.startswith(package + ".")):
                bad.append(f"{path.relative_to(ROOT.parent)}:{line} imports {target}")
    assert not bad, "\n".join(bad)


def test_no_underscore_names_across_modules():
    mods = modules()
    bad = []
    for name, path in mods.items():
        for target, names, line in imports(path, set(mods)):
            if target == name or target.rsplit(".", 1)[-1].startswith("_"):
                continue  # a declared private module may be imported from
            for imported in names:
                if imported.startswith("_") and not imported.startswith("__"):
                    bad.append(f"{path.relative_to(ROOT.parent)}:{line} takes {imported} "
                               f"from {target}")
    assert not bad, "\n".join(bad)


def test_layers_import_only_downwards():
    mods = modules()
    bad = []
    for name, path in mods.items():
        if name == "mechicl":  # the package namespace re-exports from every layer
            continue
        mine = layer_of(name)
        for target, _, line in imports(path, set(mods)):
            theirs = layer_of(target) if target != "mechicl" else len(LAYERS)
            if theirs is not None and mine is not None and theirs > mine:
                bad.append(f"{path.relative_to(ROOT.parent)}:{line} ({name}, layer {mine}) "
                           f"imports {target} (layer {theirs})")
    assert not bad, "\n".join(bad)


def test_public_names_are_sorted_and_exist():
    import mechicl

    assert mechicl.__all__ == sorted(mechicl.__all__, key=lambda n: (n != n.upper(), n))
    for name in mechicl.__all__:
        assert hasattr(mechicl, name), name
