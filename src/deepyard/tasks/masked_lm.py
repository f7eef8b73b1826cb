"""Masked language modeling: BERT's pretraining. The encoder sees text with some tokens hidden
behind <mask> (``data/text.py``: ``masked_text``) and predicts them; only those are scored. Metrics:
loss in nats per hidden token, perplexity and accuracy (the hidden token is the top guess).

What it is for: a registered masked-LM encoder is the ``init.from`` of a classifier, which then
codes its text with the encoder's vocabulary and learns a new pooled head.

Served (fill-mask): ``{"instances": ["to be or <mask> to be", ...]}`` -> for each <mask>, its
``top_k`` tokens with their probabilities, and the text with the best ones filled in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from deepyard.data.splits import MASK, MASK_ID, PAD
from deepyard.serve.payloads import (BadRequest, JsonOutputs, decode_text, instance_options, instances_of,
                                     integer_option, token_ids)
from deepyard.tasks.base import Supervised

MAX_TOP_K = 20
_KEYS = {"text", "top_k"}


class EveryPositionLogProbabilities(nn.Module):
    """Serving head: log-probabilities of every position's token (a fixed shape that ``torch.export``
    traces; the codec reads the <mask> positions)."""

    def __init__(self, pipeline: nn.Module):
        super().__init__()
        self.pipeline = pipeline

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        net = self.pipeline.net
        return torch.log_softmax(net.every_position(self.pipeline.standardize(ids)).float(), dim=-1)


class MaskedLanguageModel(Supervised):
    name = "masked_language_model"
    directions = {"loss": "min", "perplexity": "min", "accuracy": "max"}
    monitor = "val_loss"
    shown = ("train_loss", "val_loss", "val_accuracy")
    target_unit = "tokens"  # the sums count hidden tokens: throughput is also logged in tokens per second

    def __init__(self, **_: object):
        pass

    @staticmethod
    def fits(net: nn.Module, splits) -> str | None:
        if not getattr(net, "fills_masks", False):
            return ("this data hides tokens for the model to fill in (masked-language-model pretraining): use "
                    "transformer_encoder with head: tokens")
        return None

    def input_stats(self, splits) -> tuple | None:
        return None  # token ids as they are

    @staticmethod
    def training_batch(inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RoBERTa's dynamic masking: each window hides as many tokens as its data did, at new places
        drawn every time it is trained on. The data's masks, drawn once, are learnt by heart within a
        few epochs (the validation loss rose from the 7th); validation and test keep theirs, so their
        scores stay comparable."""
        text = torch.where(targets != PAD, targets, inputs)
        counts = (targets != PAD).sum(dim=1, keepdim=True)
        draws = torch.rand(text.shape, device=text.device).masked_fill(text == PAD, 2.0)  # padding: never
        ranks = draws.argsort(dim=1).argsort(dim=1)
        hidden = ranks < counts
        return text.masked_fill(hidden, MASK_ID), text.masked_fill(~hidden, PAD)

    @staticmethod
    def hidden(targets: torch.Tensor) -> torch.Tensor:
        """The hidden tokens, in the order the model's outputs come (row-major over the <mask> positions)."""
        return targets[targets != PAD]

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(outputs, self.hidden(targets))

    def batch_sums(self, outputs: torch.Tensor, targets: torch.Tensor,
                   loss: torch.Tensor | None = None) -> torch.Tensor:
        """[summed loss over hidden tokens, hidden tokens guessed right, hidden tokens]."""
        hidden = self.hidden(targets)
        count = torch.full((), float(hidden.numel()), device=outputs.device)
        total = (loss.detach().float() * count if loss is not None
                 else F.cross_entropy(outputs.float(), hidden, reduction="sum"))
        right = (outputs.argmax(dim=-1) == hidden).sum(dtype=torch.float32)
        return torch.stack([total, right, count])

    def metrics(self, sums: torch.Tensor, prefix: str) -> dict[str, float]:
        loss, right, count = sums.tolist()
        nats = loss / max(count, 1.0)
        return {f"{prefix}_loss": nats, f"{prefix}_perplexity": math.exp(min(nats, 50.0)),
                f"{prefix}_accuracy": right / max(count, 1.0)}

    def targets_per_sample(self, splits) -> float:
        return float(np.count_nonzero(splits.y_train) / max(len(splits.y_train), 1))

    def epoch_artifacts(self, model: nn.Module, splits, epoch: int, count: int = 5) -> dict[str, Any]:
        """A few validation windows with the model's guesses for their hidden tokens."""
        model.eval()
        device = next(model.parameters()).device
        metadata = {"vocab": splits.vocab, "token_level": splits.token_level}
        lines = []
        with torch.inference_mode():
            for index in range(min(count, len(splits.x_val))):
                ids = torch.from_numpy(splits.x_val[index: index + 1]).to(device)
                guesses = model(ids).argmax(dim=-1).cpu().numpy()
                answers = splits.y_val[index][splits.y_val[index] != PAD]
                lines.append(f"{decode_text(splits.x_val[index], metadata)}\n  guessed: "
                             f"{decode_text(guesses, metadata)}\n  hidden:  {decode_text(answers, metadata)}")
        return {f"samples/epoch_{epoch:04d}.txt": "\n".join(lines)}

    def serving_module(self, pipeline: nn.Module) -> nn.Module:
        return EveryPositionLogProbabilities(pipeline)


