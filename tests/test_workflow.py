"""The fairchem workflow end to end, with fairchem's own trainers, on the CPU.

* every config in configs/ loads and builds with the plugin's classes (published shapes: 31M, 83M);
* train -> checkpoint -> predict -> submission on the demo data with the tiny demo model;
* the IS2RE demo config trains and predicts.

Launchers (local DDP, SLURM, preemption) are in test_launchers.py.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from fairchem_runs import (  # noqa: F401  (demo_data is a fixture)
    CONFIGS, DEMO_IS2RE, DEMO_S2EF, N_TEST, N_TRAIN, SEED, base_env, demo_data, eqv2_cmd, fairchem_cmd, run, s2ef_args,
    val_metrics,
)

from fairchem_equiformerv2.tools.demo_data import zero_force_mae


# --------------------------------------------------------------------------------------------
# configs
# --------------------------------------------------------------------------------------------
ALL_CONFIGS = sorted(CONFIGS.rglob("*.yml"))


def test_configs_present():
    names = {str(p.relative_to(CONFIGS)) for p in ALL_CONFIGS}
    assert {
        "s2ef/equiformer_v2.yml", "s2ef/equiformer_v2_31M.yml", "s2ef/equiformer_v2_153M.yml",
        "oc22/equiformer_v2.yml", "is2re/equiformer_v2.yml", "demo/s2ef.yml", "demo/is2re.yml",
    } <= names


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_config_is_fairchem_hydra_with_plugin_classes(path):
    from fairchem.core.common.registry import registry
    from fairchem.core.common.utils import load_config, setup_imports

    setup_imports()
    config, duplicates_warning, duplicates_error = load_config(str(path))
    assert not duplicates_error
    for key in ("trainer", "dataset", "outputs", "loss_functions", "evaluation_metrics", "optim", "model"):
        assert key in config, key
    # the cosine LR schedule; equiformerv2_energy breaks on fractional warmup_epochs in fairchem 1.10
    assert config["trainer"] == "equiformerv2_forces"
    assert config["logger"] == "tensorboard"
    model = config["model"]
    assert model["name"] == "hydra"
    noisy_nodes = model["backbone"]["model"] == "fairchem_equiformerv2.NoisyNodesBackbone"
    dens = model["backbone"]["model"] == "fairchem_equiformerv2.DeNSBackbone"  # DeNS: its own heads
    assert noisy_nodes or dens or model["backbone"]["model"] == "fairchem_equiformerv2.EquiformerV2Backbone"
    prefix = "fairchem_equiformerv2.DeNS" if dens else "fairchem_equiformerv2."
    heads = {name: head["module"] for name, head in model["heads"].items()}
    energy_head = heads.pop("energy")
    conservative = energy_head == "fairchem_equiformerv2.ConservativeHead"  # energy and its gradients
    assert conservative or energy_head == f"{prefix}EnergyHead"
    if noisy_nodes:
        assert heads.pop("noisy_nodes") == "fairchem_equiformerv2.NoisyNodesHead"
    if model["backbone"].get("regress_forces", True) and not conservative:
        assert heads.pop("forces") == f"{prefix}ForceHead"
    if "stress" in heads:  # the OMat24 DeNS recipes: a decomposed (isotropic + anisotropic) stress head
        assert heads.pop("stress") == f"{prefix}StressHead"
    if conservative:  # the forces are the normalised energy's gradient: same stdev, zero mean
        normalizer = config["dataset"]["train"]["transforms"]["normalizer"]
        assert normalizer["forces"]["mean"] == 0 and normalizer["forces"]["stdev"] == normalizer["energy"]["stdev"]
    assert not heads
    # fairchem resolves the dotted names by itself (no registration needed)
    from fairchem_equiformerv2.model.backbone import EquiformerV2Backbone

    assert issubclass(registry.get_model_class(model["backbone"]["model"]), EquiformerV2Backbone)
    optim = config["optim"]
    assert optim["optimizer"] == "AdamW" and optim["scheduler_params"]["lambda_type"] == "cosine"
    assert optim["load_balancing"] == "atoms" and optim["clip_grad_norm"] > 0 and optim["ema_decay"] > 0


def _build(path: Path):
    from fairchem.core.common.registry import registry
    from fairchem.core.common.utils import setup_imports

    setup_imports()
    model = dict(yaml.safe_load(path.read_text())["model"])
    return registry.get_model_class(model.pop("name"))(**model)


@pytest.mark.parametrize("path", sorted((CONFIGS / "demo").glob("*.yml")), ids=lambda p: p.name)
def test_demo_configs_build_without_warnings(path, caplog):
    """The demo configs are what a newcomer runs first: none of the plugin's warnings (they set
    num_distance_basis: 32 once, which fairchem's model ignores, and warned on every use)."""
    from fairchem.core.common.registry import registry
    from fairchem.core.common.utils import load_config, setup_imports

    setup_imports()
    model = dict(load_config(str(path))[0]["model"])  # with the config's includes
    with caplog.at_level("WARNING", logger="fairchem_equiformerv2"):
        registry.get_model_class(model.pop("name"))(**model)
    assert [r.getMessage() for r in caplog.records if r.name.startswith("fairchem_equiformerv2")] == []


@pytest.mark.slow
@pytest.mark.parametrize(
    "rel, millions",
    # the paper's sizes; 153M (153.6) and OC22 121M (121.5) build the same way but take ~15 s each
    [("s2ef/equiformer_v2_31M.yml", 31.06), ("s2ef/equiformer_v2.yml", 83.16)],
)
def test_published_model_sizes(rel, millions):
    model = _build(CONFIGS / rel)
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(millions, abs=0.01)


