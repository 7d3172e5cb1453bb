"""Where the bf16 autocast error of our model comes from.

On weights like those of ``gpu_checks.py --checks autocast`` (fairchem's initialisation plus ``--noise``
Gaussian noise, drawn on the CPU from ``--seed``, so the same on any device) and a batch of OC20-like
slabs, prints, relative to the float32 output
(``|low - fp32| / |fp32|`` over the batch, and ``max |low - fp32| / max |fp32|``, energy and forces):

* ``autocast``: the model under bf16 autocast;
* ``weights ...``: the model in float32 with only the weights that autocast hands to bf16 matmuls
  (the backbone's linear maps; the heads run in float32 in fairchem's HydraModel) rounded to bf16,
  all of them and by group. A bf16 matmul computes with these rounded weights, so this is a floor for
  what bf16 autocast can reach on these weights, short of keeping more matmuls in float32 (ours keeps
  the radial MLPs', the feed-forward networks' and the attention's output projection's: see
  ``precision.py``; the group "those autocast still rounds" is the floor for ours);
* ``autocast bf16, float32: ...``: the model under bf16 autocast with one per-edge stage of the
  backbone's graph attentions computed in float32 (its inputs cast up, autocast off inside), to see
  which stage's rounding costs the most.

With ``--checkpoint``, on a checkpoint's weights instead (ours, or fairchem's EquiformerV2, converted
in memory; its EMA weights, which fairchem predicts with, where it has them): on trained weights.

    python benchmarks/bf16_error.py                       # CPU autocast, 31M, two 38-atom slabs
    python benchmarks/bf16_error.py --noise 0.03 --device cuda --atoms 80 --structures 8
    python benchmarks/bf16_error.py --checkpoint eq2_31M_ec4_allmd.pt
"""
from __future__ import annotations

import argparse
import contextlib
import re
import time
import warnings
from unittest import mock

import torch

from compare_fairchem import build, check_device, demo_batch, perturb, same_weights
from gpu_checks import relative_difference

# Groups of the backbone's matmul weights, by parameter name.
GROUPS = {
    "all": r".",
    "those autocast still rounds": r"so2_conv_\d\.(fc_m0|so2_m_conv)\.|alpha_dot",  # see precision.py
    "radial MLPs": r"rad_func\.",
    "SO(2) convolutions": r"so2_conv_\d\.(fc_m0|so2_m_conv)\.",
    "attention output projection": r"ga\.proj\.",
    "feed-forward": r"ffn\.",
}


# Per-edge stages of the backbone's graph attentions (submodules of ``GraphAttention``; "" is the whole
# attention), computed in float32 under autocast one at a time.
STAGES = {
    "first SO(2) convolution": ("so2_conv_1",),
    "S2 activation": ("act",),
    "second SO(2) convolution": ("so2_conv_2",),
    "all three above": ("so2_conv_1", "act", "so2_conv_2"),
    "edge-frame rotations": (),  # into and out of the frames, also in the edge-degree embedding
    "whole graph attention": ("",),
}


def matmul_weights(model) -> dict[str, torch.nn.Parameter]:
    """The backbone's parameters that autocast casts to bf16: those of linear maps (``nn.Linear``, our
    ``SO3Linear``, the attention logit vector); not norms, embeddings or the heads."""
    from fairchem_equiformerv2.nn.linear import SO3Linear

    names = {n for n, _ in model.backbone.named_parameters() if n.endswith("alpha_dot")}
    for module_name, module in model.backbone.named_modules():
        if isinstance(module, (torch.nn.Linear, SO3Linear)):
            names.update(f"{module_name}.{n}" for n, _ in module.named_parameters(recurse=False))
    return {n: p for n, p in model.backbone.named_parameters() if n in names}


def checkpoint_model(path: str, trust: bool = False):
    """Our model (eval mode, outputs ``{head: {name: tensor}}``) with the weights of the checkpoint at
    ``path``: its EMA where it keeps one (``checkpoint.pt``), else its ``state_dict`` (fairchem's
    ``best_checkpoint.pt`` holds the EMA weights there). ``trust``: unpickle Python objects other than
    tensors (see ``checkpoints.read_checkpoint``). -> (model, a line that says which)."""
    from fairchem.core.modules.exponential_moving_average import ExponentialMovingAverage

    from fairchem_equiformerv2.tools.checkpoints import build_model, convert_checkpoint_dict, read_checkpoint, strip_prefix

    checkpoint = convert_checkpoint_dict(read_checkpoint(path, trust=trust))
    model = build_model(checkpoint["config"]["model"])
    model.pass_through_head_outputs = False  # as relative_difference reads them
    model.load_state_dict(strip_prefix(checkpoint["state_dict"]))
    ema = (checkpoint.get("ema") or {}).get("shadow_params")
    if ema:  # as fairchem's trainer does before it predicts
        average = ExponentialMovingAverage(model.parameters(), checkpoint["ema"]["decay"])
        average.load_state_dict(checkpoint["ema"])
        average.copy_to()
    backbone = model.backbone
    shape = f"{backbone.num_layers} layers, lmax {backbone.lmax}, {backbone.sphere_channels} channels"
    return model.eval(), f"{path} ({shape}; {'EMA' if ema else 'state_dict'} weights)"


