"""Layers import downward only: every ltdist import of every module, at the top of a file or inside a function,
points to a module of the same layer or of a layer below (the table is :data:`ltdist.LAYERS`).

The check reads the source with :mod:`ast` (nothing is imported), so a lazy import inside a function counts
as much as a top-level one, and so does ``importlib.import_module`` of a literal name (or an f-string's
literal prefix). Importing ``a.b.c`` runs the ``__init__`` of ``a`` and ``a.b`` too: the target's layer is the
highest of the three.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

import ltdist

ROOT = Path(__file__).resolve().parents[1]
# Package name → its source folder (pyproject.toml's package-dir: ltdist.kernels lives in kernels/).
PACKAGES = {"ltdist": ROOT / "ltdist", "ltdist.kernels": ROOT / "kernels"}

Layers = Sequence[tuple[str, Sequence[str]]]


def module_files(packages: dict[str, Path]) -> dict[str, Path]:
    """Dotted module name → file, for every ``.py`` file of every package (symbolic links are not followed:
    a checkout may link ``ltdist/kernels`` to ``kernels/``, which is a package of its own here)."""
    modules: dict[str, Path] = {}
    for package, folder in packages.items():
        stack = [folder]
        while stack:
            directory = stack.pop()
            for path in sorted(directory.iterdir()):
                if path.is_symlink():
                    continue
                if path.is_dir() and path.name != "__pycache__" and any(path.rglob("*.py")):
                    stack.append(path)  # a package, or a namespace package (ltdist/engine has no __init__)
                elif path.suffix == ".py":
                    parts = list(path.relative_to(folder).with_suffix("").parts)
                    if parts[-1] == "__init__":
                        parts.pop()
                    modules[".".join([package, *parts])] = path
    return modules


def _import_module_target(node: ast.Call) -> str | None:
    """The module name of ``importlib.import_module("a.b")`` (or of f"a.b.{x}": its literal package)."""
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
    if name != "import_module" or not node.args:
        return None
    arg = node.args[0]
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return arg.value
    if isinstance(arg, ast.JoinedStr) and arg.values and isinstance(arg.values[0], ast.Constant):
        return str(arg.values[0].value).rsplit(".", 1)[0]
    return None


def imports_of(module: str, path: Path, known: set[str], roots: set[str]) -> Iterator[tuple[int, str]]:
    """(line, imported module) for every import of a module of ``roots`` in ``path``, wherever it stands.

    ``from a import b`` imports module ``a.b`` when that is a module, else (a name defined in ``a``) ``a``."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join(parent + ([node.module] if node.module else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        elif isinstance(node, ast.Call):
            target = _import_module_target(node)
            targets = [target] if target else []
        for target in dict.fromkeys(targets):
            if target.split(".")[0] in roots:
                yield node.lineno, target


def layer_of(module: str, layers: Layers) -> int | None:
    """Index of the layer whose entries name ``module`` most precisely, None when none does.

    A dotted entry covers that module and, for a package, everything in it; a top-level package's name
    covers its ``__init__`` only (so a new top-level module must be placed explicitly)."""
    best: tuple[int, int] | None = None
    for index, (_, entries) in enumerate(layers):
        for entry in entries:
            covers = module == entry or ("." in entry and module.startswith(entry + "."))
            if covers and (best is None or len(entry) > best[0]):
                best = (len(entry), index)
    return None if best is None else best[1]


def target_layer(target: str, layers: Layers) -> int | None:
    """The highest layer among ``target`` and its parent packages (importing it runs their ``__init__``)."""
    parts = target.split(".")
    found = [layer_of(".".join(parts[:i]), layers) for i in range(1, len(parts) + 1)]
    placed = [index for index in found if index is not None]
    return max(placed) if placed else None


def layer_problems(packages: dict[str, Path], layers: Layers, root: Path) -> tuple[list[str], list[str]]:
    """(modules without a layer, upward imports as ``file:line module (layer) → target (layer)``)."""
    modules = module_files(packages)
    roots = {name.split(".")[0] for name in packages}
    names = [name for name, _ in layers]
    unplaced = sorted(m for m in modules if layer_of(m, layers) is None)
    upward = []
    for module, path in sorted(modules.items()):
        own = layer_of(module, layers)
        if own is None:
            continue
        for line, target in imports_of(module, path, set(modules), roots):
            theirs = target_layer(target, layers)
            if theirs is not None and theirs > own:
                upward.append(f"{path.relative_to(root)}:{line} {module} ({names[own]}) → {target} "
                              f"({names[theirs]})")
    return unplaced, upward


def test_every_module_has_a_layer():
    unplaced, _ = layer_problems(PACKAGES, ltdist.LAYERS, ROOT)
    assert unplaced == [], f"place these modules in ltdist.LAYERS: {unplaced}"


def test_every_import_points_down_or_within_its_layer():
    _, upward = layer_problems(PACKAGES, ltdist.LAYERS, ROOT)
    assert upward == [], "upward imports (move the code down, or pass the value in):\n" + "\n".join(upward)


@pytest.fixture
def synthetic(tmp_path: Path) -> Path:
    """A package ``pkg``: ``low`` imports ``high`` lazily inside a function (the one upward import), ``high``
    imports ``low`` at the top and ``pkg.mid`` through importlib (both downward)."""
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "mid.py").write_text("")
    (package / "low.py").write_text("import os\n\n\ndef late():\n    from pkg.high import thing\n    return thing\n")
    (package / "high.py").write_text("import importlib\n\nfrom pkg import low\n\nthing = 1\n"
                                     "mid = importlib.import_module('pkg.sub.mid')\n")
    return tmp_path


LAYERS = (("low", ("pkg", "pkg.low")), ("mid", ("pkg.sub",)), ("high", ("pkg.high",)))


def test_the_check_reports_an_upward_import_inside_a_function(synthetic: Path):
    unplaced, upward = layer_problems({"pkg": synthetic / "pkg"}, LAYERS, synthetic)
    assert unplaced == []
    assert upward == ["pkg/low.py:5 pkg.low (low) → pkg.high (high)"]


def test_the_check_counts_importlib_and_parent_packages(synthetic: Path):
    # pkg.sub.mid placed low, but importing it runs pkg/sub/__init__.py (layer mid): still upward
    layers = (("low", ("pkg", "pkg.low", "pkg.sub.mid")), ("mid", ("pkg.sub",)), ("high", ("pkg.high",)))
    low = synthetic / "pkg" / "low.py"
    low.write_text("import importlib\n\nm = importlib.import_module(f'pkg.sub.{1}')\n")
    assert layer_problems({"pkg": synthetic / "pkg"}, layers, synthetic) == (
        [], ["pkg/low.py:3 pkg.low (low) → pkg.sub (mid)"])
    low.write_text("from pkg.sub.mid import x\n")
    assert layer_problems({"pkg": synthetic / "pkg"}, layers, synthetic) == (
        [], ["pkg/low.py:1 pkg.low (low) → pkg.sub.mid (mid)"])


def test_a_module_outside_the_table_is_reported(synthetic: Path):
    (synthetic / "pkg" / "new.py").write_text("")
    unplaced, _ = layer_problems({"pkg": synthetic / "pkg"}, LAYERS, synthetic)
    assert unplaced == ["pkg.new"]
