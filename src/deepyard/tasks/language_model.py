"""Language modeling: next-token cross-entropy at every position; loss in nats per token, bits per
token (bits per character for a character model), perplexity and next-token accuracy.

``generate`` samples text with temperature and top-k, both for the samples logged each epoch and
for the served model, which takes a fixed-length window: the prompt is right-padded, and since the
model is causal the padding never changes the logits at the prompt's last token.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


class LogProbabilities(nn.Module):
    """Serving head: the next token's log-probabilities at every position."""

    def __init__(self, pipeline: nn.Module):
        super().__init__()
        self.pipeline = pipeline

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.pipeline(ids).float(), dim=-1)


class LanguageModel:
    name = "language_model"
    monitor, monitor_mode = "val_loss", "min"
    metric_names = ("loss", "bits_per_token", "perplexity", "accuracy")

    def __init__(self, **_: object):
        pass

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(outputs.flatten(0, 1), targets.flatten())

    def batch_sums(self, outputs: torch.Tensor, targets: torch.Tensor,
                   loss: torch.Tensor | None = None) -> torch.Tensor:
        """[summed loss over tokens, correctly predicted tokens, tokens]."""
        count = torch.full((), float(targets.numel()), device=outputs.device)
        total = (loss.detach().float() * count if loss is not None
                 else F.cross_entropy(outputs.flatten(0, 1).float(), targets.flatten(), reduction="sum"))
        correct = (outputs.argmax(dim=-1) == targets).sum(dtype=torch.float32)
        return torch.stack([total, correct, count])

    def metrics(self, sums: torch.Tensor, prefix: str) -> dict[str, float]:
        loss, correct, count = sums.tolist()
        count = max(count, 1.0)
        nats = loss / count
        return {f"{prefix}_loss": nats, f"{prefix}_bits_per_token": nats / math.log(2),
                f"{prefix}_perplexity": math.exp(min(nats, 50.0)), f"{prefix}_accuracy": correct / count}

    def serving_module(self, pipeline: nn.Module) -> nn.Module:
        return LogProbabilities(pipeline)


@torch.inference_mode()
def generate(next_log_probs: Callable[[torch.Tensor], torch.Tensor], prompt: list[int], *, window: int,
             max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
             seed: int | None = None) -> list[int]:
    """Extend ``prompt`` by ``max_new_tokens`` sampled ids. ``next_log_probs`` maps a (1, window) batch
    of ids to (1, window, vocab) log-probabilities (or logits); ``temperature`` 0 is greedy."""
    if not prompt:
        raise ValueError("the prompt is empty: give at least one token")
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    ids = list(prompt)
    for _ in range(max_new_tokens):
        context = ids[-window:]
        padded = torch.zeros(1, window, dtype=torch.long)
        padded[0, :len(context)] = torch.tensor(context)
        scores = next_log_probs(padded)[0, len(context) - 1].float().clone()
        scores[:2] = -math.inf  # never <pad> or <unk>
        if temperature <= 0:
            ids.append(int(scores.argmax()))
            continue
        scores = scores / temperature
        if top_k:
            cutoff = torch.topk(scores, min(top_k, scores.numel())).values[-1]
            scores = scores.masked_fill(scores < cutoff, -math.inf)
        ids.append(int(torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator)))
    return ids[len(prompt):]
