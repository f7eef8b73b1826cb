"""A GAN's samples as a reference classifier sees them.

    .venv/bin/python bench/gan_quality.py [--job jobs/digits_dcgan.yaml]

Trains the job (local Ray cluster, MLflow) and reports, for 1,000 generated images from fresh noise
(the test seed) of the best epoch by ``val_quality``: the share the reference classifier (a CNN
trained on the job's own training split) classifies with probability >= 0.9, every class's share
of the samples, and, for scale, the same confident share on the real test images. Goals: >= 80%
confident samples, every class >= 5%.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import record

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--job", default=str(ROOT / "jobs/digits_dcgan.yaml"))
    args = parser.parse_args()
    home = tempfile.mkdtemp(prefix="deepyard-gan-bench-")
    os.environ["DEEPYARD_HOME"] = home
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{home}/mlflow.db"
    import torch

    from deepyard import tracking
    from deepyard.runners.setup import load_data
    from deepyard.runners.train import run
    from deepyard.runners.summary import RunOptions
    from deepyard.spec import load_spec
    from deepyard.tasks.generation import CONFIDENT, QUALITY_SAMPLES, Generation

    spec = load_spec(args.job)
    started = time.perf_counter()
    summary = run(spec, RunOptions()).to_json()
    wall = time.perf_counter() - started

    # The registered sampler, judged again by a reference classifier fitted the same way.
    splits = load_data(spec)
    judge = Generation(num_classes=splits.num_outputs)
    judge.fit_reference(splits, seed=spec.train.seed)
    sampler, metadata = tracking.load_model(summary["model_name"], summary["model_version"])
    noise = torch.randn(QUALITY_SAMPLES, metadata["input_shape"][0], generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        probabilities = torch.softmax(judge.reference(sampler(noise)), -1)
        real = torch.softmax(judge.reference(torch.from_numpy(splits.x_test)), -1)
    shares = torch.bincount(probabilities.argmax(-1), minlength=splits.num_outputs).float() / QUALITY_SAMPLES
    confident = float((probabilities.max(-1).values >= CONFIDENT).float().mean())
    job = Path(args.job).stem
    record.save(record.variant("gan_quality", job != Path(parser.get_default("job")).stem and job), {
        "bench": "gan_quality", "job": Path(args.job).name, "wall_s": wall, "epochs": summary["epochs_run"],
        "best_epoch": summary["best_epoch"], "test_metrics": summary["metrics"],
        "registered_sampler": {
            "confident_share": confident, "class_shares": dict(zip(splits.class_names, shares.tolist())),
            "min_class_share": float(shares.min()),
        },
        "real_test_images_confident_share": float((real.max(-1).values >= CONFIDENT).float().mean()),
        "reference_test_accuracy": judge.reference_accuracy,
        "goals": {"confident_share_at_least_0.8": confident >= 0.8,
                  "every_class_at_least_0.05": float(shares.min()) >= 0.05},
    })


if __name__ == "__main__":
    main()
