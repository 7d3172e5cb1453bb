"""fairchem's own EquiformerV2 (the oracle) and ours, built side by side with the same weights."""
from __future__ import annotations

import logging
import warnings

import torch
from fairchem.core.common.utils import setup_imports
from fairchem.core.models.base import HydraModel

from fairchem_equiformerv2.tools.checkpoints import load_fairchem_weights
from fairchem_equiformerv2.so3.frames import edge_frames

warnings.filterwarnings("ignore", category=FutureWarning)
setup_imports()

# 2 layers and small channels; the published shapes vary lmax/mmax and the options below.
SMALL = dict(
    num_layers=2, sphere_channels=16, attn_hidden_channels=16, num_heads=2, attn_alpha_channels=8,
    attn_value_channels=4, ffn_hidden_channels=16, edge_channels=16, max_radius=6.0, max_neighbors=20,
)
FAIRCHEM_HEADS = {"energy": "equiformerV2_scalar_head", "forces": "equiformerV2_vector_head", "stress": "rank2_symmetric_head"}
OUR_HEADS = {"energy": "fairchem_equiformerv2.EnergyHead", "forces": "fairchem_equiformerv2.ForceHead", "stress": "fairchem_equiformerv2.StressHead"}


def _heads(names: dict, head_args: dict) -> dict:
    return {h: {"module": names[h], **head_args.get(h, {})} for h in head_args}


def build_pair(
    backbone_args: dict, head_args: dict, seed: int = 0, perturb: float = 0.1,
    backbones: tuple[str, str] = ("equiformer_v2_backbone", "fairchem_equiformerv2.EquiformerV2Backbone"),
    head_names: tuple[dict, dict] = (FAIRCHEM_HEADS, OUR_HEADS),
):
    """(fairchem's model, ours), in eval mode, with identical weights and edge frames; ``backbones`` and
    ``head_names``: (fairchem's, ours) names, for variants such as DeNS.

    ``perturb`` adds noise to every fairchem parameter first, so that LayerNorm weights, biases and
    references are not at their trivial initial values.
    """
    logging.disable(logging.WARNING)
    torch.manual_seed(seed)
    args = {**SMALL, **backbone_args}
    theirs = HydraModel(backbone={"model": backbones[0], **args}, heads=_heads(head_names[0], head_args))
    ours = HydraModel(backbone={"model": backbones[1], **args}, heads=_heads(head_names[1], head_args))
    logging.disable(logging.NOTSET)
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(perturb * torch.randn_like(p))
    load_fairchem_weights(ours, theirs.state_dict())
    # fairchem draws a random roll per edge frame; give it our deterministic frames instead
    theirs.backbone._init_edge_rot_mat = lambda data, edge_index, edge_vec: edge_frames(edge_vec)
    return theirs.eval(), ours.eval()


def max_relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |a|."""
    return ((a - b).abs().max() / a.abs().max()).item()
