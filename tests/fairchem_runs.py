"""fairchem's command line on the demo data: helpers shared by the workflow and launcher tests.

The runs are tiny (32 training frames, 2 layers, lmax 2): a few seconds to a minute each, most of it
fairchem's start-up (about 10 s per command).
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
DEMO_S2EF = CONFIGS / "demo" / "s2ef.yml"
DEMO_IS2RE = CONFIGS / "demo" / "is2re.yml"
BIN = Path(sys.executable).parent
SEED = 0
N_TRAIN, N_VAL, N_TEST = 32, 8, 8  # 32 frames / batch 8 = 4 optimizer steps per epoch


def fairchem_cmd() -> list[str]:
    exe = BIN / "fairchem"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "fairchem.core._cli"]


def eqv2_cmd() -> list[str]:
    exe = BIN / "fairchem-eqv2"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "fairchem_equiformerv2.tools.cli"]


def run(cmd: list[str], log: Path, env: dict | None = None, timeout: int = 600, cwd: Path | None = None):
    """Run a command, its output into `log`; fail the test with the log's tail if it fails."""
    with open(log, "w") as out:
        proc = subprocess.run(
            [str(c) for c in cmd], stdout=out, stderr=subprocess.STDOUT, env=env, timeout=timeout, cwd=cwd
        )
    if proc.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-40:])
        pytest.fail(f"{shlex.join(map(str, cmd))} failed ({proc.returncode}):\n{tail}")
    return log.read_text()


def base_env(**extra) -> dict:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # two ranks share the CPU cores: no oversubscription
    env.update(extra)
    return env


def val_metrics(log: str) -> dict[float, dict[str, float]]:
    """{epoch: metrics} of the validations fairchem logged (base_trainer ... forces_mae ...)."""
    out = {}
    for line in log.splitlines():
        if "base_trainer.py" in line and "_mae:" in line and "epoch:" in line:
            m = dict(re.findall(r"(\w+): ([-+0-9.eE]+(?:e[-+]\d+)?)", line.split("(INFO):", 1)[1]))
            out[float(m["epoch"])] = {k: float(v) for k, v in m.items()}
    return out


def train_steps(log: str) -> dict[int, tuple[float, float]]:
    """{step: (loss, lr)} of the training steps fairchem logged (with --print-every=1)."""
    out = {}
    for line in log.splitlines():
        if "ocp_trainer.py" in line and " step: " in line:
            m = dict(re.findall(r"(\w+): ([-+0-9.eE]+)", line.split("(INFO):", 1)[1]))
            out[int(float(m["step"]))] = (float(m["loss"]), float(m["lr"]))
    return out


def relaxation_config(model: dict, src) -> dict:
    """A ``fairchem --mode run-relaxations`` config: ``model`` (a checkpoint's ``config["model"]``) relaxing
    the IS2RE LMDB ``src`` for 5 LBFGS steps, with positions written."""
    return {
        "trainer": "ocp", "model": model, "logger": "tensorboard",
        "dataset": {"relax": {"format": "lmdb", "src": str(src)}},
        "outputs": {"energy": {"shape": 1, "level": "system"},
                    "forces": {"irrep_dim": 1, "level": "atom", "train_on_free_atoms": True, "eval_on_free_atoms": True}},
        "loss_functions": [{"energy": {"fn": "mae", "coefficient": 1}}, {"forces": {"fn": "l2mae", "coefficient": 100}}],
        "evaluation_metrics": {"metrics": {"energy": ["mae"], "forces": ["mae"]}},
        "optim": {"batch_size": 1, "eval_batch_size": 2, "num_workers": 0, "lr_initial": 1e-4, "scheduler": "Null"},
        "task": {"relaxation_steps": 5, "relaxation_fmax": 0.05, "write_pos": True,
                 "relax_opt": {"maxstep": 0.04, "memory": 50, "damping": 1.0, "alpha": 70.0}},
    }


def model_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    return {re.sub(r"^(module\.)+", "", k): v.float() for k, v in state.items()}


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    from fairchem_equiformerv2.tools.demo_data import make_demo_data

    out = tmp_path_factory.mktemp("demo_data")
    make_demo_data(
        out,
        seed=SEED,
        s2ef_sizes={"train": N_TRAIN, "val": N_VAL, "test": N_TEST},
        is2re_sizes={"train": 16, "val": 4, "test": 4},
        progress=False,
    )
    return out


def s2ef_args(data: Path, run_dir: Path, timestamp: str, *extra) -> list[str]:
    """Arguments of a small, fast, deterministic demo run (fairchem's command-line overrides)."""
    return [
        "--config-yml", DEMO_S2EF, "--cpu", "--seed", SEED, "--print-every", 1,
        "--run-dir", run_dir, "--timestamp-id", timestamp,
        f"--dataset.train.src={data}/s2ef/train", f"--dataset.val.src={data}/s2ef/val",
        # 4 steps per epoch: 0.5 warm-up epochs = 2 steps (fairchem's cosine schedule divides by it)
        "--optim.scheduler_params.warmup_epochs=0.5",
        *extra,
    ]


