"""Does pretraining help? rotten_tomatoes sentiment (jobs/rotten_tomatoes_bert.yaml) from scratch
against the same job started from an encoder pretrained as a masked language model (jobs/bert_mlm.yaml,
then jobs/rotten_tomatoes_bert_pretrained.yaml), and the T5-like model as text to text
(jobs/rotten_tomatoes_t5.yaml) from scratch and after span-corruption pretraining
(jobs/t5_span_corruption.yaml), each over the same seeds, in one run.

    .venv/bin/python bench/pretraining.py [--seeds 0 1 2] [--epochs 8] [--width 128] \
        [--mlm-corpora shakespeare shakespeare+film_plots] [--t5-corpora shakespeare+film_plots]

Each corpus is pretrained once (a registered version); its vocabulary goes with it, so the
fine-tuned jobs code the reviews with it: the share of review tokens it does not know is reported.
The data split is the same for every job of a kind (``data.seed: 0``); ``train.seed`` varies. The
text-to-text jobs' split is not stratified, so their test snippets differ from the classifier's.
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


def pretrain(spec: str, corpus: list[str], home: str, epochs: int | None, model: list[str]) -> dict:
    """One pretraining job on ``corpus``: its registered version and test metrics."""
    overrides = [f"data.params.corpus={json.dumps(corpus)}", *([f"train.epochs={epochs}"] if epochs else []), *model]
    command = [str(ROOT / ".venv/bin/deepyard"), "run", str(ROOT / spec), "--json"]
    for override in overrides:
        command += ["--set", override]
    done = subprocess.run(command, capture_output=True, text=True, env=_env(home), check=True)
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    return {"model": f"{summary['model_name']}:{summary['model_version']}", "test": summary["metrics"],
            "best_epoch": summary["best_epoch"], "fit_s": summary["timings"]["fit_s"]}


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


PRETRAINING = {"mlm": ("jobs/bert_mlm.yaml", "jobs/rotten_tomatoes_bert_pretrained.yaml"),
               "t5": ("jobs/t5_span_corruption.yaml", "jobs/rotten_tomatoes_t5.yaml")}
FROM_SCRATCH = {"bert": ("jobs/rotten_tomatoes_bert.yaml", []),
                "t5": ("jobs/rotten_tomatoes_t5.yaml", ["init=null"])}


def accuracy(metrics: dict) -> float:
    """Test accuracy; a text-to-text job's is its exact match (the label and the end, both right)."""
    return metrics["test_accuracy"] if "test_accuracy" in metrics else metrics["test_exact_match"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, help="of each pretraining job (default: the jobs')")
    parser.add_argument("--mlm-corpora", nargs="*", default=["shakespeare", "shakespeare+film_plots"],
                        help="each a pretraining corpus: sources joined by +")
    parser.add_argument("--t5-corpora", nargs="*", default=["shakespeare+film_plots"])
    parser.add_argument("--scratch", nargs="*", default=["bert", "t5"], choices=list(FROM_SCRATCH))
    parser.add_argument("--recipes", nargs="*", default=[""],
                        help="fine-tuning recipes, each run from scratch and pretrained: overrides joined by "
                             "'+' ('' = the jobs as they are), e.g. model.params.dropout=0.1+optim.lr=0.0002")
    parser.add_argument("--width", type=int, help="of every model, pretrained and from scratch (default: the jobs')")
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    model = [f"model.params.width={args.width}"] if args.width else []
    home = tempfile.mkdtemp(prefix="deepyard-pretraining-")
    result: dict = {"bench": "pretraining", "seeds": args.seeds, "pretraining_epochs": args.epochs, "width": args.width,
                    "unknown_token_share": {"own_vocabulary": unknown_share(None)}, "pretrained": {}, "runs": {}}
    variants = {f"{name}_from_scratch": (str(ROOT / spec), overrides + model)
                for name, (spec, overrides) in FROM_SCRATCH.items() if name in args.scratch}
    for kind, corpora in (("mlm", args.mlm_corpora), ("t5", args.t5_corpora)):
        pretraining_spec, fine_tuning_spec = PRETRAINING[kind]
        for corpus in corpora:
            made = pretrain(pretraining_spec, corpus.split("+"), home, args.epochs, model)
            result["pretrained"][f"{kind}_{corpus}"] = made
            print(json.dumps({"pretrained": f"{kind}_{corpus}", **made}), file=sys.stderr)
            os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{home}/mlflow.db"
            vocab, _ = transfer.source_vocabulary(made["model"])
            del os.environ["MLFLOW_TRACKING_URI"]
            result["unknown_token_share"][f"{kind}_{corpus}"] = unknown_share(list(vocab))
            variants[f"{kind}_{corpus}"] = (str(ROOT / fine_tuning_spec), [f"init.from={made['model']}", *model])
    variants = {f"{name}{f' [{recipe}]' if recipe else ''}": (spec, overrides + [o for o in recipe.split("+") if o])
                for recipe in args.recipes for name, (spec, overrides) in variants.items()}
    for seed in args.seeds:  # interleaved: the machine's drift falls on every variant alike
        for name, (spec, overrides) in variants.items():
            run = deepyard_job(spec, home, f"train.seed={seed}", "data.seed=0", "register.enabled=false", *overrides)
            result["runs"].setdefault(name, []).append({"seed": seed, **run["test_metrics"], "wall_s": run["wall_s"],
                                                        "test_accuracy": accuracy(run["test_metrics"])})
            print(json.dumps({"seed": seed, "variant": name, "test_accuracy": accuracy(run["test_metrics"])}),
                  file=sys.stderr)
    result["mean_test_accuracy"] = {name: statistics.mean(run["test_accuracy"] for run in runs)
                                    for name, runs in result["runs"].items()}
    result["stdev_test_accuracy"] = {name: statistics.stdev(run["test_accuracy"] for run in runs)
                                     if len(runs) > 1 else 0.0 for name, runs in result["runs"].items()}
    means = result["mean_test_accuracy"]
    for kind, scratch_kind in (("mlm", "bert"), ("t5", "t5")):  # each against its model from scratch, same recipe
        for recipe in args.recipes:
            suffix = f" [{recipe}]" if recipe else ""
            if (scratch := means.get(f"{scratch_kind}_from_scratch{suffix}")) is None:
                continue
            result.setdefault(f"gain_over_{scratch_kind}_from_scratch", {}).update({
                name: value - scratch for name, value in means.items()
                if name.startswith(f"{kind}_") and name.endswith(suffix) and (suffix or "[" not in name)})
    record.save("pretraining" + (f"_{args.tag}" if args.tag else ""), result)


if __name__ == "__main__":
    main()
