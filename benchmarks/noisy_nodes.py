"""Noisy Nodes against the same model without it on demo IS2RE data (EMT relaxations): seeds, ablations,
the train-versus-validation gap and the auxiliary head's error.

Every run is fairchem's own CLI and trainer on a config written from configs/demo/is2re.yml (baseline) or
configs/demo/is2re_noisy_nodes.yml (the same model and optimizer + Noisy Nodes), resized by ``--model``:

    python benchmarks/noisy_nodes.py            # the fair test: OC20-like data, 6-layer 64-channel model
    python benchmarks/noisy_nodes.py --model demo --recipe demo --n-train 300 --n-val 60 --epochs 8 \\
        --methods baseline noisy_nodes          # the demo model on the quick demo data

Methods (``--methods``; baseline and noisy_nodes take every ``--seeds``, the ablations the first seed):

* ``baseline``: EquiformerV2, energy only.
* ``noisy_nodes``: the reference recipe: probability 0.5, interpolation + 0.3 Å noise, L1 loss summed over
  x, y, z, target divided by the mean norm of (relaxed - corrupted input), coefficient 15 -> 1 over the run.
* ``aux_only``: probability 0: no corruption, only the auxiliary task (predict the relaxed displacement
  from the clean input, IS2RS-style).
* ``coefficient_1``: the auxiliary coefficient 1 throughout (no 15 -> 1 schedule).
* ``matched_noise``: noise std = the std of the data's relaxed displacement components.
* ``l2mae_std``: an L2-norm MAE and the target divided by that std (this plugin's earlier choices).

Printed per method (mean ± std over seeds; every finished seed of the method in ``--work-dir`` counts, so
``--methods aux_only --seeds 1`` adds a seed to an ablation): validation relaxed-energy MAE at the last and the best epoch,
the training-split MAE of the final model on clean inputs (EMA weights, fairchem's ``--mode validate``)
and the gap, and the auxiliary head's validation MAE against its zero-prediction level. Saves a plot
(``--plot``) and every run's numbers as JSON under ``--work-dir``; finished runs are not redone, so an
interrupted benchmark resumes. Runs go ``--jobs`` at a time, each with ``--threads`` threads.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"baseline": ROOT / "configs" / "demo" / "is2re.yml",
           "noisy_nodes": ROOT / "configs" / "demo" / "is2re_noisy_nodes.yml"}

#: ``--model`` presets: backbone fields and optimizer fields over the demo configs.
MODELS = {
    "demo": ({}, {}),
    "deep": (  # 6 layers, 64 channels, lmax 2; dropout as the published OC20 IS2RE config
        {"num_layers": 6, "sphere_channels": 64, "attn_hidden_channels": 64, "num_heads": 4,
         "attn_alpha_channels": 16, "attn_value_channels": 8, "ffn_hidden_channels": 128, "edge_channels": 64,
         "alpha_drop": 0.1, "drop_path_rate": 0.05},
        {"lr_initial": 0.001, "ema_decay": 0.99},
    ),
}

#: Noisy Nodes knobs per method (``None``: the baseline); "std" stands for the measured displacement std.
METHODS: dict[str, dict | None] = {
    "baseline": None,
    "noisy_nodes": {},
    "aux_only": {"probability": 0.0},
    "coefficient_1": {"coefficient_start": 1.0},
    "matched_noise": {"noise_std": "std"},
    "l2mae_std": {"loss": "l2mae", "pos_std": "std"},
}
LABELS = {"baseline": "EquiformerV2", "noisy_nodes": "+ Noisy Nodes", "aux_only": "+ auxiliary task only (p = 0)",
          "coefficient_1": "+ Noisy Nodes, coefficient 1", "matched_noise": "+ Noisy Nodes, noise = displacement std",
          "l2mae_std": "+ Noisy Nodes, L2MAE / std target"}
MULTI_SEED = ("baseline", "noisy_nodes")


def fairchem_cmd() -> list[str]:
    exe = Path(sys.executable).parent / "fairchem"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "fairchem.core._cli"]


def val_lines(log: str) -> list[dict[str, float]]:
    """The metrics of each of fairchem's validation log lines (``energy_mae: ..., epoch: ...``)."""
    out = []
    for line in log.splitlines():
        if "base_trainer.py" in line and "energy_mae:" in line and "epoch:" in line:
            out.append({k: float(v) for k, v in re.findall(r"(\w+): ([-+0-9.eE]+)", line.split("(INFO):", 1)[1])})
    return out


