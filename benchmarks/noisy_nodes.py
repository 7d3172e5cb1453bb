"""Noisy Nodes vs. the same model without it, on demo IS2RE data (EMT relaxations), several seeds.

Trains configs/demo/is2re.yml (baseline) and configs/demo/is2re_noisy_nodes.yml (the same model and
optimizer + Noisy Nodes) with fairchem's own CLI and trainer, for each seed, and prints the relaxed-
energy MAE on the validation split (EMA weights, as fairchem validates) as mean ± std over seeds; saves
a plot of the validation curves (mean ± std band per method) and the raw numbers as JSON.

    python benchmarks/noisy_nodes.py                               # 300 train / 60 val, 3 seeds
    python benchmarks/noisy_nodes.py --seeds 0 1 2 3 4 --epochs 20 --jobs 2   # longer: ~4x the time

Runs go two at a time by default (``--jobs``), each with one thread; ``pos_std`` is measured on the
training split and ``decay_steps`` set to the whole run, as the configs' comments prescribe.
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
CONFIGS = {"baseline": ROOT / "configs" / "demo" / "is2re.yml",
           "noisy_nodes": ROOT / "configs" / "demo" / "is2re_noisy_nodes.yml"}


def fairchem_cmd() -> list[str]:
    exe = Path(sys.executable).parent / "fairchem"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "fairchem.core._cli"]


def val_curve(log: str) -> dict[float, float]:
    """{epoch: val energy_mae} from fairchem's validation log lines."""
    out = {}
    for line in log.splitlines():
        if "base_trainer.py" in line and "energy_mae:" in line and "epoch:" in line:
            m = dict(re.findall(r"(\w+): ([-+0-9.eE]+)", line.split("(INFO):", 1)[1]))
            out[float(m["epoch"])] = float(m["energy_mae"])
    return out


def make_data(out: Path, n_train: int, n_val: int, seed: int) -> Path:
    from fairchem_equiformerv2.demo_data import make_demo_data

    marker = out / f"done_{n_train}_{n_val}_{seed}"
    if not marker.exists():
        make_demo_data(out, seed=seed, s2ef_sizes={"train": 1, "val": 1, "test": 1},
                       is2re_sizes={"train": n_train, "val": n_val, "test": 1}, progress=False)
        marker.touch()
    return out / "is2re"


def energy_stats(src: Path) -> tuple[float, float]:
    from fairchem.core.datasets import LmdbDataset

    dataset = LmdbDataset({"src": str(src)})
    energies = [float(dataset[i].y_relaxed) for i in range(len(dataset))]
    return statistics.fmean(energies), statistics.pstdev(energies)


