"""The GPU measurements of the performance issue that compare_fairchem.py does not make:

* ``autocast``: bf16 autocast (with cuBLAS's default bf16 reductions in split-K matmuls, and without),
  and float32 with TF32 matmuls, against plain float32 on the same weights
  (fairchem's initialisation plus 0.1 noise) and frames, for both implementations: ``|low - fp32| / |fp32|``
  (norms over the batch) and ``max |low - fp32| / max |fp32|``, energy and forces; and our training step
  time under each;
* ``batch``: the largest batch of the 153M shape (structures of ``--atoms`` atoms) whose training step
  fits in the GPU's memory, without and with activation checkpointing; peak memory is linear in the
  batch, so it is measured at two small batches, extrapolated to the card's memory, and the
  extrapolation checked by running that batch (and, where a step is quick, one 10% larger);
* ``compile``: ``torch.compile`` of each block; compile time and training step time against eager
  (float32, and under bf16 autocast), and each as throughput against fairchem's float32 eager step
  timed in the same process;
* ``throughput``: training throughput (fairchem's step time over ours, same batch) of our model with
  ``torch_compile: true`` (the blocks, both heads' blocks and the edge-degree embedding compiled) under
  bf16 autocast, against fairchem's float32 eager step, at ``--structures`` and at 2x and 4x that batch;
  and how much of our step the GPU is busy (device time of the kernels over wall time), which says whether the step is
  bound by the GPU or by the host launching kernels; then, at ``--structures``, the same with the compiled
  modules replayed as CUDA graphs (``torch_compile: {mode: reduce-overhead, dynamic: false}``);
* ``profile``: our training step's device time by operator (torch.profiler), kernel launches per step.

    python benchmarks/gpu_checks.py --device cuda                 # autocast, batch, compile
    python benchmarks/gpu_checks.py --device cuda --checks batch --json out.json
"""
from __future__ import annotations

import argparse
import contextlib
import json
import time
import warnings

import torch

from compare_fairchem import build, check_device, demo_batch, perturb, same_weights, step, synchronize, timed_steps


def relative_difference(a: dict, b: dict) -> dict:
    """``|a - b| / |a|`` (norms) and ``max |a - b| / max |a|`` of energy and forces of two HydraModel outputs."""
    out = {}
    for k in ("energy", "forces"):
        diff = a[k][k].float() - b[k][k].float()
        out[f"{k}_norm"] = (diff.norm() / a[k][k].norm()).item()
        out[f"{k}_max"] = (diff.abs().max() / a[k][k].abs().max()).item()
    return out


class matmul_setting:
    """``torch.backends.cuda.matmul.<name> = value`` inside the ``with`` block (a global switch, restored
    on exit)."""

    def __init__(self, name: str, value: bool):
        self.name, self.value = name, value

    def __enter__(self):
        self.before = getattr(torch.backends.cuda.matmul, self.name)
        setattr(torch.backends.cuda.matmul, self.name, self.value)

    def __exit__(self, *exc):
        setattr(torch.backends.cuda.matmul, self.name, self.before)


