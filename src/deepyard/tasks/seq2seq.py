"""Sequence to sequence: text in, text out (``models/seq2seq.py``, ``data/seq2seq.py``).

Trained by teacher forcing: cross-entropy of each next target token given the true ones before it
(padding not scored). Metrics: loss in nats per token, token accuracy, and exact match, the share of
sequences whose every token (and the end) is right. Under teacher forcing every token right means
greedy decoding writes exactly that sequence, so exact match is greedy decoding's, computed in the
same pass.

Served: ``{"instances": ["source text" or {"text": ..., "beam_width": k, "max_length": n}]}`` ->
``{"text": ...}`` each, by greedy (beam width 1) or beam search, with bounded length, width and batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from deepyard.serve.payloads import (BadRequest, JsonOutputs, decode_text, instance_options, instances_of,
                                     integer_option, token_ids)
from deepyard.tasks.base import Supervised
from deepyard.tasks.language_model import LogProbabilities

MAX_BEAM_WIDTH = 8
_KEYS = {"text", "beam_width", "max_length"}


class Seq2Seq(Supervised):
    name = "seq2seq"
    directions = {"loss": "min", "token_accuracy": "max", "exact_match": "max"}
    monitor = "val_exact_match"
    shown = ("train_loss", "val_loss", "val_exact_match")
    target_unit = "tokens"  # the sums count target tokens: throughput is also logged in tokens per second

    def __init__(self, **_: object):
        pass

    @staticmethod
    def fits(net: nn.Module, splits) -> str | None:
        if not getattr(net, "reads_pairs", False):
            return ("it does not read source and target pairs; this data needs an encoder-decoder: use "
                    "transformer_seq2seq")
        return None

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        targets = targets[:, : outputs.shape[1]]  # (the model cuts the batch to its longest target)
        return F.cross_entropy(outputs.flatten(0, 1), targets.flatten(), ignore_index=0)

    def batch_sums(self, outputs: torch.Tensor, targets: torch.Tensor,
                   loss: torch.Tensor | None = None) -> torch.Tensor:
        """[summed loss over target tokens, right tokens, right sequences, sequences, target tokens]."""
        targets = targets[:, : outputs.shape[1]]
        real = targets != 0
        tokens = real.sum(dtype=torch.float32)
        total = (loss.detach().float() * tokens if loss is not None
                 else F.cross_entropy(outputs.flatten(0, 1).float(), targets.flatten(), ignore_index=0,
                                      reduction="sum"))
        right = outputs.argmax(dim=-1) == targets
        exact = (right | ~real).all(dim=1).sum(dtype=torch.float32)
        sequences = torch.full((), float(len(targets)), device=outputs.device)
        return torch.stack([total, (right & real).sum(dtype=torch.float32), exact, sequences, tokens])

    def metrics(self, sums: torch.Tensor, prefix: str) -> dict[str, float]:
        loss, right, exact, sequences, tokens = sums.tolist()
        return {f"{prefix}_loss": loss / max(tokens, 1.0), f"{prefix}_token_accuracy": right / max(tokens, 1.0),
                f"{prefix}_exact_match": exact / max(sequences, 1.0)}

    def targets_per_sample(self, splits) -> float:
        return float(np.count_nonzero(splits.y_train) / max(len(splits.y_train), 1))

    def input_stats(self, splits) -> tuple | None:
        return None  # token ids as they are

    def epoch_artifacts(self, model: nn.Module, splits, epoch: int, count: int = 5) -> dict[str, Any]:
        """A few validation sources, what greedy decoding makes of them, and the targets."""
        model.eval()
        device = next(model.parameters()).device
        metadata = {"vocab": splits.vocab, "token_level": splits.token_level}
        lines = []
        for index in range(min(count, len(splits.x_val))):
            pair = splits.x_val[index]
            decoded = beam_search(lambda ids: torch.log_softmax(model(ids.to(device)).float(), -1).cpu(),
                                  pair[0].tolist(), special_ids(splits.vocab), length=pair.shape[1],
                                  max_length=pair.shape[1] - 1, beam_width=1)
            target = splits.y_val[index][splits.y_val[index] != special_ids(splits.vocab)[1]]
            lines.append(f"{decode_text(pair[0], metadata)}\n  -> {decode_text(np.array(decoded), metadata)}\n"
                         f"  (target: {decode_text(target, metadata)})")
        return {f"samples/epoch_{epoch:04d}.txt": "\n".join(lines)}

    def serving_module(self, pipeline: nn.Module) -> nn.Module:
        return LogProbabilities(pipeline)  # (each decoder position's next token, as a language model's)


def special_ids(vocab: list[str]) -> tuple[int, int]:
    """(``<s>``, ``</s>``): the decoder's start and the end of a sequence."""
    return vocab.index("<s>"), vocab.index("</s>")


