"""Does masked-language-model pretraining help? rotten_tomatoes sentiment (jobs/rotten_tomatoes_bert.yaml)
from scratch against the same job started from a pretrained encoder (jobs/bert_mlm.yaml, then
jobs/rotten_tomatoes_bert_pretrained.yaml), each over the same seeds, in one run.

    .venv/bin/python bench/pretraining.py [--seeds 0 1 2] [--mlm-epochs 4] \
        [--corpora shakespeare shakespeare+film_plots]

Each corpus is pretrained once (a registered ``bert-mlm`` version); its vocabulary goes with it, so
the fine-tuned jobs code the reviews with it: the share of review tokens it does not know is reported.
The data split is the same for every job (``data.seed: 0``); ``train.seed`` varies.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

import numpy as np

import record
from deepyard import transfer
from train_overhead import ROOT, deepyard_job


def pretrain(corpus: list[str], home: str, epochs: int) -> dict:
    """One masked-LM job on ``corpus``: its registered version and test metrics."""
    overrides = [f"data.params.corpus={json.dumps(corpus)}", f"train.epochs={epochs}"]
    command = [str(ROOT / ".venv/bin/deepyard"), "run", str(ROOT / "jobs/bert_mlm.yaml"), "--json"]
    for override in overrides:
        command += ["--set", override]
    done = subprocess.run(command, capture_output=True, text=True, env=_env(home), check=True)
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    return {"version": summary["model_version"], "test": summary["metrics"], "best_epoch": summary["best_epoch"],
            "fit_s": summary["timings"]["fit_s"]}


def _env(home: str) -> dict:
    environment = {**os.environ, "DEEPYARD_HOME": home}
    environment.pop("MLFLOW_TRACKING_URI", None)
    return environment


def unknown_share(vocab: list[str] | None) -> float:
    """The share of the reviews' training tokens that ``vocab`` (None: their own) codes as <unk>."""
    from deepyard.data import load_splits

    splits = load_splits("rotten_tomatoes", {"max_length": 48, "min_count": 2}, val_fraction=0.1,
                         test_fraction=0.15, seed=0, vocab=vocab)
    real = splits.x_train[splits.x_train != 0]
    return float(np.mean(real == 1))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--mlm-epochs", type=int, default=4)
    parser.add_argument("--corpora", nargs="+", default=["shakespeare", "shakespeare+film_plots"],
                        help="each a pretraining corpus: sources joined by +")
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    home = tempfile.mkdtemp(prefix="deepyard-pretraining-")
    scratch_spec = str(ROOT / "jobs/rotten_tomatoes_bert.yaml")
    pretrained_spec = str(ROOT / "jobs/rotten_tomatoes_bert_pretrained.yaml")
    result: dict = {"bench": "pretraining", "seeds": args.seeds, "mlm_epochs": args.mlm_epochs,
                    "unknown_token_share": {"own_vocabulary": unknown_share(None)}, "pretrained": {}, "runs": {}}
    variants = {"from_scratch": (scratch_spec, [])}
    for corpus in args.corpora:
        made = pretrain(corpus.split("+"), home, args.mlm_epochs)
        result["pretrained"][corpus] = made
        print(json.dumps({"pretrained": corpus, **made}), file=sys.stderr)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{home}/mlflow.db"
        vocab, _ = transfer.source_vocabulary(f"bert-mlm:{made['version']}")
        del os.environ["MLFLOW_TRACKING_URI"]
        result["unknown_token_share"][corpus] = unknown_share(list(vocab))
        variants[f"mlm_{corpus}"] = (pretrained_spec, [f"init.from=bert-mlm:{made['version']}"])
    for seed in args.seeds:  # interleaved: the machine's drift falls on every variant alike
        for name, (spec, overrides) in variants.items():
            run = deepyard_job(spec, home, f"train.seed={seed}", "data.seed=0", "register.enabled=false", *overrides)
            result["runs"].setdefault(name, []).append({"seed": seed, **run["test_metrics"], "wall_s": run["wall_s"]})
            print(json.dumps({"seed": seed, "variant": name, "test_accuracy": run["test_accuracy"]}), file=sys.stderr)
    result["mean_test_accuracy"] = {name: statistics.mean(run["test_accuracy"] for run in runs)
                                    for name, runs in result["runs"].items()}
    result["stdev_test_accuracy"] = {name: statistics.stdev(run["test_accuracy"] for run in runs)
                                     if len(runs) > 1 else 0.0 for name, runs in result["runs"].items()}
    scratch = result["mean_test_accuracy"]["from_scratch"]
    result["gain_over_scratch"] = {name: value - scratch for name, value in result["mean_test_accuracy"].items()
                                   if name != "from_scratch"}
    record.save("pretraining" + (f"_{args.tag}" if args.tag else ""), result)


if __name__ == "__main__":
    main()
