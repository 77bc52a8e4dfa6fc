"""The command line's options: the parser, the option types that turn a bad value into a
one-line usage error, and the options several commands share, each declared once."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from flatminima.experiments import demo
from flatminima.experiments.config import BASE_OPTIMIZERS, SCHEDULES
from flatminima.experiments.sharpness_runs import SharpnessSettings
from flatminima.experiments.store import DEFAULT_STALE_AFTER_S
from flatminima.experiments.summary import SELECTION_RULES
from flatminima.registry import BASE_OPTIMIZER

EXIT_BAD_INPUT = 2
EXIT_RUN_FAILED = 1
EXIT_INCOMPLETE = 3
"""Nothing failed, but runs of the grid are still being trained by another process."""
EXIT_INTERRUPTED = 130
DEFAULT_DB = "flatminima.db"
DEFAULT_REPORT_DIR = "flatminima-report"
EXECUTORS = ("local", "ray")


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (no usage dump) like every other bad input."""

    command_parsers: dict[str, argparse.ArgumentParser]
    """The parser of each command (set on the top-level parser by :func:`build_parser`)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}\n")


class _NotGiven(list):  # type: ignore[type-arg]
    """An option's value before the command line sets it: a list, so that ``append`` options
    can add to it like to their default (:func:`given_options` then sees them non-empty)."""


def given_options(parser: OneLineParser, argv: Sequence[str], args: argparse.Namespace) -> set[str]:
    """The destinations (``epochs``, ``select_by``...) of the options ``argv`` gives
    explicitly, whatever their value: parsed again from a namespace where every option is
    "not given", which argparse leaves alone unless the command line sets it (abbreviations
    and ``--name=value`` included). ``--epochs 100`` is given even though 100 is the default."""
    command = parser.command_parsers[args.command]
    rest = list(argv)[list(argv).index(args.command) + 1 :]
    untouched = argparse.Namespace(**{dest: _NotGiven() for dest in vars(args)})
    parsed = command.parse_args(rest, untouched)
    return {
        dest
        for dest, value in vars(parsed).items()
        if not isinstance(value, _NotGiven) or len(value) > 0
    }


# --- option types: a bad value is a one-line usage error ------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _existing_directory(text: str) -> Path:
    """An input directory: never created here (a typo must not become a new empty folder)."""
    path = Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{text} does not exist (give an existing directory)")
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file, not a directory")
    return path


def _seed_count(text: str) -> int:
    """The demo's --seeds: a count, where `compare` takes a list or range (say so if given one)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"demo takes a number of seeds (3 runs seeds 0, 1 and 2), got {text!r}; "
            "`flatminima compare --seeds` takes lists and ranges"
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


# --- shared options, each declared once -------------------------------------------------------


def _add_db(parser: argparse.ArgumentParser, default: str = DEFAULT_DB) -> None:
    parser.add_argument(
        "--db",
        type=Path,
        default=Path(default),
        help=f"SQLite database of runs (default: {default})",
    )


def _add_jobs(parser: argparse.ArgumentParser, default: int = 1) -> None:
    parser.add_argument(
        "--jobs",
        type=_positive_int,
        default=default,
        help=f"worker processes at once, one per core (default: {default})",
    )


def _add_executor(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--executor",
        choices=EXECUTORS,
        default="local",
        help="where the runs train: local worker processes (--jobs of them), or Ray tasks "
        "(pip install 'flatminima[ray]'), on a local Ray instance of --jobs runs at once or on "
        "the cluster at --ray-address; this process alone writes the database "
        "(default: local)",
    )
    parser.add_argument(
        "--ray-address",
        default=None,
        metavar="ADDR",
        help="an existing Ray cluster's address (auto: the cluster this machine belongs to, "
        "after `ray start`); with --executor ray only",
    )


def _add_quiet(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--quiet",
        action="store_true",
        help="no progress bars (when stderr is not a terminal they are plain lines)",
    )


