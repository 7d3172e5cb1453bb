"""The ``fairchem-eqv2`` command line.

Each subcommand is registered by a small ``_add_<name>(subparsers)`` function that builds
its parser with :func:`_add_parser`, naming its ``handler`` (a function of the parsed arguments). To
add one, write such a function and list it in :data:`_SUBCOMMANDS`.

User errors (:class:`~fairchem_equiformerv2.errors.UserInputError`) and the OS's (``OSError``: a
missing file, a full disk, a read-only folder, with the path) are printed as one line on stderr with
exit status 2, without a traceback; what a command writes is never left half-written. Every command
that writes refuses an output that is one of its inputs, and replaces an existing one only with
``--force``. An interrupt (Ctrl-C, or SIGTERM) is one line too, with exit status 128 + the signal's
number (130, 143), and leaves no partial output.
"""
from __future__ import annotations

import argparse
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from ..errors import UserInputError

EXIT_USER_ERROR = 2


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised as an interrupt so that the clean-up of Ctrl-C runs for it too."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``fairchem-eqv2``; returns the exit status (0 on success)."""
    command = None
    try:
        with _sigterm_as_interrupt():
            args = build_parser().parse_args(argv)
            command = args.command
            # fairchem 1.10's modules warn about their own torch.load calls when imported: noise around the
            # one line a command prints
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"fairchem\.core")
            return _run(args)
    except KeyboardInterrupt as interrupt:
        name = "fairchem-eqv2" if command is None else f"fairchem-eqv2 {command}"
        print(f"{name}: interrupted; no output was left half-written", file=sys.stderr)
        return 128 + (signal.SIGTERM if isinstance(interrupt, Terminated) else signal.SIGINT)


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """While inside, SIGTERM raises :class:`Terminated` (in the main thread; elsewhere nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):
        raise Terminated

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _run(args: argparse.Namespace) -> int:
    """Run the parsed command; a user's or the OS's error is one line on stderr and exit status 2."""
    try:
        args.handler(args)
    except UserInputError as error:
        return _report(args.command, str(error))
    except OSError as error:  # a missing file, a full disk, a read-only folder: the path and the OS's reason
        where = f"{error.filename}: " if error.filename else ""
        return _report(args.command, f"{where}{error.strerror or error}")
    return 0


def _report(command: str, message: str) -> int:
    print(f"fairchem-eqv2 {command}: error: {message}", file=sys.stderr)
    return EXIT_USER_ERROR


def non_negative_int(text: str) -> int:
    """argparse type: a whole number >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative; give a number >= 0")
    return value


def _add_force(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--force", action="store_true", help=f"replace {what} if it exists (default: refuse)")


def _add_trust(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--trust", action="store_true", help=f"unpickle {what} fully (torch.load without weights_only) "
                        "when it holds Python objects other than tensors and plain containers: only for files from "
                        "a source you trust")


def build_parser() -> argparse.ArgumentParser:
    """The ``fairchem-eqv2`` parser: one subparser per entry of :data:`_SUBCOMMANDS`."""
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="fairchem-eqv2",
        description="Tools around the EquiformerV2 plugin for fairchem-core 1.x: demo data, EvalAI submission "
        "files, checkpoint conversion. Training, prediction and relaxations are fairchem's own CLI "
        "(fairchem --mode train|predict|validate|run-relaxations) with the plugin's classes in the config.",
        epilog=_examples(
            "fairchem-eqv2 demo-data demo_data",
            "fairchem-eqv2 convert-checkpoint eq2_31M_ec4_allmd.pt eq2_31M_plugin.pt",
            "fairchem-eqv2 COMMAND --help        # the flags of one command, with examples",
        ),
        formatter_class=_HelpFormatter,
    )
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {__version__}", help="print the plugin's version and exit"
    )
    subparsers = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", title="commands", description="(COMMAND --help for its flags)"
    )
    for add_subcommand in _SUBCOMMANDS:
        add_subcommand(subparsers)
    return parser


