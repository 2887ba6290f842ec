"""The package's import graph: one way through the role folders, no circle (docs/architecture.md).

Read from the source with `ast`, not by importing, so an import inside a function counts as
much as one at the top. A new edge the layering does not allow fails here with the file and
line; so does a function-level import of our own code that does not say why it is deferred.
"""

from __future__ import annotations

import ast
import os

import pytest

from tests.builders import REPO

# Role of every module: its first folder under recsys_cvae/, or "bottom" for the contracts
# and shared leaves at the package root and the raw-data readers in datasets/.
ROLES = ("model", "training", "export", "baselines", "evaluation", "monitoring", "synthesis",
         "pipeline")
BOTTOM = "bottom"
# role -> the roles it may import. Training and export build on the model; the baselines and
# the evaluation on the contracts only (the EASE closed form is the model's); the pipeline
# drives everything; only the CLI starts Beam jobs and the server.
ALLOWED = {
    BOTTOM: {BOTTOM},
    "model": {BOTTOM, "model"},
    "training": {BOTTOM, "model", "training"},
    "export": {BOTTOM, "model", "export"},
    "baselines": {BOTTOM, "model", "baselines"},
    "evaluation": {BOTTOM, "evaluation"},
    "monitoring": {BOTTOM, "monitoring"},  # reads candidates and logs; trains nothing
    "synthesis": {BOTTOM, "model", "synthesis"},  # EASE's closed form, a model's likelihood
    "pipeline": {BOTTOM, *ROLES},
    "cli": {BOTTOM, *ROLES, "beam_jobs", "serving"},
    # The deployable Beam jobs use the contracts, the readers and the evaluation's scorer.
    "beam_jobs": {BOTTOM, "evaluation", "beam_jobs"},
    "serving": {"serving"},  # imports nothing of recsys_cvae: it serves any SavedModel
}
PACKAGES = ("recsys_cvae", "beam_jobs", "serving")


def module_files() -> dict[str, str]:
    """Dotted module name -> file, for every module of the three packages."""
    modules = {}
    for package in PACKAGES:
        for folder, _, files in os.walk(os.path.join(REPO, package)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    dotted = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
                    modules[dotted.removesuffix(".__init__")] = path
    return modules


def role(module: str) -> str:
    parts = module.split(".")
    if parts[0] != "recsys_cvae":
        return parts[0]
    if len(parts) > 1 and parts[1] in ROLES:
        return parts[1]
    return "cli" if module == "recsys_cvae.cli" else BOTTOM


def imports(path: str, modules: dict[str, str]) -> list[tuple[str, int, bool]]:
    """(imported module of ours, line, inside a function) for every import in the file."""
    tree = ast.parse(open(path).read(), path)
    inside = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            inside.update(id(child) for child in ast.walk(node) if child is not node)
    found = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from recsys_cvae.x import y`: y is a module when it is one, else a name in x.
            names = [
                f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules
                else node.module
                for alias in node.names
            ]
        for name in names:
            if name.split(".")[0] in PACKAGES and name in modules:
                found.append((name, node.lineno, id(node) in inside))
    return found


def type_checking_lines(path: str) -> set[int]:
    """Lines inside `if TYPE_CHECKING:` blocks: annotations only, never executed."""
    tree = ast.parse(open(path).read(), path)
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING":
            for child in node.body:
                lines.update(range(child.lineno, child.end_lineno + 1))
    return lines


MODULES = module_files()
GRAPH = {
    module: [edge for edge in imports(path, MODULES) if edge[1] not in type_checking_lines(path)]
    for module, path in MODULES.items()
}


def test_the_graph_is_read_from_the_real_tree():
    # The walk sees the role folders and real edges, so the checks below cannot pass empty.
    assert {role(m) for m in MODULES} >= {BOTTOM, "cli", "beam_jobs", "serving", *ROLES}
    edges = {(module, target) for module, found in GRAPH.items() for target, _, _ in found}
    assert ("recsys_cvae.training.fit", "recsys_cvae.model.cvae") in edges
    assert ("recsys_cvae.pipeline.stages", "recsys_cvae.baselines.build") in edges


def test_no_import_goes_upward_or_across_the_role_folders():
    wrong = [
        f"{MODULES[module]}:{line}: {role(module)} imports {target} ({role(target)})"
        for module, found in GRAPH.items()
        for target, line, _ in found
        if role(target) not in ALLOWED[role(module)]
    ]
    assert not wrong, "\n".join(wrong)


def test_there_is_no_import_circle():
    # A module importing itself (`python -m beam_jobs.features` re-imports the job under its
    # real name, for pickling) is no circle.
    edges = {
        module: sorted({target for target, _, _ in found if target != module})
        for module, found in GRAPH.items()
    }
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = "open"
        stack.append(module)
        for target in edges.get(module, []):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[module] = "done"
        return None

    for module in sorted(edges):
        if module not in state and (cycle := visit(module)):
            pytest.fail("import circle: " + " -> ".join(cycle))


def test_function_level_imports_of_our_code_say_why_they_are_deferred():
    """Only to defer a heavy dependency (TensorFlow, Beam, TFRS), with a comment saying so;
    never to dodge a circle."""
    unexplained = []
    for module, found in GRAPH.items():
        lines = open(MODULES[module]).read().splitlines()
        for target, line, in_function in found:
            nearby = " ".join(lines[max(0, line - 4):line]).lower()
            if in_function and "defer" not in nearby:
                unexplained.append(f"{MODULES[module]}:{line}: imports {target} in a function")
    assert not unexplained, "\n".join(unexplained)


def test_role_folders_are_packages_that_say_what_they_hold():
    for name in ROLES:
        init = os.path.join(REPO, "recsys_cvae", name, "__init__.py")
        docstring = ast.get_docstring(ast.parse(open(init).read()))
        assert docstring and len(docstring) > 40, f"{init}: no docstring saying what it holds"
