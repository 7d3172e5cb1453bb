"""A conservative model through fairchem 1.10's own workflow: train (``equiformerv2_forces``, with the
force loss reaching the weights through the energy's gradient), predict, run-relaxations, and ASE
through ``OCPCalculator``; configs/demo/s2ef_conservative.yml on the tiny demo data."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from fairchem_runs import (  # noqa: F401  (demo_data is a fixture)
    CONFIGS, SEED, base_env, demo_data, fairchem_cmd, relaxation_config, run, train_steps, val_metrics,
)

CONSERVATIVE = CONFIGS / "demo" / "s2ef_conservative.yml"


def args(data, run_dir, timestamp, *extra) -> list:
    return [
        "--config-yml", CONSERVATIVE, "--cpu", "--seed", SEED, "--print-every", 1,
        "--run-dir", run_dir, "--timestamp-id", timestamp,
        f"--dataset.train.src={data}/s2ef/train", f"--dataset.val.src={data}/s2ef/val",
        "--optim.scheduler_params.warmup_epochs=0.5", *extra,
    ]


@pytest.mark.slow
def test_conservative_train_predict_relax(demo_data, tmp_path):
    run_dir = tmp_path / "run"
    log = run(fairchem_cmd() + ["--mode", "train"] + args(demo_data, run_dir, "train", "--optim.max_epochs=4"),
              tmp_path / "train.log", env=base_env())
    metrics = val_metrics(log)
    assert sorted(metrics) == [1.0, 2.0, 3.0, 4.0]
    # 16 steps on 32 frames are too few to see learning (the losses of these batches vary 4x); that the
    # force loss reaches the weights is test_conservative.py's second-derivative test, and the learning
    # on the demo data is measured by benchmarks/conservative_learning.py
    steps = train_steps(log)
    assert sorted(steps) == list(range(1, 17)) and all(np.isfinite(loss) for loss, _ in steps.values())
    checkpoint = run_dir / "checkpoints" / "train" / "best_checkpoint.pt"

    run(fairchem_cmd() + ["--mode", "predict", "--checkpoint", checkpoint]
        + args(demo_data, run_dir, "predict", f"--dataset.test.src={demo_data}/s2ef/test"),
        tmp_path / "predict.log", env=base_env())
    with np.load(run_dir / "results" / "predict" / "s2ef_predictions.npz", allow_pickle=True) as p:
        assert p["forces"].shape[1] == 3 and np.isfinite(p["forces"]).all() and np.abs(p["forces"]).max() > 0

    # fairchem's relaxations (OCPCalculator's trainer, under torch.no_grad)
    model = torch.load(checkpoint, weights_only=False)["config"]["model"]
    config = relaxation_config(model, demo_data / "is2re" / "val")
    (tmp_path / "relax.yml").write_text(yaml.safe_dump(config))
    run(fairchem_cmd() + ["--mode", "run-relaxations", "--config-yml", tmp_path / "relax.yml",
                          "--checkpoint", checkpoint, "--cpu", "--run-dir", tmp_path / "relax"],
        tmp_path / "relax.log", env=base_env())
    (result,) = (tmp_path / "relax" / "results").glob("*/relaxed_positions.npz")
    assert np.isfinite(np.load(result)["pos"]).all()

    # ASE: OCPCalculator's forces are minus the gradient of its energy (float32, 1e-3 A steps)
    import fairchem_equiformerv2
    from ase.optimize import BFGS

    from fairchem_equiformerv2.tools.demo_structures import random_system

    atoms = random_system(np.random.default_rng(1))
    atoms.calc = fairchem_equiformerv2.calculator(checkpoint, seed=0)
    forces = atoms.get_forces().copy()
    i = len(atoms) - 1
    energies = []
    for step in (1e-3, -1e-3):
        moved = atoms.copy()
        moved.calc = atoms.calc
        moved.positions[i] += [0.0, 0.0, step]
        energies.append(moved.get_potential_energy())
    numeric = -(energies[0] - energies[1]) / 2e-3
    assert abs(numeric - forces[i, 2]) <= 0.05 * np.abs(forces).max() + 1e-3
    start = atoms.get_potential_energy()
    BFGS(atoms, logfile=None).run(fmax=0.01, steps=5)
    assert atoms.get_potential_energy() <= start + 1e-6  # a potential: BFGS does not climb it
