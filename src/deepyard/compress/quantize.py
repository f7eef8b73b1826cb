"""int8 with ``torch.ao.quantization``, behind these functions so that a move to torchao (its
successor) stays here:

- dynamic: Linear and LSTM/GRU weights in int8, activations quantized on the fly; any model.
- static: weights and activations in int8 (FX graph mode, x86 kernels), activation ranges calibrated
  on training inputs; for CNNs, whose convolutions dynamic quantization leaves in float.

Quantized modules are stored as TorchScript (``torch.export`` cannot trace int8 packed weights), so
loading one runs no pickle either.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import torch
from torch import nn

DYNAMIC_LAYERS = (nn.Linear, nn.LSTM, nn.GRU)
RECURRENT = (nn.RNNBase,)


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


def quantize_static(module: nn.Module, calibration: np.ndarray, batch: int = 64) -> nn.Module:
    """A copy of ``module`` with int8 weights and activations; activation ranges observed on
    ``calibration`` (raw training inputs)."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    engine = "x86" if "x86" in torch.backends.quantized.supported_engines else "fbgemm"
    torch.backends.quantized.engine = engine
    inputs = torch.from_numpy(calibration)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_fx(copy.deepcopy(module).eval(), get_default_qconfig_mapping(engine),
                              example_inputs=(inputs[:2],))
        with torch.inference_mode():
            for start in range(0, len(inputs), batch):
                prepared(inputs[start:start + batch])
        return convert_fx(prepared)


def for_serving(module: nn.Module, example: torch.Tensor) -> torch.jit.ScriptModule:
    """The quantized serving module as TorchScript: what the registry stores and Serve loads."""
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")
        return torch.jit.trace(module.eval(), example)
