"""The package's layers (README "Layout"): every import, lazy ones included, goes to its own floor or
below; the verbs never import one another; no two packages import each other, directly or round a loop."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "productvlm"

# Lowest floor first. A unit is a top-level module or package of productvlm.
FLOORS = [
    {"errors", "config", "run_folder", "prices", "pages", "photo_formats"},
    {"prompting"},
    {"data", "models"},
    {"inference"},
    {"training", "evaluation", "serving"},  # the verbs: none imports another
    {"cli", "demo", "__main__", "__init__"},
]
VERBS = FLOORS[4]


def floor_of(unit: str) -> int:
    return next(i for i, units in enumerate(FLOORS) if unit in units)


def unit_of(module: str) -> str:
    """productvlm.a.b -> a; the bare package (its __init__) -> __init__."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def imports(path: Path, root: Path) -> list[tuple[str, int]]:
    """(imported productvlm module, line) for every import statement in the file, at any depth."""
    here = module_name(path, root).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            names = [base]
        else:
            continue
        found += [(n, node.lineno) for n in names if n.split(".")[0] == root.name]
    return found


def unit_edges(root: Path) -> list[tuple[str, str, str]]:
    """(importing unit, imported unit, "file:line") for every import between two different units."""
    edges = []
    for path in sorted(root.rglob("*.py")):
        source = unit_of(module_name(path, root))
        for module, line in imports(path, root):
            target = unit_of(module)
            if target != source:
                edges.append((source, target, f"{path.relative_to(root.parent)}:{line}"))
    return edges


def layer_violations(root: Path) -> list[str]:
    bad = []
    for source, target, where in unit_edges(root):
        if floor_of(target) > floor_of(source):
            bad.append(
                f"{where}: {source} (floor {floor_of(source)}) imports {target} (floor {floor_of(target)})"
            )
        elif source in VERBS and target in VERBS:
            bad.append(f"{where}: verb {source} imports verb {target}")
    return bad


def cycles(root: Path) -> list[list[str]]:
    graph: dict[str, set[str]] = {}
    for source, target, _ in unit_edges(root):
        graph.setdefault(source, set()).add(target)
    found, state = [], {}  # state: 1 on the current path, 2 done

    def visit(unit: str, path: list[str]) -> None:
        state[unit] = 1
        for nxt in sorted(graph.get(unit, ())):
            if state.get(nxt) == 1:
                found.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[unit] = 2

    for unit in sorted(graph):
        if unit not in state:
            visit(unit, [unit])
    return found


def test_every_unit_has_a_floor():
    units = {unit_of(module_name(p, PACKAGE)) for p in PACKAGE.rglob("*.py")}
    assert units == set().union(*FLOORS), "add new top-level modules to FLOORS (and the README's Layout)"


def test_imports_go_down_and_verbs_do_not_import_each_other():
    assert layer_violations(PACKAGE) == []


def test_no_package_cycles():
    assert cycles(PACKAGE) == []


def test_the_walk_sees_lazy_relative_and_upward_imports(tmp_path):
    """The checker itself: a lazy import of a verb from the inference layer, a relative import between
    two verbs, and a loop between data and models are all reported."""
    root = tmp_path / "productvlm"
    for folder in ("inference", "training", "serving", "data", "models"):
        (root / folder).mkdir(parents=True)
        (root / folder / "__init__.py").write_text("")
    (root / "inference" / "x.py").write_text("def f():\n    from productvlm.training import y\n")
    (root / "serving" / "app.py").write_text("from ..training import y\n")
    (root / "data" / "a.py").write_text("import productvlm.models.b\n")
    (root / "models" / "b.py").write_text("from productvlm.data import a\n")
    assert layer_violations(root) == [
        "productvlm/inference/x.py:2: inference (floor 3) imports training (floor 4)",
        "productvlm/serving/app.py:1: verb serving imports verb training",
    ]
    assert cycles(root) == [["data", "models", "data"]]