def bf16_full_reductions(device: str) -> contextlib.ExitStack:
    """bf16 autocast with cuBLAS's reduced-precision (bf16) reductions of split-K matmuls turned off."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch.autocast(device, dtype=torch.bfloat16))
    stack.enter_context(matmul_setting("allow_bf16_reduced_precision_reduction", False))
    return stack


def check_autocast(shape: str, atoms: int, structures: int, device: str, repeats: int) -> dict:
    batch = demo_batch(atoms, structures, device)
    ours, theirs = build("ours", shape).to(device), build("fairchem", shape).to(device)
    torch.manual_seed(1)
    perturb(theirs, 0.1)
    same_weights(theirs, ours)
    device_type = device.split(":")[0]
    precisions = {
        "bf16": lambda: torch.autocast(device_type, dtype=torch.bfloat16),
        "bf16_full_reductions": lambda: bf16_full_reductions(device_type),
        "tf32": lambda: matmul_setting("allow_tf32", True),
    }
    result = {}
    for name, model in (("ours", ours), ("fairchem", theirs)):
        model.eval()
        with torch.no_grad():
            reference = model(batch)
            for precision, context in precisions.items():
                try:
                    with context():
                        low = model(batch)
                    result[f"{name}_{precision}_vs_fp32"] = relative_difference(reference, low)
                except RuntimeError as error:  # fairchem's model may not run under autocast
                    result[f"{name}_{precision}_vs_fp32"] = f"failed: {str(error).splitlines()[0]}"
    ours.train()
    result["ours_train_fp32_s"] = timed_steps(ours, batch, "train", device, repeats)
    for precision, context in precisions.items():
        with context():
            result[f"ours_train_{precision}_s"] = timed_steps(ours, batch, "train", device, repeats)
    return result


def peak_memory(model, atoms: int, structures: int, device: str) -> float | None:
    """Peak CUDA memory (GB) of one training step on ``structures`` structures; None if out of memory."""
    batch = demo_batch(atoms, structures, device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    try:
        step(model, batch, "train")
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 2**30
    except torch.cuda.OutOfMemoryError:
        model.zero_grad(set_to_none=True)
        return None
    finally:
        del batch
        torch.cuda.empty_cache()


def check_largest_batch(atoms: int, device: str, implementations=("ours",), budget_s: float = 60.0) -> dict:
    """Per implementation (and for ours also with activation checkpointing): peak memory at 4 and 16
    structures, the batch that extrapolates to 95% of the card, whether it runs (else 10% fewer, until
    one does) and, if that step took under ``budget_s``, whether 10% more fails."""
    total = torch.cuda.mem_get_info(device)[1] / 2**30
    result = {"gpu_memory_gb": total, "atoms_per_structure": int(demo_batch(atoms, 1).natoms.sum())}
    for impl in implementations:
        for checkpointing in ((False, True) if impl == "ours" else (False,)):
            overrides = {"activation_checkpoint": True} if checkpointing else {}
            model = build(impl, "153M", **overrides).to(device).train()
            small, large = 4, 16
            m_small, m_large = peak_memory(model, atoms, small, device), peak_memory(model, atoms, large, device)
            key = f"{impl}{'_checkpointing' if checkpointing else ''}"
            if m_small is None or m_large is None:
                result[key] = {"peak_gb_4": m_small, "peak_gb_16": m_large}
                continue
            per_structure = (m_large - m_small) / (large - small)
            estimate = int((0.95 * total - (m_small - small * per_structure)) / per_structure)
            n = estimate
            while True:
                start = time.perf_counter()
                peak = peak_memory(model, atoms, n, device)
                seconds = time.perf_counter() - start
                if peak is not None or n <= large:
                    break
                n = int(n * 0.9)
            row = {"peak_gb_4": m_small, "peak_gb_16": m_large, "gb_per_structure": per_structure, "estimate": estimate,
                   "largest_run": n, "peak_gb": peak, "step_s": seconds}
            if seconds < budget_s:
                over = int(n * 1.1) + 1
                row[f"{over}_fits"] = peak_memory(model, atoms, over, device) is not None
            result[key] = row
            print(key, row, flush=True)
            del model
            torch.cuda.empty_cache()
    return result


def check_compile(shape: str, atoms: int, structures: int, device: str, repeats: int) -> dict:
    batch = demo_batch(atoms, structures, device)
    theirs = build("fairchem", shape).to(device).train()
    fairchem_s = timed_steps(theirs, batch, "train", device, repeats)
    del theirs
    torch.cuda.empty_cache()
    model = build("ours", shape).to(device).train()
    eager = timed_steps(model, batch, "train", device, repeats)
    for i, block in enumerate(model.backbone.blocks):
        model.backbone.blocks[i] = torch.compile(block, dynamic=True)
    start = time.perf_counter()
    step(model, batch, "train")
    synchronize(device)
    compile_s = time.perf_counter() - start
    compiled = timed_steps(model, batch, "train", device, repeats)
    with torch.autocast(device.split(":")[0], dtype=torch.bfloat16):
        step(model, batch, "train")  # recompiles for bf16
        compiled_bf16 = timed_steps(model, batch, "train", device, repeats)
    times = {"eager_train_s": eager, "compiled_train_s": compiled, "compiled_bf16_autocast_train_s": compiled_bf16}
    return {"fairchem_fp32_eager_train_s": fairchem_s, **times, "first_step_with_compile_s": compile_s,
            "throughput_vs_fairchem_fp32": {k.removesuffix("_train_s"): fairchem_s / v for k, v in times.items()}}


def kernel_events(prof) -> list:
    """The GPU kernels among a profile's averaged events (operators repeat their kernels' time)."""
    return [e for e in prof.key_averages() if e.device_type.name == "CUDA"]


def busy_fraction(model, batch, device: str, steps: int = 3) -> float:
    """Device time of all kernels over wall time, for ``steps`` training steps. Both are read under the
    profiler, whose own host work lengthens the wall time: a lower bound of the unprofiled fraction."""
    from torch.profiler import ProfilerActivity, profile

    synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step(model, batch, "train")
        synchronize(device)
        wall = time.perf_counter() - start
    return sum(e.self_device_time_total for e in kernel_events(prof)) / 1e6 / wall


class _Printed(dict):
    """A dict that prints each item as it is set (a long check's partial results survive a timeout)."""

    def __setitem__(self, key, value):
        print(f"  {key}: {value}", flush=True)
        super().__setitem__(key, value)


def check_throughput(shape: str, atoms: int, structures: int, device: str, repeats: int) -> dict:
    sizes = (structures, 2 * structures, 4 * structures)
    batches = {n: demo_batch(atoms, n, device) for n in sizes}
    result = _Printed(atoms={n: int(b.natoms.sum()) for n, b in batches.items()})
    theirs = build("fairchem", shape).to(device).train()
    for n, batch in batches.items():
        try:
            result[f"fairchem_fp32_eager_{n}_s"] = timed_steps(theirs, batch, "train", device, repeats)
        except torch.cuda.OutOfMemoryError:
            result[f"fairchem_fp32_eager_{n}_s"] = None
        torch.cuda.empty_cache()
    del theirs
    torch.cuda.empty_cache()
    ours = build("ours", shape).to(device).train()
    result["ours_fp32_eager_s"] = timed_steps(ours, batches[structures], "train", device, repeats)
    result["ours_fp32_eager_busy"] = busy_fraction(ours, batches[structures], device)
    del ours
    compiled_bf16_steps(True, shape, batches, device, repeats, "compiled", result)
    result["throughput_vs_fairchem_fp32"] = {
        n: result[f"fairchem_fp32_eager_{n}_s"] / result[f"ours_bf16_compiled_{n}_s"]
        for n in sizes if result[f"fairchem_fp32_eager_{n}_s"]
    }
    torch.cuda.empty_cache()
    # the compiled modules replayed as CUDA graphs, which takes their kernel launches off the host (the
    # remedy for a host-bound step): one graph per module and input shape, so one fixed batch
    cuda_graphs = {"mode": "reduce-overhead", "dynamic": False}
    try:
        compiled_bf16_steps(cuda_graphs, shape, {structures: batches[structures]}, device, repeats, "cuda_graphs", result)
        result["cuda_graphs_throughput_vs_fairchem_fp32"] = (
            result[f"fairchem_fp32_eager_{structures}_s"] / result[f"ours_bf16_cuda_graphs_{structures}_s"])
    except Exception as error:  # the numbers above stand without it
        result["cuda_graphs_error"] = f"{type(error).__name__}: {error}"[:2000]
    return result


def compiled_bf16_steps(options, shape: str, batches: dict, device: str, repeats: int, label: str, result: dict) -> None:
    """Our bf16 training step with ``torch_compile: options`` (fairchem's initial weights, as the eager
    models here): the first step, which compiles, and per batch the median step and the GPU's busy
    fraction, into ``result`` as ``{label}_first_step_s``, ``ours_bf16_{label}_{n}_s`` and
    ``ours_bf16_{label}_{n}_busy``."""
    ours = build("ours", shape, torch_compile=options).to(device).train()
    with torch.autocast(device.split(":")[0], dtype=torch.bfloat16):
        start = time.perf_counter()
        step(ours, next(iter(batches.values())), "train")
        synchronize(device)
        result[f"{label}_first_step_s"] = time.perf_counter() - start
        for n, batch in batches.items():
            result[f"ours_bf16_{label}_{n}_s"] = timed_steps(ours, batch, "train", device, repeats)
            result[f"ours_bf16_{label}_{n}_busy"] = busy_fraction(ours, batch, device)


def check_profile(shape: str, atoms: int, structures: int, device: str, top: int = 15) -> dict:
    """Where our training step spends its GPU time: the ``top`` operators by self device time."""
    from torch.profiler import ProfilerActivity, profile

    batch = demo_batch(atoms, structures, device)
    model = build("ours", shape).to(device).train()
    timed_steps(model, batch, "train", device, repeats=1)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step(model, batch, "train")
        synchronize(device)
    events = sorted(prof.key_averages(), key=lambda e: e.self_device_time_total, reverse=True)
    kernels = kernel_events(prof)
    print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=top), flush=True)
    return {"device_ms_per_step": sum(e.self_device_time_total for e in kernels) / 3e3,
            "kernel_launches_per_step": sum(e.count for e in kernels) / 3,
            "top": [(e.key, round(e.self_device_time_total / 3e3, 2), e.count // 3) for e in events[:top]]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--checks", default="autocast,batch,compile")
    parser.add_argument("--shape", default="31M", help="shape for the autocast and compile checks")
    parser.add_argument("--atoms", type=int, default=80, help="atoms per structure (about)")
    parser.add_argument("--structures", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--batch-fairchem", action="store_true", help="also the largest batch of fairchem's model")
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    check_device(parser, args.device)
    warnings.filterwarnings("ignore")
    results = {"device": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"}
    print(results["device"], flush=True)
    for check in args.checks.split(","):
        start = time.perf_counter()
        try:
            if check == "autocast":
                out = check_autocast(args.shape, args.atoms, args.structures, args.device, args.repeats)
            elif check == "batch":
                out = check_largest_batch(args.atoms, args.device, ("ours", "fairchem") if args.batch_fairchem else ("ours",))
            elif check == "profile":
                out = check_profile(args.shape, args.atoms, args.structures, args.device)
            elif check == "throughput":
                out = check_throughput(args.shape, args.atoms, args.structures, args.device, args.repeats)
            elif check == "compile":
                out = check_compile(args.shape, args.atoms, args.structures, args.device, args.repeats)
            else:
                raise SystemExit(f"--checks: unknown check {check!r} (autocast, batch, compile, throughput, profile)")
        except Exception as error:  # one check failing must not lose the others' numbers
            out = {"error": f"{type(error).__name__}: {error}"[:2000]}
        out["seconds"] = time.perf_counter() - start
        results[check] = out
        print(check, json.dumps(out, indent=1), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