class _HelpFormatter(argparse.HelpFormatter):
    """Descriptions wrapped to the terminal as usual; indented lines (the epilog's examples) kept as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        paragraphs = []
        for paragraph in text.split("\n\n"):
            if any(line.startswith(" ") for line in paragraph.splitlines()) or paragraph.startswith("examples:"):
                paragraphs.append("\n".join(indent + line for line in paragraph.splitlines()))
            else:
                paragraphs.append(super()._fill_text(paragraph, width, indent))
        return "\n\n".join(paragraphs)


def _examples(*lines: str) -> str:
    """An ``epilog``: the example command lines, indented (so that :class:`_HelpFormatter` keeps them as written)."""
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


def _add_parser(subparsers: argparse._SubParsersAction, name: str, handler: Callable[[argparse.Namespace], None], *,
                help: str, description: str, examples: Sequence[str]) -> argparse.ArgumentParser:
    """The subcommand ``name``: ``help`` in the command list, ``description`` and ``examples`` in its --help."""
    parser = subparsers.add_parser(name, help=help, description=description, epilog=_examples(*examples),
                                   formatter_class=_HelpFormatter)
    parser.set_defaults(handler=handler)
    return parser


def _add_demo_data(subparsers: argparse._SubParsersAction) -> None:
    from .demo_data import DEFAULT_IS2RE_SIZES, DEFAULT_S2EF_SIZES, IS2RE_RECIPES

    parser = _add_parser(
        subparsers, "demo-data", _run_demo_data,
        help="write small S2EF and IS2RE LMDB datasets labelled with ASE's EMT",
        description="Write small S2EF and IS2RE datasets labelled with ASE's EMT: "
        "OUT_DIR/{s2ef,is2re}/{train,val,test}/data.lmdb (+ metadata.npz) in fairchem's LMDB format (the OC20 "
        "format): adsorbates on fcc metal slabs, OC20 tags and fixed atoms. The same seed and sizes give "
        "byte-identical files. About 30 s with the default sizes. With --format aselmdb: the S2EF splits as "
        "ASE databases (OUT_DIR/s2ef/{train,val,test}/data.aselmdb + metadata.npz), which fairchem 2.x trains on.",
        examples=[
            "fairchem-eqv2 demo-data demo_data",
            "fairchem --mode train --config-yml configs/demo/s2ef.yml --cpu \\",
            "    --dataset.train.src=demo_data/s2ef/train --dataset.val.src=demo_data/s2ef/val",
            "fairchem-eqv2 demo-data demo_data_fairchem2 --format aselmdb   # for fairchem 2.x",
        ],
    )
    parser.add_argument("out_dir", metavar="OUT_DIR", help="output folder (created if needed)")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="random seed, >= 0 (default: %(default)s)")
    for task, defaults, unit in (("s2ef", DEFAULT_S2EF_SIZES, "frames"), ("is2re", DEFAULT_IS2RE_SIZES, "systems")):
        for split, size in defaults.items():
            parser.add_argument(
                f"--num-{task}-{split}", type=non_negative_int, default=size, metavar="N",
                help=f"{task.upper()} {split} {unit} (default: %(default)s)",
            )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars (for logs)")
    parser.add_argument(
        "--format", choices=["lmdb", "aselmdb"], default="lmdb",
        help="lmdb: fairchem 1.x's LMDBs, S2EF and IS2RE; aselmdb: ASE databases of the S2EF frames, for "
        "fairchem 2.x (default: %(default)s)",
    )
    parser.add_argument(
        "--is2re-recipe", choices=sorted(IS2RE_RECIPES), default="demo",
        help="how IS2RE systems start and relax. demo: 1.2-2.2 A above a site, fmax 0.1 eV/A, <= 100 steps "
        "(quick); oc20: 2.5-3.5 A above any point of the surface, fmax 0.05 eV/A, <= 300 steps, as OC20's "
        "relaxations, which move atoms further (for Noisy Nodes) (default: %(default)s)",
    )
    _add_force(parser, "the demo files in OUT_DIR")


def _run_demo_data(args: argparse.Namespace) -> None:
    from .demo_data import SPLITS, make_demo_data

    paths = make_demo_data(
        args.out_dir,
        seed=args.seed,
        s2ef_sizes={split: getattr(args, f"num_s2ef_{split}") for split in SPLITS},
        is2re_sizes={split: getattr(args, f"num_is2re_{split}") for split in SPLITS},
        progress=not args.no_progress,
        overwrite=args.force,
        format=args.format,
        is2re_recipe=args.is2re_recipe,
    )
    for task, splits in paths.items():
        for split, path in splits.items():
            line = f"{task}/{split}: {path}"
            if task == "is2re":  # (written only in fairchem 1.x's format: noisy_nodes needs fairchem 1.x)
                from .noisy_nodes_scale import free_displacements

                distances = free_displacements(path).norm(dim=1)
                line += (f"  (free atoms move {float(distances.mean()):.3f} A on average in the relaxation, "
                         f"median {float(distances.median()):.3f} A)")
            print(line)


def _add_make_submission(subparsers: argparse._SubParsersAction) -> None:
    parser = _add_parser(
        subparsers, "make-submission", _run_make_submission,
        help="join per-split prediction files into one EvalAI submission .npz, validated",
        description="Join the per-split files of `fairchem --mode predict` (e.g. s2ef_predictions.npz, "
        "is2re_predictions.npz) into one EvalAI submission file, like fairchem's make_submission_file.py, "
        "after checking them: all splits present, unique ids, finite values, consistent shapes and chunk_idx. "
        "Nothing is written if a check fails (one line on stderr names the split, the file and the problem; exit "
        "status 2).",
        examples=[
            "fairchem-eqv2 make-submission --id id.npz --ood-ads ood_ads.npz --ood-cat ood_cat.npz \\",
            "    --ood-both ood_both.npz --out-path submission_s2ef.npz                     # OC20",
            "fairchem-eqv2 make-submission --dataset OC22 --id id.npz --ood ood.npz --out-path submission.npz",
            "fairchem-eqv2 make-submission --is2re-relaxations --id traj/id --ood-ads traj/ood_ads \\",
            "    --ood-cat traj/ood_cat --ood-both traj/ood_both --out-path submission_is2re.npz",
        ],
    )
    parser.add_argument("--id", metavar="PATH", help="ID split predictions (OC20 and OC22): a *_predictions.npz file")
    parser.add_argument("--ood-ads", metavar="PATH", help="OOD-Ads split predictions (OC20 only)")
    parser.add_argument("--ood-cat", metavar="PATH", help="OOD-Cat split predictions (OC20 only)")
    parser.add_argument("--ood-both", metavar="PATH", help="OOD-Both split predictions (OC20 only)")
    parser.add_argument("--ood", metavar="PATH", help="OOD split predictions (OC22 only)")
    parser.add_argument(
        "--out-path", required=True, metavar="PATH", help="submission file to write (.npz is appended if missing)"
    )
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
    _add_force(parser, "--out-path")


def _run_make_submission(args: argparse.Namespace) -> None:
    from .submission import make_submission

    split_paths = {split: getattr(args, split) for split in ("id", "ood_ads", "ood_cat", "ood_both", "ood")}
    path = make_submission(
        split_paths,
        args.out_path,
        dataset=args.dataset,
        is2re_relaxations=args.is2re_relaxations,
        hybrid=args.hybrid,
        overwrite=args.force,
    )
    print(f"Results saved to {path} successfully.")


def _add_convert_checkpoint(subparsers: argparse._SubParsersAction) -> None:
    parser = _add_parser(
        subparsers, "convert-checkpoint", _run_convert_checkpoint,
        help="convert a fairchem EquiformerV2 checkpoint to one that uses this plugin",
        description="Read a fairchem EquiformerV2 checkpoint (the older single-model layout of the public OC20 "
        "checkpoints, or the hydra backbone/heads layout) and write a fairchem checkpoint whose config names "
        "the plugin's backbone and heads, with the weights and EMA mapped and normalizers and element "
        "references kept. fairchem's OCPCalculator(checkpoint_path=DST) loads the result. Any key that does not "
        "map, or a weight that does not fit the config, is an error that lists them. With --to fairchem2 it "
        "writes a fairchem 2.x inference checkpoint instead (load_predict_unit, FAIRChemCalculator); run it "
        "where fairchem 1.x is installed, which reads the old checkpoints.",
        examples=[
            "fairchem-eqv2 convert-checkpoint eq2_31M_ec4_allmd.pt eq2_31M_plugin.pt",
            "fairchem-eqv2 convert-checkpoint old_ocp.pt new.pt --trust --force   # a file you trust, replacing new.pt",
            "fairchem-eqv2 convert-checkpoint eq2_31M_ec4_allmd.pt eq2_31M_fairchem2.pt --to fairchem2 --dataset oc20",
        ],
    )
    parser.add_argument("src", metavar="SRC", help="fairchem checkpoint (.pt)")
    parser.add_argument("dst", metavar="DST", help="checkpoint to write")
    _add_force(parser, "DST")
    parser.add_argument(
        "--to", choices=["fairchem1", "fairchem2"], default="fairchem1",
        help="the fairchem the checkpoint is for: fairchem1 (OCPCalculator, fairchem --mode ...) or fairchem2 "
        "(load_predict_unit, FAIRChemCalculator) (default: %(default)s)",
    )
    parser.add_argument(
        "--dataset", default="oc20", metavar="NAME",
        help="with --to fairchem2: the dataset name its tasks serve, FAIRChemCalculator's task_name (default: %(default)s)",
    )
    _add_trust(parser, "SRC")


def _run_convert_checkpoint(args: argparse.Namespace) -> None:
    from .checkpoints import convert_checkpoint

    path = convert_checkpoint(
        args.src, args.dst, trust=args.trust, overwrite=args.force, to=args.to, dataset=args.dataset
    )
    print(f"wrote {path}")


def _add_fix_checkpoint(subparsers: argparse._SubParsersAction) -> None:
    parser = _add_parser(
        subparsers, "fix-checkpoint", _run_fix_checkpoint,
        help="make a checkpoint trained with the plugin load in OCPCalculator(checkpoint_path=...)",
        description="Make a checkpoint trained with the plugin load in OCPCalculator(checkpoint_path=...).\n\n"
        "fairchem 1.10 stores the task name (s2ef, is2re) as config['trainer'] for runs of its "
        "forces/energy/equiformerv2_* trainers, and OCPCalculator(checkpoint_path=...) then fails with "
        "\"Failed to find the trainer 's2ef'\". This checks the checkpoint and writes a trainer name that loads.",
        examples=[
            "fairchem-eqv2 fix-checkpoint runs/checkpoints/<id>/best_checkpoint.pt fixed.pt",
            "fairchem-eqv2 fix-checkpoint runs/checkpoints/<id>/best_checkpoint.pt          # in place",
        ],
    )
    parser.add_argument("src", metavar="CHECKPOINT", help="checkpoint trained with the plugin")
    parser.add_argument("dst", metavar="DST", nargs="?", help="where to write (default: rewrite CHECKPOINT in place)")
    _add_trust(parser, "CHECKPOINT")
    _add_force(parser, "DST (when given and not CHECKPOINT itself)")


def _run_fix_checkpoint(args: argparse.Namespace) -> None:
    from .checkpoints import fix_checkpoint

    print(f"wrote {fix_checkpoint(args.src, args.dst, trust=args.trust, overwrite=args.force)}")


def _add_noisy_nodes_scale(subparsers: argparse._SubParsersAction) -> None:
    parser = _add_parser(
        subparsers, "noisy-nodes-scale", _run_noisy_nodes_scale,
        help="measure the Noisy Nodes target normaliser (pos_std) on an IS2RE training split",
        description="Print the relaxed displacement of the free atoms of an IS2RE LMDB (with pos_relaxed) and "
        "the two choices of model.backbone.noisy_nodes.pos_std: the reference's mean norm of (relaxed - "
        "corrupted input) over corrupted inputs, which depends on the recipe's noise_std and interpolation, "
        "and the std of the displacement components.",
        examples=[
            "fairchem-eqv2 noisy-nodes-scale demo_data/is2re/train",
            "fairchem-eqv2 noisy-nodes-scale data/is2re/all/train --noise-std 0.3",
        ],
    )
    parser.add_argument("src", metavar="SRC", help="an IS2RE LMDB file or a folder of them (the training split)")
    parser.add_argument("--noise-std", type=float, default=0.3,
                        help="the recipe's noise_std, in A (default: %(default)s)")
    parser.add_argument("--no-interpolate", action="store_true",
                        help="the recipe has interpolate: False (noise only around the initial structure)")


def _run_noisy_nodes_scale(args: argparse.Namespace) -> None:
    from ..model.denoising.noisy_nodes import CONFIG_RULES, mean_corrupted_target_norm
    from .noisy_nodes_scale import free_displacements

    problem = CONFIG_RULES["noise_std"](args.noise_std)  # the config's rule: a finite number >= 0
    if problem:
        raise UserInputError(f"--noise-std {args.noise_std}: {problem}")
    displacement = free_displacements(args.src)
    distances = displacement.norm(dim=1)
    print(f"{args.src}: {len(distances)} free atoms; relaxed displacement mean {float(distances.mean()):.4f} A, "
          f"median {float(distances.median()):.4f} A")
    recipe = f"noise_std {args.noise_std}, interpolate {not args.no_interpolate}"
    norm = mean_corrupted_target_norm(displacement, noise_std=args.noise_std, interpolate=not args.no_interpolate)
    print(f"pos_std {norm:.4f}  (reference: mean norm of relaxed - corrupted input; {recipe})")
    print(f"pos_std {float(displacement.flatten().std()):.4f}  (std of the displacement components)")


_SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_demo_data,
    _add_noisy_nodes_scale,
    _add_make_submission,
    _add_convert_checkpoint,
    _add_fix_checkpoint,
]


if __name__ == "__main__":
    sys.exit(main())
