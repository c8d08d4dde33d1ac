"""The shape of the code, read statically from the source: modules import only their own layer or lower ones, the
project's import graph has no cycle, a project
module is imported inside a function only where a comment says why, functions are short enough to read at once,
and nothing cites documents outside the repository or work items."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Source folder -> the installed package it becomes.
PACKAGES = {
    "blindnet": "blindnet",
    "train": "blindnet.train",
    "export": "blindnet.export",
    "serve": "blindnet.serve",
    "demo": "blindnet.demo",
    "benchmarks": "blindnet.benchmarks",
}
MAX_FUNCTION_LINES = 80  # body lines, after the signature and the docstring
# A function-level import of a project module is allowed when this phrase is on its line or the line above.
LAZY_REASON = re.compile(r"#.*(lazy CLI dispatch|imported lazily because)", re.IGNORECASE)
LONG_REASON = re.compile(r"long on purpose", re.IGNORECASE)


def _modules() -> dict[str, Path]:
    """Installed module name -> source file, for every project module."""
    found: dict[str, Path] = {}
    for folder, package in PACKAGES.items():
        for path in (REPO / folder).rglob("*.py"):
            rel = path.relative_to(REPO / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([package, *parts])
            if not name.startswith("blindnet.blindnet"):  # 'blindnet' maps onto itself
                found.setdefault(name, path)
    return found


MODULES = _modules()


def _target(node: ast.ImportFrom | ast.Import, alias: ast.alias) -> str | None:
    """The project module an import statement loads (the submodule itself for ``from pkg import submodule``)."""
    if isinstance(node, ast.Import):
        name = alias.name
    else:
        if node.level or not node.module:
            return None
        name = f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in MODULES else node.module
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _is_main_guard(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "__name__" in ast.unparse(node.test)


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imports(tree: ast.Module) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """(module-level imports, function-level imports) of project modules as (line, module) pairs."""
    top: list[tuple[int, str]] = []
    inner: list[tuple[int, str]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        if _is_main_guard(node) or _is_type_checking(node):
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                target = _target(node, alias)
                if target:
                    (inner if in_function else top).append((node.lineno, target))
            return
        func = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, in_function or func)

    visit(tree, False)
    return top, inner


PARSED = {name: ast.parse(path.read_text(), str(path)) for name, path in MODULES.items()}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := dfs(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := dfs(start)):
            return cycle
    return None


def test_the_module_list_covers_every_job_folder() -> None:
    for must in (
        "blindnet.inference",
        "blindnet.train.loop",
        "blindnet.serve.app",
        "blindnet.export.onnx",
        "blindnet.demo.app",
        "blindnet.benchmarks.latency",
    ):
        assert must in MODULES


def test_import_graph_has_no_cycle() -> None:
    graph: dict[str, set[str]] = {}
    for name, tree in PARSED.items():
        top, _ = _imports(tree)
        graph[name] = {t for _, t in top if t != name}
    assert _find_cycle(graph) is None, " -> ".join(_find_cycle(graph) or [])


# The layers, bottom to top: a module may import its own layer and the ones below it, never one above (imports
# inside functions included: a lazy import upward is still an upward dependency). A module belongs to the layer of its
# longest matching prefix; docs/CONTRIBUTING.md draws this same table (checked below).
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "I/O and config",
        (
            "blindnet.io",
            "blindnet.media",
            "blindnet.legend",
            "blindnet.config",
            "blindnet.classes",
            "blindnet.extras",
            "blindnet.cliparse",
            "blindnet.modelnames",
            "blindnet.architectures",
            "blindnet.precisions",
        ),
    ),
    (
        "models, checkpoints, data",
        (
            "blindnet.models",
            "blindnet.checkpoint",
            "blindnet.zoo",
            "blindnet.data",
            "blindnet.losses",
            "blindnet.task",
            "blindnet.metrics",
        ),
    ),
    ("the export library", ("blindnet.export",)),
    ("runtimes and the Predictor", ("blindnet.backends", "blindnet.resolve", "blindnet.inference")),
    (
        "jobs",
        (
            "blindnet",
            "blindnet.export.pipeline",
            "blindnet.export.__main__",
            "blindnet.train",
            "blindnet.serve",
            "blindnet.demo",
            "blindnet.benchmarks",
        ),
    ),
)


def _layer_of(module: str) -> int:
    """Index into :data:`LAYERS` of ``module`` (its longest matching prefix); -1 when none matches."""
    best, length = -1, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > length:
                best, length = index, len(prefix)
    return best


def _upward_imports(parsed: dict[str, ast.Module]) -> list[str]:
    found = []
    for name, tree in parsed.items():
        top, inner = _imports(tree)
        for line, target in top + inner:
            if _layer_of(target) > _layer_of(name):
                found.append(
                    f"{name}:{line} ({LAYERS[_layer_of(name)][0]}) imports {target} ({LAYERS[_layer_of(target)][0]})"
                )
    return found


def test_every_module_has_a_layer_and_imports_only_its_own_or_lower_layers() -> None:
    assert all(_layer_of(name) >= 0 for name in MODULES)
    # The jobs' packages are themselves jobs, but what they build on must sit lower.
    assert _layer_of("blindnet.export.onnx") < _layer_of("blindnet.backends.onnxruntime_backend")
    assert _layer_of("blindnet.export.pipeline") == len(LAYERS) - 1
    upward = _upward_imports(PARSED)
    assert not upward, "imports from a lower layer into a higher one:\n" + "\n".join(upward)


def test_an_upward_import_is_found() -> None:
    tree = ast.parse("from blindnet.inference import Predictor\n")
    assert _upward_imports({"blindnet.io": tree}) == [
        "blindnet.io:1 (I/O and config) imports blindnet.inference (runtimes and the Predictor)"
    ]


def test_contributing_draws_the_layers_of_this_test() -> None:
    text = (REPO / "docs" / "CONTRIBUTING.md").read_text()
    for index, (title, prefixes) in enumerate(LAYERS, start=1):
        assert f"{index}. **{title}**: " + ", ".join(f"`{p}`" for p in prefixes) in text, title


def test_a_cycle_is_found_when_there_is_one() -> None:
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def _explained(lines: list[str], lineno: int) -> bool:
    """Whether the import at ``lineno`` (1-based), or the comment just above its block of imports, says why."""
    i = lineno - 1
    if LAZY_REASON.search(lines[i]):
        return True
    while i > 0 and (not lines[i - 1].strip() or lines[i - 1].strip().startswith(("from ", "import "))):
        i -= 1
    return i > 0 and bool(LAZY_REASON.search(lines[i - 1]))


def test_function_level_imports_of_project_modules_say_why() -> None:
    unexplained = []
    count = 0
    for name, tree in PARSED.items():
        lines = MODULES[name].read_text().splitlines()
        for lineno, target in _imports(tree)[1]:
            count += 1
            if not _explained(lines, lineno):
                unexplained.append(f"{MODULES[name].relative_to(REPO)}:{lineno} imports {target}")
    assert not unexplained, "function-level imports without a reason:\n" + "\n".join(unexplained)
    assert count > 0  # the CLI modules do dispatch lazily: the walk must see them


def test_functions_are_short_or_say_why() -> None:
    long = []
    for name, tree in PARSED.items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                # What one reads: the body after the signature and the docstring.
                first = node.body[0]
                doc = isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                start = node.body[1].lineno if doc and len(node.body) > 1 else first.lineno
                n = node.end_lineno - start + 1
                if n > MAX_FUNCTION_LINES and not LONG_REASON.search(ast.get_docstring(node) or ""):
                    long.append(f"{MODULES[name].relative_to(REPO)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, "functions over 80 lines without 'long on purpose: <why>' in the docstring:\n" + "\n".join(long)


@pytest.mark.parametrize(
    "pattern",
    [
        r"facts §",
        r"\bissue #?[0-9]",
        r"deployment_notes",
        r"aligned_appearances\.md",
        r"original_code_facts",
        r"shared/reference",
    ],
)
def test_nothing_cites_outside_notes_or_work_items(pattern: str) -> None:
    hits = []
    for folder in (*PACKAGES, "docs", "tests"):
        for path in (REPO / folder).rglob("*"):
            if path.suffix in (".py", ".md", ".yaml") and path != Path(__file__):
                for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
                    if re.search(pattern, line):
                        hits.append(f"{path.relative_to(REPO)}:{i}")
    for top in ("README.md",):
        text = (REPO / top).read_text()
        hits += [f"{top}:{i}" for i, line in enumerate(text.splitlines(), 1) if re.search(pattern, line)]
    assert not hits, hits