def test_demo_warmup_is_at_least_one_step(demo_data):
    """fairchem's EquiformerV2 schedule divides by int(warmup_epochs x steps per epoch)."""
    from fairchem.core.datasets import LmdbDataset

    for cfg_path, task in ((DEMO_S2EF, "s2ef"), (DEMO_IS2RE, "is2re")):
        optim = yaml.safe_load(cfg_path.read_text())["optim"]
        # the default demo data sizes (fairchem-eqv2 demo-data) the configs are tuned for
        from fairchem_equiformerv2.tools.demo_data import DEFAULT_IS2RE_SIZES, DEFAULT_S2EF_SIZES

        n_train = (DEFAULT_S2EF_SIZES if task == "s2ef" else DEFAULT_IS2RE_SIZES)["train"]
        steps = -(-n_train // optim["batch_size"])
        assert int(optim["scheduler_params"]["warmup_epochs"] * steps) >= 1, cfg_path
    assert len(LmdbDataset({"src": str(demo_data / "s2ef" / "train")})) == N_TRAIN


# --------------------------------------------------------------------------------------------
# train -> checkpoint -> predict -> submission
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_train_checkpoint_predict_submission(demo_data, tmp_path):
    run_dir = tmp_path / "run"
    log = run(
        fairchem_cmd() + ["--mode", "train"] + s2ef_args(demo_data, run_dir, "train", "--optim.max_epochs=4"),
        tmp_path / "train.log", env=base_env(),
    )
    ckpt_dir = run_dir / "checkpoints" / "train"
    assert (ckpt_dir / "checkpoint.pt").is_file() and (ckpt_dir / "best_checkpoint.pt").is_file()
    metrics = val_metrics(log)
    assert sorted(metrics) == [1.0, 2.0, 3.0, 4.0]
    # it learns: the force MAE drops below that of predicting zero forces (16 steps only)
    zero = zero_force_mae(demo_data / "s2ef" / "val" / "data.lmdb")
    assert metrics[4.0]["forces_mae"] < zero, (metrics[4.0]["forces_mae"], zero)
    assert metrics[4.0]["forces_mae"] < metrics[1.0]["forces_mae"]

    run(
        fairchem_cmd() + ["--mode", "predict", "--checkpoint", ckpt_dir / "best_checkpoint.pt"]
        + s2ef_args(demo_data, run_dir, "predict", f"--dataset.test.src={demo_data}/s2ef/test"),
        tmp_path / "predict.log", env=base_env(),
    )
    pred = run_dir / "results" / "predict" / "s2ef_predictions.npz"
    with np.load(pred, allow_pickle=True) as p:
        assert len(p["ids"]) == N_TEST and p["energy"].reshape(-1).shape == (N_TEST,)
        assert p["forces"].shape[1] == 3 and np.isfinite(p["forces"]).all()
        assert len(p["chunk_idx"]) == N_TEST - 1

    # EvalAI: every split, ids unique across splits -> demo test as OC22 'id', demo val as 'ood'
    run(
        fairchem_cmd() + ["--mode", "predict", "--checkpoint", ckpt_dir / "best_checkpoint.pt"]
        + s2ef_args(demo_data, run_dir, "predict_val", f"--dataset.test.src={demo_data}/s2ef/val"),
        tmp_path / "predict_val.log", env=base_env(),
    )
    out = tmp_path / "submission.npz"
    run(
        eqv2_cmd() + ["make-submission", "--dataset", "OC22", "--out-path", out, "--id", pred,
                      "--ood", run_dir / "results" / "predict_val" / "s2ef_predictions.npz"],
        tmp_path / "submission.log",
    )
    with np.load(out) as s:  # loads without pickle: EvalAI's format
        assert {"id_ids", "id_energy", "id_forces", "id_chunk_idx", "ood_ids"} <= set(s.files)
        # ids are <sid>_<fid>; demo test systems count from 2,000,000, val from 1,000,000
        assert all(re.fullmatch(r"2\d{6}_\d+", i) for i in s["id_ids"].tolist())
        assert all(re.fullmatch(r"1\d{6}_\d+", i) for i in s["ood_ids"].tolist())
        assert s["id_energy"].shape == (N_TEST, 1) and s["id_chunk_idx"].shape == (N_TEST - 1,)


@pytest.mark.slow
def test_is2re_demo_trains_and_predicts(demo_data, tmp_path):
    run_dir = tmp_path / "run"
    common = [
        "--config-yml", DEMO_IS2RE, "--cpu", "--seed", SEED, "--run-dir", run_dir,
        f"--dataset.train.src={demo_data}/is2re/train", f"--dataset.val.src={demo_data}/is2re/val",
        "--optim.max_epochs=2", "--optim.scheduler_params.warmup_epochs=0.5",
    ]
    run(fairchem_cmd() + ["--mode", "train", "--timestamp-id", "train"] + common, tmp_path / "train.log",
        env=base_env())
    ckpt = run_dir / "checkpoints" / "train" / "checkpoint.pt"
    run(fairchem_cmd() + ["--mode", "predict", "--timestamp-id", "predict", "--checkpoint", ckpt] + common
        + [f"--dataset.test.src={demo_data}/is2re/test"], tmp_path / "predict.log", env=base_env())
    (pred,) = (run_dir / "results" / "predict").glob("*_predictions.npz")  # s2ef_...: named by the trainer
    with np.load(pred, allow_pickle=True) as p:
        assert len(p["ids"]) == 4 and np.isfinite(p["energy"]).all() and "forces" not in p.files
