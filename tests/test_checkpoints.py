"""Checkpoints: fairchem EquiformerV2 checkpoints (both layouts) -> the plugin's, loaded by fairchem's
own OCPCalculator; the trainer-name trap; deterministic inference; refusals.

fairchem's checkpoints are made here the way fairchem makes them: an ``OCPTrainer`` around
fairchem's built-in EquiformerV2 (random, perturbed weights), an EMA stepped a few times, normalizers
and element references, then ``trainer.save()``.
"""
from __future__ import annotations

import copy
import logging
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from ase.build import add_adsorbate, fcc100
from ase.constraints import FixAtoms
from ase.optimize import BFGS
from fairchem.core.common.relaxation.ase_utils import OCPCalculator
from fairchem.core.models.equiformer_v2.equiformer_v2 import EquiformerV2Backbone as FairchemBackbone
from fairchem.core.models.equiformer_v2.equiformer_v2_deprecated import EquiformerV2 as FairchemLegacy
from fairchem.core.modules.normalization.element_references import LinearReferences
from fairchem.core.modules.normalization.normalizer import create_normalizer
from fairchem.core.trainers import OCPTrainer
from fairchem_runs import relaxation_config
from oracle import FAIRCHEM_HEADS, SMALL
from structures import default_structures, slab_with_adsorbate

from fairchem_equiformerv2.tools.checkpoints import (
    CheckpointError,
    build_model,
    calculator,
    convert_checkpoint,
    convert_config,
    fix_checkpoint,
    plugin_key,
    read_checkpoint,
    trainable_parameter_names,
)
from fairchem_equiformerv2.errors import UserInputError
from fairchem_equiformerv2.so3.frames import edge_frames

warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=DeprecationWarning)

ENERGY_TOLERANCE, FORCE_TOLERANCE = 1e-5, 1e-4  # relative, float32
BACKBONE = {**SMALL, "num_layers": 1, "lmax_list": [2], "mmax_list": [2], "max_neighbors": 12, "max_radius": 5.0,
            "alpha_drop": 0.1, "drop_path_rate": 0.05}
OUTPUTS = {
    "energy": {"shape": 1, "level": "system"},
    "forces": {"irrep_dim": 1, "level": "atom", "train_on_free_atoms": True, "eval_on_free_atoms": True},
}
LOSSES = [{"energy": {"fn": "mae", "coefficient": 1}}, {"forces": {"fn": "l2mae", "coefficient": 10}}]
METRICS = {"metrics": {"energy": ["mae"], "forces": ["mae"]}, "primary_metric": "forces_mae"}
OPTIM = {"optimizer": "AdamW", "lr_initial": 1e-3, "scheduler": "Null", "ema_decay": 0.9, "batch_size": 1}


@pytest.fixture(autouse=True)
def deterministic_fairchem_frames(monkeypatch):
    """fairchem rolls each edge frame randomly; OCPCalculator builds its own model, so give
    fairchem's classes our deterministic frames (the ones our model uses in eval mode)."""
    frames = lambda self, data, edge_index, edge_vec: edge_frames(edge_vec)  # noqa: E731
    monkeypatch.setattr(FairchemBackbone, "_init_edge_rot_mat", frames)
    monkeypatch.setattr(FairchemLegacy, "_init_edge_rot_mat", frames)
    logging.disable(logging.WARNING)
    yield
    logging.disable(logging.NOTSET)


def _fairchem_trainer(model: dict, tmp_path, name: str, outputs: dict = OUTPUTS, losses: list = LOSSES) -> OCPTrainer:
    torch.manual_seed(0)
    trainer = OCPTrainer(
        task={}, model=copy.deepcopy(model), outputs=copy.deepcopy(outputs), dataset=[{"format": "lmdb", "src": str(tmp_path / "train")}],
        optimizer=dict(OPTIM), loss_functions=losses, evaluation_metrics=METRICS, identifier="", local_rank=0, run_dir=str(tmp_path),
        is_debug=True, cpu=True, name=name, inference_only=True, logger="tensorboard",
    )
    trainer.load_optimizer()
    trainer.load_extras()  # the EMA, as in training
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    for _ in range(3):  # shadow weights differ from the weights
        with torch.no_grad():
            for p in trainer.model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        trainer.ema.update()
    trainer.ema.store()  # as validation leaves it: collected_params filled too
    trainer.normalizers = {"energy": create_normalizer(mean=-1.5, rmsd=2.0), "forces": create_normalizer(mean=0.0, rmsd=2.0)}
    trainer.elementrefs = {"energy": LinearReferences(element_references=torch.linspace(-3, 1, 100))}
    trainer.is_debug = False
    trainer.config["cmd"]["checkpoint_dir"] = str(tmp_path)
    return trainer


