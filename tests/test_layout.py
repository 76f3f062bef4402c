"""The package layout keeps its promise: imports go one way, as each package's docstring declares, with no cycle.

The import graph is read from the source (ast), imports inside functions and under TYPE_CHECKING included: a
cycle hidden in a function still ties two modules together.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "gamestream"
CORE = "core"
MAY_IMPORT = re.compile(r"^May import:\s*(?P<names>[a-z_, ]+)", re.MULTILINE)


def _modules() -> dict[str, Path]:
    found = {}
    for path in SRC.rglob("*.py"):
        parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imports(module: str, path: Path) -> set[str]:
    """The gamestream modules `module` imports (a package's `__init__` when a name comes from the package)."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            submodules = {f"{name}.{alias.name}" for alias in node.names} & MODULES.keys()
            found |= submodules
            if len(submodules) < len(node.names):  # something other than a submodule: the package itself
                found.add(name)
    return {name for name in found if name in MODULES and name != module}


GRAPH = {module: _imports(module, path) for module, path in MODULES.items()}


def _group(module: str) -> str:
    """The package a module belongs to (`log`, `tables`, …), or `core` for a module directly in gamestream."""
    if module == "gamestream.__main__":  # `python -m gamestream`: the command line's entry point
        return "cli"
    parts = module.split(".")
    if len(parts) == 1 or (len(parts) == 2 and not (SRC / parts[1]).is_dir()):
        return CORE
    return parts[1]


def _declared() -> dict[str, set[str]]:
    allowed = {}
    for package in sorted(p.name for p in SRC.iterdir() if (p / "__init__.py").is_file()):
        docstring = ast.get_docstring(ast.parse((SRC / package / "__init__.py").read_text(encoding="utf-8"))) or ""
        match = MAY_IMPORT.search(docstring)
        assert match, f"gamestream/{package}/__init__.py's docstring does not say what it may import"
        allowed[package] = {name.strip() for name in match["names"].split(",") if name.strip()}
    return allowed


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph`, as the list of its nodes, or None."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if target not in state and (found := visit(target)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_module_imports_in_a_cycle():
    assert _cycle(GRAPH) is None, " → ".join(_cycle(GRAPH) or [])


def test_every_package_declares_what_it_may_import_and_the_declarations_go_one_way():
    declared = _declared()
    for package, allowed in declared.items():
        assert CORE in allowed, f"{package}: every package may import the core modules; say so"
        unknown = allowed - declared.keys() - {CORE}
        assert not unknown, f"{package} declares unknown packages {unknown}"
    assert _cycle({p: a - {CORE} for p, a in declared.items()}) is None, "the declared directions form a cycle"


def test_imports_follow_the_declared_direction():
    declared = _declared()
    wrong = []
    for module, targets in GRAPH.items():
        source = _group(module)
        for target in targets:
            group = _group(target)
            if group == source or target == "gamestream":
                continue
            if source == CORE or group not in declared.get(source, set()):
                wrong.append(f"{module} imports {target}")
    assert not wrong, "imports against the documented direction:\n" + "\n".join(sorted(wrong))


def test_the_top_level_holds_only_the_core_modules_the_architecture_names():
    """docs/architecture.md's layout names the core modules; the top level holds those and no others, and the
    core stays small (everything else belongs to a stage of the data's path)."""
    top = {p.name for p in SRC.glob("*.py")} - {"__init__.py", "__main__.py"}
    layout = (SRC.parents[1] / "docs" / "architecture.md").read_text(encoding="utf-8")
    core_lines = [line for line in layout.split("```")[1].splitlines() if line.split() and line.split()[0].endswith(".py")]
    assert top == {word for line in core_lines for word in re.findall(r"\b\w+\.py\b", line)}
    assert len(top) <= 8, sorted(top)


@pytest.mark.parametrize("package", ["kpi", "tables", "log"])
def test_the_graph_sees_imports_inside_functions(package):
    """The checker itself: an import inside a function counts (the cycles issue #21 removed hid there)."""
    source = "def later():\n    from gamestream.cli import main\n"
    module = f"gamestream.{package}.probe"
    tree_imports = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            tree_imports.add(node.module)
    assert "gamestream.cli" in tree_imports and _group("gamestream.cli") not in _declared()[package], module


def test_docs_architecture_states_the_same_directions():
    """docs/architecture.md's table of import directions says what the packages' docstrings declare."""
    text = (SRC.parents[1] / "docs" / "architecture.md").read_text(encoding="utf-8")
    table = text[text.index("| package | may import |"):]
    table = table[:table.index("\n\n")]
    rows = dict(re.findall(r"^\| `(\w+)` \| ([^|]+) \|$", table, re.MULTILINE))
    declared = _declared()
    assert rows.keys() == declared.keys()
    for package, allowed in declared.items():
        written = rows[package].strip()
        if written == "every package":
            assert allowed - {CORE} == declared.keys() - {package}, package
        else:
            assert {name.strip() for name in written.split(",")} - {CORE} == allowed - {CORE}, package
