"""Recurrent networks: Elman RNN (tanh), LSTM and GRU, read over a sequence.

An input of shape (time, features) is a sequence; an image (channels, height, width) is read row by
row (height steps of channels x width features, the classic "RNN on MNIST rows"); a flat vector is
read one value per step. The head sees the last layer's final hidden state (both directions when
bidirectional) or the mean of the outputs over time.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import PositiveInt
from torch import nn

from deepyard.models.layers import Dropout, make_dropout
from deepyard.models.registry import MODELS

CELLS = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}


def as_sequence(x: torch.Tensor, in_shape: tuple[int, ...]) -> torch.Tensor:
    """(batch, *in_shape) -> (batch, time, features)."""
    if len(in_shape) == 3:  # image: one row per step
        return x.permute(0, 2, 1, 3).flatten(2)
    if len(in_shape) == 1:
        return x.unsqueeze(-1)
    return x


def sequence_shape(in_shape: tuple[int, ...]) -> tuple[int, int]:
    if len(in_shape) == 3:
        return in_shape[1], in_shape[0] * in_shape[2]
    if len(in_shape) == 1:
        return in_shape[0], 1
    if len(in_shape) == 2:
        return in_shape[0], in_shape[1]
    raise ValueError(f"a recurrent model reads (time, features), (channels, height, width) or (features,) "
                     f"inputs, not {in_shape}")


class Recurrent(nn.Module):
    def __init__(self, cell: str, in_shape: tuple[int, ...], num_outputs: int, hidden_size: int, layers: int,
                 bidirectional: bool, dropout: float, pooling: str, bptt_steps: int | None = None):
        super().__init__()
        if bptt_steps and bidirectional:
            raise ValueError("bptt_steps truncates backpropagation through time along one direction; "
                             "it cannot be combined with bidirectional: true")
        self.bptt_steps = bptt_steps
        _, features = sequence_shape(in_shape)
        self.in_shape, self.pooling = tuple(in_shape), pooling
        self.directions = 2 if bidirectional else 1
        # (between stacked layers only: PyTorch's dropout argument does nothing on a single layer)
        self.rnn = CELLS[cell](features, hidden_size, num_layers=layers, batch_first=True,
                               bidirectional=bidirectional, dropout=dropout if layers > 1 else 0.0)
        self.dropout = make_dropout(dropout)
        self.head = nn.Linear(hidden_size * self.directions, num_outputs)

    def read(self, sequence: torch.Tensor):
        """The RNN over the sequence. Training with ``bptt_steps``, it reads chunks of that many steps
        and cuts the gradient between them (truncated backpropagation through time): the forward
        values are the same, but backward costs and remembers only ``bptt_steps`` at a time."""
        steps = self.bptt_steps
        if not (self.training and steps and sequence.shape[1] > steps):
            return self.rnn(sequence)
        state, outputs = None, []
        for start in range(0, sequence.shape[1], steps):
            if state is not None:
                state = tuple(s.detach() for s in state) if isinstance(state, tuple) else state.detach()
            chunk, state = self.rnn(sequence[:, start:start + steps], state)
            outputs.append(chunk)
        return torch.cat(outputs, dim=1), state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs, state = self.read(as_sequence(x, self.in_shape))
        if self.pooling == "mean":
            summary = outputs.mean(dim=1)
        else:
            final = state[0] if isinstance(state, tuple) else state  # an LSTM also returns its cell state
            summary = torch.cat(list(final[-self.directions:]), dim=-1)  # the last layer, each direction
        return self.head(self.dropout(summary))


def _builder(cell: str):
    def build(in_shape: tuple[int, ...], num_outputs: int, hidden_size: PositiveInt = 64, layers: PositiveInt = 1,
              bidirectional: bool = False, dropout: Dropout = 0.0,
              pooling: Literal["last", "mean"] = "last", bptt_steps: PositiveInt | None = None) -> nn.Module:
        return Recurrent(cell, in_shape, num_outputs, hidden_size, layers, bidirectional, dropout, pooling,
                         bptt_steps)

    build.__name__ = cell
    build.__doc__ = f"{cell.upper()} over a sequence (an image row by row), then a linear head."
    return build


for _cell in CELLS:
    MODELS.register(_cell)(_builder(_cell))