@dataclass
class Blanks:
    text: str
    ids: list[int]
    top_k: int = 5


class FillMask(JsonOutputs):
    """``{"instances": [text with <mask>, or {"text": ..., "top_k": k}]}`` -> each <mask>'s best tokens."""

    batchable = False

    def expected(self, metadata: dict[str, Any]) -> str:
        length = metadata["input_shape"][0]
        return (f'each instance: a text with one or more {MASK} (at most {length} tokens), or {{"text": str, '
                f'"top_k": int from 1 to {MAX_TOP_K} (default 5)}}')

    def decode(self, body: Any, metadata: dict[str, Any], max_batch: int) -> list[Blanks]:
        instances = instances_of(body, self.expected(metadata), max_batch)
        return [self._blanks(item, index, metadata) for index, item in enumerate(instances)]

    def _blanks(self, item: Any, index: int, metadata: dict[str, Any]) -> Blanks:
        where = f"instances[{index}]"
        options = instance_options(item, where, "text", _KEYS, self.expected(metadata))
        top_k = integer_option(options, "top_k", where, 1, MAX_TOP_K, 5)
        ids: list[int] = []
        for position, piece in enumerate(options["text"].split(MASK)):
            ids += ([MASK_ID] if position else []) + token_ids(piece, metadata, None)
        length = int(metadata["input_shape"][0])
        if MASK_ID not in ids:
            raise BadRequest(f"{where}: no {MASK} to fill; " + self.expected(metadata))
        if len(ids) > length:
            raise BadRequest(f"{where}: {len(ids)} tokens; this model reads at most {length}", status=413)
        return Blanks(options["text"], ids, top_k)

    def run(self, module, requests: list[Blanks], metadata: dict[str, Any]) -> list[dict[str, Any]]:
        length = int(metadata["input_shape"][0])
        batch = torch.zeros(len(requests), length, dtype=torch.long)
        for row, request in enumerate(requests):
            batch[row, : len(request.ids)] = torch.tensor(request.ids)
        with torch.inference_mode():
            scores = module(batch).float()
        vocab, join_with = metadata["vocab"], "" if metadata.get("token_level") == "char" else " "
        results = []
        for row, request in enumerate(requests):
            masks, filled = [], list(request.ids)
            for position in (i for i, token in enumerate(request.ids) if token == MASK_ID):
                row_scores = scores[row, position].clone()
                row_scores[[PAD, MASK_ID]] = -math.inf  # never padding or another mask
                best = torch.topk(row_scores, request.top_k)
                masks.append([{"token": vocab[int(i)], "probability": round(float(p), 6)}
                              for p, i in zip(best.values.exp(), best.indices)])
                filled[position] = int(best.indices[0])
            results.append({"text": join_with.join(vocab[i] for i in filled), "masks": masks})
        return results

    def encode(self, outputs: list[dict[str, Any]], metadata: dict[str, Any], body: dict, options: Any) -> list[Any]:
        return outputs

    def example(self, logged_input, metadata: dict[str, Any]) -> Any:
        ids = [int(i) for i in np.asarray(logged_input).reshape(-1) if i != PAD]
        join_with = "" if metadata.get("token_level") == "char" else " "
        return join_with.join(MASK if i == MASK_ID else metadata["vocab"][i] for i in ids)


MaskedLanguageModel.codec = FillMask()