def save_fairchem_hydra(tmp_path, backbone: dict | None = None) -> str:
    """fairchem's hydra EquiformerV2, saved by its trainer as an ``s2ef`` run (config["trainer"] == "s2ef")."""
    model = {
        "name": "hydra", "pass_through_head_outputs": True, "otf_graph": True,
        "backbone": {"model": "equiformer_v2_backbone", **BACKBONE, **(backbone or {})},
        "heads": {h: {"module": FAIRCHEM_HEADS[h], "output_name": h} for h in ("energy", "forces")},
    }
    return _fairchem_trainer(model, tmp_path, "s2ef").save(checkpoint_file="fairchem_hydra.pt")


def save_fairchem_legacy(tmp_path) -> str:
    """fairchem's single-model ``equiformer_v2`` as the public OC20 checkpoints have it: config
    ``model: equiformer_v2`` + ``model_attributes``, an old-style task/dataset section, weights
    under ``module.`` with ``energy_block``/``force_block``, old normalizer names."""
    trainer = _fairchem_trainer({"name": "equiformer_v2", **BACKBONE}, tmp_path, "s2ef")
    path = trainer.save(checkpoint_file="fairchem_legacy.pt")
    checkpoint = torch.load(path, weights_only=True)
    config = checkpoint["config"]
    attributes = config.pop("model")
    attributes.pop("name")
    for key in ("outputs", "loss_functions", "evaluation_metrics"):
        config.pop(key)
    config.update(
        trainer="forces", model="equiformer_v2", model_attributes=attributes,
        task={"dataset": "trajectory_lmdb", "train_on_free_atoms": True, "eval_on_free_atoms": True},
        dataset={"src": "data/s2ef/2M/train", "normalize_labels": True, "target_mean": -1.5, "target_std": 2.0,
                 "grad_target_mean": 0.0, "grad_target_std": 2.0},
    )
    checkpoint["state_dict"] = {"module." + k: v for k, v in checkpoint["state_dict"].items()}
    checkpoint["normalizers"] = {
        "target": {"mean": torch.tensor(-1.5), "std": torch.tensor(2.0)},
        "grad_target": {"mean": torch.tensor(0.0), "std": torch.tensor(2.0)},
    }
    checkpoint["elementrefs"] = {}
    torch.save(checkpoint, path)
    return path


def predictions(calc, structures):
    out = []
    for atoms in structures:
        atoms = atoms.copy()
        atoms.calc = calc
        out.append((atoms.get_potential_energy(), atoms.get_forces()))
    return out


def assert_identical(expected, got):
    assert len(expected) == len(got)
    for (e0, f0), (e1, f1) in zip(expected, got):
        assert e1 == e0 and np.array_equal(f1, f0)


def assert_close(expected, got):
    for (e0, f0), (e1, f1) in zip(expected, got):
        assert abs(e1 - e0) <= ENERGY_TOLERANCE * abs(e0), (e0, e1)
        assert np.linalg.norm(f1 - f0) <= FORCE_TOLERANCE * np.linalg.norm(f0), np.abs(f1 - f0).max()


