"""`deepyard rl eval`: a registered policy plays its own environment, greedily."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from deepyard import tracking
from deepyard.errors import BadInput
from deepyard.rl.algorithms import env_maker
from deepyard.rl.policy import GIF_EVERY, play, save_gif
from deepyard.tasks.rl_policy import RLPolicy


def resolve(ref: str) -> tuple[str, str]:
    """NAME (newest version) | NAME:VERSION | NAME@ALIAS -> (name, version)."""
    if "@" in ref:
        name, alias = ref.split("@", 1)
        return name, tracking.model_version(name, alias=alias)["version"]
    if ":" in ref:
        name, version = ref.split(":", 1)
        return name, tracking.model_version(name, version=version)["version"]
    return ref, tracking.latest_version(ref)


def evaluate(ref: str, *, episodes: int, seed: int = 0, render: Path | None = None) -> dict[str, Any]:
    name, version = resolve(ref)
    policy, metadata = tracking.load_model(name, version)
    if metadata.get("task") != RLPolicy.name:  # (a refusal, not a branch: only a policy plays)
        raise BadInput(f"model {name!r} version {version} is a {metadata.get('task')} model, not an RL policy")
    frames: list | None = [] if render else None
    returns = play(policy, env_maker(metadata["env_id"], metadata.get("env_kwargs") or {}),
                   list(range(seed, seed + episodes)), frames=frames, frame_every=GIF_EVERY)
    if render:
        save_gif(frames, str(render))
    return {"model": name, "version": version, "env_id": metadata["env_id"], "episodes": episodes,
            "mean_return": float(np.mean(returns)), "std_return": float(np.std(returns)), "returns": returns}
