"""The ``flatminima`` command: train, compare, measure sharpness, report, and the demo that does
all of them.

    flatminima demo                                   # the main job, 3-6 minutes on 2 cores
    flatminima run --method sam --param rho=0.1 --label-noise 0.4 --seed 0
    flatminima compare --methods sgd,sam --sweep rho=0.05,0.1,0.2 --seeds 0-2 --jobs 2
    flatminima sharpness --db flatminima.db --landscape --jobs 2
    flatminima report --db flatminima.db --out flatminima-report
    flatminima methods                                # every method and its hyperparameters

Bad input ends with one line naming the argument and what it accepts, exit status 2, before
anything is written to the database.
"""

from __future__ import annotations

import argparse
import logging
import os
import sqlite3
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from flatminima.experiments import demo
from flatminima.experiments.config import (
    BASE_OPTIMIZERS,
    SCHEDULES,
    ConfigError,
    RunConfig,
    make_run_config,
)
from flatminima.experiments.data import DatasetUnavailableError, check_dataset
from flatminima.experiments.grid import Assignment, expand_grid, parse_list, parse_seeds
from flatminima.experiments.runner import GridSummary, run_grid
from flatminima.experiments.store import DEFAULT_STALE_AFTER_S, Store, StoreError
from flatminima.registry import get_method, method_names

EXIT_BAD_INPUT = 2
EXIT_RUN_FAILED = 1
DEFAULT_DB = "flatminima.db"
DEFAULT_REPORT_DIR = "flatminima-report"


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (no usage dump) like every other bad input."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}\n")


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


def _add_storage_options(parser: argparse.ArgumentParser, db_default: str = DEFAULT_DB) -> None:
    parser.add_argument(
        "--db",
        type=Path,
        default=Path(db_default),
        help=f"SQLite database of runs (default: {db_default})",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="PyTorch threads per training process (default: 1; results are "
        "reproducible for a given thread count)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument(
        "--stale-after",
        type=float,
        default=DEFAULT_STALE_AFTER_S / 3600,
        metavar="HOURS",
        help="take over a run that a process under another hostname (another container on "
        "this machine, or the machine the database was copied from) left running with no "
        f"epoch recorded for this long (default: {DEFAULT_STALE_AFTER_S / 3600:g}; inf: never; "
        "a dead process under this hostname is noticed at once)",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="where datasets are read or cached (default: the system location "
        "for fashion-mnist, ~/.cache/flatminima for mnist1d)",
    )


