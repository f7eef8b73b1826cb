"""A train job's ``fairness:``, on the driver once the model is registered: the test split's
per-group metrics and disparities, and with ``mitigation``, a second registered version whose
decisions follow per-group thresholds fitted on the validation split."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from deepyard import tracking
from deepyard.data import Splits
from deepyard.errors import BadInput
from deepyard.fairness.options import FairnessSpec


def favourable_class(options: FairnessSpec, class_names: list[str]) -> int | None:
    """The index of the favourable outcome: the spec's label, else the second class of two (None:
    a multi-class job that names none)."""
    if options.positive_label is not None:
        if options.positive_label not in class_names:
            raise BadInput(f"fairness.positive_label: {options.positive_label!r} is not a class "
                           f"(classes: {', '.join(class_names)})")
        return class_names.index(options.positive_label)
    return 1 if len(class_names) == 2 else None


def check(options: FairnessSpec, splits: Splits, task) -> None:
    """Before Ray starts: the job can be measured, and mitigated if asked."""
    if not getattr(task, "fairness_measured", False):
        raise BadInput(f"fairness: a {task.name} job's outputs are not decisions with rates to compare; fairness "
                       "is measured for classification")
    favourable = favourable_class(options, splits.class_names)
    if options.mitigation and (len(splits.class_names) != 2 or favourable is None):
        raise BadInput(f"fairness.mitigation: threshold_optimizer decides between two classes; this job has "
                       f"{len(splits.class_names)} ({', '.join(splits.class_names[:6])})")
    if not options.mitigation:
        return
    if missing := sorted(set(splits.groups["test"]) - set(splits.groups["val"])):
        raise BadInput(f"fairness.mitigation: groups {', '.join(missing[:5])} are in the test split but not the "
                       "validation split the thresholds are fitted on; raise data.val_fraction or merge groups")
    # fairlearn fits a group's thresholds on its ROC curve: it needs both outcomes in the group
    favoured = splits.y_val == favourable
    if one_sided := sorted(g for g in set(splits.groups["val"]) if len(set(favoured[splits.groups["val"] == g])) < 2):
        raise BadInput(f"fairness.mitigation: in the validation split, group(s) {', '.join(one_sided[:5])} have only "
                       "one outcome, and thresholds cannot be fitted for them; raise data.val_fraction or merge "
                       "groups")


def scores(serving: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return serving.eval()(torch.from_numpy(x)).numpy()


def log_fairness(spec, splits: Splits, run_id: str, serving: torch.nn.Module, metadata: dict[str, Any],
                 logged: dict[str, Any]) -> dict[str, Any]:
    """Metrics, a plot and a report in the run; tags on the version; the mitigated version."""
    from deepyard import plots
    from deepyard.fairness.measure import report

    options: FairnessSpec = spec.fairness
    favourable = favourable_class(options, splits.class_names)
    seed = spec.train.seed
    probabilities = scores(serving, splits.x_test)
    base = report(splits.y_test, probabilities.argmax(1), splits.groups["test"], favourable,
                  bootstrap=options.bootstrap, seed=seed)
    tracking.log_metrics(run_id, base.flat("test_fairness_"), 0)
    tracking.log_dict(run_id, base.to_json(), "fairness/report.json")
    picture = plots.fairness_by_group(base.by_group, " x ".join(options.sensitive))
    tracking.log_outputs(run_id, {"plots/fairness_by_group.png": picture})
    version = logged.get("model_version")
    if version:
        tracking.set_version_tags(logged["model_name"], version, version_tags(base, options))
    outcome: dict[str, Any] = {"fairness": base.to_json()}
    if options.mitigation:
        outcome["mitigated"] = mitigate(spec, splits, run_id, serving, metadata, logged, favourable,
                                        probabilities[:, favourable])
    return outcome


def version_tags(report, options: FairnessSpec) -> dict[str, str]:
    tags = {"fairness.sensitive": ",".join(options.sensitive)}
    tags.update({f"fairness.{name}": f"{value:.4g}" for name, value in report.disparities.items()})
    tags.update({f"fairness.{name}.ci95": f"[{low:.4g}, {high:.4g}]" for name, (low, high) in report.intervals.items()})
    return tags


def mitigate(spec, splits: Splits, run_id: str, serving: torch.nn.Module, metadata: dict[str, Any],
             logged: dict[str, Any], favourable: int, test_scores: np.ndarray) -> dict[str, Any]:
    """``test_scores``: the model's probability of the favourable class on the test split."""
    from deepyard.data.tables import Groups, TableSchema
    from deepyard.fairness.measure import report
    from deepyard.fairness.mitigate import FairDecisions, fit_thresholds, rules

    options: FairnessSpec = spec.fairness
    val_scores = scores(serving, splits.x_val)[:, favourable]
    optimizer = fit_thresholds(val_scores, (splits.y_val == favourable).astype(int), splits.groups["val"],
                               constraint=options.constraint, objective=options.objective)
    decisions = optimizer.predict(test_scores[:, None], sensitive_features=splits.groups["test"],
                                  random_state=spec.train.seed)
    labels = np.where(decisions == 1, favourable, 1 - favourable)
    mitigated = report(splits.y_test, labels, splits.groups["test"], favourable, bootstrap=options.bootstrap,
                       seed=spec.train.seed)
    tracking.log_metrics(run_id, mitigated.flat("test_mitigated_"), 0)
    tracking.log_dict(run_id, mitigated.to_json(), "fairness/mitigated_report.json")
    keys = sorted(optimizer.interpolated_thresholder_.interpolation_dict)
    module = FairDecisions(serving, favourable, rules(optimizer, keys)).eval()
    schema = TableSchema.from_dict(metadata["table"])
    values = {group: list(row) for group, row in zip(splits.groups["val"], splits.sensitive_values["val"])}
    schema.groups, schema.ignored = Groups(list(options.sensitive), keys, [values[key] for key in keys]), []
    code = {key: i for i, key in enumerate(keys)}
    example = np.concatenate([splits.x_test[:5], np.array([[code[g]] for g in splits.groups["test"][:5]],
                                                           dtype=np.float32)], axis=1)
    fair_metadata = {**metadata, "table": schema.to_dict(), "input_shape": [schema.width],
                     "feature_names": schema.feature_names() + ["<group>"],
                     "fair_decisions": {"favourable": favourable, "mitigation": options.mitigation,
                                        "constraint": options.constraint}}
    tags = {f"metric.test_{name}": f"{value:.6g}" for name, value in mitigated.overall.items()}
    tags.update(version_tags(mitigated, options))
    tags.update({"fairness.mitigation": options.mitigation, "fairness.constraint": options.constraint,
                 "run_id": run_id})
    if logged.get("model_version"):
        tags["fairness.mitigates_version"] = logged["model_version"]
    fair = tracking.log_model(run_id, module, example, registered_name=logged.get("model_name"),
                              metadata=fair_metadata, version_tags=tags, artifact="model_fair")
    if fair.get("model_version") and options.alias:
        tracking.set_alias(logged["model_name"], options.alias, fair["model_version"])
    return {**mitigated.to_json(), "model_version": fair.get("model_version"), "model_uri": fair["model_uri"]}
