"""configs/omat24/equiformer_v2_*_dens_mptrj.yml, the translations of fairchem's published DeNS configs
(FAIR-Chem/fairchem configs/omat24/mptrj/eqV2_{31M,86M,153M}_dens_mptrj.yml, last changed in commit
2ab5831c74141c682453e528327449709908b05d): the published values, the model built by fairchem's
HydraModel (shrunk) with one training forward, and a short fairchem run of the 31M config."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import yaml
from fairchem_runs import CONFIGS, base_env, fairchem_cmd, run, train_steps, val_metrics
from structures import default_structures, to_batch

from fairchem_equiformerv2.model.denoising.dens_objective import DenoisingConfig

# the published values, read off FAIR-Chem/fairchem at 2ab5831c7
SIZES = {  # num_layers, lmax, mmax, energy loss coefficient, batch size per GPU
    "31M": (8, 4, 2, 5, 4),
    "86M": (10, 6, 4, 2.5, 8),
    "153M": (20, 6, 3, 2.5, 8),
}
# optim.denoising_pos_params {prob: 0.5, fixed_noise_std: True, std: 0.1, num_steps: 50, std_low: None,
# std_high: None} (corrupt_ratio, all_atoms not set: None, False), denoising_pos_coefficient: 10
PUBLISHED_DENS = DenoisingConfig(probability=0.5, noise_std=0.1, noise_schedule=False, num_steps=50,
                                 corrupt_ratio=None, all_atoms=False, coefficient=10, output_name="denoising")
PUBLISHED_BACKBONE = dict(
    max_neighbors=20, max_radius=12.0, max_num_elements=96, avg_num_nodes=31.16592360068011,
    avg_degree=61.94676351484548, sphere_channels=128, attn_hidden_channels=64, num_heads=8,
    attn_alpha_channels=64, attn_value_channels=16, ffn_hidden_channels=128, norm_type="layer_norm_sh",
    grid_resolution=18, edge_channels=128, num_distance_basis=512, alpha_drop=0.1, drop_path_rate=0.1,
    use_pbc_single=True, enforce_max_neighbors_strictly=False, use_force_encoding=True,
    use_noise_schedule_sigma_encoding=False,
)
SHRINK = dict(num_layers=2, sphere_channels=16, attn_hidden_channels=16, num_heads=2, attn_alpha_channels=8,
              attn_value_channels=4, ffn_hidden_channels=16, edge_channels=16)


def config_path(size: str):
    return CONFIGS / "omat24" / f"equiformer_v2_{size}_dens_mptrj.yml"


def load(size: str) -> dict:
    from fairchem.core.common.utils import load_config

    config, duplicates_warning, duplicates_error = load_config(str(config_path(size)))
    assert not duplicates_warning and not duplicates_error
    return config


@pytest.mark.parametrize("size", SIZES)
def test_published_values(size):
    config = load(size)
    layers, lmax, mmax, energy_coefficient, batch_size = SIZES[size]
    assert config["trainer"] == "equiformerv2_forces"  # the plain trainer: the model corrupts the batches
    backbone = config["model"]["backbone"]
    assert backbone["model"] == "fairchem_equiformerv2.DeNSBackbone" and config["model"]["pass_through_head_outputs"]
    assert DenoisingConfig(**backbone["denoising"]) == PUBLISHED_DENS
    assert (backbone["num_layers"], backbone["lmax_list"], backbone["mmax_list"]) == (layers, [lmax], [mmax])
    assert {k: backbone[k] for k in PUBLISHED_BACKBONE} == PUBLISHED_BACKBONE
    losses = {k: v for loss in config["loss_functions"] for k, v in loss.items()}
    assert losses == {
        "energy": {"fn": "per_atom_mae", "coefficient": energy_coefficient},
        "forces": {"fn": "l2mae", "coefficient": 20},
        "stress_isotropic": {"fn": "mae", "coefficient": 5},
        "stress_anisotropic": {"fn": "mae", "reduction": "mean", "coefficient": 5},
        "denoising": {"fn": "l2mae", "coefficient": 1},  # the DeNS coefficient is in the denoising block
    }
    assert config["outputs"]["denoising"]["train_on_free_atoms"] is False
    optim = config["optim"]
    assert (optim["lr_initial"], optim["max_epochs"], optim["batch_size"], optim["eval_batch_size"]) == (2e-4, 150, batch_size, batch_size)
    assert optim["scheduler_params"] == {"lambda_type": "cosine", "warmup_factor": 0.2, "warmup_epochs": 0.1, "lr_min_factor": 0.01}
    assert (optim["optimizer"], optim["optimizer_params"], optim["clip_grad_norm"], optim["ema_decay"]) == ("AdamW", {"weight_decay": 0.001}, 100, 0.999)
    assert not any(key.startswith(("use_denoising_pos", "denoising_pos")) for key in optim)  # DeNS-trainer keys moved
    transforms = config["dataset"]["train"]["transforms"]
    assert transforms["normalizer"]["fit"] == {
        "targets": {"forces": {"mean": 0.0}, "stress_isotropic": {}, "stress_anisotropic": {}},
        "batch_size": 64, "num_batches": 10000,
    }
    assert transforms["element_references"]["fit"] == {"targets": ["energy"], "batch_size": 64, "num_batches": 10000}


def build(config: dict, **shrink):
    from fairchem.core.common.utils import setup_imports
    from fairchem.core.models.base import HydraModel

    setup_imports()
    torch.manual_seed(0)
    model = dict(config["model"])
    model.pop("name")
    model["backbone"] = {**model["backbone"], **shrink}
    return HydraModel(**model)


@pytest.mark.parametrize("size", SIZES)
def test_model_builds_and_trains_one_forward(size):
    """The config's model through fairchem's HydraModel (fewer layers and channels), with the published
    DeNS knobs; one training forward on a corrupted batch: every output finite, the noise predicted on
    the free atoms, the stress zero (use_denoising false), and a finite gradient."""
    model = build(load(size), **SHRINK)
    _, lmax, mmax, _, _ = SIZES[size]
    assert (model.backbone.lmax, model.backbone.mmax) == (lmax, mmax)
    assert model.backbone.denoising == PUBLISHED_DENS
    assert model.output_heads["energy"].use_denoising and not model.output_heads["stress"].use_denoising
    # force this batch's coin (probability 0.5) to corrupt
    model.backbone.denoising = dataclasses.replace(model.backbone.denoising, probability=1.0)
    batch = to_batch(default_structures())
    batch.forces = torch.randn(batch.pos.shape[0], 3, generator=torch.Generator().manual_seed(1))
    out = model.train()(batch)
    assert set(out) == {"energy", "forces", "stress_isotropic", "stress_anisotropic", "denoising"}
    assert all(torch.isfinite(v).all() for v in out.values())
    free = batch.fixed == 0
    assert (out["denoising"][free] != 0).all() and (out["denoising"][~free] == 0).all()
    assert (batch.denoising[free] != 0).all()  # the target: noise / 0.1 times the objective's scale
    assert (out["stress_isotropic"] == 0).all() and (out["stress_anisotropic"] == 0).all()
    assert (out["energy"] != 0).all()
    sum(v.sum() for v in out.values()).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().max() > 0 for g in (p.grad for p in model.output_heads["forces"].denoising_pos_block.parameters()))


def write_bulk_db(folder, n: int, seed: int):
    """``n`` rattled, strained EMT bulk crystals with energy, forces and stress: ``folder/data.db`` (an
    ASE database) and ``folder/metadata.npz`` (the atom counts ``load_balancing: atoms`` needs)."""
    from ase.build import bulk
    from ase.calculators.emt import EMT
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.db import connect

    folder.mkdir()
    rng = np.random.default_rng(seed)
    natoms = []
    with connect(folder / "data.db") as db:
        for i in range(n):
            metal = ["Cu", "Ni", "Al", "Pd"][i % 4]
            atoms = bulk(metal, cubic=True).repeat((1 + i % 2, 1, 1))
            atoms.set_cell(atoms.cell.array @ (np.eye(3) + 0.02 * rng.standard_normal((3, 3))), scale_atoms=True)
            atoms.rattle(0.05, seed=seed * 1000 + i)
            atoms.calc = EMT()
            energy, forces, stress = atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()
            atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces, stress=stress)
            db.write(atoms)
            natoms.append(len(atoms))
    np.savez(folder / "metadata.npz", natoms=np.array(natoms))
    return folder / "data.db"


@pytest.mark.slow
def test_fairchem_trains_the_31M_config(tmp_path):
    """The 31M config (shrunk, as a copy) through fairchem 1.10's plain trainer on a tiny EMT bulk ASE
    database: the normaliser and element references are fitted, every step's loss is finite and the
    (clean) validations report energy, forces and stress errors."""
    train, val = write_bulk_db(tmp_path / "train", 12, seed=0), write_bulk_db(tmp_path / "val", 4, seed=1)
    config = yaml.safe_load(config_path("31M").read_text())
    config["model"]["backbone"].update(SHRINK, lmax_list=[2], mmax_list=[2], max_radius=6.0)
    config["optim"].update(batch_size=4, eval_batch_size=4, num_workers=0, max_epochs=2, eval_every=3)
    config["optim"]["scheduler_params"]["warmup_epochs"] = 1  # 0.1 x 3 steps would be 0 warm-up steps
    for part in ("normalizer", "element_references"):
        config["dataset"]["train"]["transforms"][part]["fit"].update(batch_size=4, num_batches=3)
    (tmp_path / "dens.yml").write_text(yaml.safe_dump(config))
    run_dir = tmp_path / "run"
    log = run(fairchem_cmd() + [
        "--mode", "train", "--config-yml", tmp_path / "dens.yml", "--cpu", "--seed", 0, "--print-every", 1,
        "--run-dir", run_dir, "--timestamp-id", "dens",
        f"--dataset.train.src={train}", f"--dataset.val.src={val}",
    ], tmp_path / "train.log", env=base_env())
    assert "Normalization values for output forces" in log
    steps = train_steps(log)
    assert sorted(steps) == list(range(1, 7)) and all(np.isfinite(loss) for loss, _ in steps.values()), steps
    validations = val_metrics(log)
    assert validations
    for metrics in validations.values():
        for name in ("energy_mae", "forces_mae", "stress_mae", "stress_isotropic_mae", "stress_anisotropic_mae"):
            assert np.isfinite(metrics[name]), (name, metrics)
    state = torch.load(run_dir / "checkpoints" / "dens" / "checkpoint.pt", map_location="cpu", weights_only=False)["state_dict"]
    assert int(next(v for k, v in state.items() if k.endswith("backbone.dens_step"))) == 6