def make_data(out: Path, args) -> Path:
    from fairchem_equiformerv2.tools.demo_data import make_demo_data

    marker = out / f"done_{args.recipe}_{args.n_train}_{args.n_val}_{args.data_seed}"
    if not marker.exists():
        make_demo_data(out, seed=args.data_seed, s2ef_sizes={"train": 1, "val": 1, "test": 1},
                       is2re_sizes={"train": args.n_train, "val": args.n_val, "test": 1}, progress=False,
                       overwrite=True, is2re_recipe=args.recipe)
        marker.touch()
    return out / "is2re"


def data_statistics(data: Path, noise_std: float) -> dict[str, float]:
    from fairchem.core.datasets import LmdbDataset

    from fairchem_equiformerv2.model.denoising.noisy_nodes import mean_corrupted_target_norm
    from fairchem_equiformerv2.tools.noisy_nodes_scale import free_displacements

    dataset = LmdbDataset({"src": str(data / "train")})
    energies = [float(dataset[i].y_relaxed) for i in range(len(dataset))]
    displacement = free_displacements(data / "train")
    distances = displacement.norm(dim=1)
    return {"energy_mean": statistics.fmean(energies), "energy_std": statistics.pstdev(energies),
            "displacement_mean": float(distances.mean()), "displacement_median": float(distances.median()),
            "displacement_std": float(displacement.flatten().std()),
            "target_norm": mean_corrupted_target_norm(displacement, noise_std=noise_std),
            "val_displacement": free_displacements(data / "val")}


