"""The demo: the library's main job with every choice made, written down as a study file.

The grid is ``flatminima/studies/demo.toml`` (``demo-quick.toml`` for ``--quick``), shipped in
the package: MNIST-1D with 40% label noise, a small 1-D CNN, the base optimizer against SAM and
the four seed methods for 100 epochs, three seeds. The file's comments say why each
hyperparameter has its value; ``flatminima compare --study`` runs the same file. This module
adds what a study file does not say: where the demo's runs go, and the sharpness measured
after training.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flatminima.experiments.config import RunConfig
from flatminima.experiments.report import Report, write_report
from flatminima.experiments.runner import GridSummary, run_grid
from flatminima.experiments.sharpness_runs import SharpnessSettings, SharpnessSummary, measure_runs
from flatminima.experiments.store import DEFAULT_STALE_AFTER_S, Store
from flatminima.experiments.study import packaged_study

DEMO_STUDY = packaged_study("demo.toml")
QUICK_STUDY = packaged_study("demo-quick.toml")
"""``demo --quick``: the base optimizer against SAM only, on the demo's own setting and budget;
the same runs as the full demo's, so that it resumes from them."""

DEMO_TRAINING: dict[str, Any] = dict(DEMO_STUDY.training)
DEMO_ARMS: list[tuple[str, dict[str, Any]]] = [
    (method, dict(hyperparameters)) for method, hyperparameters in DEMO_STUDY.methods.items()
]
QUICK_ARMS: list[tuple[str, dict[str, Any]]] = [
    (method, dict(hyperparameters)) for method, hyperparameters in QUICK_STUDY.methods.items()
]

DEMO_SHARPNESS: dict[str, Any] = {"examples": 1024}
"""Settings of the sharpness measured after training (``flatminima.experiments.sharpness_runs.
SharpnessSettings``; the rest at their defaults). Measured on the demo's 18 trained models, one
thread each, two workers: on 1024 of the 4000 training examples a run takes 1.6-2.5 s (the 18,
landscapes included, under 30 s of wall time); on all 4000 it takes ~18 s, and the 1024-example
numbers are within 5% (top eigenvalue), 3% (trace) and 7% (worst-case sharpness) of those,
against a threefold gap in top eigenvalue between SGD and the SAM family."""

DEMO_SEEDS = len(DEMO_STUDY.seeds)
DEMO_JOBS = 2
DEMO_DB = "flatminima-demo/demo.db"
DEMO_REPORT_DIR = "flatminima-demo/report"

QUICK_SEEDS = len(QUICK_STUDY.seeds)


def demo_configs(
    seeds: int = DEMO_SEEDS, epochs: int | None = None, *, quick: bool = False
) -> list[RunConfig]:
    """The demo's study with seeds 0 to ``seeds`` − 1 and ``epochs`` (default: the file's),
    seed by seed (so that an interrupted demo holds complete comparisons)."""
    study = QUICK_STUDY if quick else DEMO_STUDY
    return study.with_budget(seeds=list(range(seeds)), epochs=epochs).configs()


@dataclass
class DemoOutcome:
    grid: GridSummary
    sharpness: SharpnessSummary | None
    """``None`` when skipped or when no run finished."""
    report: Report


@dataclass(frozen=True)
class DemoOptions:
    db: Path
    out: Path
    seeds: int = DEMO_SEEDS
    epochs: int | None = None
    quick: bool = False
    jobs: int = DEMO_JOBS
    threads: int = 1
    data_dir: Path | None = None
    progress: bool = True
    stale_after_s: float = DEFAULT_STALE_AFTER_S
    sharpness: bool = True


def run_demo(
    options: DemoOptions,
    *,
    on_trained: Callable[[GridSummary], None] = lambda summary: None,
    on_measured: Callable[[SharpnessSummary], None] = lambda summary: None,
) -> DemoOutcome:
    """Train the demo grid (resuming what ``options.db`` holds), measure the sharpness of its
    finished runs (with landscapes), and write the report. ``on_trained`` and ``on_measured``
    hear each stage's summary as soon as it is done (the command line prints them)."""
    configs = demo_configs(options.seeds, options.epochs, quick=options.quick)
    grid = run_grid(
        configs,
        options.db,
        data_dir=options.data_dir,
        jobs=options.jobs,
        threads=options.threads,
        progress=options.progress,
        stale_after_s=options.stale_after_s,
    )
    on_trained(grid)
    sharpness = None
    if options.sharpness:
        with Store(options.db) as store:
            trained = [
                config.config_hash
                for config in configs
                if (run := store.find(config.config_hash)) is not None and run.status == "finished"
            ]
        if trained:
            settings = SharpnessSettings(**DEMO_SHARPNESS)
            sharpness = measure_runs(
                options.db,
                settings,
                runs=trained,
                landscape=True,
                jobs=options.jobs,
                data_dir=options.data_dir,
                progress=options.progress,
            )
            on_measured(sharpness)
    return DemoOutcome(grid, sharpness, write_report(options.db, options.out))
