"""The commands: each checks what its options cannot, calls the experiments package and
prints what happened. The work itself (training, measuring, the demo's pipeline, the report)
is done in :mod:`flatminima.experiments`."""

from __future__ import annotations

import argparse
import inspect
import shutil
import sys
import textwrap
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from flatminima.cli.options import EXIT_INCOMPLETE, EXIT_RUN_FAILED
from flatminima.experiments import demo
from flatminima.experiments.config import ConfigError, RunConfig, make_run_config
from flatminima.experiments.data import check_dataset
from flatminima.experiments.grid import Assignment, expand_grid, parse_list, parse_seeds
from flatminima.experiments.labels import arm_labels
from flatminima.experiments.ray_executor import run_grid_on_ray
from flatminima.experiments.report import write_landscape, write_report
from flatminima.experiments.runner import GridSummary, run_grid
from flatminima.experiments.sharpness_runs import (
    SharpnessSettings,
    SharpnessSummary,
    measure_runs,
    select_runs,
)
from flatminima.experiments.store import RunRecord, Store
from flatminima.experiments.study import Study, load_study
from flatminima.experiments.summary import measurement_views, summarize
from flatminima.experiments.tables import text_table
from flatminima.registry import get_method, method_names

# --- checks and printing shared by the commands ------------------------------------------------


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
        "validation_size": args.validation_size,
        "track_sharpness": args.track_sharpness,
        "processes": args.processes,
    }


def _check_output_directory(path: Path | None, option: str) -> None:
    if path is not None and path.exists() and not path.is_dir():
        raise ConfigError(f"{option} must be a directory; {path} is a file")


def _check_runtime(args: argparse.Namespace, configs: Sequence[RunConfig]) -> None:
    """The options of where and how training runs, and the data every config needs."""
    if not args.stale_after > 0:  # inf: never take a run over; NaN fails this too
        raise ConfigError(
            f"--stale-after must be a positive number of hours, got {args.stale_after}"
        )
    for dataset in {config.dataset for config in configs}:
        check_dataset(dataset, args.data_dir)


def _check_executor(args: argparse.Namespace) -> None:
    if args.ray_address is not None and args.executor != "ray":
        raise ConfigError("--ray-address needs --executor ray")
    if args.ray_address is not None and args.jobs != 1:
        raise ConfigError(
            "--jobs sizes a local Ray instance; with --ray-address the cluster's CPUs decide how "
            "many runs train at once (drop --jobs)"
        )


def _train(
    configs: list[RunConfig], args: argparse.Namespace, jobs: int, executor: str = "local"
) -> int:
    """Check the data, run the grid, print what happened; the exit status."""
    _check_runtime(args, configs)
    settings: dict[str, Any] = {
        "data_dir": args.data_dir,
        "jobs": jobs,
        "threads": args.threads,
        "progress": not args.quiet,
        "stale_after_s": args.stale_after * 3600,
    }
    if executor == "ray":
        summary = run_grid_on_ray(configs, args.db, address=args.ray_address, **settings)
    else:
        summary = run_grid(configs, args.db, **settings)
    _print_grid_summary(summary, args.db)
    _print_tracking_overhead(configs, args.db)
    return _grid_status(summary)


def _grid_status(summary: GridSummary) -> int:
    """Failed or stopped: 1; complete: 0; runs left to another process: 3, never 0."""
    if summary.failed or summary.stopped:
        return EXIT_RUN_FAILED
    return 0 if summary.complete else EXIT_INCOMPLETE


def _print_grid_summary(summary: GridSummary, db: Path) -> None:
    parts = [f"{summary.finished} trained", f"{summary.already_finished} already in {db}"]
    if summary.skipped:
        parts.append(f"{summary.skipped} being trained by another process")
    if summary.failed:
        parts.append(f"{len(summary.failed)} failed")
    print(f"{summary.total} run(s): " + ", ".join(parts))
    for failure in summary.failed:
        print(f"  failed: {failure}", file=sys.stderr)
    if summary.stopped:
        print(f"flatminima: grid stopped: {summary.stopped}", file=sys.stderr)
    elif summary.skipped and not summary.failed:
        print(
            f"flatminima: the grid is incomplete: {summary.skipped} run(s) are being trained "
            "by another process; run the same command again when it ends",
            file=sys.stderr,
        )


