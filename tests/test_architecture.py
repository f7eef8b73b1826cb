"""The house's contracts, checked: no import cycles, no task-name branches outside tasks/, one
direction per metric name, and the registries that every extension point goes through."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from conftest import ROOT

SRC = ROOT / "src"
PACKAGE = SRC / "deepyard"


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """deepyard module -> the deepyard modules it imports, at module level or inside functions
    (a lazy import is still a dependency: a cycle through one is a cycle)."""
    modules = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package this module is in
                    base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], base]).strip(".")
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                           for alias in node.names]
            else:
                continue
            graph[name] |= {target for target in targets if target in modules and target != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles_in_src():
    graph = import_graph()
    assert "deepyard.runners.sweep" in graph and graph["deepyard.cli"], "the graph was not read"
    assert cycles(graph) == []


def test_the_cycle_check_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_task_name_branches_outside_tasks():
    """Runners and serving ask the task (tasks/base.py); they never branch on which one it is."""
    pattern = re.compile(r"""task\.name\s*==|\["task"\]\s*==|get\("task"\)\s*==""")
    # where a task is consumed, not even the data's task name: splits.task == "language_model"
    consumers = re.compile(r"""\.task\s*[!=]=""")
    offenders = [f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
                 for path in PACKAGE.rglob("*.py") if "tasks" not in path.relative_to(PACKAGE).parts
                 for number, line in enumerate(path.read_text().splitlines(), 1)
                 if pattern.search(line) or (consumers.search(line) and path.parent.name in ("runners", "serve"))]
    assert offenders == []


def test_a_metric_name_means_the_same_in_every_task():
    from deepyard.tasks import TASKS
    from deepyard.tasks.base import selectable

    seen: dict[str, tuple[str, str]] = {}
    for name, task in TASKS.items():
        assert task.monitor in selectable(task) if hasattr(task, "monitor") else True, name
        for metric, direction in selectable(task).items():
            other = seen.setdefault(metric, (direction, name))
            assert other[0] == direction, f"{metric} is {direction} in {name} but {other[0]} in {other[1]}"
    assert seen["val_accuracy"][0] == "max" and seen["val_loss"][0] == "min"


def test_progress_and_spec_metric_names_come_from_the_tasks():
    from deepyard.errors import SpecError
    from deepyard.progress import columns
    from deepyard.spec import parse_spec
    from deepyard.tasks import TASKS

    shown = columns()
    for task in TASKS.values():
        assert set(getattr(task, "shown", ())) <= set(shown)
    base = {"kind": "train", "name": "t", "data": {"name": "digits"}, "model": {"name": "mlp"}}
    parse_spec({**base, "checkpoint": {"metric": "val_bits_per_token"}})  # a language model's: a known name
    try:
        parse_spec({**base, "checkpoint": {"metric": "val_acc"}})
    except SpecError as error:
        assert "did you mean 'val_accuracy'?" in str(error)
    else:
        raise AssertionError("an unknown metric name was accepted")
