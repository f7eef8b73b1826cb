"""What a task means (``tasks/base.py`` has the protocol): loss, metrics and their directions,
per-epoch extras, artifacts, serving metadata and the payload codec. One module per task; add a
new one to ``TASKS`` and everything else (spec metric names, checkpoint ranking, progress columns,
serving) follows.
"""

from __future__ import annotations

from deepyard.errors import BadInput
from deepyard.registry import unknown_name_message
from deepyard.tasks.base import Codec, Direction, Task, selectable
from deepyard.tasks.classification import Classification
from deepyard.tasks.generation import Generation
from deepyard.tasks.language_model import LanguageModel
from deepyard.tasks.masked_lm import MaskedLanguageModel
from deepyard.tasks.regression import Regression
from deepyard.tasks.rl_policy import RLPolicy
from deepyard.tasks.seq2seq import Seq2Seq

TASKS: dict[str, type] = {task.name: task for task in (Classification, Regression, LanguageModel, Seq2Seq,
                                                        MaskedLanguageModel, Generation, RLPolicy)}

__all__ = ["TASKS", "Codec", "Task", "make_task", "metric_directions", "progress_columns", "codec"]


def make_task(name: str, **kwargs) -> Task:
    return TASKS[name](**kwargs)


def metric_directions() -> dict[str, Direction]:
    """Every metric a spec may rank epochs or trials by (val_accuracy, eval_return_mean...), with
    whether higher is better. A name two tasks share means the same in both (a test checks)."""
    found: dict[str, Direction] = {}
    for task in TASKS.values():
        found.update(selectable(task))
    return found


def progress_columns() -> list[str]:
    """The metrics a live progress table shows, in the tasks' order (a run logs one task's)."""
    return list(dict.fromkeys(key for task in TASKS.values() for key in getattr(task, "shown", ())))


def codec(task_name: str) -> Codec:
    """The payload codec of a served model's task (its metadata's ``task``)."""
    if task_name not in TASKS:
        raise BadInput(unknown_name_message("task", str(task_name), list(TASKS)))
    return TASKS[task_name].codec