def _add_data_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir",
        type=_existing_directory,
        default=None,
        help="an existing directory where datasets are read or cached (default: the system "
        "location for fashion-mnist, ~/.cache/flatminima for mnist1d)",
    )


def _add_out(parser: argparse.ArgumentParser, what: str, default: str = DEFAULT_REPORT_DIR) -> None:
    parser.add_argument(
        "--out", type=Path, default=Path(default), help=f"{what} (default: {default})"
    )


def _add_methods(parser: argparse.ArgumentParser, *, required: bool, what: str) -> None:
    parser.add_argument(
        "--methods",
        "--method",
        action="append",
        required=required,
        default=None,
        metavar="M1,M2,...",
        help=f"{what} (repeatable; `flatminima methods` lists them; {BASE_OPTIMIZER} is the "
        "base optimizer alone)",
    )


def _add_select_by(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--select-by",
        choices=SELECTION_RULES,
        default=None,
        help="validation: the report's main table gives each method at the hyperparameters "
        "with the best mean validation accuracy among those run (needs runs with a validation "
        "split); default: every setting as run",
    )


def _add_study(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--study",
        type=Path,
        default=None,
        metavar="FILE",
        help=f"a study file (TOML, see docs/runner.md): {what}",
    )


def _add_training_runtime(parser: argparse.ArgumentParser, db_default: str = DEFAULT_DB) -> None:
    """Where and how training runs: database, threads, progress, takeover, data."""
    _add_db(parser, db_default)
    parser.add_argument(
        "--threads",
        type=_positive_int,
        default=1,
        help="PyTorch threads per training process (default: 1; results are "
        "reproducible for a given thread count)",
    )
    _add_quiet(parser)
    parser.add_argument(
        "--stale-after",
        type=float,
        default=DEFAULT_STALE_AFTER_S / 3600,
        metavar="HOURS",
        help="take over a run another process left running with no epoch recorded for this "
        f"long (default: {DEFAULT_STALE_AFTER_S / 3600:g}; inf: never); a process under this "
        "hostname that is gone (its PID free, or held by a process started at another time) "
        "is noticed at once",
    )
    _add_data_dir(parser)


def _add_training_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data and training")
    group.add_argument(
        "--dataset", default="mnist1d", help="mnist1d, fashion-mnist or digits (default: mnist1d)"
    )
    group.add_argument(
        "--model", default="cnn1d", help="mlp, cnn1d, cnn or resnet20 (default: cnn1d)"
    )
    group.add_argument(
        "--optimizer",
        default="sgd",
        metavar="{" + ",".join(BASE_OPTIMIZERS) + "}",
        help="base optimizer: SGD with momentum or AdamW (default: sgd)",
    )
    group.add_argument(
        "--lr",
        type=float,
        default=None,
        help="learning rate (default: 0.05 for sgd, 0.001 for adamw)",
    )
    group.add_argument(
        "--momentum", type=float, default=None, help="SGD momentum (default: 0.9; sgd only)"
    )
    group.add_argument("--weight-decay", type=float, default=5e-4, help="(default: 5e-4)")
    group.add_argument(
        "--schedule",
        default="cosine",
        metavar="{" + ",".join(SCHEDULES) + "}",
        help="learning-rate schedule, stepped every batch (default: cosine)",
    )
    group.add_argument("--epochs", type=int, default=100, help="(default: 100)")
    group.add_argument("--batch-size", type=int, default=128, help="(default: 128)")
    group.add_argument(
        "--label-noise",
        type=float,
        default=0.0,
        help="fraction of training labels replaced by a wrong class, in [0, 1)",
    )
    group.add_argument(
        "--train-size",
        type=int,
        default=None,
        help="training examples to keep, a seeded subset (default: all)",
    )
    group.add_argument(
        "--validation-size",
        type=_non_negative_int,
        default=0,
        metavar="N",
        help="hold out N further training examples (seeded, disjoint from the training subset) "
        "and evaluate them every epoch; their labels are as noisy as the training labels "
        "(--label-noise applies to them at the same rate, as it would in practice) "
        "(default: 0, none)",
    )
    group.add_argument(
        "--track-sharpness",
        type=_non_negative_int,
        default=0,
        metavar="N",
        help="measure λ_max (Lanczos, 20 products, 512 fixed training examples) every N epochs "
        "and at the last; costs seconds per measurement, printed at the end (default: 0, never)",
    )
    group.add_argument(
        "--processes",
        type=_positive_int,
        default=1,
        help="processes training each run together (DistributedDataParallel: gloo on CPU, "
        "NCCL with a GPU per process), each a shard of every batch; SAM-type methods then "
        "perturb per process (m-sharpness), so their numbers change (default: 1)",
    )