# --- conversion -------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["hydra", "legacy"])
def test_converted_checkpoint_matches_fairchem_in_ocpcalculator(tmp_path, layout):
    src = save_fairchem_hydra(tmp_path) if layout == "hydra" else save_fairchem_legacy(tmp_path)
    dst = convert_checkpoint(src, tmp_path / "converted.pt")

    converted = torch.load(dst, weights_only=True)
    model = converted["config"]["model"]
    assert model["backbone"]["model"] == "fairchem_equiformerv2.EquiformerV2Backbone"
    assert {h: c["module"] for h, c in model["heads"].items()} == {
        "energy": "fairchem_equiformerv2.EnergyHead", "forces": "fairchem_equiformerv2.ForceHead"}
    # "s2ef" (a task name fairchem stores as the trainer) -> "ocp"; a real trainer name is kept
    assert converted["config"]["trainer"] == {"hydra": "ocp", "legacy": "forces"}[layout]
    assert converted["normalizers"] == torch.load(src, weights_only=True)["normalizers"]

    # fairchem's original needs trainer= (the saved "s2ef" is not a trainer); ours loads as it is
    expected = predictions(OCPCalculator(checkpoint_path=src, cpu=True, trainer="forces"), default_structures())
    got = predictions(OCPCalculator(checkpoint_path=str(dst), cpu=True), default_structures())
    assert_close(expected, got)


def test_ema_is_mapped_by_parameter_name(tmp_path):
    # shared atom-edge embedding: our parameter order differs from fairchem's there
    src = save_fairchem_hydra(tmp_path, {"share_atom_edge_embedding": True})
    original = torch.load(src, weights_only=True)
    converted = torch.load(convert_checkpoint(src, tmp_path / "converted.pt"), weights_only=True)

    from fairchem.core.models.base import HydraModel

    config = {k: v for k, v in original["config"]["model"].items() if k != "name"}
    theirs = [n for n, p in HydraModel(**config).named_parameters() if p.requires_grad]
    ours = trainable_parameter_names(build_model(converted["config"]["model"]))
    assert sorted(map(plugin_key, theirs)) == sorted(ours)
    position = {plugin_key(n): i for i, n in enumerate(theirs)}
    for field in ("shadow_params", "collected_params"):
        assert len(converted["ema"][field]) == len(ours)
        for i, name in enumerate(ours):
            assert torch.equal(converted["ema"][field][i], original["ema"][field][position[name]]), (field, name)
    assert "optimizer" not in converted and "ema" in converted


def test_converted_ema_loads_into_the_plugin_trainer(tmp_path):
    src = save_fairchem_hydra(tmp_path)
    dst = convert_checkpoint(src, tmp_path / "converted.pt")
    converted = torch.load(dst, weights_only=True)
    trainer = OCPTrainer(
        task={}, model=converted["config"]["model"], outputs=OUTPUTS, dataset=[{"src": ""}], optimizer=dict(OPTIM),
        loss_functions=LOSSES, evaluation_metrics=METRICS, identifier="", local_rank=0, run_dir=str(tmp_path), is_debug=True,
        cpu=True, inference_only=True, logger="tensorboard",
    )
    trainer.load_optimizer()
    trainer.load_extras()
    trainer.load_checkpoint(str(dst))  # the way fairchem resumes / fine-tunes from a checkpoint
    trainer.ema.copy_to()
    shadow = dict(zip(trainable_parameter_names(trainer.model), converted["ema"]["shadow_params"]))
    for name, p in trainer.model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p.detach(), shadow[name])


def test_convert_config_handles_old_dataset_lists_and_finetune_config():
    config = {"trainer": "s2ef", "dataset": [{"src": "a"}, {"src": "b"}], "model": {
        "name": "hydra", "finetune_config": {"starting_checkpoint": "x.pt"},
        "backbone": {"model": "equiformer_v2_backbone"}, "heads": {"e": {"module": "equiformer_v2_energy_head"}}}}
    new = convert_config(config)
    assert new["dataset"] == {"src": "a"} and "finetune_config" not in new["model"]
    assert new["model"]["heads"]["e"]["module"] == "fairchem_equiformerv2.EnergyHead"
    assert new["converted_from"]["model"]["backbone"]["model"] == "equiformer_v2_backbone"
    assert new["trainer"] == "ocp"


# --- checkpoints trained with the plugin, the trainer-name trap ---------------------------------

