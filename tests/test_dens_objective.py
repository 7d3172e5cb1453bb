"""The DeNS training objective inside the model (dens_objective.py, DeNSBackbone's ``denoising`` block)
with fairchem's plain trainer: corruption, targets, loss arithmetic, evaluation, the random stream, the
demo config and a few fairchem training steps."""
import math

import numpy as np
import pytest
import torch
import yaml
from fairchem_runs import CONFIGS, base_env, demo_data, fairchem_cmd, run, train_steps  # noqa: F401  (fixture)
from oracle import SMALL
from structures import default_structures, to_batch

from fairchem_equiformerv2.model.denoising.dens_objective import DenoisingConfig, corrupt_batch, dens_generator
from fairchem_equiformerv2.errors import ConfigError

DEMO_DENS = CONFIGS / "demo" / "s2ef_dens.yml"


def model(denoising: dict, **backbone):
    from fairchem.core.common.utils import setup_imports
    from fairchem.core.models.base import HydraModel

    setup_imports()
    torch.manual_seed(0)
    return HydraModel(
        backbone={"model": "fairchem_equiformerv2.DeNSBackbone", **SMALL, "lmax_list": [2], "mmax_list": [2],
                  "denoising": denoising, **backbone},
        heads={"energy": {"module": "fairchem_equiformerv2.DeNSEnergyHead"},
               "forces": {"module": "fairchem_equiformerv2.DeNSForceHead"}},
        pass_through_head_outputs=True,
    )


@pytest.fixture()
def batch():
    b = to_batch(default_structures())
    b.forces = torch.randn(b.pos.shape[0], 3, generator=torch.Generator().manual_seed(1))
    return b


@pytest.mark.parametrize("field, value", [
    ("probability", 1.5), ("noise_std", 0), ("corrupt_ratio", 0), ("coefficient", -1), ("num_steps", 0),
    ("output_name", "forces"), ("all_atoms", "no"), ("std_high", 0.001),
])
def test_bad_denoising_fields_are_named(field, value):
    with pytest.raises(ConfigError, match=f"denoising.{field}="):
        DenoisingConfig(**{field: value})


def test_unknown_denoising_field_is_named():
    with pytest.raises(ConfigError, match="noise_level"):
        model({"noise_level": 0.1})


def test_training_forward_corrupts_a_copy(batch):
    m = model({"probability": 1.0, "corrupt_ratio": 0.5, "noise_std": 0.2, "coefficient": 4.0, "seed": 7}).train()
    pos = batch.pos.clone()
    out = m(batch)
    assert torch.equal(batch.pos, pos) and not hasattr(batch, "noise_mask")  # the trainer's batch is untouched
    target = batch.denoising  # written by the head: noise / noise_std * scale on corrupted atoms
    n, free = pos.shape[0], int((batch.fixed == 0).sum())
    scale = 4.0 * n / free
    corrupted = target.abs().sum(1) > 0
    assert 0 < int(corrupted.sum()) < free  # about half of the free atoms
    assert not corrupted[batch.fixed == 1].any()  # fixed atoms stay put
    # the draws again: the same generator gives the same corruption
    cfg = m.backbone.denoising
    again = corrupt_batch(batch, cfg, dens_generator(7, 0, 0))
    assert torch.equal(again.mask, corrupted)
    assert torch.allclose(again.data.pos - pos, again.target * cfg.noise_std, atol=1e-6)
    assert torch.allclose(target, again.target * scale, atol=1e-6)
    assert abs((again.target[corrupted] * cfg.noise_std).std().item() - 0.2) < 0.1
    assert (out["denoising"][~corrupted] == 0).all() and (out["denoising"][corrupted] != 0).all()
    # gradients: corrupted atoms' forces give none, their denoising output does
    (out["forces"][corrupted].sum()).backward(retain_graph=True)
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in m.parameters())
    out["denoising"].sum().backward()
    assert any(p.grad is not None and p.grad.abs().max() > 0 for p in m.output_heads.forces.denoising_pos_block.parameters())
    assert int(m.backbone.dens_step) == 1


def test_loss_terms_are_the_hybrid_loss(batch):
    """fairchem's l2mae on the denoising output = coefficient / N_free * sum over corrupted atoms of
    |prediction - noise / noise_std| (the denoising part of fairchem's hybrid DeNS loss)."""
    from fairchem.core.modules.loss import DDPLoss

    m = model({"probability": 1.0, "corrupt_ratio": 0.5, "coefficient": 3.0, "seed": 2}).train()
    out = m(batch)
    natoms = torch.repeat_interleave(batch.natoms, batch.natoms)
    # the trainer's l2mae over the batch's atoms (train_on_free_atoms: false)
    trainer_term = DDPLoss("l2mae", "mean")(out["denoising"], batch.denoising, natoms)
    again = corrupt_batch(batch, m.backbone.denoising, dens_generator(2, 0, 0))
    prediction = out["denoising"] / (3.0 * len(natoms) / int((batch.fixed == 0).sum()))
    expected = 3.0 / int((batch.fixed == 0).sum()) * (prediction - again.target)[again.mask].norm(dim=1).sum()
    assert torch.allclose(trainer_term, expected, rtol=1e-5)