def rounded_weights_error(model, batch, reference: dict, pattern: str) -> dict:
    """Output error in float32 with the matmul weights matching ``pattern`` rounded to bf16."""
    chosen = [p for n, p in matmul_weights(model).items() if re.search(pattern, n)]
    saved = [p.detach().clone() for p in chosen]
    with torch.no_grad():
        for p in chosen:
            p.copy_(p.bfloat16())
        error = relative_difference(reference, model(batch))
        for p, value in zip(chosen, saved):
            p.copy_(value)
    return error


def _in_float32(forward):
    """``forward`` with its floating-point tensor arguments in float32 (at least) and autocast off."""
    from fairchem_equiformerv2.nn.precision import at_least_float32, autocast_off

    def run(*args):
        args = [at_least_float32(a) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
        with autocast_off(args[0]):
            return forward(*args)

    return run


@contextlib.contextmanager
def stage_in_float32(model, stage: str):
    """Inside: ``model``'s backbone computes the :data:`STAGES` entry ``stage`` in float32 (the rotations:
    the edge-frame ``bmm``s of ``nn/ops/scatter.py``, which take autocast's dtype from ``matmul_dtype``: given
    its sums' dtype instead)."""
    from fairchem_equiformerv2.nn.attention import GraphAttention
    from fairchem_equiformerv2.nn.precision import accumulation_dtype

    with contextlib.ExitStack() as patches:
        if not STAGES[stage]:
            patches.enter_context(mock.patch("fairchem_equiformerv2.nn.ops.scatter.matmul_dtype", accumulation_dtype))
        for attention in (m for m in model.backbone.modules() if isinstance(m, GraphAttention)):
            for name in STAGES[stage]:
                module = attention.get_submodule(name)
                patches.enter_context(mock.patch.object(module, "forward", _in_float32(module.forward)))
        yield


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="31M")
    parser.add_argument("--atoms", type=int, default=38, help="atoms per structure (about)")
    parser.add_argument("--structures", type=int, default=2)
    parser.add_argument("--noise", type=float, default=0.1, help="std of the noise added to the initial weights")
    parser.add_argument("--seed", type=int, default=1, help="seed of the weight noise")
    parser.add_argument("--weight-init", default="normal", choices=("normal", "uniform"),
                        help="the initialisation the noise is added to: fairchem's default, or the published configs'")
    parser.add_argument("--checkpoint", help="a checkpoint's weights instead of the initialisation plus noise")
    parser.add_argument("--trust", action="store_true", help="the checkpoint may hold Python objects other than tensors")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    check_device(parser, args.device)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)

    batch = demo_batch(args.atoms, args.structures, args.device)
    if args.checkpoint:
        from fairchem_equiformerv2.tools.checkpoints import CheckpointError

        try:
            ours, weights = checkpoint_model(args.checkpoint, trust=args.trust)
        except CheckpointError as e:
            parser.error(f"--checkpoint: {e}")
    else:
        init = {"weight_init": args.weight_init}
        ours, theirs = build("ours", args.shape, **init), build("fairchem", args.shape, **init)
        torch.manual_seed(args.seed)
        perturb(theirs, args.noise)
        same_weights(theirs, ours)
        del theirs
        weights = f"{args.shape}, {args.weight_init} initialisation, weight noise {args.noise} (seed {args.seed})"
    ours = ours.to(args.device).eval()
    rms = torch.cat([p.detach().flatten() for p in matmul_weights(ours).values()]).pow(2).mean().sqrt()
    print(f"{weights}, {args.structures} x {int(batch.natoms[0])} atoms, {args.device}; matmul weights' RMS {rms:.4f}")
    print(f"{'':56s} {'energy, norm':>13s} {'energy, max':>12s} {'forces, norm':>13s} {'forces, max':>12s}")

    def show(label, error, seconds=None):
        values = " ".join(f"{error[k]:>12.1e}" for k in ("energy_norm", "energy_max", "forces_norm", "forces_max"))
        print(f"{label:56s} {values}" + (f"   ({seconds:.0f} s)" if seconds is not None else ""), flush=True)

    device_type = args.device.split(":")[0]
    with torch.no_grad():
        reference = ours(batch)
        start = time.perf_counter()
        with torch.autocast(device_type, dtype=torch.bfloat16):
            low = ours(batch)
        show("autocast bf16", relative_difference(reference, low), time.perf_counter() - start)
        for stage in STAGES:
            with stage_in_float32(ours, stage), torch.autocast(device_type, dtype=torch.bfloat16):
                show(f"autocast bf16, float32: {stage}", relative_difference(reference, ours(batch)))
    for group, pattern in GROUPS.items():
        show(f"weights rounded to bf16: {group}", rounded_weights_error(ours, batch, reference, pattern))


if __name__ == "__main__":
    main()
