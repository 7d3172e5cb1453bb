"""Learning with gradient forces on the demo data: direct vs conservative from scratch vs fine-tuned.

For each seed, with fairchem's own CLI and its unmodified ``equiformerv2_forces`` trainer:

* ``direct``: configs/demo/s2ef.yml (EnergyHead + ForceHead), ``--epochs`` epochs;
* ``conservative``: configs/demo/s2ef_conservative.yml (ConservativeHead: forces = -dE/dx), the same
  model, optimizer and epochs, from scratch;
* ``fine-tuned``: the eSEN recipe (Fu et al. 2025): the ``direct`` run's best checkpoint made
  conservative (its backbone and energy network kept, the force head dropped:
  ``fairchem_equiformerv2.tools.conservative_checkpoint.to_conservative_checkpoint``), then trained ``--finetune-epochs`` more epochs with
  configs/demo/s2ef_conservative.yml's data, loss and optimizer (fairchem's ``finetune_config``).

Prints the validation force MAE and cosine (the best epoch by force MAE, which fairchem keeps as
``best_checkpoint.pt``), mean ± std over seeds, and the training time; saves the numbers as JSON.
Runs one at a time, one thread each (the machine is shared).

    python benchmarks/conservative_learning.py                      # 3 seeds: about 15 minutes on one core
    python benchmarks/conservative_learning.py --seeds 0 --epochs 4  # a quick look
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

from fairchem_equiformerv2.tools.conservative_checkpoint import to_conservative_checkpoint

ROOT = Path(__file__).resolve().parents[1]
DIRECT = ROOT / "configs" / "demo" / "s2ef.yml"
CONSERVATIVE = ROOT / "configs" / "demo" / "s2ef_conservative.yml"


def executable(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def val_metrics(log: str) -> list[dict[str, float]]:
    """Every validation line of a fairchem training log, as {metric: value}."""
    out = []
    lines = log.splitlines()
    for i, line in enumerate(lines):
        if "Evaluating on val" in line and i + 1 < len(lines):
            out.append({k: float(v) for k, v in re.findall(r"(\w+): ([-+0-9.eE]+)", lines[i + 1].split("(INFO):", 1)[-1])})
    return out


def train(config: Path, run_dir: Path, data: Path, seed: int, epochs: int, threads: int, extra: list[str] = ()) -> dict:
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # fairchem would resume from them
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = [executable("fairchem"), "--mode", "train", "--config-yml", str(config), "--cpu", "--seed", str(seed),
           "--run-dir", str(run_dir), "--timestamp-id", "train", f"--optim.max_epochs={epochs}",
           f"--dataset.train.src={data / 's2ef' / 'train'}", f"--dataset.val.src={data / 's2ef' / 'val'}", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    seconds = time.perf_counter() - start
    (run_dir / "train.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        sys.exit(f"training failed ({run_dir / 'train.log'}):\n" + (proc.stdout + proc.stderr)[-3000:])
    metrics = val_metrics(proc.stdout + proc.stderr)
    best = min(metrics, key=lambda m: m["forces_mae"])
    return {"forces_mae": best["forces_mae"], "forces_cosine": best["forces_cosine_similarity"],
            "energy_mae": best["energy_mae"], "seconds": seconds,
            "checkpoint": str(run_dir / "checkpoints" / "train" / "best_checkpoint.pt")}


def finetune_config(conservative_config: Path, starting_checkpoint: Path, path: Path) -> Path:
    """configs/demo/s2ef_conservative.yml with the model taken whole from ``starting_checkpoint``."""
    config = yaml.safe_load(conservative_config.read_text())
    config["model"] = {"name": "hydra", "pass_through_head_outputs": True, "otf_graph": True,
                       "finetune_config": {"starting_checkpoint": str(starting_checkpoint)}}
    path.write_text(yaml.safe_dump(config))
    return path


def mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/eqv2_conservative_learning"))
    parser.add_argument("--data", type=Path, default=None, help="demo data (default: made in the work dir)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=8, help="epochs of the direct and conservative runs")
    parser.add_argument("--finetune-epochs", type=int, default=4, help="conservative epochs after the direct run")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--models", nargs="+", default=["direct", "conservative", "fine-tuned"],
                        choices=["direct", "conservative", "fine-tuned"], help="which runs (fine-tuned needs direct)")
    parser.add_argument("--conservative-args", nargs="*", default=[], metavar="--KEY=VALUE",
                        help="a fairchem override for the conservative from-scratch runs, written with =: --conservative-args=--model.backbone.avg_num_nodes=16")
    args = parser.parse_args()

    work = args.work_dir
    data = args.data or work / "data"
    if not (data / "s2ef" / "train").exists():
        subprocess.run([executable("fairchem-eqv2"), "demo-data", str(data), "--no-progress"], check=True)
    if "fine-tuned" in args.models and "direct" not in args.models:
        parser.error("--models fine-tuned needs direct (it starts from the direct run)")
    results: dict[str, list[dict]] = {name: [] for name in args.models}
    for seed in args.seeds:
        if "conservative" in args.models:
            results["conservative"].append(train(
                CONSERVATIVE, work / f"conservative_{seed}", data, seed, args.epochs, args.threads, args.conservative_args
            ))
        if "direct" not in args.models:
            continue
        direct = train(DIRECT, work / f"direct_{seed}", data, seed, args.epochs, args.threads)
        results["direct"].append(direct)
        if "fine-tuned" not in args.models:
            continue
        start = work / f"finetune_{seed}" / "start.pt"
        start.parent.mkdir(parents=True, exist_ok=True)
        start.unlink(missing_ok=True)
        to_conservative_checkpoint(Path(direct["checkpoint"]), start, yaml.safe_load(CONSERVATIVE.read_text()))
        config = finetune_config(CONSERVATIVE, start, work / f"finetune_{seed}" / "config.yml")
        results["fine-tuned"].append(
            train(config, work / f"finetune_{seed}", data, seed, args.finetune_epochs, args.threads)
        )
        print(f"seed {seed}: " + ", ".join(f"{k} {v[-1]['forces_mae']:.3f}" for k, v in results.items()), flush=True)

    print(f"\nvalidation (demo data, {len(args.seeds)} seeds; best epoch by force MAE; mean ± std)"
          + (f"; conservative runs with {' '.join(args.conservative_args)}" if args.conservative_args else ""))
    print("| model | epochs | force MAE (eV/Å) | force cosine | energy MAE (eV) | training time (s) |")
    print("| --- | --- | --- | --- | --- | --- |")
    epochs = {"direct": f"{args.epochs}", "conservative": f"{args.epochs}",
              "fine-tuned": f"{args.epochs} direct + {args.finetune_epochs}"}
    for name, runs in results.items():
        print(f"| {name} | {epochs[name]} | {mean_std([r['forces_mae'] for r in runs])} | "
              f"{mean_std([r['forces_cosine'] for r in runs])} | {mean_std([r['energy_mae'] for r in runs])} | "
              f"{mean_std([r['seconds'] for r in runs])} |")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=1))


if __name__ == "__main__":
    main()
