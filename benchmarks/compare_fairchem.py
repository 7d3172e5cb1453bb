"""Speed and memory of our EquiformerV2 against fairchem's own, on the same weights and inputs.

Each measurement runs in a fresh subprocess (so peak resident memory is that model's alone); the two
implementations alternate so machine noise hits both alike. Prints median step time of several
runs, the ratio ours/fairchem, peak memory, and the largest output difference (fixed edge frames).

    python benchmarks/compare_fairchem.py --shape 31M                    # one size, train + inference
    python benchmarks/compare_fairchem.py --shape 31M --sweep 20,100,200,400,800 --plot benchmarks/scaling.png
"""
from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import resource
import statistics
import sys
import time
import warnings

# Published shapes (OC20 S2EF): backbone arguments that differ from fairchem's defaults.
SHAPES = {
    "31M": dict(num_layers=8, lmax_list=[4], mmax_list=[2], grid_resolution=18, max_radius=12.0, max_neighbors=20),
    "83M": dict(num_layers=12, lmax_list=[6], mmax_list=[2], grid_resolution=18, max_radius=12.0, max_neighbors=20),
    "153M": dict(num_layers=20, lmax_list=[6], mmax_list=[3], grid_resolution=18, max_radius=12.0, max_neighbors=20),
}
COMMON = dict(sphere_channels=128, attn_hidden_channels=64, num_heads=8, attn_alpha_channels=64, attn_value_channels=16,
              ffn_hidden_channels=128, edge_channels=128, alpha_drop=0.1, drop_path_rate=0.05)
NAMES = {
    "fairchem": ("equiformer_v2_backbone", "equiformerV2_scalar_head", "equiformerV2_vector_head"),
    "ours": ("fairchem_equiformerv2.EquiformerV2Backbone", "fairchem_equiformerv2.EnergyHead", "fairchem_equiformerv2.ForceHead"),
}


def structures(num_atoms: int, count: int):
    """``count`` OC20-like Pt slabs with a CO adsorbate, about ``num_atoms`` atoms each."""
    import numpy as np
    from ase.build import add_adsorbate, fcc111, molecule

    out = []
    layers = 4
    side = max(1, round(((num_atoms - 2) / layers) ** 0.5))
    for i in range(count):
        slab = fcc111("Pt", size=(side, side, layers), vacuum=8.0)
        add_adsorbate(slab, molecule("CO"), 2.0, "ontop")
        slab.rattle(0.05, seed=i)
        slab.set_tags(np.ones(len(slab), dtype=int))
        slab.pbc = True
        out.append(slab)
    return out


def build(impl: str, shape: str, seed: int = 0):
    from fairchem.core.common.utils import setup_imports
    from fairchem.core.models.base import HydraModel

    setup_imports()
    logging.disable(logging.WARNING)
    torch = __import__("torch")
    torch.manual_seed(seed)
    backbone, energy, forces = NAMES[impl]
    model = HydraModel(
        backbone={"model": backbone, **COMMON, **SHAPES[shape]},
        heads={"energy": {"module": energy}, "forces": {"module": forces}},
    )
    if impl == "fairchem":
        from fairchem_equiformerv2.so3.frames import edge_frames

        # the same (deterministic in eval, random in training) frames as ours, built the same way
        model.backbone._init_edge_rot_mat = lambda data, ei, vec: edge_frames(vec, random=model.training)
    return model


def same_weights(fairchem_model, ours):
    from fairchem_equiformerv2.checkpoints import load_fairchem_weights

    load_fairchem_weights(ours, fairchem_model.state_dict())


def _measure(impl, shape, num_atoms, count, mode, repeats, threads, queue):
    warnings.filterwarnings("ignore")
    import torch
    from fairchem.core.common.data_parallel import data_list_collater
    from fairchem.core.preprocessing import AtomsToGraphs

    torch.set_num_threads(threads)
    a2g = AtomsToGraphs(r_energy=False, r_forces=False, r_distances=False, r_edges=False, r_fixed=True)
    batch = data_list_collater([a2g.convert(s) for s in structures(num_atoms, count)], otf_graph=True)
    model = build(impl, shape)
    model.train(mode == "train")
    times = []
    for i in range(repeats + 1):  # the first run warms up
        start = time.perf_counter()
        if mode == "train":
            out = model(batch)
            loss = out["energy"]["energy"].pow(2).sum() + out["forces"]["forces"].pow(2).sum()
            loss.backward()
            model.zero_grad(set_to_none=True)
        else:
            with torch.no_grad():
                out = model(batch)
        if i:
            times.append(time.perf_counter() - start)
    queue.put({"median_s": statistics.median(times), "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
               "atoms": int(batch.natoms.sum())})


