"""The package's shape (docs/architecture.md): its import graph is acyclic, each subpackage imports only from the
layers below it, and no module imports another subpackage's private names.

A static check over every ``import`` statement, deferred ones (inside functions) included: a cycle that only a
deferred import hides still couples two modules, and the check needs no interpreter per module.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "ternq"

#: the layers, bottom up: a module imports from its own layer or lower ones. The reference reader (the format's
#: rules, importable without torch when copied) and the atomic write are the base; the top-level verbs
#: (`quantize` / `report`) tie the stages together; the package root and the documented old paths are the roof.
LAYERS = [
    ("ternq.errors", "ternq._text", "ternq.format.reader", "ternq.format.atomic"),
    ("ternq.config",),
    ("ternq.qat",),
    ("ternq.find",),
    ("ternq.runtime",),
    ("ternq.format",),
    ("ternq.export",),
    ("ternq.convert", "ternq.report"),
    ("ternq.cli", "ternq.demo", "ternq.atomic", "ternq.native", "ternq.numpy_format", "ternq.uses",
     "ternq.weight_attr", "ternq"),
]


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = ("ternq", *path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    best, rank = -1, None
    for i, names in enumerate(LAYERS):
        for name in names:  # the longest prefix decides: ternq.format.reader before ternq.format
            if (module == name or module.startswith(name + ".")) and len(name) > best:
                best, rank = len(name), i
    assert rank is not None, f"{module} is in no layer of tests/test_architecture.py: add it"
    return rank


def subpackage(module: str) -> str:
    """``ternq.qat.layers`` -> ``ternq.qat``; a top-level module is its own."""
    parts = module.split(".")
    return ".".join(parts[:2])


def imports(root: Path = ROOT) -> list[tuple[str, str, str]]:
    """(importer, imported module, imported name or "") for every import of a ternq module by a ternq module."""
    modules = {module_name(p, root): p for p in root.rglob("*.py")}
    out = []
    for importer, path in modules.items():
        package = importer if path.name == "__init__.py" else importer.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[:len(base) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if not target.startswith("ternq"):
                    continue
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    if sub in modules:  # `from . import native`: the submodule
                        out.append((importer, sub, ""))
                    else:
                        out.append((importer, target, alias.name))
            elif isinstance(node, ast.Import):
                out += [(importer, a.name, "") for a in node.names if a.name.startswith("ternq")]
    return out


def edges(root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the modules it imports; an import of a package by one of its own modules (``from .. import
    __version__``, ``from . import kernels``) is not an edge: Python runs the package first anyway."""
    graph: dict[str, set[str]] = {}
    for importer, target, _ in imports(root):
        if importer == target or importer.startswith(target + "."):
            continue
        graph.setdefault(importer, set()).add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def check(root: Path = ROOT) -> list[str]:
    """Every violation of the rules above, as a sentence."""
    problems = []
    cycle = find_cycle(edges(root))
    if cycle:
        problems.append("import cycle: " + " -> ".join(cycle))
    for importer, target, _ in imports(root):
        if importer.startswith(target + ".") or importer == target:
            continue
        if layer_of(target) > layer_of(importer):
            problems.append(f"{importer} (layer {layer_of(importer)}) imports {target} (layer {layer_of(target)}): "
                            "a backward edge")
    for importer, target, name in imports(root):
        if name.startswith("_") and not name.startswith("__") and subpackage(importer) != subpackage(target):
            problems.append(f"{importer} imports the private {target}.{name} from another subpackage")
    return problems


def test_layers_acyclic_and_no_private_names_across_subpackages() -> None:
    assert check() == []


@pytest.mark.parametrize("bad", [
    ("qat/layers.py", "\n\ndef _late():\n    from ..convert import quantize\n    return quantize\n"),  # a cycle
    ("find/sites.py", "\nfrom ..runtime import is_packed  # noqa\n"),  # backward, no cycle
    ("convert.py", "\nfrom .format.torch import _collect_sites  # noqa\n"),  # a private name
])
def test_the_check_finds_each_violation(tmp_path: Path, bad: tuple[str, str]) -> None:
    """The check is not vacuous: each kind of violation, planted in a copy of the package, is reported."""
    import shutil
    copy = tmp_path / "ternq"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns("__pycache__"))
    path, text = bad
    (copy / path).write_text((copy / path).read_text() + text)
    assert check(copy) != []
