"""Noisy Nodes: the corruption recipe (statistics over many draws), the clean evaluation path, the
coefficient schedule, the loss reaching the parameters, reproducibility, the configs, and a
train -> predict run through the ``fairchem`` CLI on demo IS2RE data."""
from __future__ import annotations

import copy
import dataclasses
import math
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from fairchem_runs import base_env, demo_data, fairchem_cmd, run, train_steps  # noqa: F401  (demo_data is a fixture)

from fairchem_equiformerv2 import EquiformerV2Backbone, NoisyNodesBackbone, NoisyNodesHead
from fairchem_equiformerv2.errors import ConfigError
from fairchem_equiformerv2.model.denoising.noisy_nodes import (
    LinearCoefficientSchedule,
    NoisyNodesConfig,
    corrupt_positions,
    denoising_target,
    draw_corruption,
    mean_corrupted_target_norm,
    noisy_nodes_generator,
    relaxed_displacement,
)

ROOT = Path(__file__).resolve().parents[1]
DEMO_NN = ROOT / "configs" / "demo" / "is2re_noisy_nodes.yml"
DEMO_BASE = ROOT / "configs" / "demo" / "is2re.yml"
FULL_NN = ROOT / "configs" / "is2re" / "equiformer_v2_noisy_nodes.yml"
FULL_BASE = ROOT / "configs" / "is2re" / "equiformer_v2.yml"


def _z(p: float, n: int) -> float:
    return 5.0 * math.sqrt(p * (1 - p) / n)  # 5-sigma binomial tolerance


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def is2re_batch(demo_data):
    """8 demo IS2RE structures as the trainer sees them (y_relaxed -> energy)."""
    from fairchem.core.datasets import LmdbDataset, data_list_collater

    dataset = LmdbDataset({"src": str(demo_data / "is2re" / "train"), "key_mapping": {"y_relaxed": "energy"}})
    return data_list_collater([dataset[i] for i in range(8)], otf_graph=True)


def demo_model_config(path: Path = DEMO_NN) -> dict:
    return copy.deepcopy(yaml.safe_load(path.read_text())["model"])


def build_hydra(torch_seed: int = 0, **noisy_nodes):
    from fairchem.core.models.base import HydraModel

    model = demo_model_config()
    model.pop("name")
    model["backbone"]["noisy_nodes"].update(noisy_nodes)
    torch.manual_seed(torch_seed)
    return HydraModel(**model)


def synthetic(num_structures: int, atoms_per_structure: int, seed: int = 0):
    """pos [N, 3], displacement [N, 3], batch [N], fixed [N] (first atom of each structure fixed)."""
    g = torch.Generator().manual_seed(seed)
    n = num_structures * atoms_per_structure
    pos = torch.randn(n, 3, generator=g, dtype=torch.float64) * 3
    displacement = torch.randn(n, 3, generator=g, dtype=torch.float64)
    batch = torch.arange(num_structures).repeat_interleave(atoms_per_structure)
    fixed = (torch.arange(n) % atoms_per_structure == 0).int()
    displacement[fixed.bool()] = 0.0  # fixed atoms do not move in a relaxation
    return pos, displacement, batch, fixed


# --------------------------------------------------------------------------------------------
# the recipe: pure functions, statistics over many draws
# --------------------------------------------------------------------------------------------
def test_draws_follow_the_recipe():
    n_struct, n_atoms = 20000, 200000
    c = draw_corruption(n_struct, n_atoms, 0.5, 0.3, noisy_nodes_generator(0, 0, 0), torch.float64)
    assert c.selected.shape == (n_struct,) and c.selected.dtype == torch.bool
    assert c.interpolation.shape == (n_atoms,) and c.noise.shape == (n_atoms, 3)
    assert abs(c.selected.double().mean().item() - 0.5) < _z(0.5, n_struct)
    t = c.interpolation
    assert t.min() >= 0 and t.max() < 1
    assert abs(t.mean().item() - 0.5) < 5 * math.sqrt(1 / 12 / n_atoms)
    assert abs(t.var().item() - 1 / 12) < 0.002
    assert abs(c.noise.mean().item()) < 5 * 0.3 / math.sqrt(3 * n_atoms)
    assert abs(c.noise.std().item() - 0.3) < 0.003
    for p in (0.0, 0.2, 1.0):
        sel = draw_corruption(n_struct, 1, p, 0.3, noisy_nodes_generator(1, 0, 0)).selected
        assert abs(sel.double().mean().item() - p) < _z(p, n_struct) + 1e-12


