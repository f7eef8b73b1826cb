"""Explanations as pictures: an image beside its attribution heatmap, or bars for features, time
steps and tokens. Drawn on matplotlib ``Figure`` objects, never pyplot's global state: a replica
draws heatmaps on several threads at once."""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
from matplotlib.figure import Figure


def heatmap(image: np.ndarray, attributions: np.ndarray, pixel_max: float, title: str = "") -> Figure:
    """(channels, height, width) raw image and its attributions: the image, then the attributions
    summed over channels (red for, blue against the target, one scale symmetric around zero)."""
    summed = attributions.reshape(attributions.shape[0], *attributions.shape[-2:]).sum(0)
    limit = float(np.abs(summed).max()) or 1.0
    figure = Figure(figsize=(4, 2.2))
    left, right = figure.subplots(1, 2)
    shown = np.clip(image / pixel_max, 0, 1)
    left.imshow(shown[0] if shown.shape[0] == 1 else shown.transpose(1, 2, 0), cmap="gray", vmin=0, vmax=1)
    right.imshow(summed, cmap="bwr", vmin=-limit, vmax=limit)
    for axis, label in ((left, "input"), (right, "attribution")):
        axis.set_title(label, fontsize=8)
        axis.axis("off")
    if title:
        figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    return figure


def bars(labels: list[str], values: list[float], title: str = "", limit: int = 20) -> Figure:
    """The ``limit`` largest attributions by size, as horizontal bars in their input order."""
    order = sorted(np.argsort(-np.abs(np.asarray(values)))[:limit].tolist())
    figure = Figure(figsize=(5, 0.25 * len(order) + 1))
    axis = figure.subplots()
    shown = [values[i] for i in order]
    axis.barh(range(len(order)), shown, color=["tab:red" if v >= 0 else "tab:blue" for v in shown])
    axis.set_yticks(range(len(order)), [labels[i] for i in order], fontsize=7)
    axis.invert_yaxis()
    axis.axvline(0, color="black", linewidth=0.5)
    axis.set_xlabel("attribution")
    if title:
        axis.set_title(title, fontsize=9)
    figure.tight_layout()
    return figure


def figure_of(raw: np.ndarray, explanation: dict[str, Any], pixel_max: float) -> Figure:
    """The picture of one explanation (``Explainer.explain``'s dict) of the raw input ``raw``."""
    title = f"{explanation['method']}, target {explanation['target']}"
    if "tokens" in explanation:
        return bars(explanation["tokens"], explanation["attributions"], title)
    if "features" in explanation:
        return bars(explanation["features"], explanation["attributions"], title)
    if "steps" in explanation:
        return bars(explanation["steps"], explanation["step_attributions"], title, limit=len(explanation["steps"]))
    return heatmap(raw, np.asarray(explanation["attributions"]), pixel_max, title)


def png_bytes(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def heatmap_base64(image: np.ndarray, attributions: np.ndarray, pixel_max: float) -> str:
    return base64.b64encode(png_bytes(heatmap(image, attributions, pixel_max))).decode()