def train(method: str, seed: int, data: Path, work: Path, args, extra: list[str]) -> dict:
    run_dir = work / f"{method}_seed{seed}"
    log_path = work / f"{method}_seed{seed}.log"
    cmd = fairchem_cmd() + [
        "--mode", "train", "--config-yml", str(CONFIGS[method]), "--cpu", "--seed", str(seed),
        "--run-dir", str(run_dir), "--timestamp-id", "run", "--print-every", "1000",
        f"--dataset.train.src={data}/train", f"--dataset.val.src={data}/val",
        f"--optim.max_epochs={args.epochs}", f"--optim.batch_size={args.batch_size}",
        f"--optim.eval_batch_size={args.batch_size}", f"--optim.scheduler_params.warmup_epochs={args.warmup_epochs}",
        *extra,
    ]
    if method == "noisy_nodes":
        cmd += [f"--model.backbone.noisy_nodes.{k}={v}" for k, v in args.noisy_nodes.items()]
    start = time.time()
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    with open(log_path, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    log = log_path.read_text()
    if proc.returncode != 0:
        raise RuntimeError(f"{method} seed {seed} failed, see {log_path}:\n{log[-3000:]}")
    curve = val_curve(log)
    return {"method": method, "seed": seed, "curve": curve, "final": curve[max(curve)], "best": min(curve.values()),
            "seconds": time.time() - start}


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def plot(results: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for method, color in (("baseline", "tab:blue"), ("noisy_nodes", "tab:orange")):
        runs = [r for r in results if r["method"] == method]
        epochs = sorted(runs[0]["curve"])
        values = np.array([[r["curve"][e] for e in epochs] for r in runs])
        mean, std = values.mean(0), values.std(0, ddof=1) if len(runs) > 1 else np.zeros(len(epochs))
        for v in values:
            ax.plot(epochs, v, color=color, alpha=0.25, lw=0.8)
        label = "EquiformerV2" if method == "baseline" else "EquiformerV2 + Noisy Nodes"
        ax.plot(epochs, mean, color=color, lw=2, label=f"{label} (mean of {len(runs)} seeds)")
        ax.fill_between(epochs, mean - std, mean + std, color=color, alpha=0.2)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation relaxed-energy MAE (eV)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/eqv2_noisy_nodes_bench"))
    parser.add_argument("--plot", type=Path, default=ROOT / "benchmarks" / "noisy_nodes.png")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--n-train", type=int, default=300)
    parser.add_argument("--n-val", type=int, default=60)
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--warmup-epochs", type=float, default=0.5)
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="extra fairchem overrides for both methods, e.g. model.backbone.num_layers=1")
    args = parser.parse_args()

    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    data = make_data(work / "data", args.n_train, args.n_val, args.data_seed)
    from fairchem_equiformerv2.noisy_nodes import displacement_std

    pos_std = displacement_std(data / "train")
    mean, stdev = energy_stats(data / "train")
    steps = -(-args.n_train // args.batch_size) * args.epochs
    args.noisy_nodes = {"pos_std": round(pos_std, 4), "decay_steps": steps}
    extra = [f"--dataset.train.transforms.normalizer.energy.mean={mean}",
             f"--dataset.train.transforms.normalizer.energy.stdev={stdev}"] + [f"--{kv}" for kv in args.set]
    print(f"data: {args.n_train} train / {args.n_val} val systems ({time.time() - t0:.0f} s); "
          f"energy mean {mean:.3f} std {stdev:.3f} eV; displacement std {pos_std:.3f} A; "
          f"{steps} optimizer steps per run", flush=True)

    jobs = [(method, seed) for seed in args.seeds for method in ("baseline", "noisy_nodes")]
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda job: train(*job, data, work, args, extra), jobs))
    for r in results:
        print(f"  {r['method']:12s} seed {r['seed']}: final {r['final']:.4f}  best {r['best']:.4f} eV  ({r['seconds']:.0f} s)")

    rows = []
    for method in ("baseline", "noisy_nodes"):
        runs = [r for r in results if r["method"] == method]
        rows.append((method, mean_std([r["final"] for r in runs]), mean_std([r["best"] for r in runs])))
    print(f"\nValidation relaxed-energy MAE (eV), {len(args.seeds)} seeds, {args.epochs} epochs, "
          f"{args.n_train} train / {args.n_val} val:")
    print("| model | final epoch | best epoch |\n|---|---|---|")
    for method, (fm, fs), (bm, bs) in rows:
        name = "EquiformerV2" if method == "baseline" else "EquiformerV2 + Noisy Nodes"
        print(f"| {name} | {fm:.4f} ± {fs:.4f} | {bm:.4f} ± {bs:.4f} |")
    title = (f"demo IS2RE (EMT), {args.n_train} train / {args.n_val} val, {args.epochs} epochs, "
             f"seeds {args.seeds}")
    plot(results, args.plot, title)
    (work / "results.json").write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k not in ("work_dir", "plot")},
                                                    "results": results}, indent=1, default=str))
    print(f"\nplot: {args.plot}\nraw: {work / 'results.json'}\ntotal {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