@pytest.fixture(scope="module")
def plugin_checkpoint(tmp_path_factory):
    """A checkpoint as fairchem's trainer saves it for the plugin's model (config["trainer"] == "s2ef")."""
    tmp_path = tmp_path_factory.mktemp("plugin")
    logging.disable(logging.WARNING)
    model = {
        "name": "hydra", "pass_through_head_outputs": True, "otf_graph": True,
        "backbone": {"model": "fairchem_equiformerv2.EquiformerV2Backbone", **BACKBONE},
        "heads": {"energy": {"module": "fairchem_equiformerv2.EnergyHead"}, "forces": {"module": "fairchem_equiformerv2.ForceHead"}},
    }
    path = _fairchem_trainer(model, tmp_path, "s2ef").save(checkpoint_file="plugin.pt")
    logging.disable(logging.NOTSET)
    assert torch.load(path, weights_only=True)["config"]["trainer"] == "s2ef"
    return path


def test_trainer_name_trap_and_the_ways_around_it(plugin_checkpoint, tmp_path):
    with pytest.raises(RuntimeError, match="Failed to find the trainer 's2ef'"):
        OCPCalculator(checkpoint_path=plugin_checkpoint, cpu=True)
    structures = default_structures()[:1]
    expected = predictions(OCPCalculator(checkpoint_path=plugin_checkpoint, cpu=True, trainer="forces"), structures)
    assert_identical(expected, predictions(calculator(plugin_checkpoint), structures))
    fixed = fix_checkpoint(plugin_checkpoint, tmp_path / "fixed.pt")
    assert_identical(expected, predictions(OCPCalculator(checkpoint_path=str(fixed), cpu=True), structures))


def test_same_atoms_twice_bit_identical(plugin_checkpoint):
    calc = calculator(plugin_checkpoint)
    atoms = slab_with_adsorbate("Pt", "111", "CO", seed=3)
    first = predictions(calc, [atoms])[0]
    second = predictions(calc, [atoms])[0]
    third = predictions(calculator(plugin_checkpoint), [atoms])[0]  # a fresh calculator too
    assert_identical([first, first], [second, third])


def test_ase_relaxation_reaches_its_force_threshold(plugin_checkpoint):
    """BFGS with the plugin checkpoint through OCPCalculator, to fmax = 0.05 eV/A. The model has
    random weights (its direct forces need not be a gradient), so this is a case that converges:
    one free C atom above a fixed Cu(100) slab."""
    slab = fcc100("Cu", size=(2, 2, 2), vacuum=5.0)
    add_adsorbate(slab, "C", 1.8, "hollow")
    slab.pbc = True
    slab.set_constraint(FixAtoms(indices=list(range(len(slab) - 1))))
    slab.calc = calculator(plugin_checkpoint)
    start = slab.positions.copy()
    opt = BFGS(slab, logfile=None)
    assert opt.run(fmax=0.05, steps=60)
    assert np.linalg.norm(slab.get_forces(), axis=1).max() < 0.05
    assert opt.get_number_of_steps() > 0 and not np.allclose(slab.positions, start)


# --- refusals ----------------------------------------------------------------------------------

def test_refuses_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        convert_checkpoint(tmp_path / "nope.pt", tmp_path / "out.pt")
    assert issubclass(CheckpointError, UserInputError)


def test_refuses_truncated_file(plugin_checkpoint, tmp_path):
    data = open(plugin_checkpoint, "rb").read()
    path = tmp_path / "truncated.pt"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or"):
        read_checkpoint(path)
    with pytest.raises(CheckpointError, match="truncated or"):
        calculator(path)


def test_refuses_corrupted_file(plugin_checkpoint, tmp_path):
    with zipfile.ZipFile(plugin_checkpoint) as archive:  # the data of the largest tensor
        info = max(archive.infolist(), key=lambda i: i.file_size)
    data = bytearray(open(plugin_checkpoint, "rb").read())
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra) + info.file_size // 2
    data[start : start + 8] = bytes(255 - b for b in data[start : start + 8])
    path = tmp_path / "corrupted.pt"
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="fails its CRC check"):
        read_checkpoint(path)


def test_refuses_another_model_family(plugin_checkpoint, tmp_path):
    checkpoint = torch.load(plugin_checkpoint, weights_only=True)
    checkpoint["config"]["model"] = {"name": "schnet", "hidden_channels": 64}
    torch.save(checkpoint, tmp_path / "schnet.pt")
    with pytest.raises(CheckpointError, match="'schnet', not EquiformerV2"):
        convert_checkpoint(tmp_path / "schnet.pt", tmp_path / "out.pt")
    checkpoint["config"]["model"] = {"name": "hydra", "backbone": {"model": "escn_backbone"}, "heads": {}}
    torch.save(checkpoint, tmp_path / "escn.pt")
    with pytest.raises(CheckpointError, match="'escn_backbone', not EquiformerV2"):
        calculator(tmp_path / "escn.pt")