def _print_tracking_overhead(configs: Sequence[RunConfig], db: Path) -> None:
    """With --track-sharpness: what measuring λ_max during training cost, per measurement and
    against the training time, over the grid's finished runs."""
    tracking = [config.config_hash for config in configs if config.track_sharpness]
    if not tracking:
        return
    seconds, training = [], 0.0
    with Store(db) as store:
        for config_hash in tracking:
            run = store.find(config_hash)
            if run is None or run.status != "finished":
                continue
            rows = store.epochs(run.id)
            seconds += [row["sharpness_time_s"] for row in rows if row["sharpness_time_s"]]
            training += rows[-1]["train_time_s"] if rows else 0.0
    if seconds:
        print(
            f"λ_max tracked during training: {len(seconds)} measurement(s), "
            f"{sum(seconds) / len(seconds):.2f} s each, {sum(seconds):.1f} s in all "
            f"({100 * sum(seconds) / training:.0f}% on top of {training:.1f} s of training)"
        )


def _print_sharpness_summary(summary: SharpnessSummary) -> None:
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


SHARPNESS_TABLE_HEADERS = (
    "run",
    "method and seed",
    "test acc. %",
    "λ_max",
    "tr(H)",
    "worst-case",
    "examples",
)


def sharpness_table(runs: list[RunRecord], rows: dict[str, Any]) -> str:
    """The measured runs, one line each, labelled as the report labels their arms."""
    labels = arm_labels([(run.config["method"], run.config["hyperparameters"]) for run in runs])
    lines = []
    for run, label in zip(runs, labels, strict=True):
        metrics = rows[run.config_hash].metrics
        lines.append(
            [
                run.config_hash,
                f"{label} seed={run.config['seed']}",
                f"{100 * run.final['final_test_accuracy']:.2f}",
                f"{metrics['hessian_top_eigenvalue']:.4g}",
                f"{metrics['hessian_trace']:.4g}",
                f"{metrics['worst_case_sharpness']:.4g}",
                str(rows[run.config_hash].examples),
            ]
        )
    return text_table(SHARPNESS_TABLE_HEADERS, lines)


def _print_report(
    db: Path,
    out: Path,
    select_by: str | None = None,
    only: Collection[str] | None = None,
    study: Path | None = None,
) -> None:
    rerun = None if study is None else f"flatminima compare --study {study}"
    report = write_report(db, out, select_by=select_by, only=only, rerun=rerun)
    print()
    print(report.text)
    print()
    print(f"report: {report.markdown_path}")
    for path in report.plots:
        print(f"plot:   {path}")


# --- the commands ----------------------------------------------------------------------------


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
    status = _train([config], args, jobs=1)
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


def selected_methods(args: argparse.Namespace) -> list[str] | None:
    if not args.methods:
        return None
    return [name for text in args.methods for name in parse_list(text, "--methods")]


STUDY_DEFINES = {
    "methods": "--methods",
    "seeds": "--seeds",
    "param": "--param",
    "sweep": "--sweep",
    "select_by": "--select-by",
    "dataset": "--dataset",
    "model": "--model",
    "optimizer": "--optimizer",
    "lr": "--lr",
    "momentum": "--momentum",
    "weight_decay": "--weight-decay",
    "schedule": "--schedule",
    "epochs": "--epochs",
    "batch_size": "--batch-size",
    "label_noise": "--label-noise",
    "train_size": "--train-size",
    "validation_size": "--validation-size",
    "track_sharpness": "--track-sharpness",
    "processes": "--processes",
}
"""Options a study file defines (destination → option): refused beside ``--study``, so that
the file alone says what was run. Where and how it runs (``--db``, ``--jobs``, ``--quiet``,
``--out``, ``--report``, ``--threads``...) stays on the command line."""


def _load_study(args: argparse.Namespace) -> Study:
    """The study of ``--study``, after refusing the options it defines."""
    given = sorted(set(STUDY_DEFINES) & getattr(args, "given", set()))
    if given:
        option = STUDY_DEFINES[given[0]]
        raise ConfigError(
            f"{option} cannot be given with --study: {args.study} defines it (edit the file, "
            "or drop --study)"
        )
    return load_study(args.study)


def _given(args: argparse.Namespace, dest: str) -> bool:
    return dest in getattr(args, "given", set())


