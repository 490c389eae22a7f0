"""The house rules of ../shared/ARCHITECTURE.md, read from the source: arrows point down only
(`training -> connectors -> vision_tower`), no import cycle among the package's modules (an import inside
a function counts), and neither `vision_tower` nor `connectors` imports `deepspeed` or `training`.

Imports are read with `ast` from every module, wherever they stand, and resolved to the modules they name:
`from pkg import name` is an import of `pkg.name` when that is a module, else of `pkg`."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("vision_tower", "connectors", "training")


def _modules(root: Path = ROOT) -> dict[str, tuple[Path, bool]]:
    """Dotted name -> (file, is a package's ``__init__``) for every module of the three packages."""
    found = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            is_init = parts[-1] == "__init__"
            found[".".join(parts[:-1] if is_init else parts)] = (path, is_init)
    return found


def _imported_names(path: Path, module: str, is_init: bool) -> list[tuple[str, str | None]]:
    """(source, name) of every import statement anywhere in ``path``, relative sources made absolute:
    ``import X.Y`` is ("X.Y", None), ``from X import a`` is ("X", "a")."""
    package = module if is_init else module.rpartition(".")[0]
    names: list[tuple[str, str | None]] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            source = node.module or ""
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            names += [(source, alias.name) for alias in node.names]
    return names


def import_graph(root: Path = ROOT) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(edges between the package's modules, every top-level name each module imports). ``from X import
    a`` is an edge to the module ``X.a`` when there is one, else to ``X``."""
    modules = _modules(root)
    edges: dict[str, set[str]] = {m: set() for m in modules}
    tops: dict[str, set[str]] = {m: set() for m in modules}
    for module, (path, is_init) in modules.items():
        for source, name in _imported_names(path, module, is_init):
            tops[module].add(source.split(".")[0])
            target = f"{source}.{name}" if f"{source}.{name}" in modules else source
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != module:
                edges[module].add(target)
    return edges, tops


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_cycle_among_the_packages_modules():
    edges, _ = import_graph()
    found = cycles(edges)
    assert not found, "import cycles (imports inside functions count): " + "; ".join(
        " <-> ".join(c) for c in found
    )


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [("vision_tower", {"connectors", "training", "deepspeed"}), ("connectors", {"training", "deepspeed"})],
)
def test_arrows_point_down_only(package, forbidden):
    _, tops = import_graph()
    wrong = sorted(
        f"{module} imports {name}"
        for module, names in tops.items()
        if module.split(".")[0] == package
        for name in names & forbidden
    )
    assert not wrong, wrong


def test_the_core_names_no_upper_package_even_in_a_string():
    """The command line finds `connectors` and `training` through entry points, not by name."""
    named = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in sorted((ROOT / "vision_tower").rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        for word in ("connectors", "training")
        if f'"{word}' in line or f"'{word}" in line
    ]
    assert not named, named


def test_the_checks_see_a_cycle_and_a_wrong_arrow(tmp_path):
    """The reader itself: a planted cycle through an import inside a function, and an upward import."""
    for package in PACKAGES:
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "connectors" / "a.py").write_text("from .b import thing\n")
    (tmp_path / "connectors" / "b.py").write_text("def f():\n    from connectors import a\n")
    (tmp_path / "vision_tower" / "c.py").write_text("def g():\n    import training.x\n")
    edges, tops = import_graph(tmp_path)
    assert cycles(edges) == [["connectors.a", "connectors.b"]]
    assert "training" in tops["vision_tower.c"]


def test_the_runner_imports_no_task_and_no_connector():
    """The runner serves any task: it reaches the core, never `training.tasks` or `connectors`."""
    edges, tops = import_graph()
    wrong = sorted(
        f"{module} imports {target}"
        for module, targets in edges.items()
        if module.startswith("training.runner")
        for target in targets | ({"connectors"} & tops[module])
        if not target.startswith(("training.runner", "vision_tower"))
    )
    assert not wrong, wrong


def test_each_package_imports_only_what_its_install_declares():
    """`vision_tower` needs only the core requirements, `connectors` adds the `connectors` extra and
    `training` the `train` extra (pyproject.toml): an import outside them breaks an install without it."""
    import sys
    from importlib.metadata import packages_distributions

    from packaging.requirements import Requirement

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def names(requirements):
        return {Requirement(r).name.lower().replace("_", "-") for r in requirements} - {"vision-tower"}

    extras = project["optional-dependencies"]
    allowed = {"vision_tower": names(project["dependencies"])}
    allowed["connectors"] = allowed["vision_tower"] | names(extras["connectors"])
    allowed["training"] = allowed["connectors"] | names(extras["train"])
    dists = {name: {d.lower().replace("_", "-") for d in ds} for name, ds in packages_distributions().items()}
    _, tops = import_graph()
    wrong = sorted(
        f"{module} imports {name} ({', '.join(sorted(dists.get(name, {'?'})))})"
        for module, imported in tops.items()
        for name in imported - set(sys.stdlib_module_names) - set(PACKAGES) - {""}
        if not dists.get(name, set()) & allowed[module.split(".")[0]]
    )
    assert not wrong, wrong