def test_refuses_config_weights_shape_mismatch(plugin_checkpoint, tmp_path):
    checkpoint = torch.load(plugin_checkpoint, weights_only=True)
    checkpoint["config"]["model"]["backbone"]["sphere_channels"] = 24
    torch.save(checkpoint, tmp_path / "mismatch.pt")
    with pytest.raises(CheckpointError, match=r"weights do not match .*atom_embedding.sphere_embedding.weight: \(90, 16\)"):
        calculator(tmp_path / "mismatch.pt")


def test_refuses_unknown_and_missing_weights(tmp_path):
    checkpoint = torch.load(save_fairchem_hydra(tmp_path), weights_only=True)
    state = checkpoint["state_dict"]
    prefix = "module." if next(iter(state)).startswith("module.") else ""
    state[prefix + "backbone.extra.weight"] = torch.zeros(3)
    del state[next(k for k in state if "force_block" in k)]
    torch.save(checkpoint, tmp_path / "bad_keys.pt")
    with pytest.raises(CheckpointError, match=r"unknown keys \['backbone.extra.weight'\].*missing keys \['output_heads.forces"):
        convert_checkpoint(tmp_path / "bad_keys.pt", tmp_path / "out.pt")


def test_refuses_python_objects_unless_trusted(plugin_checkpoint, tmp_path):
    checkpoint = torch.load(plugin_checkpoint, weights_only=True)
    checkpoint["val_metrics"] = {"energy_mae": {"metric": np.float64(0.5)}}  # as older OCP versions wrote
    torch.save(checkpoint, tmp_path / "numpy.pt")
    with pytest.raises(CheckpointError, match="weights_only=True.*trust=True"):
        read_checkpoint(tmp_path / "numpy.pt")
    assert read_checkpoint(tmp_path / "numpy.pt", trust=True)["val_metrics"]["energy_mae"]["metric"] == 0.5