def _seed_count(text: str) -> int:
    """The demo's --seeds: a count, where `compare` takes a list or range (say so if given one)."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"demo takes a number of seeds (3 runs seeds 0, 1 and 2), got {text!r}; "
            "`flatminima compare --seeds` takes lists and ranges"
        ) from None


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="flatminima",
        description="Train and compare sharpness-aware optimizers on real data.",
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    demo_parser = commands.add_parser(
        "demo",
        help="the base optimizer against SAM and four variants on noisy MNIST-1D",
        description="Base optimizer vs SAM, Fisher, Monge, Tilted and Friendly SAM on MNIST-1D "
        "with 40% label noise, then the sharpness of every trained model and the report. "
        "Finished runs and measurements are kept: run it again to resume.",
    )
    demo_parser.add_argument(
        "--seeds",
        type=_seed_count,
        default=demo.DEMO_SEEDS,
        metavar="N",
        help=f"how many seeds: N runs seeds 0 to N-1 (default: {demo.DEMO_SEEDS})",
    )
    demo_parser.add_argument(
        "--epochs",
        type=int,
        default=demo.DEMO_TRAINING["epochs"],
        help=f"(default: {demo.DEMO_TRAINING['epochs']})",
    )
    demo_parser.add_argument(
        "--jobs",
        type=int,
        default=demo.DEMO_JOBS,
        help=f"worker processes, one per core (default: {demo.DEMO_JOBS})",
    )
    demo_parser.add_argument(
        "--out",
        type=Path,
        default=Path(demo.DEMO_REPORT_DIR),
        help=f"report directory (default: {demo.DEMO_REPORT_DIR})",
    )
    demo_parser.add_argument(
        "--no-sharpness",
        action="store_true",
        help="skip measuring the trained models' sharpness and landscapes",
    )
    _add_storage_options(demo_parser, db_default=demo.DEMO_DB)

    run = commands.add_parser("run", help="one training run")
    run.add_argument(
        "--method",
        default="sgd",
        help="a registered method (see `flatminima "
        "methods`); sgd is the base optimizer alone (default: sgd)",
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
    _add_storage_options(run)

    compare = commands.add_parser(
        "compare", help="a grid of runs: methods × seeds × swept hyperparameters (resumable)"
    )
    compare.add_argument(
        "--methods",
        "--method",
        action="append",
        required=True,
        metavar="M1,M2,...",
        help="methods to compare (repeatable)",
    )
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
    compare.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="worker processes running at once, one per core (default: 1)",
    )
    compare.add_argument(
        "--report",
        type=Path,
        default=None,
        metavar="DIR",
        help="write the report to DIR when the grid is done",
    )
    _add_training_options(compare)
    _add_storage_options(compare)

    _add_sharpness_parser(commands)

    report = commands.add_parser("report", help="tables and plots from the database")
    report.add_argument(
        "--db", type=Path, default=Path(DEFAULT_DB), help=f"(default: {DEFAULT_DB})"
    )
    report.add_argument(
        "--out",
        type=Path,
        default=Path(DEFAULT_REPORT_DIR),
        help=f"directory for report.md and the plots (default: {DEFAULT_REPORT_DIR})",
    )

    commands.add_parser("methods", help="every registered method, its hyperparameters and cost")
    return parser


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
    sharpness.add_argument(
        "--db", type=Path, default=Path(DEFAULT_DB), help=f"(default: {DEFAULT_DB})"
    )
    sharpness.add_argument(
        "--runs",
        nargs="+",
        default=["all"],
        metavar="HASH",
        help="configuration hashes (or unique prefixes) of the runs to measure, or `all` "
        "(default: all finished runs)",
    )
    sharpness.add_argument(
        "--methods",
        "--method",
        action="append",
        default=None,
        metavar="M1,M2,...",
        help="only the runs of these methods (repeatable)",
    )
    sharpness.add_argument(
        "--examples",
        type=int,
        default=1024,
        help="training examples to measure on, a subset drawn with --seed; the whole training "
        "set when smaller (default: 1024)",
    )
    sharpness.add_argument(
        "--rho", type=float, default=0.05, help="worst-case sharpness radius (default: 0.05)"
    )
    sharpness.add_argument(
        "--top-k", type=int, default=1, help="Hessian eigenvalues to compute (default: 1)"
    )
    sharpness.add_argument(
        "--num-probes",
        type=int,
        default=10,
        help="Hutchinson probes for the Hessian trace (default: 10)",
    )
    sharpness.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seeds the example subset, the measurements' random draws and the landscape "
        "direction (default: 0)",
    )
    sharpness.add_argument(
        "--landscape",
        action="store_true",
        help="also measure each run's 1-D filter-normalised loss landscape and plot one "
        "curve per method and setting into --out",
    )
    sharpness.add_argument(
        "--out",
        type=Path,
        default=Path(DEFAULT_REPORT_DIR),
        help=f"directory for the landscape plots (default: {DEFAULT_REPORT_DIR})",
    )
    sharpness.add_argument(
        "--force", action="store_true", help="measure runs again, replacing their rows"
    )
    sharpness.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="worker processes measuring at once, one thread each (default: 1)",
    )
    sharpness.add_argument("--quiet", action="store_true", help="no progress bar")
    sharpness.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="where datasets are read or cached (as for training)",
    )


def _training(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "dataset": args.dataset,
        "model": args.model,
        "optimizer": args.optimizer,
        "lr": args.lr,
        "momentum": args.momentum,
        "weight_decay": args.weight_decay,
        "schedule": args.schedule,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "label_noise": args.label_noise,
        "train_size": args.train_size,
    }


def _check_positive(value: int, option: str) -> None:
    if value < 1:
        raise ConfigError(f"{option} must be >= 1, got {value}")


def _check_output_directory(path: Path | None, option: str) -> None:
    if path is not None and path.exists() and not path.is_dir():
        raise ConfigError(f"{option} must be a directory; {path} is a file")


def _run_and_summarize(configs: list[RunConfig], args: argparse.Namespace, jobs: int) -> int:
    """Check the data, run the grid, print what happened; the exit status."""
    _check_positive(jobs, "--jobs")
    _check_positive(args.threads, "--threads")
    if not args.stale_after > 0:  # inf: never take a run over; NaN fails this too
        raise ConfigError(
            f"--stale-after must be a positive number of hours, got {args.stale_after}"
        )
    for dataset in {config.dataset for config in configs}:
        check_dataset(dataset, args.data_dir)
    summary = run_grid(
        configs,
        args.db,
        data_dir=args.data_dir,
        jobs=jobs,
        threads=args.threads,
        progress=not args.quiet,
        stale_after_s=args.stale_after * 3600,
    )
    _print_summary(summary, args.db)
    return EXIT_RUN_FAILED if summary.failed else 0


def _print_summary(summary: GridSummary, db: Path) -> None:
    parts = [f"{summary.finished} trained", f"{summary.already_finished} already in {db}"]
    if summary.skipped:
        parts.append(f"{summary.skipped} being trained by another process")
    if summary.failed:
        parts.append(f"{len(summary.failed)} failed")
    print(f"{summary.total} run(s): " + ", ".join(parts))
    for failure in summary.failed:
        print(f"  failed: {failure}", file=sys.stderr)


def command_run(args: argparse.Namespace) -> int:
    overrides = {}
    for text in args.param:
        assignment = Assignment.parse(text, "--param")
        if assignment.method is not None or len(assignment.values) != 1:
            raise ConfigError(f"--param of `run` takes NAME=VALUE (one value), got {text!r}")
        overrides[assignment.name] = assignment.values[0]
    config = make_run_config(
        method=args.method, hyperparameters=overrides, seed=args.seed, **_training(args)
    )
    status = _run_and_summarize([config], args, jobs=1)
    with Store(args.db) as store:
        run = store.find(config.config_hash)
    if run is not None and run.status == "finished":
        final = run.final
        diverged = final["diverged_at_epoch"]
        epochs = (
            f"{config.epochs} epochs"
            if diverged is None
            else f"{diverged} epochs (diverged: training stopped)"
        )
        print(
            f"{config.label}: test accuracy {100 * final['final_test_accuracy']:.2f}% "
            f"after {epochs}, {final['passes']} forward/backward passes, "
            f"{final['train_time_s']:.1f} s (run {run.id}, weights {run.weights_path})"
        )
    return status


def command_compare(args: argparse.Namespace) -> int:
    methods = [name for text in args.methods for name in parse_list(text, "--methods")]
    seeds = parse_seeds(args.seeds or ["0,1,2"])
    configs = expand_grid(
        methods,
        seeds,
        [Assignment.parse(text, "--param") for text in args.param],
        [Assignment.parse(text, "--sweep") for text in args.sweep],
        _training(args),
    )
    _check_output_directory(args.report, "--report")
    status = _run_and_summarize(configs, args, args.jobs)
    if args.report is not None:
        _print_report(args.db, args.report)
    return status


def command_demo(args: argparse.Namespace) -> int:
    _check_positive(args.seeds, "--seeds")
    _check_positive(args.epochs, "--epochs")
    _check_output_directory(args.out, "--out")
    configs = demo.demo_configs(seeds=args.seeds, epochs=args.epochs)
    print(
        f"flatminima demo: {len(configs)} runs ({len(demo.DEMO_ARMS)} methods × {args.seeds} "
        f"seeds) on MNIST-1D with {demo.DEMO_TRAINING['label_noise']:.0%} label noise, "
        f"{args.epochs} epochs each; database {args.db}"
    )
    status = _run_and_summarize(configs, args, args.jobs)
    if not args.no_sharpness:
        with Store(args.db) as store:
            trained = [
                config.config_hash
                for config in configs
                if (run := store.find(config.config_hash)) is not None and run.status == "finished"
            ]
        if trained:
            print(f"\nsharpness of the {len(trained)} trained models (--no-sharpness skips it):")
            settings = _sharpness_settings(**demo.DEMO_SHARPNESS)
            sharpness_status = _measure_and_summarize(
                args, settings, runs=trained, methods=None, landscape=True, force=False
            )
            status = status or sharpness_status
    _print_report(args.db, args.out)
    return status


def _sharpness_settings(**values: Any) -> Any:
    from flatminima.experiments.sharpness_runs import SharpnessSettings

    settings = SharpnessSettings(**values)
    settings.check()
    return settings


def _measure_and_summarize(
    args: argparse.Namespace,
    settings: Any,
    *,
    runs: list[str],
    methods: list[str] | None,
    landscape: bool,
    force: bool,
) -> int:
    """Measure, print what happened and the stored numbers; the exit status."""
    from flatminima.experiments.sharpness_runs import measure_runs, select_runs

    summary = measure_runs(
        args.db,
        settings,
        runs=runs,
        methods=methods,
        landscape=landscape,
        force=force,
        jobs=args.jobs,
        data_dir=args.data_dir,
        progress=not args.quiet,
    )
    already = f"{summary.already_measured} already measured"
    if summary.already_measured:
        already += " (--force measures again)"
    parts = [f"{len(summary.measured)} measured", already]
    if summary.landscapes_added:
        parts.append(f"{summary.landscapes_added} given their missing landscape")
    if summary.without_weights:
        parts.append(f"{len(summary.without_weights)} without a weights file")
    if summary.diverged:
        parts.append(f"{len(summary.diverged)} diverged (not finite, not measured)")
    if summary.failed:
        parts.append(f"{len(summary.failed)} failed")
    print(f"{summary.selected} run(s): " + ", ".join(parts))
    for label in summary.without_weights:
        print(f"  no weights file: {label}", file=sys.stderr)
    for label in summary.diverged:
        print(f"  diverged in training: {label}", file=sys.stderr)
    for failure in summary.failed:
        print(f"  failed: {failure}", file=sys.stderr)
    with Store(args.db) as store:
        selected = select_runs(store, runs, methods)
        rows = store.sharpness()
    measured = [run for run in selected if run.config_hash in rows]
    if measured:
        print()
        print(_sharpness_table(measured, rows))
    return EXIT_RUN_FAILED if summary.failed else 0


def _sharpness_table(runs: list[Any], rows: dict[str, Any]) -> str:
    from flatminima.experiments.report import text_table

    headers = ["run", "method and seed", "test acc. %", "λ_max", "tr(H)", "worst-case", "examples"]
    lines = []
    for run in runs:
        row = rows[run.config_hash]
        metrics = row.metrics
        lines.append(
            [
                run.config_hash,
                RunConfig(**run.config).label,
                f"{100 * run.final['final_test_accuracy']:.2f}",
                f"{metrics['hessian_top_eigenvalue']:.4g}",
                f"{metrics['hessian_trace']:.4g}",
                f"{metrics['worst_case_sharpness']:.4g}",
                str(row.examples),
            ]
        )
    return text_table(headers, lines)


def command_sharpness(args: argparse.Namespace) -> int:
    settings = _sharpness_settings(
        examples=args.examples,
        rho=args.rho,
        top_k=args.top_k,
        num_probes=args.num_probes,
        seed=args.seed,
    )
    _check_positive(args.jobs, "--jobs")
    _check_output_directory(args.out, "--out")
    methods = (
        [name for text in args.methods for name in parse_list(text, "--methods")]
        if args.methods
        else None
    )
    status = _measure_and_summarize(
        args, settings, runs=args.runs, methods=methods, landscape=args.landscape, force=args.force
    )
    if args.landscape:
        from flatminima.experiments.report import summarize, write_landscape

        with Store(args.db) as store:
            settings_measured = summarize(store)
        print()
        for setting in settings_measured:
            for path in write_landscape(setting, args.out / setting.slug):
                print(f"landscape: {path}")
    print(f"\n`flatminima report --db {args.db}` shows them beside test accuracy.")
    return status


def _print_report(db: Path, out: Path) -> None:
    # Imported here: matplotlib and SciPy cost a second that `run` and `compare` do not need.
    from flatminima.experiments.report import write_report

    report = write_report(db, out)
    print()
    print(report.text)
    print()
    print(f"report: {report.markdown_path}")
    for path in report.plots:
        print(f"plot:   {path}")


def command_report(args: argparse.Namespace) -> int:
    _check_output_directory(args.out, "--out")
    _print_report(args.db, args.out)
    return 0


def command_methods(args: argparse.Namespace) -> int:
    for name in method_names():
        spec = get_method(name)
        settings = ", ".join(f"{key}={value}" for key, value in spec.hyperparameters.items())
        # Averaged over the method's cycle: LookSAM's k = 5 costs 1.2 passes a step, not 2.
        passes = f"{spec.mean_passes_per_step():g}"
        print(f"{name:<14} {passes:<3} passes/step  {settings or '-'}")
        print(f"{'':<14} {spec.summary}")
    return 0


COMMANDS = {
    "demo": command_demo,
    "run": command_run,
    "compare": command_compare,
    "sharpness": command_sharpness,
    "report": command_report,
    "methods": command_methods,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="flatminima: %(levelname)s: %(message)s")
    try:
        status = COMMANDS[args.command](args)
        sys.stdout.flush()  # here, where a closed pipe is caught, not at interpreter exit
        return status
    except (ConfigError, DatasetUnavailableError, FileNotFoundError, StoreError) as error:
        print(f"flatminima {args.command}: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (sqlite3.Error, NotADirectoryError, IsADirectoryError, PermissionError) as error:
        # The database or an output path went wrong mid-way (another program locked the file
        # past the timeout, a full disk, a path without permission): one line, and the runs
        # already finished stay in the database.
        print(f"flatminima {args.command}: error: {type(error).__name__}: {error}", file=sys.stderr)
        return EXIT_RUN_FAILED
    except BrokenPipeError:
        # The reader of our output went away (`flatminima methods | head`): not an error of
        # ours. Point stdout at /dev/null so that the interpreter's final flush stays quiet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_RUN_FAILED
    except KeyboardInterrupt:
        print(
            "\nflatminima: interrupted; finished runs are kept, run the same command again "
            "to resume",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
