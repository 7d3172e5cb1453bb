"""Speed and memory of our EquiformerV2 against fairchem's own, on the same weights and inputs.

Each measurement runs in a fresh subprocess (so peak resident memory is that model's alone); the two
implementations alternate so machine noise hits both alike. Prints median step time of several
runs, the ratio ours/fairchem, peak memory, and the largest output difference (fixed edge frames).

    python benchmarks/compare_fairchem.py --shape 31M                    # one size, train + inference
    python benchmarks/compare_fairchem.py --shape 31M --modes inference --sweep 20,50,100,200,400,800 \
        --plot benchmarks/scaling.png
    python benchmarks/compare_fairchem.py --device cuda --shape 31M --atoms 80 --structures 8 --repeats 20

On a GPU the measurements run in this process, one after another (peak memory is the CUDA allocator's
peak, reset before each), timed with the device synchronised; float32 throughout (no TF32).
"""
from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
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
# Set by --fairchem-keeps-freed-memory, read in the measuring subprocesses.
FAIRCHEM_KEEPS_FREED_MEMORY = "COMPARE_FAIRCHEM_KEEPS_FREED_MEMORY"
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


def build(impl: str, shape: str, seed: int = 0, **overrides):
    """fairchem's HydraModel of ``impl`` ("fairchem" or "ours") with the published ``shape``; ``overrides``
    go to the backbone."""
    # registers fairchem's names (setup_imports would import every fairchem model, and what they need)
    import fairchem.core.models.equiformer_v2.equiformer_v2  # noqa: F401
    import fairchem.core.models.equiformer_v2.heads  # noqa: F401
    from fairchem.core.models.base import HydraModel

    logging.disable(logging.WARNING)
    torch = __import__("torch")
    torch.manual_seed(seed)
    backbone, energy, forces = NAMES[impl]
    model = HydraModel(
        backbone={"model": backbone, **COMMON, **SHAPES[shape], **overrides},
        heads={"energy": {"module": energy}, "forces": {"module": forces}},
    )
    if impl == "fairchem":
        from fairchem_equiformerv2.so3.frames import edge_frames

        # the same (deterministic in eval, random in training) frames as ours, built the same way
        model.backbone._init_edge_rot_mat = lambda data, ei, vec: edge_frames(vec, random=model.training)
    return model


def same_weights(fairchem_model, ours):
    from fairchem_equiformerv2.tools.checkpoints import load_fairchem_weights

    load_fairchem_weights(ours, fairchem_model.state_dict())


def demo_batch(num_atoms: int, count: int, device: str = "cpu"):
    """``count`` slabs of about ``num_atoms`` atoms as one fairchem batch on ``device``."""
    from fairchem.core.common.data_parallel import data_list_collater
    from fairchem.core.preprocessing import AtomsToGraphs

    a2g = AtomsToGraphs(r_energy=False, r_forces=False, r_distances=False, r_edges=False, r_fixed=True)
    return data_list_collater([a2g.convert(s) for s in structures(num_atoms, count)], otf_graph=True).to(device)


def step(model, batch, mode: str) -> None:
    """One training step (forward + backward of energy and forces) or one inference (no gradients)."""
    import torch

    if mode == "train":
        out = model(batch)
        loss = out["energy"]["energy"].pow(2).sum() + out["forces"]["forces"].pow(2).sum()
        loss.backward()
        model.zero_grad(set_to_none=True)
    else:
        with torch.no_grad():
            model(batch)


def synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def timed_steps(model, batch, mode: str, device: str, repeats: int, warmup: int = 3) -> float:
    """Median seconds of ``repeats`` steps after ``warmup`` untimed ones."""
    times = []
    for _ in range(warmup + repeats):
        synchronize(device)
        start = time.perf_counter()
        step(model, batch, mode)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[warmup:])


def perturb(model, scale: float) -> None:
    """Adds ``N(0, scale^2)`` to every parameter: away from the initial values (zero biases, unit
    norms), as after training."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))


def _measure(impl, shape, num_atoms, count, mode, repeats, threads, device, queue):
    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(threads)
    if impl == "fairchem" and os.environ.get(FAIRCHEM_KEEPS_FREED_MEMORY) == "1":
        from fairchem_equiformerv2.runtime import glibc_keeps_freed_memory

        glibc_keeps_freed_memory()  # the malloc setting ours makes (runtime.configure) when built
    batch = demo_batch(num_atoms, count, device)
    model = build(impl, shape).to(device)
    model.train(mode == "train")
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    median = timed_steps(model, batch, mode, device, repeats, warmup=3 if cuda else 1)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    result = {"median_s": median, "peak_gb": peak, "atoms": int(batch.natoms.sum())}
    result["gflop"] = step_flops(model, batch, mode) / 1e9
    queue.put(result)


def step_flops(model, batch, mode) -> float:
    """Matrix-multiply FLOPs of one step (torch's FlopCounterMode: mm, bmm, addmm, ...; elementwise
    work such as SiLU is not counted). Inference is counted with gradients enabled (the same matmuls):
    newer torch's counter fails under no_grad."""
    from torch.utils.flop_counter import FlopCounterMode

    from fairchem_equiformerv2.nn.ops.dense import FLOP_FORMULAS

    counter = FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS)
    with counter:
        if mode == "train":
            step(model, batch, mode)
        else:
            model(batch)
    return float(counter.get_total_flops())


