"""Fairness on arrests (jobs/arrests_fairness.yaml), and what mixed columns cost an endpoint.

- fairness, per seed (the seed moves the splits and the weights): the trained MLP's test accuracy,
  balanced accuracy, demographic parity and equalized odds differences by colour (95% bootstrap
  intervals), then the same after fairlearn's ThresholdOptimizer (fitted on the validation split).
  Goal: equalized odds difference at most 0.02, for at most 1 point of accuracy lost. Four
  variants: the job as it is (colour left out, classes weighted, the thresholds maximizing balanced
  accuracy), the thresholds maximizing accuracy instead, colour given to the model, and classes not
  weighted (the model then says "released" to nearly everyone).
- served: p50 latency of one-instance /predict requests to the arrests model (objects of 6 mixed
  columns, encoded by the fitted schema in the replica) against a numeric-only table model of the same
  encoded width (7 numbers), interleaved rounds on the same Serve instance.

    .venv/bin/python bench/fairness.py [--seeds 3] [--requests 300]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import httpx
import numpy as np
import yaml

import record

ROOT = Path(__file__).resolve().parents[1]


VARIANTS = {  # label -> overrides of the job
    "colour_left_out": [],
    "objective_accuracy": ["fairness.objective=accuracy_score"],
    "colour_as_a_feature": ["fairness.include_sensitive=true"],
    "unweighted_classes": ["train.class_weight=null", "fairness.objective=accuracy_score"],
}


def fairness_runs(seeds: int, variant: list[str]) -> dict:
    from deepyard.runners.summary import RunOptions
    from deepyard.runners.train import run
    from deepyard.spec import load_spec

    rows = []
    for seed in range(seeds):
        overrides = [f"train.seed={seed}", "promote=null", *variant]
        summary = run(load_spec(ROOT / "jobs/arrests_fairness.yaml", overrides), RunOptions()).to_json()
        before, after = summary["fairness"], summary["mitigated"]
        row = {"seed": seed}
        for label, found in (("baseline", before), ("mitigated", after)):
            row[label] = {"accuracy": found["overall"]["accuracy"],
                          "balanced_accuracy": found["overall"]["balanced_accuracy"],
                          **found["disparities"],
                          "equalized_odds_difference_ci95": found["intervals_95"]["equalized_odds_difference"]}
        row["accuracy_points_lost"] = 100 * (row["baseline"]["accuracy"] - row["mitigated"]["accuracy"])
        row["balanced_accuracy_points_lost"] = 100 * (row["baseline"]["balanced_accuracy"]
                                                      - row["mitigated"]["balanced_accuracy"])
        row["model_versions"] = [summary["model_version"], after["model_version"]]
        rows.append(row)
    median = {f"{label}_{metric}": statistics.median(r[label][metric] for r in rows)
              for label in ("baseline", "mitigated")
              for metric in ("accuracy", "balanced_accuracy", "equalized_odds_difference",
                             "demographic_parity_difference")}
    for lost in ("accuracy_points_lost", "balanced_accuracy_points_lost"):
        median[lost] = statistics.median(r[lost] for r in rows)
    goal = {"mitigated_equalized_odds_difference_at_most_0.02": median["mitigated_equalized_odds_difference"] <= 0.02,
            "accuracy_points_lost_at_most_1": median["accuracy_points_lost"] <= 1.0}
    return {"runs": rows, "median": median, "goal_met": goal, "version": rows[-1]["model_versions"][0]}


def logistic_reference(seeds: int, include_sensitive: bool) -> dict:
    """The issue's reference study: scikit-learn's logistic regression on the same splits, with the
    same ThresholdOptimizer (equalized odds, accuracy), fitted on the same validation split."""
    from fairlearn.metrics import equalized_odds_difference
    from fairlearn.postprocessing import ThresholdOptimizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from deepyard.data import load_splits

    rows = []
    for seed in range(seeds):
        splits = load_splits("arrests", {}, val_fraction=0.2, test_fraction=0.2, seed=seed, sensitive=["colour"],
                             keep_sensitive=include_sensitive)
        x = {split: getattr(splits, f"x_{split}").astype(np.float64) for split in ("train", "val", "test")}
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(x["train"], splits.y_train)
        optimizer = ThresholdOptimizer(estimator=model, constraints="equalized_odds", prefit=True,
                                       predict_method="predict_proba")
        optimizer.fit(x["val"], splits.y_val, sensitive_features=splits.groups["val"])
        row = {"seed": seed}
        for label, predicted in (("baseline", model.predict(x["test"])),
                                 ("mitigated", optimizer.predict(x["test"], sensitive_features=splits.groups["test"],
                                                                 random_state=seed))):
            row[label] = {"accuracy": float((predicted == splits.y_test).mean()),
                          "balanced_accuracy": float(balanced_accuracy_score(splits.y_test, predicted)),
                          "equalized_odds_difference": float(equalized_odds_difference(
                              splits.y_test, predicted, sensitive_features=splits.groups["test"]))}
        rows.append(row)
    return {"runs": rows, "median": {f"{label}_{metric}": statistics.median(r[label][metric] for r in rows)
                                     for label in ("baseline", "mitigated")
                                     for metric in ("accuracy", "balanced_accuracy", "equalized_odds_difference")}}


def numeric_twin(folder: Path, width: int) -> str:
    """A numeric-only table job of ``width`` features, trained for one epoch and registered."""
    from deepyard.runners.summary import RunOptions
    from deepyard.runners.train import run
    from deepyard.spec import parse_spec

    rng = np.random.default_rng(0)
    x = rng.normal(size=(2000, width))
    path = folder / "numeric.csv"
    lines = [",".join([f"f{i}" for i in range(width)] + ["y"])]
    lines += [",".join([f"{v:.4f}" for v in row] + ["yes" if row.sum() > 0 else "no"]) for row in x]
    path.write_text("\n".join(lines) + "\n")
    spec = parse_spec(yaml.safe_load(f"""
