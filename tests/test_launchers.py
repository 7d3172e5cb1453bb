"""fairchem's launchers running the plugin's model, on the CPU.

* local DDP (``fairchem --num-gpus 2 --cpu``, gloo) gives the same result as one process with
  the same global batch;
* ``fairchem --submit`` writes a correct SLURM job through submitit (stand-in ``sbatch``), and that
  job's payload trains as a 2-task job (stand-in ``scontrol``, the SLURM variables of a 2-task job);
* preemption: SIGUSR2 (what SLURM sends before the time limit) makes submitit call fairchem's
  ``Runner.checkpoint``, requeue the job, and the requeued job resumes to the same loss curve as an
  uninterrupted run.
"""
from __future__ import annotations

import os
import pickle
import re
import shlex
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from fairchem_runs import (  # noqa: F401  (demo_data is a fixture)
    CONFIGS, DEMO_S2EF, base_env, demo_data, fairchem_cmd, model_weights, run, s2ef_args, train_steps, val_metrics,
)


# --------------------------------------------------------------------------------------------
# local DDP: fairchem's elastic launcher, gloo on the CPU
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def single_process_run(demo_data, tmp_path_factory):
    """2 epochs x 4 steps, one process, batch 8 (also the uninterrupted reference for preemption)."""
    tmp = tmp_path_factory.mktemp("single")
    log = run(
        fairchem_cmd() + ["--mode", "train"]
        + s2ef_args(demo_data, tmp / "run", "single", "--optim.max_epochs=2", "--optim.batch_size=8"),
        tmp / "train.log", env=base_env(),
    )
    return log, tmp / "run" / "checkpoints" / "single" / "checkpoint.pt"


@pytest.mark.slow
def test_local_ddp_matches_single_process(demo_data, tmp_path, single_process_run):
    single_log, single_ckpt = single_process_run
    # 2 ranks x batch 4 = the same global batch of 8: fairchem's DDP loss divides by the global count
    ddp_log = run(
        fairchem_cmd() + ["--mode", "train", "--num-gpus", 2]
        + s2ef_args(demo_data, tmp_path / "run", "ddp", "--optim.max_epochs=2", "--optim.batch_size=4"),
        tmp_path / "ddp.log", env=base_env(),
    )
    assert "Running in local mode with 2 ranks" in ddp_log
    ddp_ckpt = tmp_path / "run" / "checkpoints" / "ddp" / "checkpoint.pt"

    single, ddp = val_metrics(single_log), val_metrics(ddp_log)
    assert sorted(single) == sorted(ddp) == [1.0, 2.0]
    for epoch in single:
        for key in ("energy_mae", "forces_mae", "loss"):  # logged with 4 decimals
            assert ddp[epoch][key] == pytest.approx(single[epoch][key], rel=2e-3, abs=2e-4), (epoch, key)

    # Adam turns fp-level gradient differences on near-zero gradients into +-lr steps, so compare the
    # weights as a whole (measured here: 8e-4 relative after 8 steps)
    a, b = model_weights(single_ckpt), model_weights(ddp_ckpt)
    assert a.keys() == b.keys()
    va, vb = (torch.cat([w[k].flatten() for k in sorted(a)]) for w in (a, b))
    assert ((va - vb).norm() / va.norm()).item() < 5e-3


