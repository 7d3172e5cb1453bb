"""DeNS vs. the same model without it, on the demo S2EF data (EMT trajectories), several seeds.

Trains configs/demo/s2ef.yml (baseline) and configs/demo/s2ef_dens.yml (the same model and optimizer
with the DeNS backbone, heads and objective) with fairchem's own CLI and trainer, for each seed, and
prints the validation force and energy MAE (EMA weights, clean inputs, as fairchem validates) as
mean ± std over seeds; saves a plot of the validation force-MAE curves and the raw numbers as JSON.

    python benchmarks/dens.py                                  # 200 train / 50 val frames, 3 seeds, 8 epochs
    python benchmarks/dens.py --seeds 0 1 2 3 4 --epochs 20    # longer

Runs go two at a time by default (``--jobs``), each with one thread.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"baseline": ROOT / "configs" / "demo" / "s2ef.yml", "dens": ROOT / "configs" / "demo" / "s2ef_dens.yml"}
LABELS = {"baseline": "EquiformerV2", "dens": "EquiformerV2 + DeNS"}


def fairchem_cmd() -> list[str]:
    exe = Path(sys.executable).parent / "fairchem"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "fairchem.core._cli"]


def val_curves(log: str) -> dict[float, dict[str, float]]:
    """{epoch: {"forces_mae", "energy_mae"}} from fairchem's validation log lines."""
    out = {}
    for line in log.splitlines():
        if "base_trainer.py" in line and "forces_mae:" in line and "epoch:" in line:
            m = dict(re.findall(r"(\w+): ([-+0-9.eE]+)", line.split("(INFO):", 1)[1]))
            out[float(m["epoch"])] = {"forces_mae": float(m["forces_mae"]), "energy_mae": float(m["energy_mae"])}
    return out


def make_data(out: Path, n_train: int, n_val: int, seed: int) -> Path:
    from fairchem_equiformerv2.tools.demo_data import make_demo_data

    marker = out / f"done_{n_train}_{n_val}_{seed}"
    if not marker.exists():
        make_demo_data(out, seed=seed, s2ef_sizes={"train": n_train, "val": n_val, "test": 1},
                       is2re_sizes={"train": 1, "val": 1, "test": 1}, progress=False)
        marker.touch()
    return out / "s2ef"


def train(method: str, seed: int, data: Path, work: Path, args) -> dict:
    run_dir = work / f"{method}_seed{seed}"
    log_path = work / f"{method}_seed{seed}.log"
    cmd = fairchem_cmd() + [
        "--mode", "train", "--config-yml", str(CONFIGS[method]), "--cpu", "--seed", str(seed),
        "--run-dir", str(run_dir), "--timestamp-id", "run", "--print-every", "1000",
        f"--dataset.train.src={data}/train", f"--dataset.val.src={data}/val",
        f"--optim.max_epochs={args.epochs}", *[f"--{kv}" for kv in args.set],
    ]
    start = time.time()
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    with open(log_path, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    log = log_path.read_text()
    if proc.returncode != 0:
        raise RuntimeError(f"{method} seed {seed} failed, see {log_path}:\n{log[-3000:]}")
    curve = val_curves(log)
    last = curve[max(curve)]
    best = min(curve.values(), key=lambda m: m["forces_mae"])
    return {"method": method, "seed": seed, "curve": curve, "final": last, "best_forces": best,
            "seconds": time.time() - start}


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def plot(results: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for method, color in (("baseline", "tab:blue"), ("dens", "tab:orange")):
        runs = [r for r in results if r["method"] == method]
        epochs = sorted(runs[0]["curve"])
        values = np.array([[r["curve"][e]["forces_mae"] for e in epochs] for r in runs])
        mean = values.mean(0)
        std = values.std(0, ddof=1) if len(runs) > 1 else np.zeros(len(epochs))
        for v in values:
            ax.plot(epochs, v, color=color, alpha=0.25, lw=0.8)
        ax.plot(epochs, mean, color=color, lw=2, label=f"{LABELS[method]} (mean of {len(runs)} seeds)")
        ax.fill_between(epochs, mean - std, mean + std, color=color, alpha=0.2)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation force MAE (eV/Å)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/eqv2_dens_bench"))
    parser.add_argument("--plot", type=Path, default=ROOT / "benchmarks" / "dens.png")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--n-train", type=int, default=200)
    parser.add_argument("--n-val", type=int, default=50)
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="extra fairchem overrides for both methods, e.g. optim.lr_initial=0.002")
    args = parser.parse_args(argv)

    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    data = make_data(work / "data", args.n_train, args.n_val, args.data_seed)
    print(f"data: {args.n_train} train / {args.n_val} val frames ({time.time() - t0:.0f} s)", flush=True)

    jobs = [(method, seed) for seed in args.seeds for method in ("baseline", "dens")]
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda job: train(*job, data, work, args), jobs))
    for r in results:
        print(f"  {r['method']:8s} seed {r['seed']}: final forces {r['final']['forces_mae']:.4f} eV/A, "
              f"energy {r['final']['energy_mae']:.4f} eV  ({r['seconds']:.0f} s)")

    print(f"\nValidation MAE, {len(args.seeds)} seeds, {args.epochs} epochs, {args.n_train} train / {args.n_val} val "
          "frames, final epoch (mean ± std):")
    print("| model | forces (eV/Å) | energy (eV) | best-epoch forces (eV/Å) |\n|---|---|---|---|")
    for method in ("baseline", "dens"):
        runs = [r for r in results if r["method"] == method]
        (fm, fs), (em, es) = (mean_std([r["final"][k] for r in runs]) for k in ("forces_mae", "energy_mae"))
        bm, bs = mean_std([r["best_forces"]["forces_mae"] for r in runs])
        print(f"| {LABELS[method]} | {fm:.4f} ± {fs:.4f} | {em:.4f} ± {es:.4f} | {bm:.4f} ± {bs:.4f} |")
    title = f"demo S2EF (EMT), {args.n_train} train / {args.n_val} val frames, {args.epochs} epochs, seeds {args.seeds}"
    plot(results, args.plot, title)
    (work / "results.json").write_text(json.dumps(
        {"args": {k: v for k, v in vars(args).items() if k not in ("work_dir", "plot")}, "results": results},
        indent=1, default=str))
    print(f"\nplot: {args.plot}\nraw: {work / 'results.json'}\ntotal {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
