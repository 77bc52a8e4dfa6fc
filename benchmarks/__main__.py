"""``python -m benchmarks``: time and measure every method and its peers, write JSON and
the markdown report.

    python -m benchmarks                       # full run: see the estimate below
    python -m benchmarks --quick               # a few minutes, for development; noisier
    python -m benchmarks --methods gsam,wsam   # only these rows (and the base rows)
    python -m benchmarks --report-only benchmarks/results/full.json   # markdown from JSON

Run it on a quiet machine: other processes on the same cores move every number. Before it
starts it logs an estimate of its duration from rounds × passes × the per-pass and per-step
times of the last full run (2-core Xeon, one thread); the full run with every method and
peer comes to about {full} minutes, --quick to about {quick}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks import report
from benchmarks.contenders import (
    Contender,
    contenders,
    memory_contenders,
    pytorch_optimizer_available,
    select,
)
from benchmarks.memory import measure
from benchmarks.timing import time_interleaved
from benchmarks.workloads import WORKLOADS
from flatminima.registry import BASE_OPTIMIZER, METHODS

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Plan:
    """Rounds per workload and where memory is measured."""

    rounds: dict[str, int]
    warmup: dict[str, int]
    memory_workloads: tuple[str, ...]
    memory_steps: int = 2


FULL = Plan(
    rounds={"W1-resnet20": 30, "W2-wide": 150, "W2-many-small": 200},
    warmup={"W1-resnet20": 3, "W2-wide": 5, "W2-many-small": 10},
    memory_workloads=("W1-resnet20", "W2-wide", "W2-many-small"),
)
QUICK = Plan(
    rounds={"W1-resnet20": 3, "W2-wide": 15, "W2-many-small": 25},
    warmup={"W1-resnet20": 1, "W2-wide": 3, "W2-many-small": 3},
    memory_workloads=("W2-wide",),
)


REFERENCE_SECONDS: dict[str, tuple[float, float]] = {
    "W1-resnet20": (0.307, 0.307),
    "W2-wide": (0.0154, 0.0396),
    "W2-many-small": (0.0142, 0.0264),
}
"""(one forward/backward pass, one base step) per workload, medians of the full run of
2026-11-23 (docs/benchmarks.md at 1f8c780: 2-core Xeon, one thread, quiet): the duration
estimate's unit costs."""

MEMORY_SLOWDOWN = 1.5
"""A step under the allocation tracker against a timed one (a Python call per ATen op)."""


def estimate_seconds(plan: Plan, workloads: list[str], methods: set[str] | None) -> float:
    """The run's duration from rounds × passes: a row's step costs its passes times a pass,
    plus the base step's own arithmetic (once for the base, max(2, passes) times for a
    sharpness-aware step), for every warm-up and timed round; memory runs ``memory_steps``
    steps of every row under the tracker. Within about a third on the reference machine."""

    def step_seconds(row: Contender, name: str) -> float:
        pass_s, base_s = REFERENCE_SECONDS[name]
        arithmetic = max(base_s - pass_s, 0.0)
        factor = {"passes": 0.0, "base": 1.0}.get(row.kind, max(2.0, row.passes))
        return row.passes * pass_s + factor * arithmetic

    total = 0.0
    for name in workloads:
        rows = select(contenders(), methods)
        total += (plan.rounds[name] + plan.warmup[name]) * sum(
            step_seconds(row, name) for row in rows
        )
        if name in plan.memory_workloads:
            total += sum(
                MEMORY_SLOWDOWN * plan.memory_steps * step_seconds(row, name)
                for row in select(memory_contenders(), methods)
            )
    return total


def _method_names(text: str) -> set[str]:
    """``--methods``: comma-separated registered names; a one-line error names the rest."""
    names = {name.strip() for name in text.split(",") if name.strip()}
    accepted = [name for name in METHODS if name != BASE_OPTIMIZER]
    unknown = sorted(names - set(accepted))
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown method(s) {', '.join(unknown) or '(none given)'}; accepted: "
            f"{', '.join(accepted)} (the pass and base rows always run)"
        )
    return names


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _environment(mode: str, threads: int) -> dict[str, Any]:
    def git_commit() -> str:
        try:
            return subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"],
                cwd=ROOT,
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return "unknown"

    def cpu_model() -> str:
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return platform.processor() or "unknown"

    peer_version = None
    if pytorch_optimizer_available():
        from importlib.metadata import version

        peer_version = version("pytorch_optimizer")
    return {
        "mode": mode,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "torch": torch.__version__,
        "pytorch_optimizer": peer_version,
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "load_average_at_start": os.getloadavg()[0],
    }