def measure(impl, shape, num_atoms, count, mode, repeats, threads):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    p = ctx.Process(target=_measure, args=(impl, shape, num_atoms, count, mode, repeats, threads, queue))
    p.start()
    result = queue.get()
    p.join()
    return result


def max_difference(shape, num_atoms, count):
    """Largest |ours - fairchem| / max |fairchem| of energy and forces, same weights and frames."""
    warnings.filterwarnings("ignore")
    from fairchem.core.common.data_parallel import data_list_collater
    from fairchem.core.preprocessing import AtomsToGraphs

    a2g = AtomsToGraphs(r_energy=False, r_forces=False, r_distances=False, r_edges=False, r_fixed=True)
    batch = data_list_collater([a2g.convert(s) for s in structures(num_atoms, count)], otf_graph=True)
    theirs, ours = build("fairchem", shape).eval(), build("ours", shape).eval()
    same_weights(theirs, ours)
    a, b = theirs(batch), ours(batch)
    return {k: ((a[k][k] - b[k][k]).abs().max() / a[k][k].abs().max()).item() for k in ("energy", "forces")}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=list(SHAPES), default="31M")
    parser.add_argument("--atoms", type=int, default=38, help="atoms per structure (about)")
    parser.add_argument("--structures", type=int, default=2)
    parser.add_argument("--modes", default="train,inference")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sweep", default="", help="comma-separated atoms per structure: time one train step at each")
    parser.add_argument("--plot", default="", help="PNG of step time against system size (with --sweep)")
    parser.add_argument("--json", default="", help="write the results here too")
    args = parser.parse_args(argv)

    results = {"shape": args.shape, "rows": []}
    print(f"EquiformerV2 {args.shape}: {args.structures} structures of ~{args.atoms} atoms, {args.threads} threads, "
          f"median of {args.repeats}")
    print(f"{'mode':10s} {'fairchem s':>11s} {'ours s':>9s} {'ratio':>7s} {'fairchem GB':>12s} {'ours GB':>8s} {'ratio':>6s}")
    for mode in args.modes.split(","):
        r = {impl: measure(impl, args.shape, args.atoms, args.structures, mode, args.repeats, args.threads) for impl in ("fairchem", "ours")}
        f, o = r["fairchem"], r["ours"]
        print(f"{mode:10s} {f['median_s']:11.3f} {o['median_s']:9.3f} {o['median_s'] / f['median_s']:7.2f} "
              f"{f['peak_rss_gb']:12.2f} {o['peak_rss_gb']:8.2f} {o['peak_rss_gb'] / f['peak_rss_gb']:6.2f}")
        results["rows"].append({"mode": mode, **{f"{k}_{impl}": v for impl in r for k, v in r[impl].items()}})
    diff = max_difference(args.shape, args.atoms, args.structures)
    print(f"max relative output difference (same weights and frames): energy {diff['energy']:.1e}, forces {diff['forces']:.1e}")
    results["max_difference"] = diff

    if args.sweep:
        sizes = [int(s) for s in args.sweep.split(",")]
        sweep = []
        print(f"\ntrain step against system size (1 structure):\n{'atoms':>6s} {'fairchem s':>11s} {'ours s':>9s} {'ratio':>7s}")
        for n in sizes:
            r = {impl: measure(impl, args.shape, n, 1, "train", max(1, args.repeats - 1), args.threads) for impl in ("fairchem", "ours")}
            sweep.append((r["ours"]["atoms"], r["fairchem"]["median_s"], r["ours"]["median_s"]))
            print(f"{sweep[-1][0]:6d} {sweep[-1][1]:11.3f} {sweep[-1][2]:9.3f} {sweep[-1][2] / sweep[-1][1]:7.2f}")
        results["sweep"] = sweep
        if args.plot:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            atoms, t_f, t_o = zip(*sweep)
            plt.figure(figsize=(5, 3.5))
            plt.loglog(atoms, t_f, "o-", label="fairchem EquiformerV2")
            plt.loglog(atoms, t_o, "s-", label="fairchem-equiformerv2")
            plt.xlabel("atoms")
            plt.ylabel("train step (s)")
            plt.title(f"EquiformerV2 {args.shape}, CPU, {args.threads} threads")
            plt.legend()
            plt.tight_layout()
            plt.savefig(args.plot, dpi=120)
            print(f"plot: {args.plot}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