def _matmul_rates(threads, device, queue):
    """The machine's dense float32 matmul rates (GFLOP/s): best of 5 square GEMMs (2048 on CPU, 8192 on
    GPU), ``{"torch": torch's a @ b}``, on the CPU also ``"onednn"``: the products ours runs
    (``nn/ops/dense.py``; on AMD CPUs torch's MKL runs AVX2 code, oneDNN AVX-512)."""
    import torch

    from fairchem_equiformerv2.nn.ops import dense

    torch.set_num_threads(threads)
    n = 8192 if device.startswith("cuda") else 2048
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    gemms = {"torch": lambda: a @ b}
    if not device.startswith("cuda") and dense.onednn_available():
        gemms["onednn"] = lambda: dense.onednn_linear(a, b.T, None)
    rates = {}
    for name, product in gemms.items():
        product()

        def gemm():
            product()
            synchronize(device)

        rates[name] = 2 * n**3 / min(_timed(gemm) for _ in range(5)) / 1e9
    from fairchem_equiformerv2 import runtime

    route = None if device.startswith("cuda") else runtime.configure().matmul
    queue.put((rates, route and (route.route, str(route))))


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class _Result:
    """A queue of one item, for measurements run in this process."""

    def put(self, value):
        self.value = value


def _in_subprocess(target, *args):
    """Run ``target(*args, queue)`` in a fresh process; None if it died (e.g. out of memory).
    On a GPU (``args[-1]`` the device) in this process instead: the allocator's peak is per process."""
    if str(args[-1]).startswith("cuda"):
        import torch

        result = _Result()
        try:
            target(*args, result)
        except torch.cuda.OutOfMemoryError:
            return None
        finally:
            torch.cuda.empty_cache()
        return result.value
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    p = ctx.Process(target=target, args=(*args, queue))
    p.start()
    p.join()
    return queue.get() if p.exitcode == 0 and not queue.empty() else None


def measure(impl, shape, num_atoms, count, mode, repeats, threads, device="cpu"):
    return _in_subprocess(_measure, impl, shape, num_atoms, count, mode, repeats, threads, device)


def _max_difference(shape, num_atoms, count, device, queue):
    queue.put(max_difference(shape, num_atoms, count, device))


def max_difference(shape, num_atoms, count, device="cpu"):
    """Largest |ours - fairchem| / max |fairchem| of energy and forces, same weights and frames."""
    warnings.filterwarnings("ignore")
    batch = demo_batch(num_atoms, count, device)
    theirs, ours = build("fairchem", shape).to(device).eval(), build("ours", shape).to(device).eval()
    same_weights(theirs, ours)
    a, b = theirs(batch), ours(batch)
    return {k: ((a[k][k] - b[k][k]).abs().max() / a[k][k].abs().max()).item() for k in ("energy", "forces")}


def torch_device_name(device: str) -> str:
    import torch

    return torch.cuda.get_device_name(device)


def check_device(parser: argparse.ArgumentParser, device: str) -> None:
    """Stop with a usage error naming ``--device`` if it asks for a GPU torch cannot see."""
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {device}: torch sees no CUDA GPU here (torch {torch.__version__})")