def grid_configs(args: argparse.Namespace) -> list[RunConfig]:
    """The runs ``compare``'s options (without ``--study``) plan."""
    if not args.methods:
        raise ConfigError("compare needs --methods (or a --study file)")
    return expand_grid(
        selected_methods(args) or [],
        parse_seeds(args.seeds or ["0,1,2"]),
        [Assignment.parse(text, "--param") for text in args.param],
        [Assignment.parse(text, "--sweep") for text in args.sweep],
        _training(args),
    )


def command_compare(args: argparse.Namespace) -> int:
    study: Study | None = None
    only: frozenset[str] | None = None
    if args.study is not None:
        study = _load_study(args)
        configs = study.configs()
        # The study's report shows its own runs: the database may hold other studies' too.
        only = study.config_hashes
        if not _given(args, "db") and study.database is not None:
            args.db = study.database
        if args.report is None:
            args.report = study.report
        select_by = study.select_by
    else:
        configs = grid_configs(args)
        select_by = args.select_by
        _check_selection(select_by, configs, args.report)
    _check_output_directory(args.report, "--report")
    _check_executor(args)
    status = _train(configs, args, args.jobs, args.executor)
    if study is not None and study.sharpness is not None and only is not None:
        print(f"\nsharpness of the study's trained models ({study.name} [sharpness]):")
        with Store(args.db, create=False) as store:
            finished = [
                run.config_hash
                for run in store.runs()
                if run.config_hash in only and run.status == "finished"
            ]
        measured = measure_runs(
            args.db,
            study.sharpness,
            runs=finished,
            jobs=args.jobs,
            data_dir=args.data_dir,
            progress=not args.quiet,
        )
        _print_sharpness_summary(measured)
        if measured.failed:
            status = status or EXIT_RUN_FAILED
    if args.report is not None:
        _print_report(args.db, args.report, select_by, only, args.study)
    return status


def _check_selection(
    select_by: str | None, configs: Sequence[RunConfig], report: Path | None
) -> None:
    """Before anything trains: a choice on validation data needs a validation split in every
    run, and a report to show it in."""
    if select_by is None:
        return
    if report is None:
        raise ConfigError(
            f"--select-by {select_by} chooses what the report shows: give --report DIR too"
        )
    if any(config.validation_size == 0 for config in configs):
        raise ConfigError(
            f"--select-by {select_by} needs a validation split: give --validation-size N "
            "(training examples held out and evaluated every epoch)"
        )


def command_demo(args: argparse.Namespace) -> int:
    _check_output_directory(args.out, "--out")
    seeds = args.seeds or (demo.QUICK_SEEDS if args.quick else demo.DEMO_SEEDS)
    configs = demo.demo_configs(seeds, args.epochs, quick=args.quick)
    _check_runtime(args, configs)
    arms = len(demo.QUICK_ARMS if args.quick else demo.DEMO_ARMS)
    print(
        f"flatminima demo{' --quick' if args.quick else ''}: {len(configs)} runs ({arms} "
        f"methods × {seeds} seeds) on MNIST-1D with "
        f"{demo.DEMO_TRAINING['label_noise']:.0%} label noise, {args.epochs} epochs each; "
        f"database {args.db}"
    )

    def measuring_starts(grid: GridSummary) -> None:
        _print_grid_summary(grid, args.db)
        if not args.no_sharpness:
            print("\nsharpness of the trained models (--no-sharpness skips it):")

    outcome = demo.run_demo(
        demo.DemoOptions(
            db=args.db,
            out=args.out,
            seeds=seeds,
            epochs=args.epochs,
            quick=args.quick,
            jobs=args.jobs,
            threads=args.threads,
            data_dir=args.data_dir,
            progress=not args.quiet,
            stale_after_s=args.stale_after * 3600,
            sharpness=not args.no_sharpness,
        ),
        on_trained=measuring_starts,
        on_measured=_print_sharpness_summary,
    )
    print()
    print(outcome.report.text)
    print()
    print(f"report: {outcome.report.markdown_path}")
    for path in outcome.report.plots:
        print(f"plot:   {path}")
    if outcome.sharpness is not None and outcome.sharpness.failed:
        return EXIT_RUN_FAILED
    return _grid_status(outcome.grid)


def sharpness_settings(args: argparse.Namespace) -> SharpnessSettings:
    """The measurement settings the options of `sharpness` give."""
    return SharpnessSettings(
        examples=args.examples,
        rho=args.rho,
        top_k=args.top_k,
        num_probes=args.num_probes,
        seed=args.seed,
    )


