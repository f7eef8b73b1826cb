"""`kind: robustness`: a registered classifier under attack. Run one with `deepyard run jobs/digits_robustness.yaml`.

Driver: the model from the registry (rebuilt from its train spec and weights) -> its own test split,
the first ``examples`` -> one Ray task per epsilon runs every attack (and PGD with twice the steps,
for the checks) -> the table, the plot and the gradient-masking checks in the job's run, the robust
accuracies as the version's tags.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from deepyard import tracking
from deepyard.compress.parent import Parent, load_parent, rebuild
from deepyard.errors import BadInput
from deepyard.robust.attacks import valid_range
from deepyard.runners.setup import in_memory, load_data
from deepyard.runners.summary import RunOptions, RunSummary
from deepyard.spec import RobustnessJob


@dataclass
class Target:
    parent: Parent
    pipeline: torch.nn.Module  # raw inputs -> logits, eval mode
    x: np.ndarray  # the attacked test examples, raw
    y: np.ndarray
    lower: np.ndarray  # the valid range of an input (broadcasts against x)
    upper: np.ndarray


def _target(spec: RobustnessJob) -> Target:
    parent = load_parent(spec.model, where="model")
    splits = in_memory(load_data(parent.spec), parent.spec, "robustness")
    pipeline, task = rebuild(parent, splits)
    if "accuracy" not in task.directions or getattr(pipeline.net, "generative", False):
        raise BadInput(f"model: {parent.ref} is a {task.name} model; robustness measures the accuracy a classifier "
                       "keeps under attack")
    if splits.is_text:
        raise BadInput(f"model: {parent.ref} reads token ids; gradient attacks perturb numbers (text needs "
                       "word substitutions, not supported)")
    lower, upper = valid_range(splits.x_train, per_feature=not splits.is_image)
    count = min(spec.examples, len(splits.x_test))
    return Target(parent, pipeline.eval(), splits.x_test[:count], splits.y_test[:count], lower, upper)


def check(spec: RobustnessJob) -> str:
    target = _target(spec)
    return (f"model {target.parent.ref}: {target.parent.spec.model.name} on {target.parent.spec.data.name}; "
            f"{', '.join(spec.attacks)} at epsilon {', '.join(f'{e:g}' for e in spec.epsilons)} on "
            f"{len(target.x)} test examples (valid range {float(target.lower.min()):g} to "
            f"{float(target.upper.max()):g})")


def attack_at(pipeline: torch.nn.Module, x: np.ndarray, y: np.ndarray, lower: np.ndarray, upper: np.ndarray,
              epsilon: float, spec: dict[str, Any]) -> dict[str, float]:
    """Accuracy under each attack at one epsilon (a Ray task; ``spec`` as JSON)."""
    from deepyard.robust.attacks import accuracy, fgsm, pgd

    torch.set_num_threads(1)
    job = RobustnessJob.model_validate(spec)
    low, high = torch.from_numpy(lower), torch.from_numpy(upper)
    found: dict[str, list[float]] = {}
    for start in range(0, len(x), job.batch_size):
        inputs = torch.from_numpy(x[start:start + job.batch_size])
        labels = torch.from_numpy(y[start:start + job.batch_size])
        weight = len(inputs) / len(x)
        attacked = {}
        if "fgsm" in job.attacks:
            attacked["fgsm"] = fgsm(pipeline, inputs, labels, epsilon, low, high)
        if "pgd" in job.attacks:
            # Twice the steps from the same random starts with the same step size: they can only search
            # further (a PGD that keeps each example's first fooling step never finds less)
            step_size = job.pgd.step_size or 2.5 * epsilon / job.pgd.steps
            for name, steps in (("pgd", job.pgd.steps), ("pgd_2x_steps", 2 * job.pgd.steps)):
                starts = torch.Generator().manual_seed(job.seed + start)
                attacked[name] = pgd(pipeline, inputs, labels, epsilon, low, high, steps=steps, step_size=step_size,
                                     restarts=job.pgd.restarts, generator=starts)
        for name, adversarial in attacked.items():
            found.setdefault(name, []).append(weight * accuracy(pipeline, adversarial, labels))
    return {name: float(sum(parts)) for name, parts in found.items()}


def sanity_checks(table: dict[str, list[float]], examples: int) -> dict[str, bool]:
    """Signs of gradient masking (Carlini et al. 2019, "On evaluating adversarial robustness"): PGD
    never beats FGSM's accuracy, accuracy never rises with epsilon, more PGD steps never raise it.
    Each within one example: a single flip is noise, not masking."""
    slack = 1.0 / examples

    def at_most(smaller: list[float], larger: list[float]) -> bool:
        return all(a <= b + slack for a, b in zip(smaller, larger))

    checks = {}
    if "pgd" in table and "fgsm" in table:
        checks["pgd_at_most_fgsm"] = at_most(table["pgd"], table["fgsm"])
    for attack in ("fgsm", "pgd"):
        if attack in table:
            checks[f"{attack}_not_rising_with_epsilon"] = at_most(table[attack][1:], table[attack])
    if "pgd" in table:
        checks["more_pgd_steps_never_raise_it"] = at_most(table["pgd_2x_steps"], table["pgd"])
    return checks


def run(spec: RobustnessJob, options: RunOptions) -> RunSummary:
    import ray

    from deepyard import cluster, plots
    from deepyard.robust.attacks import accuracy

    target = _target(spec)
    parent = target.parent
    tags = {"deepyard.parent": parent.ref}
    with tracking.job_run(spec, tags=tags, failure="the robustness job failed") as job:
        clean = accuracy(target.pipeline, torch.from_numpy(target.x), torch.from_numpy(target.y))
        with cluster.connected(options.address, options.ray_logs):
            job.mark("startup")
            task = ray.remote(num_cpus=1)(attack_at)
            shared = [ray.put(value) for value in (target.pipeline, target.x, target.y, target.lower, target.upper)]
            per_epsilon = ray.get([task.remote(*shared, epsilon, spec.model_dump(mode="json"))
                                   for epsilon in spec.epsilons])
        table = {name: [row[name] for row in per_epsilon] for name in per_epsilon[0]}
        checks = sanity_checks(table, len(target.x))
        metrics = {"clean_accuracy": clean, **{f"{name}_accuracy_eps{epsilon:g}": value
                                               for name, values in table.items()
                                               for epsilon, value in zip(spec.epsilons, values)}}
        tracking.log_metrics(job.id, metrics, 0)
        report = {"model": parent.ref, "examples": len(target.x), "epsilons": spec.epsilons, "clean_accuracy": clean,
                  "accuracy": table, "checks": checks}
        shown = {name: values for name, values in table.items() if name in spec.attacks}
        tracking.log_outputs(job.id, {"robustness.json": json.dumps(report, indent=2),
                                      "plots/robust_accuracy.png": plots.robust_accuracy(spec.epsilons, shown,
                                                                                         clean)})
        failed = [name for name, passed in checks.items() if not passed]
        version_tags = {"robustness.clean_accuracy": f"{clean:.4g}", "robustness.run_id": job.id,
                        "robustness.checks": "failed: " + ", ".join(failed) if failed else "passed",
                        **{f"robustness.{name}.eps{epsilon:g}": f"{value:.4g}" for name, values in shown.items()
                           for epsilon, value in zip(spec.epsilons, values)}}
        client = tracking.client()
        for key, value in version_tags.items():
            client.set_model_version_tag(parent.name, parent.version, key, value)
        job.mark("total")
    notes = [f"{name} at epsilon {', '.join(f'{e:g}' for e in spec.epsilons)}: "
             f"{', '.join(f'{v:.3f}' for v in values)} (clean {clean:.3f})" for name, values in shown.items()]
    notes.append("gradient-masking checks: " + ("passed" if not failed else "FAILED " + ", ".join(failed)))
    return RunSummary(run_id=job.id, experiment=spec.experiment, metrics=metrics, timings=job.timings,
                      details={"model": parent.ref, "checks": checks, "accuracy": table}, notes=notes)