def test_refuses_to_overwrite(plugin_checkpoint, tmp_path):
    (tmp_path / "out.pt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="exists"):
        convert_checkpoint(plugin_checkpoint, tmp_path / "out.pt")


def test_fairchem_run_relaxations_with_a_plugin_checkpoint(plugin_checkpoint, tmp_path):
    """``fairchem --mode run-relaxations`` (fairchem's batch LBFGS) on a plugin checkpoint writes
    relaxed positions for every system. Needs ASE < 3.24 (fairchem 1.10's OptimizableBatch)."""
    import subprocess
    import sys

    import numpy as np
    import yaml

    from fairchem_equiformerv2.tools.demo_data import make_demo_data

    paths = make_demo_data(tmp_path / "data", seed=0, s2ef_sizes={"train": 1, "val": 1, "test": 1},
                           is2re_sizes={"train": 1, "val": 3, "test": 1}, progress=False)
    model = torch.load(plugin_checkpoint, weights_only=True)["config"]["model"]
    config = relaxation_config(model, paths["is2re"]["val"])
    (tmp_path / "relax.yml").write_text(yaml.safe_dump(config))
    fairchem = Path(sys.executable).with_name("fairchem")
    run = subprocess.run(
        [str(fairchem), "--mode", "run-relaxations", "--config-yml", str(tmp_path / "relax.yml"),
         "--checkpoint", str(plugin_checkpoint), "--cpu", "--run-dir", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (result,) = (tmp_path / "run" / "results").glob("*/relaxed_positions.npz")
    relaxed = np.load(result)
    assert len(relaxed["ids"]) == 3 and np.isfinite(relaxed["pos"]).all()


# --- refusals of loadable but unusable checkpoints, on the command line -----------------------------

@pytest.fixture(scope="module")
def fairchem_hydra(tmp_path_factory):
    """fairchem's hydra EquiformerV2 checkpoint, as a dict to damage (a fresh copy per test)."""
    logging.disable(logging.WARNING)
    path = save_fairchem_hydra(tmp_path_factory.mktemp("fairchem_hydra"))
    logging.disable(logging.NOTSET)
    return torch.load(path, weights_only=True)


def convert_on_the_command_line(checkpoint: dict, tmp_path, capsys, *args) -> tuple[Path, str]:
    """``fairchem-eqv2 convert-checkpoint`` of ``checkpoint`` (saved to a file); asserts it is refused
    with one line (exit status 2) naming the file and writes nothing. Returns (the file, the line)."""
    from fairchem_equiformerv2.tools.cli import main

    src, dst = tmp_path / "damaged.pt", tmp_path / "out.pt"
    torch.save(checkpoint, src)
    capsys.readouterr()
    assert main(["convert-checkpoint", str(src), str(dst), *args]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and str(src) in lines[0], lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["damaged.pt"]  # no output, no temporary file
    return src, lines[0]


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("to", ["fairchem1", "fairchem2"])
@pytest.mark.parametrize(("damage", "field"), [
    (lambda c: c["normalizers"]["energy"]["rmsd"].fill_(NAN), "normaliser normalizers.energy.rmsd"),
    (lambda c: c["normalizers"]["forces"]["mean"].fill_(INF), "normaliser normalizers.forces.mean"),
    (lambda c: c["elementrefs"]["energy"]["element_references"].__setitem__(8, NAN),
     "element reference elementrefs.energy.element_references"),
    (lambda c: c["config"]["dataset"].update(transforms={"normalizer": {"energy": {"mean": 0.0, "rmsd": NAN}}}),
     "normaliser config.dataset.transforms.normalizer.energy.rmsd"),
    (lambda c: c["config"]["dataset"].update(normalize_labels=True, target_std=INF), "normaliser config.dataset.target_std"),
], ids=["rmsd", "mean", "element-reference", "config-normalizer", "config-target-std"])
def test_refuses_nan_normalizers_and_element_references(fairchem_hydra, tmp_path, capsys, damage, field, to):
    """They pass no weight check, and the calculator would return NaN energies."""
    checkpoint = copy.deepcopy(fairchem_hydra)
    damage(checkpoint)
    _, line = convert_on_the_command_line(checkpoint, tmp_path, capsys, "--to", to)
    assert field in line and "NaN or infinite" in line


def _first_weight(checkpoint: dict) -> str:
    return next(iter(checkpoint["state_dict"]))


@pytest.mark.parametrize(("damage", "field"), [
    (lambda c: c["config"]["model"].update(heads=["energy", "forces"]), "config.model.heads is a list"),
    (lambda c: c["config"]["model"]["heads"].update(energy="equiformer_v2_energy_head"), "config.model.heads.energy is a str"),
    (lambda c: c["config"]["model"].update(backbone="equiformer_v2_backbone"), "config.model.backbone is a str"),
    (lambda c: c["config"].update(model=["hydra"]), "config has no model section"),
    (lambda c: c.pop("config"), "no 'config'"),
    (lambda c: c["config"].update(dataset="data/s2ef"), "config.dataset is a str"),
    (lambda c: c["config"].update(outputs=["energy"]), "config.outputs is a list"),
    (lambda c: c["state_dict"].update({_first_weight(c): "weights"}), "is a str ('weights'), not a tensor"),
    (lambda c: c.update(ema=[torch.zeros(1)]), "ema is a list"),
    (lambda c: c["ema"]["shadow_params"].__setitem__(0, 0.5), "ema.shadow_params[0] is a float"),
    (lambda c: c.update(normalizers=[torch.zeros(1)]), "normalizers is a list"),
    (lambda c: c["elementrefs"].update(energy="refs.npz"), "elementrefs.energy is a str"),
], ids=["heads-list", "head-str", "backbone-str", "model-list", "no-config", "dataset-str", "outputs-list",
        "state-dict-str", "ema-list", "ema-entry", "normalizers-list", "elementrefs-str"])
def test_malformed_checkpoints_give_one_line_errors(fairchem_hydra, tmp_path, capsys, damage, field):
    checkpoint = copy.deepcopy(fairchem_hydra)
    damage(checkpoint)
    _, line = convert_on_the_command_line(checkpoint, tmp_path, capsys)
    assert field in line