def write_config(method: str, data: Path, stats: dict, args, work: Path) -> Path:
    config = yaml.safe_load(CONFIGS["baseline" if METHODS[method] is None else "noisy_nodes"].read_text())
    backbone_fields, optim_fields = MODELS[args.model]
    config["model"]["backbone"].update(backbone_fields)
    config["dataset"]["train"]["src"] = str(data / "train")
    config["dataset"]["val"]["src"] = str(data / "val")
    config["dataset"]["train"]["transforms"]["normalizer"]["energy"] = {
        "mean": stats["energy_mean"], "stdev": stats["energy_std"]}
    steps = -(-args.n_train // args.batch_size) * args.epochs
    config["optim"].update(optim_fields, max_epochs=args.epochs, batch_size=args.batch_size,
                           eval_batch_size=args.batch_size)
    config["optim"]["scheduler_params"]["warmup_epochs"] = args.warmup_epochs
    if METHODS[method] is not None:
        knobs = {"pos_std": round(stats["target_norm"], 4), "decay_steps": steps, "loss": "l1"}
        knobs.update(METHODS[method])
        knobs = {k: (round(stats["displacement_std"], 4) if v == "std" else v) for k, v in knobs.items()}
        config["model"]["backbone"]["noisy_nodes"].update(knobs)
        for loss in config["loss_functions"]:
            if "noisy_nodes" in loss:
                loss["noisy_nodes"]["fn"] = "mae" if knobs["loss"] == "l1" else "l2mae"
        config["evaluation_metrics"]["metrics"]["noisy_nodes"] = ["mae"]
    path = work / "configs" / f"{method}.yml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def fairchem(args_list: list[str], log_path: Path, threads: int) -> str:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    with open(log_path, "w") as f:
        proc = subprocess.run(fairchem_cmd() + args_list, stdout=f, stderr=subprocess.STDOUT, env=env)
    log = log_path.read_text()
    if proc.returncode != 0:
        raise RuntimeError(f"fairchem {' '.join(args_list[:2])} failed, see {log_path}:\n{log[-3000:]}")
    return log


def run(method: str, seed: int, config: Path, data: Path, work: Path, args) -> dict:
    result_path = work / f"{method}_seed{seed}.json"
    if result_path.exists():
        return json.loads(result_path.read_text())
    run_dir = work / f"{method}_seed{seed}"
    start = time.time()
    common = ["--config-yml", str(config), "--cpu", "--seed", str(seed), "--timestamp-id", "run"]
    log = fairchem(["--mode", "train", *common, "--run-dir", str(run_dir), "--print-every", "1000"],
                   work / f"{method}_seed{seed}.log", args.threads)
    curve = val_lines(log)
    checkpoint = run_dir / "checkpoints" / "run" / "checkpoint.pt"
    train_log = fairchem(["--mode", "validate", *common, "--run-dir", str(run_dir / "on_train"),
                          "--checkpoint", str(checkpoint), f"--dataset.val.src={data / 'train'}"],
                         work / f"{method}_seed{seed}_on_train.log", args.threads)
    pos_std = yaml.safe_load(config.read_text())["model"]["backbone"].get("noisy_nodes", {}).get("pos_std")
    result = {"method": method, "seed": seed, "curve": curve, "on_train": val_lines(train_log)[-1],
              "pos_std": pos_std, "seconds": time.time() - start}
    result_path.write_text(json.dumps(result, indent=1))
    return result


def finished_runs(work: Path, methods: list[str]) -> list[dict]:
    """Every finished run of ``methods`` in ``work`` (its ``<method>_seed<k>.json``), by method and seed."""
    runs = [json.loads(path.read_text()) for method in methods for path in work.glob(f"{method}_seed*.json")]
    return sorted(runs, key=lambda r: (list(METHODS).index(r["method"]), r["seed"]))


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}"


def aux_ratio(result: dict, val_mean_abs_displacement: float) -> list[float]:
    """Per epoch: the auxiliary head's validation MAE over the MAE of predicting zero (1 = no better)."""
    zero = val_mean_abs_displacement / result["pos_std"]
    return [c["noisy_nodes_mae"] / zero for c in result["curve"]]


def report(results: list[dict], val_mean_abs_displacement: float) -> str:
    lines = ["| model | seeds | val, last epoch | val, best epoch | train, final model | gap (val - train) "
             "| auxiliary head, val, / zero-prediction MAE |", "|---|---|---|---|---|---|---|"]
    for method in METHODS:
        runs = [r for r in results if r["method"] == method]
        if not runs:
            continue
        last = [r["curve"][-1]["energy_mae"] for r in runs]
        best = [min(c["energy_mae"] for c in r["curve"]) for r in runs]
        train = [r["on_train"]["energy_mae"] for r in runs]
        aux = [aux_ratio(r, val_mean_abs_displacement)[-1] for r in runs if r["pos_std"]]
        lines.append(f"| {LABELS[method]} | {','.join(str(r['seed']) for r in runs)} | {mean_std(last)} | "
                     f"{mean_std(best)} | {mean_std(train)} | {mean_std([v - t for v, t in zip(last, train)])} | "
                     f"{mean_std(aux) if aux else '-'} |")
    return "\n".join(lines)