def test_corrupted_positions_and_targets_follow_the_recipe():
    """pos + t * (pos_relaxed - pos) + noise for free atoms of selected structures; target =
    (pos_relaxed - corrupted) / pos_std; over many draws E[offset] = d / 2, Var = d^2 / 12 + sigma^2."""
    n_struct, per = 4000, 5
    pos, disp, batch, fixed = synthetic(n_struct, per)
    disp[:] = torch.tensor([0.6, -0.3, 0.0], dtype=torch.float64)  # same displacement everywhere
    disp[fixed.bool()] = 0.0
    free = fixed == 0
    offsets, selected_all = [], []
    for step in range(5):
        c = draw_corruption(n_struct, pos.shape[0], 0.5, 0.3, noisy_nodes_generator(7, 0, step), torch.float64)
        corrupted = corrupt_positions(pos, batch, c, disp, movable=free)
        target = denoising_target(pos, corrupted, disp, 0.25, 0.3)
        torch.testing.assert_close(target, (pos + disp - corrupted) / 0.25)
        sel_atoms = c.selected[batch]
        # unselected structures and fixed atoms: untouched, bit for bit
        assert torch.equal(corrupted[~sel_atoms], pos[~sel_atoms])
        assert torch.equal(corrupted[~free], pos[~free])
        active = sel_atoms & free
        expected = pos + c.interpolation.unsqueeze(1) * disp + c.noise
        torch.testing.assert_close(corrupted[active], expected[active])
        offsets.append((corrupted - pos)[active])
        selected_all.append(c.selected)
    off = torch.cat(offsets)
    n = off.shape[0]
    d = disp[free][0]
    sigma2 = 0.09 + d**2 / 12
    assert torch.all((off.mean(0) - d / 2).abs() < 5 * torch.sqrt(sigma2 / n))
    assert torch.all((off.var(0) / sigma2 - 1).abs() < 0.05)
    assert abs(torch.cat(selected_all).double().mean().item() - 0.5) < _z(0.5, 5 * n_struct)


def test_interpolation_factor_statistics_without_noise():
    n_struct, per = 2000, 10
    pos, disp, batch, fixed = synthetic(n_struct, per, seed=3)
    c = draw_corruption(n_struct, pos.shape[0], 1.0, 0.0, noisy_nodes_generator(0, 0, 0), torch.float64)
    corrupted = corrupt_positions(pos, batch, c, disp, movable=fixed == 0)
    free = fixed == 0
    t = ((corrupted - pos)[free] * disp[free]).sum(1) / (disp[free] ** 2).sum(1)
    torch.testing.assert_close(t, c.interpolation[free])  # the offset is along the displacement
    assert t.min() >= 0 and t.max() <= 1
    assert abs(t.mean().item() - 0.5) < 0.01 and abs(t.var().item() - 1 / 12) < 0.004


def test_noise_only_data_predicts_the_noise():
    pos, _, batch, fixed = synthetic(3000, 4)
    c = draw_corruption(3000, pos.shape[0], 0.5, 0.3, noisy_nodes_generator(0, 0, 0), torch.float64)
    corrupted = corrupt_positions(pos, batch, c, None)
    target = denoising_target(pos, corrupted, None, 0.5, 0.3)
    sel = c.selected[batch]
    torch.testing.assert_close(target[sel], c.noise[sel] / 0.3)
    assert torch.equal(target[~sel], torch.zeros_like(target[~sel]))
    assert abs(target[sel].std().item() - 1.0) < 0.03


