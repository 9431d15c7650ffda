"""The tree's shape: the README's Layout section is the real tree, no module is
over 500 lines, there is no import cycle, and only the composition root picks
the QEMU plugin."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("vmfactory", "runtime_client")
MAX_LINES = 500
COMPOSITION_ROOTS = {"vmfactory/app.py"}
# A package's own files, implied by the package (listed only where worth saying).
ENTRY_FILES = ("__init__.py", "__main__.py")


def modules(*tops: str) -> Iterator[Path]:
    for top in tops:
        for path in sorted((REPO / top).rglob("*.py")):
            if "_pb2" not in path.name and "__pycache__" not in path.parts:
                yield path


def layout_block() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    return section.split("```", 2)[1].strip("\n").splitlines()


def layout_paths() -> set[str]:
    """Every path the Layout block names: ``name/`` opens a folder, indentation nests."""
    paths, stack = set(), []
    for line in layout_block():
        depth = (len(line) - len(line.lstrip(" "))) // 2
        name = line.split()[0]
        del stack[depth:]
        path = "/".join([*stack, name.rstrip("/")])
        paths.add(path)
        if name.endswith("/"):
            stack.append(name.rstrip("/"))
    return paths


def test_the_layout_section_is_the_tree() -> None:
    listed = layout_paths()
    real = set()
    for path in modules(*PACKAGES):
        rel = path.relative_to(REPO)
        if rel.name not in ENTRY_FILES:
            real.add(rel.as_posix())
        real.update(p.as_posix() for p in rel.parents if p != Path("."))
    listed_packages = {p for p in listed if p.split("/")[0] in PACKAGES
                       and p.rsplit("/", 1)[-1] not in ENTRY_FILES}
    assert listed_packages - real == set(), "listed but not in the tree"
    assert real - listed_packages == set(), "in the tree but not in the README's Layout"
    for top in {p.split("/")[0] for p in listed} - set(PACKAGES):
        assert (REPO / top).is_dir(), top
    scripts = {p.name for p in (REPO / "benchmarks").glob("*.py")} - set(ENTRY_FILES)
    line = next(ln for ln in layout_block() if ln.startswith("benchmarks/"))
    assert scripts == set(re.findall(r"\w+\.py", line))


def test_no_module_is_over_500_lines() -> None:
    long = {str(p.relative_to(REPO)): n for p in modules(*PACKAGES, "benchmarks")
            if (n := p.read_text().count("\n")) > MAX_LINES}
    assert not long


def _imports(path: Path) -> Iterator[tuple[str, bool]]:
    """(module, at module level) for every vmfactory/runtime_client import in ``path``."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    top |= {id(n) for block in tree.body if isinstance(block, ast.If) for n in block.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] in PACKAGES:
                yield name, id(node) in top


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def test_no_import_cycle() -> None:
    paths = {_module_name(p): p for p in modules(*PACKAGES)}
    graph = {name: {imp for imp, module_level in _imports(path) if module_level and imp in paths
                    and imp != name}
             for name, path in paths.items()}
    # A package's __init__ re-exporting its own submodules is not a cycle.
    for name in graph:
        graph[name] = {dep for dep in graph[name] if not name.startswith(dep + ".")}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for dep in graph[node]:
            assert state.get(dep) != 1, f"import cycle: {' -> '.join([*trail, node, dep])}"
            if dep not in state:
                visit(dep, [*trail, node])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [])


def test_only_the_composition_root_picks_the_qemu_plugin() -> None:
    offenders = []
    for path in modules(*PACKAGES, "benchmarks"):
        rel = path.relative_to(REPO).as_posix()
        if rel.startswith("vmfactory/hypervisor/") or rel in COMPOSITION_ROOTS:
            continue
        if any(imp.startswith("vmfactory.hypervisor.qemu") for imp, _ in _imports(path)):
            offenders.append(rel)
    assert not offenders
