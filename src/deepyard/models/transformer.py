"""Transformers over token ids: a BERT-like encoder with a pooled classification head, and a
GPT-like causal decoder that predicts the next token at every position.

Both are pre-norm stacks of the same ``Block`` (multi-head self-attention through PyTorch's fused
``scaled_dot_product_attention``, then a GELU MLP). Token id 0 is padding: the encoder never
attends to it; the decoder is causal, so right-padding never changes the logits before it.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import PositiveInt
from torch import nn

from deepyard.data.splits import MASK_ID
from deepyard.models.layers import Dropout, make_dropout
from deepyard.models.registry import MODELS


class Block(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float, causal: bool, mlp_ratio: int = 4):
        super().__init__()
        self.heads, self.causal, self.dropout = heads, causal, dropout
        self.attention_norm = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.projection = nn.Linear(width, width)
        self.mlp_norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Linear(mlp_ratio * width, width))
        self.residual_dropout = make_dropout(dropout)

    def attend(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        batch, steps, width = x.shape
        q, k, v = self.qkv(x).view(batch, steps, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.causal,
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.projection(out.transpose(1, 2).reshape(batch, steps, width))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.residual_dropout(self.attend(self.attention_norm(x), mask))
        return x + self.residual_dropout(self.mlp(self.mlp_norm(x)))


class Embeddings(nn.Module):
    """Token plus learned position embeddings."""

    def __init__(self, vocab_size: int, context_length: int, width: int, dropout: float):
        super().__init__()
        self.tokens = nn.Embedding(vocab_size, width)
        self.positions = nn.Embedding(context_length, width)
        self.dropout = make_dropout(dropout)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        return self.dropout(self.tokens(ids) + self.positions(positions))


def _init_weights(module: nn.Module) -> None:
    """GPT-2's initialization: small normal weights, zero biases."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


def _check_sizes(in_shape: tuple[int, ...], vocab_size: int | None, width: int, heads: int,
                 context_length: int | None) -> int:
    if vocab_size is None or len(in_shape) != 1:
        raise ValueError("a transformer reads token ids: use a text data set (shakespeare_char, rotten_tomatoes, "
                         "text_csv)")
    if width % heads:
        raise ValueError(f"width {width} is not divisible by heads {heads}")
    context_length = context_length or in_shape[0]
    if in_shape[0] > context_length:
        raise ValueError(f"the data's sequences have {in_shape[0]} tokens but the model's context_length is "
                         f"{context_length}; raise model.params.context_length or shorten the data's "
                         "context_length / max_length")
    return context_length


class TransformerEncoder(nn.Module):
    def __init__(self, vocab_size: int, context_length: int, num_outputs: int, width: int, layers: int, heads: int,
                 dropout: float, pooling: str, head: str = "pooled"):
        super().__init__()
        self.pooling = pooling
        # BERT's pretraining head: the hidden tokens' logits, read with the input embedding;
        # fine-tuning swaps it for a new pooled head.
        self.fills_masks = head == "tokens"
        extra = self.extra = 1 if pooling == "cls" else 0  # a learned [CLS] vector goes in front
        self.embeddings = Embeddings(vocab_size, context_length + extra, width, dropout)
        self.cls = nn.Parameter(torch.zeros(1, 1, width)) if pooling == "cls" else None
        self.blocks = nn.ModuleList(Block(width, heads, dropout, causal=False) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.dropout = make_dropout(dropout)
        self.head = nn.Linear(width, num_outputs)
        self.apply(_init_weights)
        if self.fills_masks:
            self.head.weight = self.embeddings.tokens.weight

    def encode(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden states, a (batch, steps) mask of real tokens)."""
        keep = ids != 0
        x = self.embeddings.tokens(ids)
        if self.cls is not None:
            x = torch.cat([self.cls.expand(len(ids), -1, -1), x], dim=1)
            keep = torch.cat([torch.ones_like(keep[:, :1]), keep], dim=1)
        positions = torch.arange(x.shape[1], device=ids.device)
        x = self.embeddings.dropout(x + self.embeddings.positions(positions))
        mask = keep[:, None, None, :]  # (batch, heads, query, key): True may be attended to
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x), keep

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        hidden, keep = self.encode(ids)
        if self.fills_masks:  # the <mask> positions' logits only, in row-major order: (masks in the batch, vocab)
            return self.head(hidden[:, self.extra:][ids == MASK_ID])
        if self.cls is not None:
            pooled = hidden[:, 0]
        else:
            weights = keep.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return self.head(self.dropout(pooled))

    def every_position(self, ids: torch.Tensor) -> torch.Tensor:
        """A token head's logits at every position, (batch, steps, vocab): the served fill-mask
        model's (a fixed shape, which ``torch.export`` traces)."""
        return self.head(self.encode(ids)[0][:, self.extra:])


class TransformerDecoder(nn.Module):
    predicts_every_step = True  # a language model: one output per position, not per text

    def __init__(self, vocab_size: int, context_length: int, width: int, layers: int, heads: int, dropout: float,
                 tie_weights: bool):
        super().__init__()
        self.context_length = context_length
        self.embeddings = Embeddings(vocab_size, context_length, width, dropout)
        self.blocks = nn.ModuleList(Block(width, heads, dropout, causal=True) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab_size, bias=False)
        self.apply(_init_weights)
        if tie_weights:  # the output layer reads with the input embedding (fewer parameters, often better)
            self.head.weight = self.embeddings.tokens.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))  # (batch, steps, vocab): the next token's logits at every step


@MODELS.register("transformer_encoder")
def transformer_encoder(in_shape: tuple[int, ...], num_outputs: int, vocab_size: int | None = None,
                        width: PositiveInt = 128, layers: PositiveInt = 2, heads: PositiveInt = 4,
                        dropout: Dropout = 0.1, pooling: Literal["mean", "cls"] = "mean",
                        context_length: PositiveInt | None = None,
                        head: Literal["pooled", "tokens"] = "pooled") -> nn.Module:
    """BERT-like encoder: self-attention over the whole text (padding masked), pooled, then a linear
    head; ``head: tokens`` predicts a token at every position instead (masked-language-model pretraining)."""
    context_length = _check_sizes(in_shape, vocab_size, width, heads, context_length)
    if head == "tokens" and num_outputs != vocab_size:
        raise ValueError("head: tokens predicts a token at every position; use it with masked-language-model data "
                         "(masked_text), or leave head out (pooled) for a classifier")
    return TransformerEncoder(vocab_size, context_length, num_outputs, width, layers, heads, dropout, pooling, head)


@MODELS.register("transformer_decoder")
def transformer_decoder(in_shape: tuple[int, ...], num_outputs: int, vocab_size: int | None = None,
                        width: PositiveInt = 128, layers: PositiveInt = 4, heads: PositiveInt = 4,
                        dropout: Dropout = 0.1, tie_weights: bool = True,
                        context_length: PositiveInt | None = None) -> nn.Module:
    """GPT-like causal language model: each position sees only the tokens before it."""
    context_length = _check_sizes(in_shape, vocab_size, width, heads, context_length)
    if num_outputs != vocab_size:
        raise ValueError("transformer_decoder is a language model: use it with a language-model data set "
                         "(shakespeare_char)")
    return TransformerDecoder(vocab_size, context_length, width, layers, heads, dropout, tie_weights)