def _contender_table(rows: list[Contender]) -> dict[str, dict[str, Any]]:
    return {
        c.key: {"label": c.label, "kind": c.kind, "method": c.method, "passes": c.passes}
        for c in rows
    }


def run(
    plan: Plan,
    *,
    mode: str,
    threads: int,
    workloads: list[str],
    methods: set[str] | None = None,
    clock: str = "wall",
) -> dict[str, Any]:
    """Times every row (of ``methods`` only, when given) on ``workloads``, and measures their
    memory where the plan says."""
    results: dict[str, Any] = {
        "environment": {**_environment(mode, threads), "clock": clock},
        "plan": asdict(plan),
        "methods": None if methods is None else sorted(methods),
        "contenders": _contender_table(select(memory_contenders(), methods)),
        "workloads": {},
    }
    for name in workloads:
        workload = WORKLOADS[name]
        model = workload.build_model()
        params = [p for p in model.parameters() if p.requires_grad]
        entry: dict[str, Any] = {
            "description": workload.description,
            "parameters": sum(p.numel() for p in params),
            "tensors": len(params),
            "parameter_bytes": sum(p.numel() * p.element_size() for p in params),
        }
        _log(f"{name}: timing, {plan.rounds[name]} rounds")
        timings = time_interleaved(
            workload,
            select(contenders(), methods),
            rounds=plan.rounds[name],
            warmup=plan.warmup[name],
            progress=_log,
            clock=time.thread_time if clock == "thread" else time.perf_counter,
        )
        entry["timing"] = {key: t.as_dict() for key, t in timings.items()}
        if name in plan.memory_workloads:
            entry["memory"] = {}
            for contender in select(memory_contenders(), methods):
                _log(f"{name}: memory of {contender.label}")
                entry["memory"][contender.key] = asdict(
                    measure(contender, workload, steps=plan.memory_steps)
                )
        results["workloads"][name] = entry
    results["environment"]["load_average_at_end"] = os.getloadavg()[0]
    return results


def main(argv: list[str] | None = None) -> int:
    full = estimate_seconds(FULL, list(WORKLOADS), None) / 60
    quick = estimate_seconds(QUICK, list(WORKLOADS), None) / 60
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=(__doc__ or "").format(full=f"{full:.0f}", quick=f"{quick:.0f}"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="few rounds, memory on W2-wide only")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: steadier on a shared two-core machine)",
    )
    parser.add_argument(
        "--workloads", nargs="+", choices=sorted(WORKLOADS), default=list(WORKLOADS)
    )
    parser.add_argument(
        "--methods",
        type=_method_names,
        default=None,
        metavar="NAME[,NAME...]",
        help="only these methods' rows (flatminima's and the peers'); the pass "
        "and base rows always run (default: every method)",
    )
    parser.add_argument(
        "--clock",
        choices=("wall", "thread"),
        default="wall",
        help="wall time (default: publish these) or this thread's CPU time (steadier on a busy "
        "machine, for development)",
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=None,
        help="where to write the results (default benchmarks/results/<mode>.json)",
    )
    parser.add_argument("--markdown", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument(
        "--report-only",
        type=Path,
        metavar="JSON",
        help="only regenerate the markdown from an existing results file",
    )
    args = parser.parse_args(argv)

    if args.report_only is not None:
        results = json.loads(args.report_only.read_text())
    else:
        if not pytorch_optimizer_available():
            _log(
                "pytorch_optimizer is not installed: the peer rows are skipped "
                "(pip install --no-deps pytorch_optimizer)"
            )
        torch.set_num_threads(args.threads)
        # Training one fixed batch for hundreds of steps drives values towards zero; without
        # this, subnormal arithmetic would slow later rounds down on CPU.
        torch.set_flush_denormal(True)
        mode = "quick" if args.quick else "full"
        plan = QUICK if args.quick else FULL
        estimate = estimate_seconds(plan, args.workloads, args.methods)
        _log(
            f"estimated duration on a quiet machine: about {estimate / 60:.0f} min "
            f"({estimate:.0f} s)"
        )
        results = run(
            plan,
            mode=mode,
            threads=args.threads,
            workloads=args.workloads,
            methods=args.methods,
            clock=args.clock,
        )
        path = args.json or ROOT / "benchmarks" / "results" / f"{mode}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=1) + "\n")
        _log(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    args.markdown.parent.mkdir(parents=True, exist_ok=True)
    args.markdown.write_text(report.render(results))
    _log(f"wrote {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
