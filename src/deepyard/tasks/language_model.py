"""Language modeling: next-token cross-entropy at every position; loss in nats per token, bits per
token (bits per character for a character model), perplexity and next-token accuracy.

``generate`` samples text with temperature and top-k, both for the samples logged each epoch and
for the served model, which takes a fixed-length window: the prompt is right-padded, and since the
model is causal the padding never changes the logits at the prompt's last token.

Served: prompts (a string, or a prompt with sampling options) -> generated text, never batched
across requests (one forward pass per new token).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from deepyard.serve.payloads import (BadRequest, JsonOutputs, decode_text, instance_options, instances_of,
                                     integer_option, seed_of, token_ids)
from deepyard.tasks.base import Supervised

# Per request: one forward pass per new token; these caps keep one request from holding a replica for minutes.
MAX_NEW_TOKENS = 2048
MAX_TOTAL_NEW_TOKENS = 4096
_GENERATION_KEYS = {"prompt", "max_new_tokens", "temperature", "top_k", "seed"}


class LogProbabilities(nn.Module):
    """Serving head: the next token's log-probabilities at every position."""

    def __init__(self, pipeline: nn.Module):
        super().__init__()
        self.pipeline = pipeline

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.pipeline(ids).float(), dim=-1)


class LanguageModel(Supervised):
    name = "language_model"
    directions = {"loss": "min", "bits_per_token": "min", "perplexity": "min", "accuracy": "max"}
    monitor = "val_loss"
    shown = ("train_loss", "val_loss", "val_bits_per_token")
    target_unit = "tokens"  # the sums count tokens: throughput is also logged in tokens per second

    def __init__(self, **_: object):
        pass

    @staticmethod
    def fits(net: nn.Module, splits) -> str | None:
        if not getattr(net, "predicts_every_step", False):
            return ("it is not a language model (it predicts one output per text); this data needs next-token "
                    "predictions: use transformer_decoder")
        return None

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

    def epoch_artifacts(self, model: nn.Module, splits, epoch: int, count: int = 3) -> dict[str, Any]:
        """A few texts sampled from the model, each from the start of a validation window."""
        from deepyard.data.text import decode

        model.eval()
        window = splits.in_shape[0]
        device = next(model.parameters()).device
        texts = []
        for index in range(count):
            prompt = splits.x_val[index * len(splits.x_val) // count, : max(1, window // 4)].tolist()
            ids = generate(lambda batch: model(batch.to(device)).cpu(), prompt, window=window,
                           max_new_tokens=2 * window, temperature=0.8, top_k=20, seed=index)
            texts.append(f"[{decode(prompt, splits.vocab, splits.join_with)}]"
                         f"{splits.join_with}{decode(ids, splits.vocab, splits.join_with)}")
        return {f"samples/epoch_{epoch:04d}.txt": "\n\n----\n\n".join(texts)}

    def serving_module(self, pipeline: nn.Module) -> nn.Module:
        return LogProbabilities(pipeline)


@dataclass
class Generation:
    prompt: str
    ids: list[int]
    max_new_tokens: int = 100
    temperature: float = 1.0
    top_k: int | None = None
    seed: int | None = None


class Prompts(JsonOutputs):
    """``{"instances": [prompt or {"prompt": ..., ...}]}`` -> generated texts."""

    batchable = False

    def expected(self, metadata: dict[str, Any]) -> str:
        return ('each instance: a prompt string, or {"prompt": str, "max_new_tokens": int (default 100, at most '
                f'{MAX_NEW_TOKENS}), "temperature": number >= 0 (default 1; 0 is greedy), "top_k": int, "seed": int}}')

    def decode(self, body: Any, metadata: dict[str, Any], max_batch: int) -> list[Generation]:
        instances = instances_of(body, self.expected(metadata), max_batch)
        requests = [self._generation(item, index, metadata) for index, item in enumerate(instances)]
        if (total := sum(request.max_new_tokens for request in requests)) > MAX_TOTAL_NEW_TOKENS:
            raise BadRequest(f"{total} new tokens in one request is over the limit of {MAX_TOTAL_NEW_TOKENS}; "
                             "split the request or lower max_new_tokens", status=413)
        return requests

    def _generation(self, item: Any, index: int, metadata: dict[str, Any]) -> Generation:
        where = f"instances[{index}]"
        options = instance_options(item, where, "prompt", _GENERATION_KEYS, self.expected(metadata))
        temperature = options.get("temperature", 1.0)
        if (not isinstance(temperature, (int, float)) or isinstance(temperature, bool)
                or not (temperature == 0 or 0.01 <= temperature <= 10)):
            raise BadRequest(f"{where}.temperature: {temperature!r}; must be 0 (greedy) or a number from 0.01 to 10")
        new_tokens = integer_option(options, "max_new_tokens", where, 1, MAX_NEW_TOKENS)
        ids = token_ids(options["prompt"], metadata, None)
        if not ids:
            raise BadRequest(f"{where}.prompt: holds no tokens; " + self.expected(metadata))
        return Generation(options["prompt"], ids, 100 if new_tokens is None else new_tokens, float(temperature),
                          integer_option(options, "top_k", where, 1), seed_of(options.get("seed"), f"{where}.seed"))

    def run(self, module, requests: list[Generation], metadata: dict[str, Any]) -> list[dict[str, Any]]:
        """Sample each request's continuation from the served language model."""
        from deepyard.data.text import decode

        join_with = "" if metadata.get("token_level") == "char" else " "
        window = int(metadata["input_shape"][0])
        results = []
        for request in requests:
            ids = generate(module, request.ids, window=window, max_new_tokens=request.max_new_tokens,
                           temperature=request.temperature, top_k=request.top_k, seed=request.seed)
            results.append({"prompt": request.prompt, "text": decode(ids, metadata["vocab"], join_with)})
        return results

    def encode(self, outputs: list[dict[str, Any]], metadata: dict[str, Any], body: dict, options: Any) -> list[Any]:
        return outputs

    def example(self, logged_input, metadata: dict[str, Any]) -> Any:
        text = decode_text(logged_input, metadata)
        return {"prompt": text[: len(text) // 4] or text, "max_new_tokens": 100, "temperature": 0.8, "top_k": 20}


LanguageModel.codec = Prompts()


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