# --------------------------------------------------------------------------------------------
# SLURM through submitit, with stand-ins for sbatch / scontrol / srun
# --------------------------------------------------------------------------------------------
SBATCH = """#!/usr/bin/env bash
# stand-in sbatch: record the submitted script and answer like sbatch does
set -e
rec="${SLURM_STUB_DIR:?}"
id=$(cat "$rec/next_id" 2>/dev/null || echo 4242)
echo $((id + 1)) > "$rec/next_id"
cp "${@: -1}" "$rec/sbatch_$id.sh"
printf '%s\\n' "$@" > "$rec/sbatch_$id.args"
echo "Submitted batch job $id"
"""
SCONTROL = """#!/usr/bin/env bash
# stand-in scontrol: 'show hostnames LIST' -> this host; 'requeue JOBID' -> recorded
rec="${SLURM_STUB_DIR:?}"
case "$1 $2" in
  "show hostnames") echo localhost ;;
  requeue*) echo "$2" >> "$rec/requeued" ;;
  *) echo "scontrol stand-in: unsupported: $*" >&2; exit 1 ;;
esac
"""
SRUN = """#!/usr/bin/env bash
echo "srun stand-in: only needed on PATH for submitit to pick its SLURM executor" >&2
exit 1
"""
# A CPU node standing in for a GPU node. fairchem 1.10's SLURM set-up (distutils.setup with
# submit=True) hard-codes the NCCL backend and torch.cuda.set_device(local_rank): on a CPU-only
# torch use gloo and skip the device pinning. fairchem 1.10's --sweep-yml needs
# collections.MutableMapping (removed in Python 3.10): EQV2_TEST_COLLECTIONS_COMPAT puts it back. Optionally send ourselves SIGUSR2 right after the
# N-th optimizer step (what SLURM's `--signal=USR2@90` does before the time limit), so the
# preemption lands at a step boundary, deterministically.
SITECUSTOMIZE = '''
import os
if os.environ.get("EQV2_TEST_COLLECTIONS_COMPAT"):
    # fairchem 1.10's create_grid (--sweep-yml) uses collections.MutableMapping, gone since Python 3.10
    import collections, collections.abc
    collections.MutableMapping = collections.abc.MutableMapping
if os.environ.get("EQV2_TEST_CPU_SLURM"):
    import torch
    import torch.distributed as dist
    if not torch.cuda.is_available():
        _init = dist.init_process_group
        def _gloo_init(backend=None, *args, **kwargs):
            return _init("gloo" if backend in (None, "nccl") else backend, *args, **kwargs)
        dist.init_process_group = _gloo_init
        torch.cuda.set_device = lambda *args, **kwargs: None
if os.environ.get("EQV2_TEST_SIGUSR2_AFTER_STEP"):
    import signal
    from fairchem.core.models.equiformer_v2.trainers.lr_scheduler import LRScheduler
    _after, _step = int(os.environ["EQV2_TEST_SIGUSR2_AFTER_STEP"]), LRScheduler.step
    def _step_then_signal(self, *args, **kwargs):
        _step(self, *args, **kwargs)
        self._eqv2_test_steps = getattr(self, "_eqv2_test_steps", 0) + 1
        if self._eqv2_test_steps == _after:
            os.kill(os.getpid(), signal.SIGUSR2)
    LRScheduler.step = _step_then_signal
'''


@pytest.fixture
def slurm(tmp_path):
    """Stand-ins on PATH; returns (env, record_dir, shim_dir)."""
    stub_bin, rec, shim = tmp_path / "stub_bin", tmp_path / "slurm_records", tmp_path / "shim"
    for d in (stub_bin, rec, shim):
        d.mkdir()
    for name, text in (("sbatch", SBATCH), ("scontrol", SCONTROL), ("srun", SRUN)):
        (stub_bin / name).write_text(text)
        (stub_bin / name).chmod(0o755)
    (shim / "sitecustomize.py").write_text(textwrap.dedent(SITECUSTOMIZE))
    env = base_env(PATH=f"{stub_bin}{os.pathsep}{os.environ['PATH']}", SLURM_STUB_DIR=str(rec))
    return env, rec, shim


def submit_demo_training(demo_data: Path, tmp_path: Path, env: dict, rec: Path, num_gpus: int, timestamp: str,
                         *extra) -> dict[str, str]:
    """`fairchem --mode train --submit` of a 1-node demo run through the stand-in sbatch; the job it recorded."""
    run(
        fairchem_cmd() + ["--mode", "train", "--submit", "--num-nodes", 1, "--num-gpus", num_gpus,
                          "--slurm-partition", "test", "--logdir", tmp_path / "logs"]
        + s2ef_args(demo_data, tmp_path / "run", timestamp, *extra),
        tmp_path / "submit.log", env=env, timeout=120,
    )
    return submitted(rec)


def submitted(rec: Path) -> dict[str, str]:
    scripts = sorted(rec.glob("sbatch_*.sh"))
    assert len(scripts) == 1, scripts
    return {"id": scripts[0].stem.split("_")[1], "script": scripts[0].read_text()}


