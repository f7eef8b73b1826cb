"""The trained policy as a plain module: a batch of observations -> the greedy actions, in the
environment's own action units. This is what gets registered, served and evaluated.

RLlib's RLModule answers either actions (DQN) or action-distribution inputs: logits for discrete
actions, mean and log-std for continuous ones. Continuous means live in [-1, 1] (tanh-squashed for
SAC, clipped otherwise, as RLlib's own action connector does) and are rescaled to the bounds.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from torch import nn


class GreedyPolicy(nn.Module):
    def __init__(self, module: nn.Module, action_space, squashed: bool):
        super().__init__()
        self.module = module
        self.discrete = not hasattr(action_space, "low")
        self.squashed = squashed
        if not self.discrete:
            self.register_buffer("low", torch.as_tensor(action_space.low, dtype=torch.float32))
            self.register_buffer("high", torch.as_tensor(action_space.high, dtype=torch.float32))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        out = self.module.forward_inference({"obs": obs})
        if "actions" in out:
            return out["actions"]
        inputs = out["action_dist_inputs"]
        if self.discrete:
            return inputs.argmax(dim=-1)
        mean = inputs[..., : inputs.shape[-1] // 2]
        unit = torch.tanh(mean) if self.squashed else mean.clamp(-1.0, 1.0)
        return self.low + (unit + 1.0) * (self.high - self.low) / 2


def from_algorithm(algo, action_space, algorithm: str) -> GreedyPolicy:
    module = algo.get_module()
    return GreedyPolicy(module, action_space, squashed=algorithm == "sac").eval()


def from_checkpoint(path: str, action_space, algorithm: str) -> GreedyPolicy:
    """The policy saved in an algorithm checkpoint (``Algorithm.save_to_path``), without Ray."""
    from pathlib import Path

    from ray.rllib.core.rl_module.rl_module import RLModule

    module = RLModule.from_checkpoint(str(Path(path) / "learner_group" / "learner" / "rl_module" / "default_policy"))
    return GreedyPolicy(module, action_space, squashed=algorithm == "sac").eval()


EPISODES_AT_ONCE = 32  # greedy episodes played side by side, at most (here and in RLlib's evaluation)


def play(policy, make_env: Callable[[bool], Any], seeds: list[int], frames: list | None = None,
         frame_every: int = 1, at_once: int = EPISODES_AT_ONCE) -> list[float]:
    """One greedy episode per seed, ``at_once`` side by side: each step is one policy call on the
    episodes still running (10 CartPole episodes one at a time made 5,000 calls: 1.6 s).
    ``make_env(render)`` builds an environment. With ``frames``, every ``frame_every``-th frame of
    the first episode is rendered into it (rendering costs more than the step)."""
    returns: list[float] = []
    for first in range(0, len(seeds), at_once):
        rendered = frames if first == 0 else None
        returns += _side_by_side(policy, make_env, seeds[first:first + at_once], rendered, frame_every)
    return returns


def _side_by_side(policy, make_env, seeds: list[int], frames: list | None, frame_every: int) -> list[float]:
    envs: list = []
    try:
        for index in range(len(seeds)):
            envs.append(make_env(frames is not None and index == 0))
        observations = [env.reset(seed=seed)[0] for env, seed in zip(envs, seeds)]
        returns, running, step = [0.0] * len(envs), list(range(len(envs))), 0
        while running:
            if frames is not None and running[0] == 0 and step % frame_every == 0:
                frames.append(envs[0].render())
            with torch.inference_mode():
                batch = torch.as_tensor(np.stack([observations[i] for i in running]), dtype=torch.float32)
                actions = policy(batch).numpy()
            still = []
            for index, action in zip(running, actions):
                observations[index], reward, terminated, truncated, _ = envs[index].step(
                    action.item() if action.ndim == 0 else action)
                returns[index] += float(reward)
                if not (terminated or truncated):
                    still.append(index)
            running, step = still, step + 1
        return returns
    finally:
        for env in envs:
            env.close()


GIF_EVERY = 2  # a GIF shows every other step of the episode


def save_gif(frames: list[np.ndarray], path: str, every: int = GIF_EVERY, width: int = 300) -> None:
    """``frames``, one every ``every`` steps, shrunk by a whole factor to about ``width`` pixels, at
    the environment's pace. A box filter (``reduce``) and a fast octree palette per frame: 0.4 s for
    a CartPole episode where bicubic resizing and median-cut colours took 1.8 s (and twice the bytes)."""
    from PIL import Image

    images = []
    for frame in frames:
        image = Image.fromarray(frame)
        image = image.reduce(max(1, round(image.width / width)))
        images.append(image.quantize(colors=256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE))
    images[0].save(path, save_all=True, append_images=images[1:], duration=40 * every, loop=0)
