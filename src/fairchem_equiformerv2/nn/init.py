"""EquiformerV2's weight initialisation, applied module by module (``model.apply``, children first).

Linear maps: zero bias and, for ``weight_init="normal"``, weights ~ N(0, 1/in_features); radial
MLPs: weights ~ U(+-1/sqrt(in_features)) whatever ``weight_init`` says; LayerNorms: identity.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .linear import SO3Linear
from .radial import RadialMLP


def _uniform_linear(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        bound = 1 / math.sqrt(module.in_features)
        torch.nn.init.uniform_(module.weight, -bound, bound)
        if module.bias is not None:
            torch.nn.init.zeros_(module.bias)


def init_weights(module: nn.Module, weight_init: str) -> None:
    if isinstance(module, (nn.Linear, SO3Linear)):
        if module.bias is not None:
            torch.nn.init.zeros_(module.bias)
        if weight_init == "normal":
            torch.nn.init.normal_(module.weight, 0.0, 1 / math.sqrt(module.in_features))
    elif isinstance(module, nn.LayerNorm):
        torch.nn.init.ones_(module.weight)
        torch.nn.init.zeros_(module.bias)
    elif isinstance(module, RadialMLP):
        module.apply(_uniform_linear)