def test_relaxed_displacement_uses_the_nearest_periodic_image():
    cell = torch.tensor([[[10.0, 0, 0], [2.0, 8.0, 0], [0, 0, 20.0]]], dtype=torch.float64)
    pos = torch.tensor([[0.1, 0.1, 5.0], [5.0, 4.0, 6.0]], dtype=torch.float64)
    true = torch.tensor([[-0.3, 0.2, 0.1], [0.4, -0.1, 0.0]], dtype=torch.float64)
    wrapped = pos + true + torch.tensor([[1.0, 0, 0], [0, 0, 0]], dtype=torch.float64) @ cell[0]  # crossed a boundary
    batch = torch.zeros(2, dtype=torch.long)
    torch.testing.assert_close(relaxed_displacement(pos, wrapped, cell, batch), true)
    torch.testing.assert_close(relaxed_displacement(pos, pos + true), true)


# --------------------------------------------------------------------------------------------
# the schedule and the config
# --------------------------------------------------------------------------------------------
def test_coefficient_schedule():
    s = LinearCoefficientSchedule(15, 1, 100)
    assert s(0) == 15 and s(100) == 1 and s(1000) == 1 and s(50) == pytest.approx(8)
    assert s(25) == pytest.approx(15 - 14 * 0.25)
    assert all(s(i) >= s(i + 1) for i in range(150))
    assert LinearCoefficientSchedule(15, 1, 0)(0) == 1  # no decay: the end value throughout
    assert NoisyNodesConfig().probability == 0.5 and NoisyNodesConfig().noise_std == 0.3
    assert (NoisyNodesConfig().coefficient_start, NoisyNodesConfig().coefficient_end) == (15, 1)


BAD_CONFIG = [  # (field, value): each refused with a ConfigError naming noisy_nodes.<field> and the value
    ("probability", "0.5"),          # a string for a number (was a bare TypeError)
    ("probability", 1.5),            # out of [0, 1]
    ("probability", -0.1),           # negative
    ("probability", math.nan),
    ("probability", True),           # a boolean for a number
    ("probability", [0.5]),          # a list
    ("interpolate", "false"),        # a string for a boolean: true to Python (was accepted, reversing the recipe)
    ("interpolate", 1),              # a number for a boolean
    ("corrupt_fixed", "no"),         # (was accepted as true)
    ("corrupt_fixed", None),
    ("noise_std", math.inf),         # (was accepted)
    ("noise_std", -0.3),
    ("noise_std", "0.3"),
    ("pos_std", 0),                  # must be > 0
    ("pos_std", math.nan),
    ("coefficient_start", -1),
    ("coefficient_start", math.inf),
    ("coefficient_end", "1"),
    ("coefficient_end", math.nan),
    ("decay_steps", 1.5),            # not a whole number
    ("decay_steps", -1),
    ("decay_steps", "100"),
    ("decay_steps", True),
    ("loss", "l2"),                  # not one of l1, l2mae
    ("loss", 1),
    ("seed", 1.5),                   # not a whole number (was accepted)
    ("seed", -1),
    ("seed", "0"),
    ("noise_level", 0.1),            # an unknown field
]


@pytest.mark.parametrize("field, value", BAD_CONFIG)
def test_bad_config_field_is_named(field, value):
    with pytest.raises(ConfigError, match=re.escape(f"noisy_nodes.{field}={value!r}: ")):
        NoisyNodesConfig.from_config({field: value})
    if field in NoisyNodesConfig.__dataclass_fields__:  # constructed directly, as well
        with pytest.raises(ConfigError, match=re.escape(f"noisy_nodes.{field}={value!r}: ")):
            NoisyNodesConfig(**{field: value})


@pytest.mark.parametrize("block", [[0.5], "yes", False])
def test_noisy_nodes_block_must_be_a_mapping(block):
    with pytest.raises(ConfigError, match=re.escape(f"noisy_nodes={block!r}: must be a mapping")):
        NoisyNodesConfig.from_config(block)


def test_bad_config_stops_the_model_before_it_is_built():
    with pytest.raises(ConfigError, match=re.escape("noisy_nodes.corrupt_fixed='no': must be true or false")):
        build_hydra(corrupt_fixed="no")


@pytest.mark.parametrize("good", [{"probability": 0}, {"probability": 1}, {"noise_std": 0}, {"decay_steps": 0},
                                  {"coefficient_start": 0, "coefficient_end": 0}, {"seed": 0}, {"seed": None},
                                  {"loss": "l2mae"}, {"interpolate": False, "corrupt_fixed": True},
                                  {"pos_std": np.float64(0.5)}, {}, None])