def sbatch_options(script: str) -> dict[str, str]:
    return dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", script, flags=re.M))


def run_payload(script: str, job_id: str, ntasks: int, env: dict, shim: Path, log_dir: Path, extra_env=None):
    """Do what `srun` in the submitted script does on a 1-node, `ntasks`-task allocation."""
    exports = dict(line[len("export "):].split("=", 1) for line in script.splitlines() if line.startswith("export "))
    srun = shlex.split([line for line in script.splitlines() if line.startswith("srun ")][-1])
    payload = srun[next(i for i, a in enumerate(srun) if Path(a).name.startswith("python")):]
    payload = [a.replace("%j", job_id) for a in payload]
    procs = []
    for rank in range(ntasks):
        task_env = dict(
            env, **exports, **(extra_env or {}),
            SLURM_JOB_ID=job_id, SLURM_JOB_NAME="eqv2", SLURM_NNODES="1", SLURM_JOB_NUM_NODES="1",
            SLURM_NODEID="0", SLURM_NTASKS=str(ntasks), SLURM_NTASKS_PER_NODE=str(ntasks),
            SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank),
            SLURM_JOB_NODELIST="localhost", SLURM_STEP_NODELIST="localhost", CUDA_VISIBLE_DEVICES="",
            EQV2_TEST_CPU_SLURM="1", PYTHONPATH=os.pathsep.join(filter(None, [str(shim), env.get("PYTHONPATH")])),
        )
        log = open(log_dir / f"payload_{job_id}_{rank}.log", "a")
        procs.append((subprocess.Popen(payload, env=task_env, stdout=log, stderr=subprocess.STDOUT), log))
    codes = []
    for proc, log in procs:
        try:
            codes.append(proc.wait(timeout=600))
        finally:
            log.close()
    return codes


def test_sweep_yml_needs_python_lt_3_10_upstream():
    """fairchem 1.10's create_grid uses collections.MutableMapping: --sweep-yml fails on Python >= 3.10.

    When this starts failing, fairchem fixed it: drop EQV2_TEST_COLLECTIONS_COMPAT below."""
    import collections

    from fairchem.core.common.utils import create_grid

    if hasattr(collections, "MutableMapping"):
        pytest.skip("collections.MutableMapping exists here")
    with pytest.raises(AttributeError, match="MutableMapping"):
        create_grid({"optim": {"lr_initial": 1.0}}, str(CONFIGS / "demo" / "s2ef.yml"))


def test_submit_writes_correct_slurm_jobs(tmp_path, slurm):
    """--submit: nodes, tasks and GPUs per node, partition, time; --sweep-yml: a job array."""
    env, rec, shim = slurm
    sweep = tmp_path / "sweep.yml"
    sweep.write_text("optim:\n  lr_initial: [0.001, 0.004]\n")
    sweep_env = dict(env, EQV2_TEST_COLLECTIONS_COMPAT="1", PYTHONPATH=str(shim))
    for extra, array, job_env in (([], None, env), (["--sweep-yml", sweep], "0-1", sweep_env)):
        for f in rec.glob("sbatch_*"):
            f.unlink()
        log = run(
            fairchem_cmd() + ["--mode", "train", "--config-yml", DEMO_S2EF, "--submit", "--num-nodes", 4,
                              "--num-gpus", 8, "--slurm-partition", "gpu", "--slurm-timeout", 2,
                              "--slurm-mem", 64, "--identifier", "eqv2", "--logdir", tmp_path / "logs",
                              "--run-dir", tmp_path / "run", *extra],
            tmp_path / "submit.log", env=job_env, timeout=120,
        )
        job = submitted(rec)
        opts = sbatch_options(job["script"])
        assert opts["nodes"] == "4" and opts["ntasks-per-node"] == "8" and opts["gpus-per-node"] == "8"
        assert opts["partition"] == "gpu" and opts["time"] == "120" and opts["mem"] == "64GB"
        assert opts["job-name"] == "eqv2" and opts["signal"].startswith("USR2@")  # preemption warning
        assert opts["cpus-per-task"] == str(yaml.safe_load(DEMO_S2EF.read_text())["optim"]["num_workers"] + 1)
        assert opts.get("array", "").split("%")[0] == (array or "")
        assert "-m submitit.core._submit" in job["script"]
        ids = re.search(r"Submitted jobs: (.*)", log).group(1).split(", ")
        assert ids == ([job["id"]] if array is None else [f"{job['id']}_0", f"{job['id']}_1"])
        if array:  # one pickled fairchem config per array task, with its swept value
            lrs = []
            for task in (0, 1):
                pkl = tmp_path / "logs" / f"{job['id']}_{task}" / f"{job['id']}_{task}_submitted.pkl"
                with open(pkl, "rb") as f:
                    delayed = pickle.load(f)
                lrs.append(delayed.args[0]["optim"]["lr_initial"])
            assert sorted(lrs) == [0.001, 0.004]