# --- the parser ------------------------------------------------------------------------------


def build_parser() -> OneLineParser:
    parser = OneLineParser(
        prog="flatminima",
        description="Train and compare sharpness-aware optimizers on real data.",
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    _add_demo_parser(commands)

    run = commands.add_parser("run", help="one training run")
    run.add_argument(
        "--method",
        default=BASE_OPTIMIZER,
        help=f"a registered method (see `flatminima methods`); {BASE_OPTIMIZER} is the base "
        f"optimizer alone (default: {BASE_OPTIMIZER})",
    )
    run.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a hyperparameter of the method, e.g. rho=0.1 (repeatable)",
    )
    run.add_argument("--seed", type=int, default=0, help="(default: 0)")
    _add_training_options(run)
    _add_training_runtime(run)

    compare = commands.add_parser(
        "compare", help="a grid of runs: methods × seeds × swept hyperparameters (resumable)"
    )
    _add_study(
        compare,
        "its methods, seeds, data and training settings and selection rule replace those "
        "options (which may not be given with it); its [output] gives --db and --report "
        "defaults",
    )
    _add_methods(compare, required=False, what="methods to compare (required without --study)")
    compare.add_argument(
        "--seeds",
        "--seed",
        action="append",
        default=None,
        metavar="0,1,2",
        help="seeds, as a list or ranges like 0-4 (default: 0,1,2)",
    )
    compare.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="[METHOD:]NAME=VALUE",
        help="a fixed hyperparameter, for every method that takes it or for "
        "METHOD only (repeatable)",
    )
    compare.add_argument(
        "--sweep",
        action="append",
        default=[],
        metavar="[METHOD:]NAME=V1,V2,...",
        help="a swept hyperparameter, e.g. rho=0.05,0.1,0.2 (repeatable: the "
        "grid is their product)",
    )
    _add_jobs(compare)
    _add_executor(compare)
    compare.add_argument(
        "--report",
        type=Path,
        default=None,
        metavar="DIR",
        help="write the report to DIR when the grid is done",
    )
    _add_select_by(compare)
    _add_training_options(compare)
    _add_training_runtime(compare)

    _add_sharpness_parser(commands)

    report = commands.add_parser("report", help="tables and plots from the database")
    _add_db(report)
    _add_out(report, "directory for report.md and the plots")
    _add_select_by(report)
    _add_study(
        report,
        "report its database ([output] database, unless --db) into its [output] report "
        "(unless --out) with its selection rule",
    )

    forget = commands.add_parser(
        "forget",
        help="delete runs from the database: their rows, sharpness and weights",
        description="Delete each named run (a configuration hash or a unique prefix of one) "
        "with its epochs, sharpness measurements and weights file, or with --failed every "
        "failed run; the next `compare` of its configuration trains it again.",
    )
    forget.add_argument("runs", nargs="*", metavar="RUN", help="configuration hashes or prefixes")
    forget.add_argument("--failed", action="store_true", help="every failed run")
    _add_db(forget)

    commands.add_parser("methods", help="every registered method, its hyperparameters and cost")
    parser.command_parsers = dict(commands.choices)
    return parser


