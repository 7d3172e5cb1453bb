"""The ``fairchem-eqv2`` command line.

Each subcommand is registered by a small ``_add_<name>(subparsers)`` function that builds
its parser and sets ``handler`` (a function of the parsed arguments). To add one, write
such a function and list it in :data:`_SUBCOMMANDS`.

User errors (:class:`~fairchem_equiformerv2.errors.UserInputError`, a missing file) are
printed as one line on stderr with exit status 2, without a traceback.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from .errors import UserInputError

EXIT_USER_ERROR = 2


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``fairchem-eqv2``; returns the exit status (0 on success)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.handler(args)
    except (UserInputError, FileNotFoundError) as error:
        print(f"fairchem-eqv2 {args.command}: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fairchem-eqv2", description="EquiformerV2 for fairchem-core: tools.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_subcommand in _SUBCOMMANDS:
        add_subcommand(subparsers)
    return parser


def _add_demo_data(subparsers: argparse._SubParsersAction) -> None:
    from .demo_data import DEFAULT_IS2RE_SIZES, DEFAULT_S2EF_SIZES

    parser = subparsers.add_parser(
        "demo-data",
        help="write small S2EF and IS2RE LMDB datasets labelled with ASE's EMT",
        description="Write OUT_DIR/{s2ef,is2re}/{train,val,test}/data.lmdb (+ metadata.npz) in fairchem's "
        "LMDB format, labelled with ASE's EMT. The same seed and sizes give byte-identical files.",
    )
    parser.add_argument("out_dir", metavar="OUT_DIR", help="output folder (existing demo files are replaced)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    for task, defaults, unit in (("s2ef", DEFAULT_S2EF_SIZES, "frames"), ("is2re", DEFAULT_IS2RE_SIZES, "systems")):
        for split, size in defaults.items():
            parser.add_argument(
                f"--num-{task}-{split}", type=int, default=size, metavar="N",
                help=f"{task.upper()} {split} {unit} (default: %(default)s)",
            )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    parser.set_defaults(handler=_run_demo_data)


def _run_demo_data(args: argparse.Namespace) -> None:
    from .demo_data import SPLITS, make_demo_data

    paths = make_demo_data(
        args.out_dir,
        seed=args.seed,
        s2ef_sizes={split: getattr(args, f"num_s2ef_{split}") for split in SPLITS},
        is2re_sizes={split: getattr(args, f"num_is2re_{split}") for split in SPLITS},
        progress=not args.no_progress,
    )
    for task, splits in paths.items():
        for split, path in splits.items():
            print(f"{task}/{split}: {path}")


def _add_make_submission(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "make-submission",
        help="join per-split prediction files into one EvalAI submission .npz, validated",
        description="Join the per-split files of `fairchem --mode predict` (e.g. s2ef_predictions.npz, "
        "is2re_predictions.npz) into one EvalAI submission file, like fairchem's make_submission_file.py, "
        "after checking them: all splits present, unique ids, finite values, consistent shapes and chunk_idx. "
        "Nothing is written if a check fails.",
    )
    parser.add_argument("--id", help="ID split predictions (OC20 and OC22)")
    parser.add_argument("--ood-ads", help="OOD-Ads split predictions (OC20 only)")
    parser.add_argument("--ood-cat", help="OOD-Cat split predictions (OC20 only)")
    parser.add_argument("--ood-both", help="OOD-Both split predictions (OC20 only)")
    parser.add_argument("--ood", help="OOD split predictions (OC22 only)")
    parser.add_argument("--out-path", required=True, help="submission file to write (.npz is appended if missing)")
    parser.add_argument(
        "--dataset", default="OC20", choices=["OC20", "OC22"], help="which leaderboard (default: %(default)s)"
    )
    parser.add_argument(
        "--is2re-relaxations", action="store_true",
        help="IS2RE energies from ML relaxations: the split paths are folders of <sid>.traj files "
        "(the last frame's energy is the prediction)",
    )
    parser.add_argument(
        "--hybrid", action="store_true",
        help="with --is2re-relaxations: the split paths are S2EF prediction files; ids <sid>_<fid> become <sid>",
    )
    parser.set_defaults(handler=_run_make_submission)


def _run_make_submission(args: argparse.Namespace) -> None:
    from .submission import make_submission

    split_paths = {split: getattr(args, split) for split in ("id", "ood_ads", "ood_cat", "ood_both", "ood")}
    path = make_submission(
        split_paths,
        args.out_path,
        dataset=args.dataset,
        is2re_relaxations=args.is2re_relaxations,
        hybrid=args.hybrid,
    )
    print(f"Results saved to {path} successfully.")


def _add_convert_checkpoint(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "convert-checkpoint",
        help="convert a fairchem EquiformerV2 checkpoint to one that uses this plugin",
        description="Read a fairchem EquiformerV2 checkpoint (the older single-model layout of the public OC20 "
        "checkpoints, or the hydra backbone/heads layout) and write a fairchem checkpoint whose config names "
        "the plugin's backbone and heads, with the weights and EMA mapped and normalizers and element "
        "references kept. fairchem's OCPCalculator(checkpoint_path=DST) loads the result.",
    )
    parser.add_argument("src", metavar="SRC", help="fairchem checkpoint (.pt)")
    parser.add_argument("dst", metavar="DST", help="checkpoint to write")
    parser.add_argument("--force", action="store_true", help="replace DST if it exists")
    parser.add_argument(
        "--trust", action="store_true",
        help="unpickle SRC fully (torch.load without weights_only) when it holds Python objects other than "
        "tensors and plain containers: only for files from a source you trust",
    )
    parser.set_defaults(handler=_run_convert_checkpoint)


def _run_convert_checkpoint(args: argparse.Namespace) -> None:
    from .checkpoints import convert_checkpoint

    print(f"wrote {convert_checkpoint(args.src, args.dst, trust=args.trust, overwrite=args.force)}")


def _add_fix_checkpoint(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "fix-checkpoint",
        help="make a checkpoint trained with the plugin load in OCPCalculator(checkpoint_path=...)",
        description="fairchem 1.10 stores the task name (s2ef, is2re) as config['trainer'] for runs of its "
        "forces/energy/equiformerv2_* trainers, and OCPCalculator(checkpoint_path=...) then fails with "
        "\"Failed to find the trainer 's2ef'\". This checks the checkpoint and writes a trainer name that loads.",
    )
    parser.add_argument("src", metavar="CHECKPOINT", help="checkpoint trained with the plugin")
    parser.add_argument("dst", metavar="DST", nargs="?", help="where to write (default: rewrite CHECKPOINT in place)")
    parser.add_argument("--trust", action="store_true", help="as for convert-checkpoint")
    parser.set_defaults(handler=_run_fix_checkpoint)


def _run_fix_checkpoint(args: argparse.Namespace) -> None:
    from .checkpoints import fix_checkpoint

    print(f"wrote {fix_checkpoint(args.src, args.dst, trust=args.trust)}")


_SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_demo_data,
    _add_make_submission,
    _add_convert_checkpoint,
    _add_fix_checkpoint,
]


if __name__ == "__main__":
    sys.exit(main())
