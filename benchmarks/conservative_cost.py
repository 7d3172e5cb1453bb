"""Cost of gradient forces against direct ones: step time and peak memory, same model shape and batch.

The published OC20 shapes (``compare_fairchem.SHAPES``, 31M by default) on the CPU, on
``compare_fairchem``'s batch (OC20-like Pt slabs with CO, ``--structures`` of about ``--atoms``
atoms). Direct: EnergyHead + ForceHead. Gradient: ConservativeHead (forces = -dE/dx; with
``--stress`` also the stress). Each measurement runs in a fresh subprocess (peak resident memory is
that run's alone), alternating the two models:

* training step: forward, loss ``sum(E^2) + sum(F^2)``, backward (for gradient forces a double
  backward: the force loss reaches the weights through ``create_graph``), weights' gradients zeroed;
* inference: forward under ``torch.no_grad()`` (as fairchem predicts and ``OCPCalculator`` runs;
  the gradient model switches gradients on inside).

    python benchmarks/conservative_cost.py                       # 31M, 2 x 38 atoms, 2 threads
    python benchmarks/conservative_cost.py --threads 1 --repeats 3
"""
from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import resource
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_fairchem import COMMON, SHAPES, demo_batch, perturb  # noqa: E402

HEADS = {
    "direct": {"energy": {"module": "fairchem_equiformerv2.EnergyHead"}, "forces": {"module": "fairchem_equiformerv2.ForceHead"}},
    "gradient": {"energy": {"module": "fairchem_equiformerv2.ConservativeHead"}},
    "gradient+stress": {"energy": {"module": "fairchem_equiformerv2.ConservativeHead", "stress": True}},
}


def build(kind: str, shape: str, seed: int = 0):
    from fairchem.core.models.base import HydraModel

    logging.disable(logging.WARNING)
    torch = __import__("torch")
    torch.manual_seed(seed)
    model = HydraModel(
        backbone={"model": "fairchem_equiformerv2.EquiformerV2Backbone", **COMMON, **SHAPES[shape]},
        heads=HEADS[kind], pass_through_head_outputs=True,
    )
    perturb(model, 0.01)
    return model


def step(model, batch, mode: str) -> None:
    import torch

    if mode == "train":
        out = model(batch)
        loss = out["energy"].pow(2).sum() + out["forces"].pow(2).sum()
        loss.backward()
        model.zero_grad(set_to_none=True)
    else:
        with torch.no_grad():
            model(batch)


def _measure(kind, shape, num_atoms, count, mode, repeats, threads, queue):
    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(threads)
    batch = demo_batch(num_atoms, count)
    model = build(kind, shape)
    model.train(mode == "train")
    times = []
    for _ in range(1 + repeats):
        start = time.perf_counter()
        step(model, batch, mode)
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    queue.put({"median_s": statistics.median(times[1:]), "peak_gb": peak, "atoms": int(batch.natoms.sum())})


def measure(*args):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    p = ctx.Process(target=_measure, args=(*args, queue))
    p.start()
    p.join()
    return queue.get() if p.exitcode == 0 and not queue.empty() else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=list(SHAPES), default="31M")
    parser.add_argument("--atoms", type=int, default=38, help="atoms per structure (about)")
    parser.add_argument("--structures", type=int, default=2)
    parser.add_argument("--modes", default="train,inference")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads")
    parser.add_argument("--stress", action="store_true", help="also measure gradient forces + stress")
    args = parser.parse_args()

    kinds = ["direct", "gradient"] + (["gradient+stress"] if args.stress else [])
    print(f"{args.shape}, CPU, {args.threads} threads, {args.structures} x ~{args.atoms} atoms, median of {args.repeats}")
    print("| mode | forces | step time (s) | x direct | peak RSS (GB) | x direct |")
    print("| --- | --- | --- | --- | --- | --- |")
    for mode in args.modes.split(","):
        results = {k: measure(k, args.shape, args.atoms, args.structures, mode, args.repeats, args.threads) for k in kinds}
        base = results["direct"]
        for kind, r in results.items():
            if r is None:
                print(f"| {mode} | {kind} | failed | | | |")
                continue
            print(f"| {mode} | {kind} | {r['median_s']:.2f} | {r['median_s'] / base['median_s']:.2f} | "
                  f"{r['peak_gb']:.2f} | {r['peak_gb'] / base['peak_gb']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
