"""End to end through fairchem itself: demo data -> train (tiny SchNet) -> predict -> submission."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from fairchem_equiformerv2.demo_data import make_demo_data
from fairchem_equiformerv2.submission import make_submission

FAIRCHEM = [sys.executable, "-m", "fairchem.core._cli"]


def _s2ef_config(data: dict[str, Path]) -> dict:
    """fairchem's own SchNet (small), S2EF, reading the demo LMDBs like configs/demo/s2ef.yml does."""
    return {
        "trainer": "forces",  # -> prediction file s2ef_predictions.npz
        "dataset": {
            "train": {
                "format": "lmdb",
                "src": str(data["train"].parent),
                "key_mapping": {"y": "energy", "force": "forces"},
                "transforms": {"normalizer": {"energy": {"mean": 0.0, "stdev": 1.0}, "forces": {"mean": 0.0, "stdev": 1.0}}},
            },
            "val": {"src": str(data["val"].parent)},
        },
        "task": {"prediction_dtype": "float32"},
        "logger": "tensorboard",
        "outputs": {
            "energy": {"shape": 1, "level": "system"},
            "forces": {"irrep_dim": 1, "level": "atom", "train_on_free_atoms": True, "eval_on_free_atoms": True},
        },
        "loss_functions": [{"energy": {"fn": "mae", "coefficient": 1}}, {"forces": {"fn": "l2mae", "coefficient": 10}}],
        "evaluation_metrics": {"metrics": {"energy": ["mae"], "forces": ["mae"]}, "primary_metric": "forces_mae"},
        "model": {
            "name": "schnet", "hidden_channels": 8, "num_filters": 8, "num_interactions": 1, "num_gaussians": 8,
            "cutoff": 5.0, "use_pbc": True, "regress_forces": True, "otf_graph": True,
        },
        "optim": {
            "batch_size": 4, "eval_batch_size": 4, "load_balancing": "atoms", "num_workers": 0, "lr_initial": 0.001,
            "max_epochs": 1, "lr_gamma": 0.1, "lr_milestones": [1000], "warmup_steps": 1, "warmup_factor": 0.2,
        },
    }


def _fairchem(*args: str, cwd: Path) -> None:
    result = subprocess.run([*FAIRCHEM, *args, "--cpu"], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow
def test_fairchem_predictions_make_a_submission(tmp_path):
    paths = make_demo_data(
        tmp_path / "data", s2ef_sizes={"train": 8, "val": 4, "test": 4},
        is2re_sizes={"train": 1, "val": 1, "test": 1}, progress=False,
    )["s2ef"]
    config = tmp_path / "s2ef.yml"
    config.write_text(yaml.safe_dump(_s2ef_config(paths)))

    _fairchem("--mode", "train", "--config-yml", str(config), "--run-dir", "train", "--identifier", "t", cwd=tmp_path)
    checkpoint = next((tmp_path / "train").glob("checkpoints/*/checkpoint.pt"))
    predictions = {}
    for split, source in (("id", "test"), ("ood", "val")):  # the OC22 leaderboard has two splits
        run_dir = f"predict_{split}"
        _fairchem(
            "--mode", "predict", "--config-yml", str(config), "--run-dir", run_dir, "--identifier", "p",
            "--checkpoint", str(checkpoint), f"--dataset.test.src={paths[source]}", cwd=tmp_path,
        )
        (predictions[split],) = (tmp_path / run_dir).glob("results/*/s2ef_predictions.npz")

    out = make_submission(predictions, tmp_path / "submission.npz", dataset="OC22")
    with np.load(out) as submission:
        assert submission["id_ids"].tolist() == [f"2000000_{fid}" for fid in range(4)]
        assert submission["ood_energy"].shape == (4, 1) and submission["ood_energy"].dtype == np.float32
        assert submission["id_forces"].shape[1] == 3 and submission["id_chunk_idx"].shape == (3,)