def plot_sweep(sweep, title, ylabel, path):
    """Log-log plot of ``sweep`` = [(atoms, fairchem seconds, our seconds), ...] to the PNG ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    atoms, t_f, t_o = zip(*sweep)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.loglog(atoms, t_f, "o-", label="fairchem EquiformerV2")
    ax.loglog(atoms, t_o, "s-", label="fairchem-equiformerv2")
    ax.set_xticks(atoms)
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("atoms")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=list(SHAPES), default="31M")
    parser.add_argument("--atoms", type=int, default=38, help="atoms per structure (about)")
    parser.add_argument("--structures", type=int, default=2)
    parser.add_argument("--modes", default="train,inference")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N)")
    parser.add_argument("--sweep", default="", help="comma-separated atoms per structure: time one step at each")
    parser.add_argument("--sweep-mode", choices=["train", "inference"], default="inference",
                        help="what the sweep times (training at 800 atoms needs more than 24 GB for fairchem's model)")
    parser.add_argument("--plot", default="", help="PNG of step time against system size (with --sweep)")
    parser.add_argument("--json", default="", help="write the results here too")
    parser.add_argument("--fairchem-keeps-freed-memory", action="store_true",
                        help="give fairchem's model the glibc malloc setting ours makes (runtime.py)")
    args = parser.parse_args(argv)
    check_device(parser, args.device)
    if args.fairchem_keeps_freed_memory:
        os.environ[FAIRCHEM_KEEPS_FREED_MEMORY] = "1"

    results = {"shape": args.shape, "rows": []}
    dev = args.device
    where = torch_device_name(dev) if dev.startswith("cuda") else f"CPU, {args.threads} threads"
    memory = "peak CUDA memory" if dev.startswith("cuda") else "peak RSS"
    print(f"EquiformerV2 {args.shape}: {args.structures} structures of ~{args.atoms} atoms, {where}, median of {args.repeats}; "
          f"GB = {memory}" + ("; fairchem keeps freed memory too" if args.fairchem_keeps_freed_memory else ""))
    rates, route = _in_subprocess(_matmul_rates, args.threads, dev)
    rate = max(rates.values())  # the limit: the fastest dense GEMM this machine has
    if route is not None:  # every measurement process takes the route chosen here
        from fairchem_equiformerv2.runtime import CPU_MATMUL_ENV

        os.environ[CPU_MATMUL_ENV] = route[0]
        print(f"our CPU float32 matmul route: {route[1]}", flush=True)
    print(f"{'mode':10s} {'fairchem s':>11s} {'ours s':>9s} {'ratio':>7s} {'fairchem GB':>12s} {'ours GB':>8s} {'ratio':>6s}")
    for mode in args.modes.split(","):
        r = {impl: measure(impl, args.shape, args.atoms, args.structures, mode, args.repeats, args.threads, dev)
             for impl in ("fairchem", "ours")}
        f, o = r["fairchem"], r["ours"]
        print(f"{mode:10s} {f['median_s']:11.3f} {o['median_s']:9.3f} {o['median_s'] / f['median_s']:7.2f} "
              f"{f['peak_gb']:12.2f} {o['peak_gb']:8.2f} {o['peak_gb'] / f['peak_gb']:6.2f}", flush=True)
        results["rows"].append({"mode": mode, **{f"{k}_{impl}": v for impl in r for k, v in r[impl].items()}})
    machine = ", ".join(f"{v:.0f} GFLOP/s through {k}" for k, v in rates.items())
    print(f"\nmatmul FLOPs per step and achieved rate (machine's dense float32 GEMM: {machine}; {where})")
    for row in results["rows"]:
        for impl in ("fairchem", "ours"):
            achieved = row[f"gflop_{impl}"] / row[f"median_s_{impl}"]
            print(f"{row['mode']:10s} {impl:9s} {row[f'gflop_{impl}']:8.1f} GFLOP  {achieved:6.1f} GFLOP/s  "
                  f"= {achieved / rate:.0%} of the GEMM rate")
    results["gemm_gflops"] = rates
    # in a subprocess too: children start from this process's peak memory (ru_maxrss survives fork + exec)
    diff = _in_subprocess(_max_difference, args.shape, args.atoms, args.structures, dev)
    print(f"max relative output difference (same weights and frames): energy {diff['energy']:.1e}, forces {diff['forces']:.1e}")
    results["max_difference"] = diff

    if args.sweep:
        sizes = [int(s) for s in args.sweep.split(",")]
        sweep = []
        mode = args.sweep_mode
        print(f"\n{mode} step against system size (1 structure):\n"
              f"{'atoms':>6s} {'fairchem s':>11s} {'ours s':>9s} {'ratio':>7s} {'fairchem GB':>12s} {'ours GB':>8s}")
        for n in sizes:
            r = {impl: measure(impl, args.shape, n, 1, mode, max(1, args.repeats - 1), args.threads, dev)
                 for impl in ("fairchem", "ours")}
            if r["ours"] is None:
                print(f"~{n} atoms: ours failed (out of memory?): sweep stops")
                break
            t = {impl: (r[impl]["median_s"], r[impl]["peak_gb"]) if r[impl] else (float("nan"),) * 2 for impl in r}
            sweep.append((r["ours"]["atoms"], t["fairchem"][0], t["ours"][0]))
            print(f"{sweep[-1][0]:6d} {t['fairchem'][0]:11.3f} {t['ours'][0]:9.3f} {t['ours'][0] / t['fairchem'][0]:7.2f} "
                  f"{t['fairchem'][1]:12.2f} {t['ours'][1]:8.2f}" + ("  (fairchem failed: out of memory?)" if r["fairchem"] is None else ""))
        results["sweep"] = sweep
        if args.plot:
            plot_sweep(sweep, f"EquiformerV2 {args.shape}, {where}", f"{mode} step (s)", args.plot)
            print(f"plot: {args.plot}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