def plot(results: list[dict], val_mean_abs_displacement: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (ax_energy, ax_aux) = plt.subplots(1, 2, figsize=(12, 4.2))
    colors = dict(zip(METHODS, ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")))
    for method in METHODS:
        runs = [r for r in results if r["method"] == method]
        if not runs:
            continue
        epochs = [c["epoch"] for c in runs[0]["curve"]]
        style = {"color": colors[method], "lw": 2 if method in MULTI_SEED else 1.2,
                 "ls": "-" if method in MULTI_SEED else "--"}
        energy = np.array([[c["energy_mae"] for c in r["curve"]] for r in runs])
        label = f"{LABELS[method]} ({len(runs)} seed{'s' if len(runs) > 1 else ''})"
        ax_energy.plot(epochs, energy.mean(0), label=label, **style)
        if len(runs) > 1:
            ax_energy.fill_between(epochs, energy.min(0), energy.max(0), color=colors[method], alpha=0.15)
        train = np.mean([r["on_train"]["energy_mae"] for r in runs])
        ax_energy.scatter([epochs[-1] + 0.3], [train], color=colors[method], marker="v", s=30)
        if runs[0]["pos_std"]:
            aux = np.array([aux_ratio(r, val_mean_abs_displacement) for r in runs])
            ax_aux.plot(epochs, aux.mean(0), label=LABELS[method], **style)
    ax_aux.axhline(1.0, color="k", ls=":", label="predicting zero")
    ax_energy.set(xlabel="epoch", ylabel="relaxed-energy MAE (eV)",
                  title="validation (lines; band: min-max over seeds); final model on train split (▼)")
    ax_aux.set(xlabel="epoch", ylabel="MAE / MAE of predicting zero",
               title="auxiliary head on the validation split (clean inputs)")
    for ax in (ax_energy, ax_aux):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        ax.title.set_fontsize(8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/eqv2_noisy_nodes_bench"))
    parser.add_argument("--plot", type=Path, default=ROOT / "benchmarks" / "noisy_nodes.png")
    parser.add_argument("--model", choices=sorted(MODELS), default="deep")
    parser.add_argument("--recipe", choices=["demo", "oc20"], default="oc20", help="demo-data --is2re-recipe")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--n-train", type=int, default=400)
    parser.add_argument("--n-val", type=int, default=200)
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--warmup-epochs", type=float, default=1.0)
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    args = parser.parse_args()

    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    data = make_data(work / "data", args)
    noise_std = yaml.safe_load(CONFIGS["noisy_nodes"].read_text())["model"]["backbone"]["noisy_nodes"]["noise_std"]
    stats = data_statistics(data, noise_std)
    val_displacement = stats.pop("val_displacement")
    val_mean_abs_displacement = float(val_displacement.abs().mean())  # Å, per component: the zero-prediction MAE x pos_std
    print(f"data ({args.recipe} recipe): {args.n_train} train / {args.n_val} val systems ({time.time() - t0:.0f} s); "
          + ", ".join(f"{k} {v:.3f}" for k, v in stats.items()), flush=True)

    configs = {method: write_config(method, data, stats, args, work) for method in args.methods}
    jobs = [(m, s) for s in args.seeds for m in args.methods if m in MULTI_SEED]
    jobs += [(m, args.seeds[0]) for m in args.methods if m not in MULTI_SEED]
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(lambda job: run(*job, configs[job[0]], data, work, args), jobs))
    results = finished_runs(work, args.methods)  # these runs and any other seeds finished in the folder
    for r in results:
        print(f"  {r['method']:14s} seed {r['seed']}: val last {r['curve'][-1]['energy_mae']:.4f}, "
              f"train {r['on_train']['energy_mae']:.4f} eV ({r['seconds']:.0f} s)")

    print(f"\nRelaxed-energy MAE (eV), {args.model} model, {args.epochs} epochs, {args.n_train} train / "
          f"{args.n_val} val systems ({args.recipe} recipe):")
    print(report(results, val_mean_abs_displacement))
    title = (f"demo IS2RE ({args.recipe} recipe, EMT), {args.n_train} train / {args.n_val} val, "
             f"{args.model} model, {args.epochs} epochs")
    plot(results, val_mean_abs_displacement, args.plot, title)
    (work / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                    "data": stats, "val_mean_abs_displacement": val_mean_abs_displacement,
                                                    "results": results}, indent=1))
    print(f"\nplot: {args.plot}\nraw: {work / 'results.json'}\ntotal {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
