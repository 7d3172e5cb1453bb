"""How much the edge-frame roll moves EquiformerV2's outputs.

fairchem's EquiformerV2 rolls every edge frame by a random angle in every call; ours uses a fixed
roll in evaluation (``edge_roll="random_when_training"``). The S2 activations make the network only
approximately invariant to that roll, so the choice moves the outputs a little. This script
evaluates one model (random weights, fairchem's initialisation) on OC20-like slabs with the
deterministic frames and with several random draws, and prints the largest change, relative to
the largest value:

    python benchmarks/frame_choice.py --shape 31M --draws 5
    python benchmarks/frame_choice.py --shape 83M

Weights are random (fairchem's initialisation plus noise, ``--perturb``): trained weights differ, so
treat the numbers as an order of magnitude.
"""
from __future__ import annotations

import argparse
import logging
import warnings

import torch

from compare_fairchem import COMMON, SHAPES, structures, perturb as perturb_weights

DEMO = dict(num_layers=2, lmax_list=[2], mmax_list=[2], sphere_channels=16, attn_hidden_channels=16, num_heads=2,
            attn_alpha_channels=8, attn_value_channels=4, ffn_hidden_channels=16, edge_channels=16,
            grid_resolution=None, max_radius=6.0, max_neighbors=20)


def build(shape: str, seed: int, perturb: float) -> torch.nn.Module:
    """Our model with fairchem's initialisation, plus ``N(0, perturb^2)`` on every parameter (so
    norms, biases and the last layers are not at their trivial initial values, as after training)."""
    from fairchem.core.models.base import HydraModel

    torch.manual_seed(seed)
    args = DEMO if shape == "demo" else {**COMMON, **SHAPES[shape]}
    backbone = {"model": "fairchem_equiformerv2.EquiformerV2Backbone", **args, "alpha_drop": 0.0, "drop_path_rate": 0.0,
                "edge_roll": "deterministic"}
    heads = {"energy": {"module": "fairchem_equiformerv2.EnergyHead"}, "forces": {"module": "fairchem_equiformerv2.ForceHead"}}
    model = HydraModel(backbone=backbone, heads=heads, otf_graph=True).eval()
    perturb_weights(model, perturb)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["demo", *SHAPES], default="31M")
    parser.add_argument("--atoms", type=int, default=38, help="atoms per structure (about)")
    parser.add_argument("--structures", type=int, default=2)
    parser.add_argument("--draws", type=int, default=5, help="random-roll evaluations to compare")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--perturb", type=float, default=0.1, help="noise added to the initial weights (0: as initialised)")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")

    from fairchem.core.common.data_parallel import data_list_collater
    from fairchem.core.preprocessing import AtomsToGraphs

    a2g = AtomsToGraphs(r_energy=False, r_forces=False, r_distances=False, r_edges=False, r_pbc=True)
    batch = data_list_collater([a2g.convert(a) for a in structures(args.atoms, args.structures)], otf_graph=True)
    model = build(args.shape, args.seed, args.perturb)

    def evaluate(roll: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        model.backbone.edge_roll = roll
        torch.manual_seed(seed)
        with torch.no_grad():
            out = model(batch.clone())
        return out["energy"]["energy"], out["forces"]["forces"]

    energy, forces = evaluate("deterministic", 0)
    again = evaluate("deterministic", 1)
    identical = torch.equal(energy, again[0]) and torch.equal(forces, again[1])
    de = df = 0.0
    for draw in range(args.draws):
        e, f = evaluate("random", 1000 + draw)
        de = max(de, ((e - energy).abs().max() / energy.abs().max()).item())
        df = max(df, ((f - forces).abs().max() / forces.abs().max()).item())
    print(f"shape {args.shape} (weights perturbed by {args.perturb}), {len(batch.natoms)} structures of "
          f"{batch.natoms.tolist()} atoms, {args.draws} random draws")
    print(f"deterministic frames twice: {'bit-identical' if identical else 'DIFFERENT'}")
    print(f"random vs deterministic frames: energy max rel {de:.1e}, forces max rel {df:.1e}")


if __name__ == "__main__":
    main()