def test_edge_values_are_accepted(good):
    config = NoisyNodesConfig.from_config(good)
    for field, value in (good or {}).items():
        assert getattr(config, field) == value


@pytest.mark.parametrize("path", [DEMO_NN, FULL_NN], ids=["demo", "is2re"])
def test_published_noisy_nodes_blocks_are_accepted(path):
    block = yaml.safe_load(path.read_text())["model"]["backbone"]["noisy_nodes"]
    config = NoisyNodesConfig.from_config(block)
    assert dataclasses.asdict(config) == {**dataclasses.asdict(NoisyNodesConfig()), **block}
    assert config.interpolate is True and config.corrupt_fixed is False


def test_head_needs_the_noisy_nodes_backbone():
    backbone_cfg = demo_model_config(DEMO_BASE)["backbone"]
    backbone_cfg.pop("model")
    with pytest.raises(ConfigError, match="NoisyNodesBackbone"):
        NoisyNodesHead(EquiformerV2Backbone(**backbone_cfg))


def test_model_applies_the_schedule_to_prediction_and_target(is2re_batch):
    model = build_hydra(decay_steps=4, coefficient_start=15, coefficient_end=1)
    model.train()
    bb, head = model.backbone, model.output_heads["noisy_nodes"]
    ratios = []
    for step in range(6):
        batch = is2re_batch.clone()
        torch.manual_seed(step)  # the same random edge-frame roll in both forwards
        prediction = model(batch)["noisy_nodes"]  # also writes the scaled target into batch
        # the unscaled prediction and target: the same forward again, with the same (seed, rank, step)
        bb.noisy_nodes_step -= 1
        torch.manual_seed(step)
        emb = bb(is2re_batch.clone())
        target, coefficient = emb.noisy_nodes.target, emb.noisy_nodes.scale
        # the schedule, times 3 for the demo config's loss: l1 (fairchem's mae averages over x, y, z)
        assert coefficient == pytest.approx(3 * LinearCoefficientSchedule(15, 1, 4)(step))
        torch.testing.assert_close(batch.noisy_nodes, target * coefficient)
        emb.noisy_nodes.scale = 1.0
        unscaled = head(is2re_batch.clone(), emb)["noisy_nodes"]
        torch.testing.assert_close(prediction, unscaled * coefficient)
        ratios.append(coefficient)
    assert ratios == pytest.approx([3 * c for c in (15, 11.5, 8, 4.5, 1, 1)])
    assert int(model.backbone.noisy_nodes_step) == 6


def test_l1_loss_is_the_reference_sum_over_xyz(is2re_batch):
    """With ``loss: l1`` fairchem's ``mae`` (a mean over the N x 3 components) equals the reference's
    loss: per free atom the L1 norm summed over x, y, z, averaged over atoms, times the coefficient;
    in evaluation the output is the plain normalised displacement, as with ``l2mae``."""
    from fairchem.core.modules.loss import DDPLoss

    outputs = {}
    for loss in ("l1", "l2mae"):
        model = build_hydra(torch_seed=0, loss=loss, decay_steps=10, coefficient_start=15, coefficient_end=1)
        model.train()
        batch = is2re_batch.clone()
        torch.manual_seed(0)
        out = model(batch)["noisy_nodes"]
        model.eval()
        clean = model(is2re_batch.clone())["noisy_nodes"]
        outputs[loss] = (out, batch.noisy_nodes, clean)
    (out1, target1, clean1), (out2, target2, clean2) = outputs["l1"], outputs["l2mae"]
    torch.testing.assert_close(out1, 3 * out2)
    torch.testing.assert_close(target1, 3 * target2)
    torch.testing.assert_close(clean1, clean2)
    free = is2re_batch.fixed == 0
    fairchem_term = DDPLoss("mae", reduction="mean")(out1[free], target1[free], natoms=is2re_batch.natoms)
    reference = 15 * ((out2 - target2)[free] / 15).abs().sum(dim=1).mean()
    torch.testing.assert_close(fairchem_term, reference)


