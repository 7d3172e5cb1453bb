"""Every ``fairchem-eqv2`` command against the files a user did not mean to lose and the errors the OS
gives: one line on stderr naming the path and the reason, exit status 2, nothing partial left."""
from __future__ import annotations

import errno
import os
import resource
import subprocess

import numpy as np
import pytest
import torch
from fairchem_runs import eqv2_cmd
from test_checkpoints import save_fairchem_hydra
from test_submission import OC20, _s2ef_predictions, _write_splits

from fairchem_equiformerv2.tools import submission
from fairchem_equiformerv2.tools.safe_write import replaced_atomically
from fairchem_equiformerv2.tools.checkpoints import convert_checkpoint
from fairchem_equiformerv2.tools.cli import main
from fairchem_equiformerv2.errors import UserInputError


def eqv2(*args, limit_file_size: int | None = None) -> subprocess.CompletedProcess:
    """``fairchem-eqv2 ARGS`` in a subprocess; ``limit_file_size`` caps the size of any file it writes
    (RLIMIT_FSIZE: writes past it fail with the OS's EFBIG, as a full disk fails with ENOSPC)."""
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_file_size, limit_file_size))

    return subprocess.run(
        [*eqv2_cmd(), *map(str, args)], capture_output=True, text=True, timeout=300,
        preexec_fn=limit if limit_file_size is not None else None,
    )


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def files_in(folder) -> set[str]:
    return {p.name for p in folder.iterdir()}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(fairchem's checkpoint, the plugin's converted one)."""
    folder = tmp_path_factory.mktemp("checkpoints")
    source = save_fairchem_hydra(folder)
    return source, convert_checkpoint(source, folder / "plugin.pt")


@pytest.fixture
def predictions(tmp_path):
    return _write_splits(tmp_path, OC20, _s2ef_predictions, name="s2ef_predictions.npz")


def submission_args(paths, out) -> list:
    return ["make-submission", "--id", paths["id"], "--ood-ads", paths["ood_ads"], "--ood-cat", paths["ood_cat"],
            "--ood-both", paths["ood_both"], "--out-path", out]


# --- outputs that are inputs, outputs that exist --------------------------------------------------


def test_make_submission_refuses_an_output_that_is_an_input(predictions, tmp_path):
    before = predictions["id"].read_bytes()
    for force in ([], ["--force"]):
        assert_one_line_error(eqv2(*submission_args(predictions, predictions["id"]), *force), "is the input")
    link = tmp_path / "link.npz"
    link.symlink_to(predictions["ood_cat"])
    assert_one_line_error(eqv2(*submission_args(predictions, link), "--force"), "is the input")
    assert predictions["id"].read_bytes() == before and link.resolve() == predictions["ood_cat"]


def test_make_submission_replaces_an_existing_file_only_with_force(predictions, tmp_path):
    out = tmp_path / "submission.npz"
    out.write_bytes(b"earlier submission")
    assert_one_line_error(eqv2(*submission_args(predictions, out)), str(out), "exists; pass --force")
    assert out.read_bytes() == b"earlier submission"
    assert eqv2(*submission_args(predictions, out), "--force").returncode == 0
    assert set(np.load(out)) >= {"id_ids", "ood_both_forces"}


def test_fix_checkpoint_asks_before_replacing_an_unrelated_file(checkpoints, tmp_path):
    _, plugin = checkpoints
    unrelated = tmp_path / "notes.pt"
    unrelated.write_bytes(b"my notes")
    assert_one_line_error(eqv2("fix-checkpoint", plugin, unrelated), "exists; pass --force")
    assert unrelated.read_bytes() == b"my notes"
    assert eqv2("fix-checkpoint", plugin, unrelated, "--force").returncode == 0
    assert torch.load(unrelated, weights_only=True)["config"]["trainer"] == "ocp"


def test_convert_checkpoint_refuses_its_input_through_a_link(checkpoints, tmp_path):
    source, _ = checkpoints
    link = tmp_path / "same.pt"
    link.symlink_to(source)
    assert_one_line_error(eqv2("convert-checkpoint", source, link, "--force"), "is the input")


def test_a_destination_that_is_a_folder_or_under_a_file(checkpoints, tmp_path):
    source, _ = checkpoints
    assert_one_line_error(eqv2("convert-checkpoint", source, tmp_path), str(tmp_path), "is a folder")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert_one_line_error(eqv2("convert-checkpoint", source, blocker / "out.pt"), "is a file, not a folder")


def test_demo_data_refuses_before_making_anything(tmp_path):
    blocker = tmp_path / "data"
    blocker.write_text("not a folder")
    assert_one_line_error(eqv2("demo-data", blocker, "--no-progress"), "is a file, not a folder")
    sizes = [f"--num-{task}-{split}=1" for task in ("s2ef", "is2re") for split in ("train", "val", "test")]
    out = tmp_path / "demo"
    assert eqv2("demo-data", out, "--no-progress", *sizes).returncode == 0
    lmdb = out / "s2ef" / "train" / "data.lmdb"
    before = lmdb.read_bytes()
    assert_one_line_error(eqv2("demo-data", out, "--no-progress", *sizes, "--seed", 1), "exists; pass --force")
    assert lmdb.read_bytes() == before
    assert eqv2("demo-data", out, "--no-progress", *sizes, "--seed", 1, "--force").returncode == 0
    assert lmdb.read_bytes() != before


# --- two writers of one output --------------------------------------------------------------------


def test_an_output_written_meanwhile_by_another_process_is_kept(predictions, tmp_path, monkeypatch, capsys):
    """Both writers pass the check; the other one finishes first (here: while this one validates).
    This one is refused as if the file had been there at the check; the other's file stays intact."""
    (tmp_path / "out").mkdir()
    out = tmp_path / "out" / "submission.npz"
    validate_across_splits = submission.validate_across_splits

    def the_other_writer_finishes_first(predictions):
        out.write_bytes(b"the other process's submission")
        return validate_across_splits(predictions)

    monkeypatch.setattr(submission, "validate_across_splits", the_other_writer_finishes_first)
    args = [str(arg) for arg in submission_args(predictions, out)]
    assert main(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and f"--out-path {out} exists; pass --force" in lines[0], lines
    assert out.read_bytes() == b"the other process's submission"
    assert files_in(out.parent) == {"submission.npz"}  # no temporary file left
    assert main([*args, "--force"]) == 0  # with consent it is replaced
    assert set(np.load(out)) >= {"id_ids"}


def test_writers_in_one_process_use_their_own_temporary_files(tmp_path):
    """Two threads (here: nested writers) of one process writing the same file do not share a
    temporary file; the last to finish wins, as with processes."""
    out = tmp_path / "out.bin"
    with replaced_atomically(out, overwrite=True) as first:
        first.write_bytes(b"first")
        with replaced_atomically(out, overwrite=True) as second:
            assert second != first
            second.write_bytes(b"second")
        assert out.read_bytes() == b"second"
    assert out.read_bytes() == b"first" and files_in(tmp_path) == {"out.bin"}
    with pytest.raises(UserInputError, match="exists; pass --force"):
        with replaced_atomically(out, overwrite=False) as third:
            third.write_bytes(b"third")
    assert out.read_bytes() == b"first" and files_in(tmp_path) == {"out.bin"}


def test_without_hard_links_an_existing_output_is_still_refused(tmp_path, monkeypatch):
    """On a file system without hard links (os.link fails with EPERM, as on FAT) the last step is a
    check, then the rename: a new file is written, an existing one refused and kept."""
    def no_hard_links(source, destination):
        raise PermissionError(errno.EPERM, "Operation not permitted", str(source))

    monkeypatch.setattr(os, "link", no_hard_links)
    out = tmp_path / "out.bin"
    with replaced_atomically(out, overwrite=False) as temporary:
        temporary.write_bytes(b"first")
    with pytest.raises(UserInputError, match="exists; pass --force"):
        with replaced_atomically(out, overwrite=False) as temporary:
            temporary.write_bytes(b"second")
    assert out.read_bytes() == b"first" and files_in(tmp_path) == {"out.bin"}


def test_negative_seed_is_a_usage_error(tmp_path):
    result = eqv2("demo-data", tmp_path / "demo", "--seed", "-3")
    assert result.returncode == 2 and "--seed: -3 is negative" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "demo").exists()