def _add_demo_parser(commands: Any) -> None:
    described = ", ".join(name for name, _ in demo.DEMO_ARMS if name != BASE_OPTIMIZER)
    parser = commands.add_parser(
        "demo",
        help="the base optimizer against SAM and its variants on noisy MNIST-1D",
        description=f"The base optimizer alone against {described} on MNIST-1D with "
        f"{demo.DEMO_TRAINING['label_noise']:.0%} label noise, then the sharpness of every "
        "trained model and the report. Finished runs and measurements are kept: run it again "
        "to resume. --quick: the base optimizer against SAM only (a minute or two).",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"base optimizer vs SAM only, {demo.QUICK_SEEDS} seeds: a first taste in a minute or "
        "two (the full demo resumes from these runs)",
    )
    parser.add_argument(
        "--seeds",
        type=_seed_count,
        default=None,
        metavar="N",
        help=f"how many seeds: N runs seeds 0 to N-1 (default: {demo.DEMO_SEEDS}; "
        f"{demo.QUICK_SEEDS} with --quick)",
    )
    parser.add_argument(
        "--epochs",
        type=_positive_int,
        default=demo.DEMO_TRAINING["epochs"],
        help=f"(default: {demo.DEMO_TRAINING['epochs']})",
    )
    _add_jobs(parser, default=demo.DEMO_JOBS)
    _add_out(parser, "report directory", default=demo.DEMO_REPORT_DIR)
    parser.add_argument(
        "--no-sharpness",
        action="store_true",
        help="skip measuring the trained models' sharpness and landscapes",
    )
    _add_training_runtime(parser, db_default=demo.DEMO_DB)


def _add_sharpness_parser(commands: Any) -> None:
    sharpness = commands.add_parser(
        "sharpness",
        help="measure the sharpness of finished runs from their saved weights",
        description="For each finished run with saved weights and no sharpness measurement yet: "
        "rebuild its model and its training set as it trained on it (noisy labels included), "
        "measure the Hessian's top eigenvalues and trace and the worst- and average-case "
        "sharpness on a seeded subset of the training examples, and store them in the "
        "database's sharpness table. Runs are never changed. `flatminima report` then shows "
        "the numbers beside test accuracy.",
    )
    _add_db(sharpness)
    sharpness.add_argument(
        "--runs",
        nargs="+",
        default=["all"],
        metavar="HASH",
        help="configuration hashes (or unique prefixes) of the runs to measure, or `all` "
        "(default: all finished runs)",
    )
    _add_methods(sharpness, required=False, what="only the runs of these methods")
    defaults = SharpnessSettings()
    sharpness.add_argument(
        "--examples",
        type=int,
        default=defaults.examples,
        help="training examples to measure on, a subset drawn with --seed; the whole training "
        f"set when smaller (default: {defaults.examples})",
    )
    sharpness.add_argument(
        "--rho",
        type=float,
        default=defaults.rho,
        help=f"worst-case sharpness radius (default: {defaults.rho})",
    )
    sharpness.add_argument(
        "--top-k",
        type=int,
        default=defaults.top_k,
        help=f"Hessian eigenvalues to compute (default: {defaults.top_k})",
    )
    sharpness.add_argument(
        "--num-probes",
        type=int,
        default=defaults.num_probes,
        help=f"Hutchinson probes for the Hessian trace (default: {defaults.num_probes})",
    )
    sharpness.add_argument(
        "--seed",
        type=int,
        default=defaults.seed,
        help="seeds the example subset, the measurements' random draws and the landscape "
        f"direction (default: {defaults.seed})",
    )
    sharpness.add_argument(
        "--landscape",
        action="store_true",
        help="also measure each run's 1-D filter-normalised loss landscape and plot one "
        "curve per method and setting into --out",
    )
    _add_out(sharpness, "directory for the landscape plots")
    sharpness.add_argument(
        "--force", action="store_true", help="measure runs again, replacing their rows"
    )
    _add_jobs(sharpness)
    _add_quiet(sharpness)
    _add_data_dir(sharpness)