def test_evaluation_is_clean_and_equals_the_model_without_the_objective(batch):
    with_objective = model({"probability": 1.0, "seed": 0}).eval()
    plain = model(None).eval()
    plain.load_state_dict(with_objective.state_dict(), strict=False)
    a, b = with_objective(batch), plain(batch)
    assert torch.equal(a["energy"], b["energy"]) and torch.equal(a["forces"], b["forces"])
    assert (a["denoising"] == 0).all() and (batch.denoising == 0).all()
    assert int(with_objective.backbone.dens_step) == 0


def test_probability_zero_never_corrupts(batch):
    m = model({"probability": 0.0}).train()
    for _ in range(3):
        out = m(batch)
        assert (batch.denoising == 0).all()
        assert out["denoising"].requires_grad  # still in the graph (the trainer needs a grad_fn)


def test_all_atoms_and_md_structures(batch):
    cfg = DenoisingConfig(probability=1.0, all_atoms=True)
    c = corrupt_batch(batch, cfg, dens_generator(0, 0, 0))
    assert c.mask.all()
    batch.md = torch.tensor([0, 1, 0])
    c = corrupt_batch(batch, cfg, dens_generator(0, 0, 0))
    assert not c.mask[batch.batch == 1].any() and c.mask[batch.batch != 1].all()


def test_noise_schedule_levels_per_structure(batch):
    cfg = DenoisingConfig(probability=1.0, noise_schedule=True, std_low=0.01, std_high=0.5, num_steps=5, all_atoms=True)
    c = corrupt_batch(batch, cfg, dens_generator(0, 0, 0))
    levels = np.exp(np.linspace(math.log(0.01), math.log(0.5), 5))
    sigmas = c.data.sigmas.view(-1)
    for s in range(3):
        values = sigmas[batch.batch == s].unique()
        assert len(values) == 1 and np.isclose(levels, values.item(), rtol=1e-5).any()
    assert torch.allclose(c.target * 0.5, c.data.pos - batch.pos, atol=1e-6)


def test_random_stream_resumes_from_a_checkpoint(batch):
    m = model({"probability": 1.0, "corrupt_ratio": 0.5, "seed": 5}).train()
    m(batch)
    first = batch.denoising != 0
    state = {k: v.clone() for k, v in m.state_dict().items()}
    assert int(state["backbone.dens_step"]) == 1
    m(batch)
    expected = batch.denoising != 0
    resumed = model({"probability": 1.0, "corrupt_ratio": 0.5, "seed": 5}).train()
    resumed.load_state_dict(state)
    resumed(batch)
    assert torch.equal(batch.denoising != 0, expected) and not torch.equal(first, expected)
    # a checkpoint without the objective's buffers (a converted fairchem DeNS one) loads
    plain = model(None)
    model({"seed": 1}).load_state_dict(plain.state_dict())


def test_demo_config_is_the_demo_with_dens():
    base = yaml.safe_load((CONFIGS / "demo" / "s2ef.yml").read_text())
    dens = yaml.safe_load(DEMO_DENS.read_text())
    assert dens["model"]["backbone"]["model"] == "fairchem_equiformerv2.DeNSBackbone"
    DenoisingConfig(**dens["model"]["backbone"]["denoising"])
    assert dens["model"]["pass_through_head_outputs"] is True
    name = dens["model"]["backbone"]["denoising"]["output_name"]
    assert dens["outputs"][name]["train_on_free_atoms"] is False
    assert {"denoising": {"fn": "l2mae", "coefficient": 1}} in dens["loss_functions"]
    for key in ("optim", "dataset"):
        assert dens[key] == base[key]


@pytest.mark.slow
def test_fairchem_trains_with_dens(demo_data, tmp_path):
    """fairchem's plain trainer (equiformerv2_forces) on the demo data with the DeNS objective, the whole
    training split as one batch (so that the steps' losses compare): every step's loss finite, the loss
    falls, each clean validation improves on the one before, the step counter is checkpointed."""
    from fairchem_runs import val_metrics

    run_dir = tmp_path / "run"
    args = [
        "--mode", "train", "--config-yml", DEMO_DENS, "--cpu", "--seed", 0, "--print-every", 1,
        "--run-dir", run_dir, "--timestamp-id", "dens",
        f"--dataset.train.src={demo_data}/s2ef/train", f"--dataset.val.src={demo_data}/s2ef/val",
        "--optim.max_epochs=8", "--optim.batch_size=32", "--optim.scheduler_params.warmup_epochs=1",
    ]
    log = run(fairchem_cmd() + args, tmp_path / "train.log", env=base_env())
    steps = train_steps(log)
    assert sorted(steps) == list(range(1, 9))
    losses = [steps[s][0] for s in sorted(steps)]
    assert all(np.isfinite(losses))
    assert np.mean(losses[-2:]) < 0.95 * np.mean(losses[:2]), losses
    validation = [m["loss"] for _, m in sorted(val_metrics(log).items())]
    assert len(validation) == 8 and all(b < a for a, b in zip(validation, validation[1:])), validation
    state = torch.load(run_dir / "checkpoints" / "dens" / "checkpoint.pt", map_location="cpu", weights_only=False)["state_dict"]
    assert int(next(v for k, v in state.items() if k.endswith("backbone.dens_step"))) == 8
