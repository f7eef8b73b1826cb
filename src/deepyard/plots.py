"""Figures logged with each run (matplotlib, no display needed)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def learning_curves(history: dict[str, list[tuple[int, float]]]):
    """Loss on the left, the task's other metrics on the right, train and validation per epoch."""
    names = sorted({key.split("_", 1)[1] for key in history})
    losses = [n for n in names if n.endswith("loss")]  # a GAN has two
    others = [n for n in names if n not in losses]
    figure, axes = plt.subplots(1, 1 + bool(others), figsize=(10 if others else 5, 4), squeeze=False)
    for axis, metrics in zip(axes[0], (losses, others)):
        for metric in metrics:
            for split in ("train", "val"):
                points = history.get(f"{split}_{metric}")
                if points:
                    steps, values = zip(*sorted(points))
                    axis.plot(steps, values, marker="o", markersize=3, label=f"{split} {metric}")
        axis.set_xlabel("epoch")
        axis.legend()
        axis.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def confusion_matrix(counts: np.ndarray, class_names: list[str]):
    size = max(4.0, 0.45 * len(class_names) + 2)
    figure, axis = plt.subplots(figsize=(size, size))
    axis.imshow(counts, cmap="Blues")
    ticks = range(len(class_names))
    axis.set_xticks(ticks, class_names, rotation=45, ha="right")
    axis.set_yticks(ticks, class_names)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    threshold = counts.max() / 2 if counts.size else 0
    for (row, col), value in np.ndenumerate(counts):
        axis.text(col, row, str(value), ha="center", va="center", fontsize=8,
                  color="white" if value > threshold else "black")
    figure.tight_layout()
    return figure


def metric_vs_params(trials: list[dict], paths: list[str], metric: str):
    """One panel per hyperparameter: each trial's best metric against the value it tried."""
    figure, axes = plt.subplots(1, len(paths), figsize=(4 * len(paths), 3.5), squeeze=False)
    for axis, path in zip(axes[0], paths):
        values = [t["config"].get(path) for t in trials]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        xs = values if numeric else [str(v) for v in values]
        axis.scatter(xs, [t["best"] for t in trials], alpha=0.7)
        if numeric and values and min(values) > 0 and max(values) / min(values) > 50:
            axis.set_xscale("log")
        axis.set_xlabel(path)
        axis.set_ylabel(metric)
        axis.tick_params(axis="x", labelrotation=30)
        axis.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def trial_curves(curves: dict[str, list[tuple[int, float]]], metric: str):
    figure, axis = plt.subplots(figsize=(6, 4))
    for name, points in curves.items():
        if points:
            steps, values = zip(*sorted(points))
            axis.plot(steps, values, marker="o", markersize=3, label=name)
    axis.set_xlabel("epoch")
    axis.set_ylabel(metric)
    axis.legend(title="trial", fontsize=8)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def forecast(actual: np.ndarray, predicted: np.ndarray, naive: np.ndarray | None):
    """The test span: what happened, the model's one-step forecasts, and persistence's."""
    figure, axis = plt.subplots(figsize=(10, 4))
    steps = np.arange(len(actual))
    axis.plot(steps, actual, color="black", linewidth=1.5, label="actual")
    axis.plot(steps, predicted, color="tab:blue", label="forecast")
    if naive is not None:
        axis.plot(steps, naive, color="tab:gray", linestyle="--", linewidth=1, label="persistence")
    axis.set_xlabel("test step")
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def image_grid(images: np.ndarray, rows: int, pixel_max: float, title: str = ""):
    """(n, channels, height, width) images in the data set's units (0 to ``pixel_max``, the same
    scale every epoch), tiled ``rows`` x ``rows`` with a one-pixel gap into a single picture (one
    imshow: fast enough to log every epoch)."""
    count, channels, height, width = images.shape
    images = np.clip(images / pixel_max, 0.0, 1.0)
    tiled = np.ones((channels, rows * (height + 1) - 1, rows * (width + 1) - 1), dtype=np.float32)
    for index, image in enumerate(images[: rows * rows]):
        top, left = (index // rows) * (height + 1), (index % rows) * (width + 1)
        tiled[:, top:top + height, left:left + width] = image
    figure, axis = plt.subplots(figsize=(4, 4))
    axis.imshow(tiled[0] if channels == 1 else tiled.transpose(1, 2, 0), cmap="gray" if channels == 1 else None,
                vmin=0, vmax=1, interpolation="nearest")
    axis.axis("off")
    axis.set_title(title)
    return figure


def compression(points: list[dict], x: str, metric: str, x_label: str):
    """A compress job's trade-off: ``metric`` against ``x`` (sparsity, stored bytes...), one point per
    version, the parent's marked."""
    figure, axis = plt.subplots(figsize=(6, 4))
    for point in points:
        parent = point["label"] == "parent"
        axis.scatter(point[x], point[metric], marker="*" if parent else "o", s=120 if parent else 40,
                     color="black" if parent else "tab:blue")
        axis.annotate(point["label"], (point[x], point[metric]), textcoords="offset points", xytext=(5, 5), fontsize=8)
    axis.set_xlabel(x_label)
    axis.set_ylabel(metric)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def robust_accuracy(epsilons: list[float], curves: dict[str, list[float]], clean: float):
    """A robustness job's accuracy left under each attack, against the budget epsilon."""
    figure, axis = plt.subplots(figsize=(6, 4))
    axis.plot([0.0, *epsilons], [clean] * (len(epsilons) + 1), linestyle=":", color="gray", label="clean")
    for attack, accuracies in curves.items():
        axis.plot([0.0, *epsilons], [clean, *accuracies], marker="o", label=attack)
    axis.set_xlabel("epsilon (L-infinity, data units)")
    axis.set_ylabel("accuracy")
    axis.set_ylim(0, 1.02)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    return figure


def fairness_by_group(by_group: dict[str, dict[str, float]], sensitive: str):
    """Grouped bars: each rate and accuracy, one bar per group, the group's size in the legend."""
    metrics = [name for name in next(iter(by_group.values())) if name != "count"]
    groups = list(by_group)
    width = 0.8 / max(len(groups), 1)
    figure, axis = plt.subplots(figsize=(max(6.0, 1.2 * len(metrics) + 2), 4))
    for i, group in enumerate(groups):
        values = [by_group[group][m] for m in metrics]
        axis.bar(np.arange(len(metrics)) + i * width, values, width,
                 label=f"{group} (n={int(by_group[group].get('count', 0))})")
    axis.set_xticks(np.arange(len(metrics)) + width * (len(groups) - 1) / 2,
                    [m.replace("_", " ") for m in metrics], rotation=20, ha="right")
    axis.set_ylim(0, 1)
    axis.set_title(f"test metrics by {sensitive}")
    axis.legend(fontsize=8)
    figure.tight_layout()
    return figure