@pytest.mark.slow
def test_slurm_two_task_job_trains(demo_data, tmp_path, slurm):
    env, rec, shim = slurm
    run_dir = tmp_path / "run"
    job = submit_demo_training(demo_data, tmp_path, env, rec, 2, "slurm2", "--optim.max_epochs=1", "--optim.batch_size=4")
    opts = sbatch_options(job["script"])
    assert opts["nodes"] == "1" and opts["ntasks-per-node"] == "2" and opts["gpus-per-node"] == "2"
    codes = run_payload(job["script"], job["id"], 2, env, shim, tmp_path)
    logs = [(tmp_path / f"payload_{job['id']}_{r}.log").read_text() for r in range(2)]
    assert codes == [0, 0], "\n".join(log[-3000:] for log in logs)
    assert "Init: tcp://localhost:" in logs[0]  # fairchem's SLURM rendezvous, from `scontrol show hostnames`
    assert val_metrics(logs[0])  # validated after the epoch
    assert (run_dir / "checkpoints" / "slurm2" / "checkpoint.pt").is_file()
    results = sorted((tmp_path / "logs" / job["id"]).glob("*_result.pkl"))
    assert len(results) == 2  # submitit: both tasks finished


# --------------------------------------------------------------------------------------------
# preemption: SIGUSR2 -> submitit -> Runner.checkpoint -> requeue -> resume
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_preempted_job_resumes_to_the_same_loss_curve(demo_data, tmp_path, slurm, single_process_run):
    env, rec, shim = slurm
    reference_log, reference_ckpt = single_process_run
    run_dir = tmp_path / "run"
    job = submit_demo_training(demo_data, tmp_path, env, rec, 1, "single", "--optim.max_epochs=2", "--optim.batch_size=8")
    # first allocation: the time-limit warning arrives after step 3 (mid-epoch: 4 steps per epoch)
    codes = run_payload(job["script"], job["id"], 1, env, shim, tmp_path, {"EQV2_TEST_SIGUSR2_AFTER_STEP": "3"})
    first = (tmp_path / f"payload_{job['id']}_0.log").read_text()
    assert codes != [0], first[-3000:]
    assert "Checkpointing callback is triggered" in first, first[-3000:]  # fairchem's Runner.checkpoint
    assert (rec / "requeued").read_text().split() == [job["id"]]  # submitit requeued the job
    ckpt = run_dir / "checkpoints" / "single" / "checkpoint.pt"
    assert torch.load(ckpt, map_location="cpu", weights_only=False)["step"] == 3

    # the requeued job: same job id, submitit loads the checkpointed submission and fairchem resumes
    codes = run_payload(job["script"], job["id"], 1, env, shim, tmp_path)
    both = (tmp_path / f"payload_{job['id']}_0.log").read_text()
    assert codes == [0], both[-3000:]
    second = both[len(first):]
    assert "Attemping to load user specified checkpoint" in second or "resuming job" in second

    reference, interrupted = train_steps(reference_log), {**train_steps(first), **train_steps(second)}
    assert sorted(reference) == list(range(1, 9))
    assert sorted(train_steps(first)) == [1, 2, 3] and sorted(train_steps(second)) == [4, 5, 6, 7, 8]
    for step in reference:
        assert interrupted[step][0] == pytest.approx(reference[step][0], rel=1e-4, abs=1e-6), step
        assert interrupted[step][1] == pytest.approx(reference[step][1], rel=1e-6), step
    a, b = model_weights(reference_ckpt), model_weights(ckpt)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