# --- the OS's errors ---------------------------------------------------------------------------


def test_a_full_disk_is_named_and_leaves_nothing(predictions, checkpoints, tmp_path):
    """A write that the OS stops half way (here the file-size limit, EFBIG; a full disk is ENOSPC):
    one line with the path and the OS's reason; no file, no temporary file."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    result = eqv2(*submission_args(predictions, out_dir / "submission.npz"), limit_file_size=512)
    assert_one_line_error(result, str(out_dir / "submission.npz"), "File too large")
    _, plugin = checkpoints
    result = eqv2("fix-checkpoint", plugin, out_dir / "fixed.pt", limit_file_size=4096)
    assert_one_line_error(result, str(out_dir / "fixed.pt"), "File too large")
    result = eqv2("demo-data", out_dir / "demo", "--no-progress", limit_file_size=4096)
    lmdb = out_dir / "demo" / "s2ef" / "train" / "data.lmdb"  # named where it goes, not where it was being made
    assert_one_line_error(result, f"cannot write {lmdb}: No space left on device")  # LMDB's words
    assert files_in(out_dir) == set()  # not even the folder demo-data made


def test_a_checkpoint_with_nan_weights_is_refused(checkpoints, tmp_path):
    source, _ = checkpoints
    checkpoint = torch.load(source, weights_only=True)
    key = next(k for k in checkpoint["state_dict"] if k.endswith("weight"))
    checkpoint["state_dict"][key][0].fill_(float("nan"))
    diverged = tmp_path / "diverged.pt"
    torch.save(checkpoint, diverged)
    out = tmp_path / "out.pt"
    assert_one_line_error(eqv2("convert-checkpoint", diverged, out), "NaN or infinite", "diverged")
    assert not out.exists()