kind: train
name: numeric-twin
data: {{name: csv, params: {{path: {path}, target: y}}}}
model: {{name: mlp, params: {{hidden_sizes: [32, 16], dropout: 0.1}}}}
train: {{epochs: 1}}
register: {{model_name: numeric-twin}}
"""))
    return run(spec, RunOptions()).to_json()["model_version"]


def served_p50(arrests_version: str, numeric_version: str, width: int, requests: int) -> dict:
    from deepyard.runners import deploy
    from deepyard.serve.options import EndpointOptions

    infos = deploy.start([EndpointOptions(model=f"arrests-mlp:{arrests_version}", num_cpus=0.5),
                          EndpointOptions(model=f"numeric-twin:{numeric_version}", num_cpus=0.5)],
                         host="127.0.0.1", port=record.free_port())
    bodies = {"mixed": {"instances": [{"year": 2001, "age": 24, "sex": "Male", "employed": "Yes", "citizen": "Yes",
                                       "checks": 2}]},
              "numeric": {"instances": [[0.1 * i for i in range(width)]]}}
    urls = {"mixed": infos[0]["url"] + "/predict", "numeric": infos[1]["url"] + "/predict"}
    samples: dict[str, list[float]] = {"mixed": [], "numeric": []}
    with httpx.Client(timeout=60) as client:
        for round_ in range(6):  # interleaved rounds; the first is a warm-up
            for kind in ("mixed", "numeric") if round_ % 2 == 0 else ("numeric", "mixed"):
                for _ in range(requests // 5):
                    started = time.perf_counter()
                    answer = client.post(urls[kind], json=bodies[kind])
                    elapsed = time.perf_counter() - started
                    assert answer.status_code == 200, answer.text
                    if round_:
                        samples[kind].append(elapsed)
    p50 = {kind: 1000 * statistics.median(values) for kind, values in samples.items()}
    return {"mixed_p50_ms": p50["mixed"], "numeric_p50_ms": p50["numeric"],
            "mixed_vs_numeric_p50": p50["mixed"] / p50["numeric"], "requests_each": len(samples["mixed"])}




def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=300, help="per model, for the served p50")
    args = parser.parse_args()
    home = record.fresh_home("fairness")
    from ray import serve

    from deepyard import cluster

    results: dict = {"bench": "fairness", "data": "arrests (5,226 rows; colour: Black/White)",
                     "job": "jobs/arrests_fairness.yaml", "seeds": args.seeds}
    with cluster.connected(local_env=cluster.serve_env()):
        width = 7  # arrests encoded: year, age, sex=Male, sex=Female, employed, citizen, checks
        numeric = numeric_twin(Path(home), width)
        for label, overrides in VARIANTS.items():
            results[label] = fairness_runs(args.seeds, overrides)
        results["logistic_regression_reference"] = {
            "colour_left_out": logistic_reference(args.seeds, include_sensitive=False),
            "colour_as_a_feature": logistic_reference(args.seeds, include_sensitive=True)}
        results["served"] = served_p50(results["colour_left_out"]["version"], numeric, width, args.requests)
        serve.shutdown()
    record.save("fairness", results)


if __name__ == "__main__":
    main()