@torch.inference_mode()
def beam_search(log_probs, source: list[int], specials: tuple[int, int], *, length: int, max_length: int,
                beam_width: int = 1) -> list[int]:
    """The target ids (without ``<s>`` and ``</s>``) that beam search finds for ``source``:
    ``log_probs`` maps (beams, 2, length) pairs to (beams, steps, vocab) log-probabilities. Width 1
    is greedy decoding. A finished beam (``</s>``) keeps its score; the best finished one wins."""
    start, end = specials
    beams: list[tuple[float, list[int]]] = [(0.0, [])]
    finished: list[tuple[float, list[int]]] = []
    for step in range(max_length + 1):
        pairs = torch.zeros(len(beams), 2, length, dtype=torch.long)
        pairs[:, 0, : len(source)] = torch.tensor(source[:length])
        for row, (_, ids) in enumerate(beams):
            pairs[row, 1, : step + 1] = torch.tensor([start] + ids)
        scores = log_probs(pairs)[:, step].float()
        scores[:, :2] = -float("inf")  # never <pad> or <unk>
        scores[:, start] = -float("inf")
        if step == max_length:  # out of room: only the end may follow
            keep = scores[:, end].clone()
            scores.fill_(-float("inf"))
            scores[:, end] = keep
        candidates = []
        for row, (score, ids) in enumerate(beams):
            top = torch.topk(scores[row], min(beam_width, scores.shape[1]))
            candidates += [(score + float(value), ids + [int(token)]) for value, token in zip(top.values, top.indices)]
        candidates.sort(key=lambda item: -item[0])
        beams = []
        for score, ids in candidates:
            if ids[-1] == end:
                finished.append((score, ids[:-1]))
            elif len(beams) < beam_width:
                beams.append((score, ids))
            if len(beams) == beam_width and len(finished) >= beam_width:
                break
        if not beams or (finished and max(f[0] for f in finished) >= beams[0][0]):
            break  # (scores only fall: no open beam can beat the best finished one)
    best = max(finished, key=lambda item: item[0]) if finished else beams[0]
    return best[1]


@dataclass
class Translation:
    text: str
    ids: list[int]
    beam_width: int
    max_length: int


class Translations(JsonOutputs):
    """``{"instances": [text or {"text": ..., "beam_width": k, "max_length": n}]}`` -> ``{"text": ...}`` each."""

    batchable = False

    def expected(self, metadata: dict[str, Any]) -> str:
        room = int(metadata["input_shape"][1]) - 1
        return (f'each instance: a source text, or {{"text": str, "beam_width": 1 to {MAX_BEAM_WIDTH} (default 1: '
                f'greedy), "max_length": 1 to {room} target tokens (default {room})}}')

    def decode(self, body: Any, metadata: dict[str, Any], max_batch: int) -> list[Translation]:
        instances = instances_of(body, self.expected(metadata), max_batch)
        return [self._translation(item, index, metadata) for index, item in enumerate(instances)]

    def _translation(self, item: Any, index: int, metadata: dict[str, Any]) -> Translation:
        where, room = f"instances[{index}]", int(metadata["input_shape"][1]) - 1
        options = instance_options(item, where, "text", _KEYS, self.expected(metadata))
        ids = token_ids(options["text"], metadata, None)
        length = int(metadata["input_shape"][1])
        if len(ids) > length:
            raise BadRequest(f"{where}.text: {len(ids)} tokens is over this model's {length}; shorten it",
                             status=413)
        return Translation(options["text"], ids, integer_option(options, "beam_width", where, 1, MAX_BEAM_WIDTH, 1),
                           integer_option(options, "max_length", where, 1, room, room))

    def run(self, module, requests: list[Translation], metadata: dict[str, Any]) -> list[dict[str, Any]]:
        specials = special_ids(metadata["vocab"])
        length = int(metadata["input_shape"][1])
        results = []
        for request in requests:
            ids = beam_search(module, request.ids, specials, length=length, max_length=request.max_length,
                              beam_width=request.beam_width)
            results.append({"text": decode_text(np.array(ids, dtype=np.int64), metadata)})
        return results

    def encode(self, outputs: list[dict[str, Any]], metadata: dict[str, Any], body: dict, options: Any) -> list[Any]:
        return outputs

    def example(self, logged_input, metadata: dict[str, Any]) -> Any:
        return decode_text(np.asarray(logged_input)[0], metadata)


Seq2Seq.codec = Translations()
