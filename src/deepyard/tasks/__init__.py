"""What a task means: its loss, metrics, monitored metric and serving output.

Metrics are accumulated as sums so that data-parallel workers can all-reduce them exactly.
"""

from deepyard.tasks.classification import Classification
from deepyard.tasks.generation import Generation
from deepyard.tasks.language_model import LanguageModel
from deepyard.tasks.regression import Regression

TASKS = {"classification": Classification, "regression": Regression, "language_model": LanguageModel,
         "generation": Generation}

__all__ = ["TASKS", "Classification", "Generation", "LanguageModel", "Regression", "make_task"]


def make_task(name: str, **kwargs):
    return TASKS[name](**kwargs)