def test_corrupted_target_norm_is_the_reference_normaliser(demo_data):
    """The mean norm of (relaxed - corrupted input) against its closed forms: without noise and
    interpolation it is the mean displacement, with interpolation half of it (E[1 - t] = 1/2), and
    noise much larger than the displacements gives noise_std x E|N(0, I_3)| = noise_std x 2 sqrt(2/pi)."""
    from fairchem_equiformerv2.tools.noisy_nodes_scale import corrupted_target_norm, free_displacements

    src = demo_data / "is2re" / "train"
    mean_distance = float(free_displacements(src).norm(dim=1).mean())
    assert corrupted_target_norm(src, noise_std=0.0, interpolate=False) == pytest.approx(mean_distance, rel=1e-9)
    assert corrupted_target_norm(src, noise_std=0.0, draws=64) == pytest.approx(mean_distance / 2, rel=0.03)
    assert corrupted_target_norm(src, noise_std=100.0, draws=64) == pytest.approx(
        100 * 2 * math.sqrt(2 / math.pi), rel=0.02)


def test_noisy_nodes_scale_command(demo_data):
    import subprocess

    from fairchem_runs import eqv2_cmd

    from fairchem_equiformerv2.tools.noisy_nodes_scale import corrupted_target_norm, displacement_std

    src = demo_data / "is2re" / "train"
    out = subprocess.run([*eqv2_cmd(), "noisy-nodes-scale", str(src), "--noise-std", "0.1"],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    values = [float(line.split()[1]) for line in out if line.startswith("pos_std")]
    assert values == pytest.approx([corrupted_target_norm(src, noise_std=0.1), displacement_std(src)], abs=1e-4)
    refused = subprocess.run([*eqv2_cmd(), "noisy-nodes-scale", str(demo_data / "s2ef" / "train")],
                             capture_output=True, text=True)
    assert refused.returncode == 2 and "no pos_relaxed" in refused.stderr and "Traceback" not in refused.stderr


def _lmdb(path: Path, entries: dict[bytes, bytes]) -> Path:
    import lmdb

    env = lmdb.open(str(path), subdir=False, lock=False)
    with env.begin(write=True) as txn:
        for key, value in entries.items():
            txn.put(key, value)
    env.close()
    return path


def _bad_source(kind: str, folder: Path) -> Path:
    """A ``noisy-nodes-scale`` source of ``kind`` that is not an IS2RE LMDB, in ``folder``."""
    if kind == "folder without an LMDB":
        (folder / "data").mkdir()
        (folder / "data" / "README").write_text("no LMDB here")
        return folder / "data"
    if kind == "empty LMDB":
        return _lmdb(folder / "empty.lmdb", {})
    if kind == "entry not a pickle":
        return _lmdb(folder / "garbage.lmdb", {b"0": b"garbage"})
    path = folder / "data.lmdb"
    if kind == "random bytes":
        path.write_bytes(np.random.default_rng(0).bytes(8192))
    elif kind == "empty file":
        path.touch()
    return path  # "missing": not created


BAD_SOURCES = [  # (kind, a fragment of the one-line error)
    ("folder without an LMDB", "no LMDB here"), ("empty LMDB", "has no entries"),
    ("random bytes", "not a readable LMDB file"), ("empty file", "not a readable LMDB file"),
    ("entry not a pickle", "entry 0 is not a pickled"), ("missing", "no such file or folder"),
]


def _one_line_error(argv: list[str], capsys) -> str:
    from fairchem_equiformerv2.tools.cli import main

    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err and "pos_std" not in captured.out, captured
    return lines[0]


@pytest.mark.parametrize("kind, fragment", BAD_SOURCES)
def test_noisy_nodes_scale_bad_source_is_one_line(kind, fragment, tmp_path, capsys):
    src = _bad_source(kind, tmp_path)
    line = _one_line_error(["noisy-nodes-scale", str(src)], capsys)
    assert line.startswith("fairchem-eqv2 noisy-nodes-scale: error: ") and str(src) in line and fragment in line


def test_noisy_nodes_scale_all_fixed_atoms_is_one_line(demo_data, tmp_path, capsys):
    from fairchem.core.datasets import LmdbDataset

    data = LmdbDataset({"src": str(demo_data / "is2re" / "train")})[0]
    data.fixed = torch.ones_like(data.fixed)
    src = _lmdb(tmp_path / "fixed.lmdb", {b"0": pickle.dumps(data)})
    line = _one_line_error(["noisy-nodes-scale", str(src)], capsys)
    assert str(src) in line and "no free atoms" in line


@pytest.mark.parametrize("noise_std", ["-0.1", "nan", "inf"])
def test_noisy_nodes_scale_bad_noise_std_is_one_line(noise_std, demo_data, capsys):
    line = _one_line_error(["noisy-nodes-scale", str(demo_data / "is2re" / "train"), "--noise-std", noise_std], capsys)
    assert f"--noise-std {float(noise_std)}: must be a number >= 0" in line


def test_corrupted_target_norm_refuses_a_bad_noise_std():
    with pytest.raises(ConfigError, match="noise_std=nan"):
        mean_corrupted_target_norm(torch.ones(4, 3), noise_std=math.nan)
    with pytest.raises(ConfigError, match="draws=0"):
        mean_corrupted_target_norm(torch.ones(4, 3), draws=0)


# --------------------------------------------------------------------------------------------
# through the model: training corrupts, evaluation is clean
# --------------------------------------------------------------------------------------------
def test_training_forward_corrupts_a_copy_with_the_recipe(is2re_batch):
    model = build_hydra()
    bb = model.backbone
    bb.train()
    batch = is2re_batch.clone()
    pos0 = batch.pos.clone()
    free = batch.fixed == 0
    selected_fraction, n = [], 0
    for _ in range(40):
        inp, target, _ = bb.corrupt(batch)
        assert inp is not batch and torch.equal(batch.pos, pos0)  # the trainer's batch is untouched
        moved = (inp.pos != pos0).any(1)
        assert not moved[~free].any()  # fixed atoms never move
        per_structure = torch.zeros(len(batch.natoms), dtype=torch.bool).index_put_((batch.batch[moved],), torch.tensor(True))
        selected_fraction.append(per_structure.double().mean().item())
        torch.testing.assert_close(target, (batch.pos_relaxed - inp.pos) / bb.noisy_nodes.pos_std)
        n += 1
    assert abs(np.mean(selected_fraction) - 0.5) < _z(0.5, 40 * 8)
    # energy target is still the relaxed energy
    assert torch.equal(batch.energy, is2re_batch.energy)


def test_eval_is_clean_and_matches_the_plain_backbone(is2re_batch):
    model = build_hydra()
    model.eval()
    step0 = int(model.backbone.noisy_nodes_step)
    batch = is2re_batch.clone()
    with torch.no_grad():
        out = model(batch)
    assert int(model.backbone.noisy_nodes_step) == step0  # evaluation does not advance the stream
    torch.testing.assert_close(batch.noisy_nodes, (batch.pos_relaxed - batch.pos) / model.backbone.noisy_nodes.pos_std)
    assert torch.equal(batch.pos, is2re_batch.pos)
    # the same weights in the plain backbone give the same embedding and energy
    cfg = demo_model_config(DEMO_BASE)["backbone"]
    cfg.pop("model")
    plain = EquiformerV2Backbone(**cfg).eval()
    missing, unexpected = plain.load_state_dict(model.backbone.state_dict(), strict=False)
    assert not missing and set(unexpected) == {"noisy_nodes_seed", "noisy_nodes_step"}
    with torch.no_grad():
        a = model.backbone(is2re_batch.clone())["node_embedding"]
        b = plain(is2re_batch.clone())["node_embedding"]
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    # no pos_relaxed (a test split): the target is zeros, the output still well defined
    test_batch = is2re_batch.clone()
    del test_batch.pos_relaxed
    with torch.no_grad():
        out_test = model(test_batch)
    assert torch.equal(test_batch.noisy_nodes, torch.zeros_like(test_batch.pos))
    torch.testing.assert_close(out_test["energy"], out["energy"])


def test_energy_only_data_trains_on_the_noise(is2re_batch):
    model = build_hydra(probability=1.0)
    model.train()
    batch = is2re_batch.clone()
    del batch.pos_relaxed
    inp, target, _ = model.backbone.corrupt(batch)
    free = batch.fixed == 0
    torch.testing.assert_close(target[free], (inp.pos - batch.pos)[free] / 0.3)
    assert (target[free].norm(dim=1) > 0).all()


# --------------------------------------------------------------------------------------------
# the loss reaches the parameters (fairchem's loss, as the trainer computes it)
# --------------------------------------------------------------------------------------------
def _trainer_style_loss(out, batch, name="noisy_nodes"):
    from fairchem.core.modules.loss import DDPLoss

    mask = batch.fixed == 0
    return DDPLoss("l2mae", reduction="mean")(out[name][mask], batch[name][mask], natoms=batch.natoms)


def test_noisy_nodes_loss_reaches_the_parameters(is2re_batch):
    grads = {}
    for start in (1.0, 3.0):
        model = build_hydra(coefficient_start=start, coefficient_end=start, decay_steps=0)
        model.train()
        batch = is2re_batch.clone()
        loss = _trainer_style_loss(model(batch), batch)
        loss.backward()
        grads[start] = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    g = grads[1.0]
    head = [k for k in g if k.startswith("output_heads.noisy_nodes")]
    backbone = [k for k in g if k.startswith("backbone.")]
    assert head and backbone
    assert any(g[k].abs().sum() > 0 for k in head) and any(g[k].abs().sum() > 0 for k in backbone)
    assert sum(g[k].abs().sum() for k in backbone) > 0
    # the energy head gets no gradient from this term
    assert not any(k.startswith("output_heads.energy") and g[k].abs().sum() > 0 for k in g)
    # L2-norm MAE is homogeneous: coefficient 3 scales the gradient by 3 exactly (same draws)
    for k in g:
        torch.testing.assert_close(grads[3.0][k], 3 * g[k], rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------------------------
# reproducibility
# --------------------------------------------------------------------------------------------
def _corrupted_sequence(model, batch, steps=3):
    model.train()
    return [model.backbone.corrupt(batch.clone())[0].pos for _ in range(steps)]


def test_reproducible_for_a_seed_and_per_rank(is2re_batch, monkeypatch):
    a = _corrupted_sequence(build_hydra(torch_seed=5), is2re_batch)
    b = _corrupted_sequence(build_hydra(torch_seed=5), is2re_batch)
    c = _corrupted_sequence(build_hydra(torch_seed=6), is2re_batch)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not any(torch.equal(x, y) for x, y in zip(a, c))
    assert not torch.equal(a[0], a[1])  # each step its own draw
    # an explicit seed wins over torch's
    d = _corrupted_sequence(build_hydra(torch_seed=1, seed=42), is2re_batch)
    e = _corrupted_sequence(build_hydra(torch_seed=2, seed=42), is2re_batch)
    assert all(torch.equal(x, y) for x, y in zip(d, e))
    # another DDP rank: another stream
    monkeypatch.setattr(NoisyNodesBackbone, "_rank", staticmethod(lambda: 1))
    r1 = _corrupted_sequence(build_hydra(torch_seed=5), is2re_batch)
    assert not any(torch.equal(x, y) for x, y in zip(a, r1))


def test_checkpoint_resumes_the_stream(is2re_batch):
    model = build_hydra(torch_seed=5)
    full = _corrupted_sequence(model, is2re_batch, steps=4)
    model2 = build_hydra(torch_seed=5)
    _corrupted_sequence(model2, is2re_batch, steps=2)
    state = copy.deepcopy(model2.state_dict())
    torch.manual_seed(1234)  # a resumed process may have another torch seed: the buffer wins
    resumed = build_hydra(torch_seed=99)
    resumed.load_state_dict(state)
    rest = _corrupted_sequence(resumed, is2re_batch, steps=2)
    assert torch.equal(rest[0], full[2]) and torch.equal(rest[1], full[3])


# --------------------------------------------------------------------------------------------
# configs
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("nn_path, base_path", [(DEMO_NN, DEMO_BASE), (FULL_NN, FULL_BASE)], ids=["demo", "is2re"])
def test_noisy_nodes_configs(nn_path, base_path):
    from fairchem.core.common.utils import load_config

    nn_cfg, _, dup = load_config(str(nn_path))
    base, _, _ = load_config(str(base_path))
    assert not dup
    nn_bb, base_bb = dict(nn_cfg["model"]["backbone"]), dict(base["model"]["backbone"])
    assert nn_bb.pop("model") == "fairchem_equiformerv2.NoisyNodesBackbone"
    assert base_bb.pop("model") == "fairchem_equiformerv2.EquiformerV2Backbone"
    knobs = nn_bb.pop("noisy_nodes")
    assert nn_bb == base_bb  # the same model
    assert nn_cfg["optim"] == base["optim"] and nn_cfg["trainer"] == base["trainer"]
    assert nn_cfg["dataset"] == base["dataset"]  # energy target: y_relaxed
    assert nn_cfg["dataset"]["train"]["key_mapping"] == {"y_relaxed": "energy"}
    assert (knobs["probability"], knobs["noise_std"], knobs["interpolate"]) == (0.5, 0.3, True)
    assert (knobs["coefficient_start"], knobs["coefficient_end"]) == (15, 1) and knobs["decay_steps"] > 0
    NoisyNodesConfig.from_config(knobs)
    heads = nn_cfg["model"]["heads"]
    assert heads["noisy_nodes"]["module"] == "fairchem_equiformerv2.NoisyNodesHead"
    assert heads["energy"] == base["model"]["heads"]["energy"]
    losses = {k: v for loss in nn_cfg["loss_functions"] for k, v in loss.items()}
    assert knobs["loss"] == "l1"  # the reference's loss, which fairchem's mae gives with the model's factor 3
    assert losses["noisy_nodes"] == {"fn": "mae", "coefficient": 1}  # the model schedules it
    assert nn_cfg["outputs"]["noisy_nodes"]["level"] == "atom" and nn_cfg["outputs"]["noisy_nodes"]["train_on_free_atoms"]


def test_demo_decay_covers_the_demo_run():
    from fairchem_equiformerv2.tools.demo_data import DEFAULT_IS2RE_SIZES

    cfg = yaml.safe_load(DEMO_NN.read_text())
    steps = -(-DEFAULT_IS2RE_SIZES["train"] // cfg["optim"]["batch_size"]) * cfg["optim"]["max_epochs"]
    assert cfg["model"]["backbone"]["noisy_nodes"]["decay_steps"] == steps


# --------------------------------------------------------------------------------------------
# fairchem CLI: train -> predict
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_cli_train_then_predict(demo_data, tmp_path):
    run_dir = tmp_path / "run"
    common = [
        "--config-yml", DEMO_NN, "--cpu", "--seed", 0, "--run-dir", run_dir, "--print-every", 1,
        f"--dataset.train.src={demo_data}/is2re/train", f"--dataset.val.src={demo_data}/is2re/val",
        "--optim.max_epochs=2", "--optim.scheduler_params.warmup_epochs=0.5",
        "--model.backbone.noisy_nodes.decay_steps=4",
    ]
    log = run(fairchem_cmd() + ["--mode", "train", "--timestamp-id", "train"] + common, tmp_path / "train.log",
              env=base_env())
    assert log.count("Evaluating on val") == 2
    steps = train_steps(log)  # {step: (loss, lr)}
    assert sorted(steps) == [1, 2, 3, 4] and all(np.isfinite(loss) for loss, _ in steps.values())
    ckpt = run_dir / "checkpoints" / "train" / "checkpoint.pt"
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    step_key = next(k for k in state if k.endswith("backbone.noisy_nodes_step"))
    assert int(state[step_key]) == 4  # 16 systems / batch 8 x 2 epochs

    run(fairchem_cmd() + ["--mode", "predict", "--timestamp-id", "predict", "--checkpoint", ckpt] + common
        + [f"--dataset.test.src={demo_data}/is2re/test"], tmp_path / "predict.log", env=base_env())
    (pred,) = (run_dir / "results" / "predict").glob("*_predictions.npz")
    with np.load(pred, allow_pickle=True) as p:
        assert len(p["ids"]) == 4 and np.isfinite(p["energy"]).all()
        # the vector head's clean-input output: the predicted relaxed displacement / pos_std, free atoms
        assert p["noisy_nodes"].shape[1] == 3 and np.isfinite(p["noisy_nodes"]).all()
        assert len(p["noisy_nodes_chunk_idx"]) == 4 - 1
