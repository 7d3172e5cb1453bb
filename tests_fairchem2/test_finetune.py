"""Fine-tuning a converted EquiformerV2 checkpoint with fairchem 2.x's own CLI and training unit
(``fairchem -c configs/fairchem2/finetune_demo.yaml``) on demo data in fairchem 2.x's format
(``fairchem-eqv2 demo-data --format aselmdb``); the result loads with ``load_predict_unit``."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
from ase.db import connect
from fairchem.core.calculate.ase_calculator import FAIRChemCalculator
from fairchem.core.units.mlip_unit import load_predict_unit
from fairchem.core.units.mlip_unit.api.inference import InferenceSettings

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "fairchem2" / "finetune_demo.yaml"
CHECKPOINT = Path(__file__).parent / "data" / "equiformer_v2_fairchem2.pt"
BIN = Path(sys.executable).parent


def run(command: list, log: Path) -> str:
    with open(log, "w") as out:
        result = subprocess.run([str(c) for c in command], stdout=out, stderr=subprocess.STDOUT, timeout=900)
    text = log.read_text()
    assert result.returncode == 0, "\n".join(text.splitlines()[-30:])
    return text


def test_finetune_with_fairchem2s_trainer(tmp_path):
    sizes = ["--num-s2ef-train", 24, "--num-s2ef-val", 8, "--num-s2ef-test", 2]
    run([BIN / "fairchem-eqv2", "demo-data", tmp_path / "data", "--format", "aselmdb", "--no-progress", *sizes],
        tmp_path / "data.log")
    for split in ("train", "val"):  # no lock or temporary file left beside the data
        assert sorted(p.name for p in (tmp_path / "data" / "s2ef" / split).iterdir()) == ["data.aselmdb", "metadata.npz"]
    assert len(connect(str(tmp_path / "data" / "s2ef" / "train" / "data.aselmdb"))) == 24

    log = run([BIN / "fairchem", "-c", CONFIG, f"starting_checkpoint={CHECKPOINT}", f"data_dir={tmp_path / 'data' / 's2ef'}",
               f"job.run_dir={tmp_path / 'runs'}", "steps=20", "eval_every=10"], tmp_path / "train.log")
    train = [float(x) for x in re.findall(r"'train/loss': ([-0-9.e]+)", log)]
    val = [float(x) for x in re.findall(r"val/loss: ([-0-9.e]+)", log)]
    assert len(train) == 4 and all(np.isfinite(train)) and min(train[1:]) < train[0]
    assert len(val) >= 2 and np.isfinite(val).all() and len(set(val)) > 1  # validation sees the weights move

    [fine_tuned] = (tmp_path / "runs").glob("*/checkpoints/final/inference_ckpt.pt")
    unit = load_predict_unit(str(fine_tuned), inference_settings=InferenceSettings(compile=False, merge_mole=False), device="cpu")
    atoms = connect(str(tmp_path / "data" / "s2ef" / "val" / "data.aselmdb")).get_atoms(id=1)
    atoms.calc = FAIRChemCalculator(unit, task_name="oc20")
    assert np.isfinite(atoms.get_potential_energy()) and np.isfinite(atoms.get_forces()).all()
