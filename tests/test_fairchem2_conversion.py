"""``convert-checkpoint --to fairchem2`` in the fairchem 1.10 environment: a fairchem 2.x inference
checkpoint with the same weights, the EMA, the normalizers and element references. (That it loads and
predicts in fairchem 2.x is tests_fairchem2/'s part, on a checkpoint made by
scripts/fairchem2_reference.py.)"""
from __future__ import annotations

import pytest
import torch
from fairchem.core.modules.normalization.normalizer import create_normalizer
from test_checkpoints import BACKBONE, _fairchem_trainer, save_fairchem_hydra
from test_cli_errors import eqv2

from fairchem_equiformerv2.tools.checkpoints import convert_checkpoint, read_checkpoint, strip_prefix
from fairchem_equiformerv2.tools.fairchem2_checkpoint import (
    CHECKPOINT_CLASS, CHECKPOINT_MODULE, Fairchem2ConversionError, _stand_in_class, fairchem2_checkpoint,
)


def load_fairchem2(path):
    """The checkpoint as fairchem 2.x unpickles it (here into the stand-in of its dataclass)."""
    with _stand_in_class() as cls:
        checkpoint = torch.load(path, weights_only=False)
        assert type(checkpoint) is cls
    return checkpoint


def test_fields_weights_ema_normalizers_and_references(tmp_path):
    source = save_fairchem_hydra(tmp_path)
    plugin = read_checkpoint(convert_checkpoint(source, tmp_path / "plugin.pt"))
    path = convert_checkpoint(source, tmp_path / "fc2.pt", to="fairchem2", dataset="oc20")
    with open(path, "rb") as f:
        assert f"{CHECKPOINT_MODULE}".encode() in f.read()  # unpickled as fairchem 2.x's class
    checkpoint = load_fairchem2(path)
    assert type(checkpoint).__name__ == CHECKPOINT_CLASS

    config = checkpoint.model_config
    assert config["_target_"] == "fairchem.core.models.base.HydraModel" and config["pass_through_head_outputs"]
    assert config["backbone"]["model"] == "fairchem_equiformerv2.adapters.fairchem2.EquiformerV2Backbone"
    assert {k: v for k, v in config["backbone"].items() if k != "model"} == {
        k: v for k, v in plugin["config"]["model"]["backbone"].items() if k != "model"
    }
    assert {h["module"] for h in config["heads"].values()} == {
        "fairchem_equiformerv2.adapters.fairchem2.EnergyHead", "fairchem_equiformerv2.adapters.fairchem2.ForceHead"
    }

    weights = strip_prefix(plugin["state_dict"])
    assert checkpoint.model_state_dict.keys() == weights.keys()
    assert all(torch.equal(checkpoint.model_state_dict[k], v) for k, v in weights.items())
    ema = checkpoint.ema_state_dict
    assert int(ema["n_averaged"]) == (plugin["ema"]["num_updates"] or 1)  # fairchem 1.x keeps no count by default
    assert ema.keys() - {"n_averaged"} == {f"module.{k}" for k in weights}
    from fairchem_equiformerv2.tools.checkpoints import build_model, trainable_parameter_names

    names = trainable_parameter_names(build_model(plugin["config"]["model"]))
    shadow = dict(zip(names, plugin["ema"]["shadow_params"]))
    assert all(torch.equal(ema[f"module.{k}"], shadow.get(k, weights[k])) for k in weights)
    assert any(not torch.equal(ema[f"module.{k}"], weights[k]) for k in shadow)  # the EMA differs

    tasks = {t["name"]: t for t in checkpoint.tasks_config}
    assert set(tasks) == {"energy", "forces"} and all(t["datasets"] == ["oc20"] for t in tasks.values())
    for name, task in tasks.items():
        state = plugin["normalizers"][name]
        assert task["normalizer"]["mean"] == float(state["mean"]) and task["normalizer"]["rmsd"] == float(state["rmsd"])
    references = tasks["energy"]["element_references"]["element_references"]["_args_"][0]
    assert references == plugin["elementrefs"]["energy"]["element_references"].double().tolist()
    assert "element_references" not in tasks["forces"]


def test_command_line_stress_heads_and_what_has_no_fairchem2_counterpart(tmp_path):
    source = save_fairchem_hydra(tmp_path)
    out = tmp_path / "fc2.pt"
    result = eqv2("convert-checkpoint", source, out, "--to", "fairchem2", "--dataset", "omat")
    assert result.returncode == 0, result.stderr
    assert {t["datasets"][0] for t in load_fairchem2(out).tasks_config} == {"omat"}

    # a decomposed stress head: the head denormalizes with the 1.x normalizers, its task does not
    model = {
        "name": "hydra", "pass_through_head_outputs": True, "otf_graph": True,
        "backbone": {"model": "equiformer_v2_backbone", **BACKBONE},
        "heads": {"energy": {"module": "equiformerV2_scalar_head"},
                  "stress": {"module": "rank2_symmetric_head", "output_name": "stress", "decompose": True}},
    }
    trainer = _fairchem_trainer(model, tmp_path, "s2ef")
    trainer.normalizers["stress_isotropic"] = create_normalizer(mean=0.002, rmsd=0.03)
    with_stress = trainer.save(checkpoint_file="stress.pt")
    converted = load_fairchem2(convert_checkpoint(with_stress, tmp_path / "s.pt", to="fairchem2"))
    head = converted.model_config["heads"]["stress"]
    assert head["module"] == "fairchem_equiformerv2.adapters.fairchem2.StressHead" and head["decompose"] is True
    assert head["isotropic_normalizer"] == pytest.approx([0.002, 0.03]) and head["anisotropic_normalizer"] == [0.0, 1.0]
    stress = next(t for t in converted.tasks_config if t["property"] == "stress")
    assert stress["out_spec"]["dim"] == [1, 9] and (stress["normalizer"]["mean"], stress["normalizer"]["rmsd"]) == (0.0, 1.0)

    noisy_nodes = {"config": {"model": {"backbone": {"model": "fairchem_equiformerv2.NoisyNodesBackbone"},
                                        "heads": {}}}, "state_dict": {}}
    with pytest.raises(Fairchem2ConversionError, match="NoisyNodesBackbone has no fairchem 2.x counterpart"):
        fairchem2_checkpoint(noisy_nodes, [], "oc20")
