"""int8 weights for Linear and LSTM/GRU layers, activations quantized on the fly (dynamic quantization).

Behind one function, so that a move from ``torch.ao.quantization`` (deprecated in favour of torchao)
to torchao stays here.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

DYNAMIC_LAYERS = (nn.Linear, nn.LSTM, nn.GRU)


def quantizable(net: nn.Module) -> list[str]:
    """Names of the layers dynamic int8 replaces (attention's own projections stay float)."""
    return [name for name, module in net.named_modules()
            if type(module) in DYNAMIC_LAYERS]  # exact types: MultiheadAttention's out_proj is a subclass


def quantize_dynamic(module: nn.Module) -> nn.Module:
    """A copy of ``module`` with int8 Linear/LSTM/GRU weights, for CPU inference."""
    with warnings.catch_warnings():  # torch.ao's deprecation notice: the move to torchao stays local
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(module).eval(), set(DYNAMIC_LAYERS),
                                                      dtype=torch.qint8)
