"""A reinforcement-learning policy (``kind: rl``): trained by RLlib, so this task holds only what
ranks its runs and what its served model answers. The rl runner logs the returns; a sweep ranks its
trials by the greedy evaluation's mean return, or the exploring one's without evaluation.

Served: observations -> greedy actions (an index, or a vector in the action space's units).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from deepyard.serve.payloads import ArrayCodec


class Actions(ArrayCodec):
    def expected(self, metadata: dict[str, Any]) -> str:
        return (f"each instance: one observation of {metadata['env_id']}, {metadata['input_shape'][0]} numbers; "
                f"the answer is the greedy action in {metadata['action_space']}")

    def encode(self, outputs: np.ndarray, metadata: dict[str, Any], body: dict, options: Any) -> list[Any]:
        return [action.item() if action.ndim == 0 else action.tolist() for action in np.asarray(outputs)]


class RLPolicy:
    name = "rl_policy"
    directions: ClassVar[dict[str, str]] = {"eval_return_mean": "max", "return_mean": "max"}
    monitor_prefix = ""  # its metrics are ranked under their own names, not as val_<name>
    codec = Actions()
