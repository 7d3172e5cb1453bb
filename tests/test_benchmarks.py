"""The benchmarks refuse a GPU device torch cannot see with a usage error naming --device;
``bf16_error.py --checkpoint`` measures a checkpoint's weights (its EMA where it keeps one), with
each per-edge stage in float32 in turn."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible here")
@pytest.mark.parametrize("script", ["compare_fairchem", "gpu_checks", "bf16_error"])
def test_cuda_without_gpu_is_a_usage_error(script, capsys):
    main = __import__(script).main
    with pytest.raises(SystemExit) as stop:
        main(["--device", "cuda"])
    assert stop.value.code == 2
    assert "--device cuda: torch sees no CUDA GPU here" in capsys.readouterr().err


def _plugin_checkpoint(path, ema: bool) -> tuple[torch.nn.Module, list]:
    """A small plugin model saved as fairchem's trainer saves it; with ``ema``, a shadow copy of
    its trainable weights that differs from them. -> (the model, the shadow weights or None)."""
    from oracle import OUR_HEADS, SMALL

    from fairchem_equiformerv2.tools.checkpoints import build_model, trainable_parameter_names

    config = {"model": {
        "name": "hydra", "otf_graph": True, "pass_through_head_outputs": True,
        "backbone": {"model": "fairchem_equiformerv2.EquiformerV2Backbone", **SMALL, "lmax_list": [2], "mmax_list": [1]},
        "heads": {h: {"module": OUR_HEADS[h]} for h in ("energy", "forces")},
    }}
    torch.manual_seed(0)
    model = build_model(config["model"])
    parameters = dict(model.named_parameters())
    shadow = [parameters[n].detach() + 0.05 * torch.randn_like(parameters[n]) for n in trainable_parameter_names(model)]
    ema_state = {"decay": 0.9, "num_updates": 3, "shadow_params": shadow, "collected_params": []} if ema else None
    torch.save({"state_dict": {"module." + k: v for k, v in model.state_dict().items()}, "config": config,
                "ema": ema_state}, path)
    return model, shadow if ema else None


@pytest.mark.parametrize("ema", [False, True])
def test_bf16_error_reads_a_checkpoints_weights(tmp_path, ema):
    from bf16_error import checkpoint_model

    from fairchem_equiformerv2.tools.checkpoints import trainable_parameter_names

    saved, shadow = _plugin_checkpoint(tmp_path / "checkpoint.pt", ema)
    model, label = checkpoint_model(str(tmp_path / "checkpoint.pt"))
    assert ("EMA weights" if ema else "state_dict weights") in label and "2 layers, lmax 2, 16 channels" in label
    parameters = dict(model.named_parameters())
    expected = shadow if ema else [dict(saved.named_parameters())[n] for n in trainable_parameter_names(saved)]
    for name, value in zip(trainable_parameter_names(model), expected):
        assert torch.equal(parameters[name], value), name


def test_bf16_error_runs_on_a_checkpoint(tmp_path, capsys):
    from bf16_error import main

    _plugin_checkpoint(tmp_path / "checkpoint.pt", ema=True)
    main(["--checkpoint", str(tmp_path / "checkpoint.pt"), "--atoms", "18", "--threads", "1"])
    rows = {line[:56].strip(): line[56:].split()[:4] for line in capsys.readouterr().out.splitlines()[2:]}
    assert set(rows) >= {"autocast bf16", "weights rounded to bf16: all", "weights rounded to bf16: SO(2) convolutions",
                         "autocast bf16, float32: S2 activation", "autocast bf16, float32: edge-frame rotations"}
    # with the attentions in float32 nothing is left in bf16 (the rest of the model computes in float32
    # under autocast: precision.py), so the output is float32's
    assert all(float(v) == 0 for v in rows.pop("autocast bf16, float32: whole graph attention"))
    for label, values in rows.items():  # relative errors of bf16 rounding: small, not zero, not NaN
        assert all(1e-7 < float(v) < 0.1 for v in values), (label, values)


def test_bf16_error_refuses_a_missing_checkpoint_naming_it(tmp_path, capsys):
    from bf16_error import main

    with pytest.raises(SystemExit) as stop:
        main(["--checkpoint", str(tmp_path / "nope.pt"), "--threads", "1"])
    assert stop.value.code == 2
    assert f"--checkpoint: checkpoint {tmp_path / 'nope.pt'}: no such file" in capsys.readouterr().err
