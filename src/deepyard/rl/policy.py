"""The trained policy as a plain module: a batch of observations -> the greedy actions, in the
environment's own action units. This is what gets registered, served and evaluated.

RLlib's RLModule answers either actions (DQN) or action-distribution inputs: logits for discrete
actions, mean and log-std for continuous ones. Continuous means live in [-1, 1] (tanh-squashed for
SAC, clipped otherwise, as RLlib's own action connector does) and are rescaled to the bounds.
"""

from __future__ import annotations

from typing import Any

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


def act(policy, observation: np.ndarray) -> Any:
    with torch.inference_mode():
        action = policy(torch.as_tensor(observation, dtype=torch.float32)[None])[0].numpy()
    return action.item() if action.ndim == 0 else action


def play(policy, env, episodes: int, seed: int = 0, frames: list | None = None, frame_every: int = 1) -> list[float]:
    """Greedy episodes; their returns. With ``frames``, every ``frame_every``-th frame of the first
    episode is rendered into it (rendering costs more than the step)."""
    returns = []
    for episode in range(episodes):
        observation, _ = env.reset(seed=seed + episode)
        total, done, step = 0.0, False, 0
        while not done:
            if frames is not None and episode == 0 and step % frame_every == 0:
                frames.append(env.render())
            step += 1
            observation, reward, terminated, truncated, _ = env.step(act(policy, observation))
            total += float(reward)
            done = terminated or truncated
        returns.append(total)
    return returns


GIF_EVERY = 2  # a GIF shows every other step of the episode


def save_gif(frames: list[np.ndarray], path: str, every: int = GIF_EVERY, width: int = 300) -> None:
    """``frames``, one every ``every`` steps, scaled to ``width`` pixels, at the environment's pace."""
    from PIL import Image

    images = []
    for frame in frames:
        image = Image.fromarray(frame)
        images.append(image.resize((width, round(image.height * width / image.width))))
    images[0].save(path, save_all=True, append_images=images[1:], duration=40 * every, loop=0)