def command_sharpness(args: argparse.Namespace) -> int:
    settings = sharpness_settings(args)
    settings.check()
    _check_output_directory(args.out, "--out")
    methods = selected_methods(args)
    summary = measure_runs(
        args.db,
        settings,
        runs=args.runs,
        methods=methods,
        landscape=args.landscape,
        force=args.force,
        jobs=args.jobs,
        data_dir=args.data_dir,
        progress=not args.quiet,
    )
    _print_sharpness_summary(summary)
    with Store(args.db, create=False) as store:
        selected = select_runs(store, args.runs, methods)
        rows = store.sharpness(asdict(settings))
        settings_measured = summarize(store) if args.landscape else []
    measured = [run for run in selected if run.config_hash in rows]
    if measured:
        print()
        print(sharpness_table(measured, rows))
    if settings_measured:
        print()
    for setting in settings_measured:
        for view in measurement_views(setting):
            if view.sharpness_settings != asdict(settings):
                continue  # another measurement's landscapes
            for path in write_landscape(view, args.out / view.slug):
                print(f"landscape: {path}")
    print(f"\n`flatminima report --db {args.db}` shows them beside test accuracy.")
    return EXIT_RUN_FAILED if summary.failed else 0


def command_report(args: argparse.Namespace) -> int:
    select_by = args.select_by
    only: frozenset[str] | None = None
    if args.study is not None:
        study = _load_study(args)
        only = study.config_hashes
        if not _given(args, "db") and study.database is not None:
            args.db = study.database
        if not _given(args, "out") and study.report is not None:
            args.out = study.report
        select_by = study.select_by
    _check_output_directory(args.out, "--out")
    _print_report(args.db, args.out, select_by, only, args.study)
    return 0


def command_forget(args: argparse.Namespace) -> int:
    if bool(args.runs) == args.failed:
        raise ConfigError("forget takes RUN hashes or --failed (one of the two)")
    with Store(args.db, create=False) as store:
        everything = store.runs()
    if args.failed:
        chosen = [run for run in everything if run.status == "failed"]
    else:
        chosen = []
        for name in args.runs:
            matches = [run for run in everything if run.config_hash.startswith(name.strip())]
            if not name.strip() or len(matches) != 1:
                found = "no run" if not matches else f"{len(matches)} runs"
                raise ConfigError(
                    f"RUN {name!r} matches {found} in {args.db}: give a configuration hash or "
                    "a unique prefix of one (`flatminima report` lists them)"
                )
            chosen += matches
    if not chosen:
        print(f"no failed run in {args.db}")
        return 0
    labels = arm_labels([(run.config["method"], run.config["hyperparameters"]) for run in chosen])
    with Store(args.db) as store:
        for run, label in zip(chosen, labels, strict=True):
            store.forget(run.config_hash)
            print(f"forgot {run.config_hash} ({label} seed={run.config['seed']}, {run.status})")
    return 0


def method_description(name: str) -> str:
    """A method's one-sentence summary: the first paragraph of its docstring (which may run
    over several lines), not its first line."""
    spec = get_method(name)
    documented = inspect.getdoc(spec.build_fn) if spec.build_fn is not None else None
    if not documented:
        return spec.summary
    return " ".join(documented.split("\n\n")[0].split())


def command_methods(args: argparse.Namespace) -> int:
    width = max(60, min(shutil.get_terminal_size().columns, 120))
    indent = " " * 15
    for name in method_names():
        spec = get_method(name)
        settings = ", ".join(f"{key}={value}" for key, value in spec.hyperparameters.items())
        # Averaged over the method's cycle: LookSAM's k = 5 costs 1.2 passes a step, not 2.
        passes = f"{spec.mean_passes_per_step():g}"
        print(f"{name:<14} {passes:<3} passes/step  {settings or '-'}")
        print(
            textwrap.fill(
                method_description(name),
                width=width,
                initial_indent=indent,
                subsequent_indent=indent,
                break_long_words=False,
                break_on_hyphens=False,
            )
        )
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "demo": command_demo,
    "run": command_run,
    "compare": command_compare,
    "sharpness": command_sharpness,
    "report": command_report,
    "forget": command_forget,
    "methods": command_methods,
}
