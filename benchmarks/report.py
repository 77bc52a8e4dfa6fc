"""Renders a results file as ``docs/benchmarks.md``: targets, step times, memory, method."""

from __future__ import annotations

from typing import Any

from benchmarks.targets import (
    MEMORY_TOLERANCE,
    OVERHEAD_PEERS,
    OVERHEAD_RATIO_TARGET,
    STATE_TARGETS,
    STEP_TARGETS,
    memory_targets,
)

Results = dict[str, Any]


def _spread(values: dict[str, float], scale: float = 1.0, digits: int = 2) -> str:
    median, q1, q3 = (values[k] * scale for k in ("median", "q1", "q3"))
    return f"{median:.{digits}f} [{q1:.{digits}f}–{q3:.{digits}f}]"


def _ms(values: dict[str, float]) -> str:
    return _spread(values, 1e3, 1 if abs(values["median"]) >= 0.1 else 2)


def _targets(results: Results) -> list[tuple[str, str, str]]:
    rows: list[tuple[str, str, str]] = []
    workloads = results["workloads"]
    labels = {key: c["label"] for key, c in results["contenders"].items()}

    for target in STEP_TARGETS:
        timing = workloads.get(target.workload, {}).get("timing", {}).get(target.key)
        if timing is None:
            continue
        ratio = timing["ratio_to_base"]["median"]
        short = target.workload.split("-")[0]
        bound = "" if target.bound is None else f" ≤ {target.bound}"
        note = f" ({target.note})" if target.note else ""
        measured = f"{ratio:.3f} (IQR {_spread(timing['ratio_to_base'], digits=3)})"
        if target.bound is None:
            verdict = "measured"
        else:
            verdict = _verdict(ratio <= target.bound, f"missed by {ratio - target.bound:.3f}")
        rows.append(
            (f"{short}: {labels[target.key]} step / base step{bound}{note}", measured, verdict)
        )

    w2 = workloads.get("W2-many-small", {}).get("timing", {})
    if "flatminima:sam" in w2:
        measures = (("overhead_s", "overhead"), ("beyond_base_s", "beyond the base step"))
        for measure, name in measures:
            ours = w2["flatminima:sam"][measure]["median"]
            for peer in OVERHEAD_PEERS:
                if peer not in w2:
                    continue
                theirs = w2[peer][measure]["median"]
                factor = theirs / ours if ours > 0 else float("inf")
                rows.append(
                    (
                        f"W2 many small tensors: SAM {name} ≥ {OVERHEAD_RATIO_TARGET:.0f}× lower "
                        f"than {labels[peer]}",
                        f"{factor:.2f}× ({theirs * 1e3:.2f} ms vs {ours * 1e3:.2f} ms)",
                        _verdict(
                            factor >= OVERHEAD_RATIO_TARGET,
                            f"missed: {factor:.2f}× of {OVERHEAD_RATIO_TARGET:.0f}×",
                        ),
                    )
                )

    for key, target in memory_targets().items():
        measured = [
            (name, _peak_with_state(entry["memory"][key]))
            for name, entry in workloads.items()
            if key in entry.get("memory", {})
        ]
        if not measured:
            continue
        worst_name, worst = max(measured, key=lambda item: item[1])
        rows.append(
            (
                f"extra memory of {labels[key]}: {target:g} parameter copies",
                f"{worst:.3f} P (worst of {len(measured)} workload(s): {worst_name})",
                _verdict(worst <= target + MEMORY_TOLERANCE, f"{worst - target:+.3f} P"),
            )
        )

    for key, target in STATE_TARGETS.items():
        # The larger of what the tracker saw held between steps and the storage of the
        # method's state tensors: the mask counts whichever way it was allocated.
        measured = [
            (name, max(m["between_steps"], m.get("state") or 0.0))
            for name, entry in workloads.items()
            if (m := entry.get("memory", {}).get(key)) is not None
        ]
        if not measured:
            continue
        worst_name, worst = max(measured, key=lambda item: item[1])
        rows.append(
            (
                f"persistent state of {labels[key]} (its mask) beyond the backup ≤ {target:.3f} P",
                f"{worst:.3f} P (worst of {len(measured)} workload(s): {worst_name})",
                _verdict(worst <= target + 0.01, f"{worst - target:+.3f} P"),
            )
        )
    return rows


def _peak_with_state(memory: dict[str, Any]) -> float:
    """The tracker's peak plus any state it did not see allocated (a mask learnt before the
    measured steps, when the row was built): state held beyond what it saw between steps."""
    unseen = max(0.0, (memory.get("state") or 0.0) - memory["between_steps"])
    return memory["peak"] + unseen


def _verdict(met: bool, miss: str) -> str:
    return "met" if met else f"**not met** ({miss})"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _timing_section(name: str, entry: dict[str, Any], contenders: dict[str, Any]) -> list[str]:
    lines = [
        f"### {name}",
        "",
        f"{entry['description']}. {entry['parameters']:,} parameters in {entry['tensors']:,} "
        f"tensors; {next(iter(entry['timing'].values()))['samples']} interleaved rounds.",
        "",
    ]
    rows = []
    for key, timing in entry["timing"].items():
        contender = contenders[key]
        is_reference = contender["kind"] == "passes"
        rows.append(
            [
                contender["label"],
                _passes(timing, contender),
                _ms(timing["step_s"]),
                _spread(timing["ratio_to_base"]),
                "—" if is_reference else _ms(timing["overhead_s"]),
                "—"
                if is_reference or contender["kind"] == "base"
                else _ms(timing["beyond_base_s"]),
            ]
        )
    lines += _table(
        ["", "passes", "step, ms", "× base step", "overhead, ms", "beyond base step, ms"], rows
    )
    return [*lines, ""]


def _passes(timing: dict[str, Any], contender: dict[str, Any]) -> str:
    """Passes per step: as the optimizer counted them where it does (results written before
    it did give the closure calls)."""
    return f"{timing.get('passes', contender['passes']):.2f}"


def _memory_section(results: Results) -> list[str]:
    measured = {
        name: entry["memory"] for name, entry in results["workloads"].items() if "memory" in entry
    }
    if not measured:
        return []
    lines = [
        "## Extra memory",
        "",
        "In copies of the model's trainable parameters (P). *Peak*: the most the optimizer held "
        "at any moment of its step; *during passes*: what it held while a forward/backward ran "
        "(what adds to activation memory on an accelerator); *between steps*: its persistent "
        "state. In brackets: the storage of the tensors in the method's own optimizer state "
        "(an EMA, a mask), however and whenever allocated. The base optimizer's own momentum "
        "and temporaries and the gradients are not counted (every contender has them).",
        "",
    ]
    names = list(measured)
    header = [""] + [f"{name}: peak / during passes / between steps" for name in names]
    rows = []
    keys = [key for key in results["contenders"] if any(key in m for m in measured.values())]
    for key in keys:
        if results["contenders"][key]["kind"] in ("passes", "base"):
            continue
        cells = [results["contenders"][key]["label"]]
        for name in names:
            m = measured[name].get(key)
            if m is None:
                cells.append("—")
                continue
            cell = f"{m['peak']:.3f} / {m['during_passes']:.3f} / {m['between_steps']:.3f}"
            if m.get("state") is not None:
                cell += f" ({m['state']:.3f})"
            cells.append(cell)
        rows.append(cells)
    return [*lines, *_table(header, rows), ""]


METHOD = """\
## How it is measured

**Contenders.** Every row builds its own copy of the workload's model from the same seed and
steps it on the same fixed batch. All share one closure (set every `.grad` to `None`,
forward, cross-entropy, backward) and one base optimizer: `torch.optim.SGD(lr=0.01,
momentum=0.9, weight_decay=5e-4, foreach=True)` — pytorch_optimizer builds its base itself
from its own param groups, whose `foreach` entry is its own switch, so its SGD is made to
take the same foreach step. flatminima methods run with their published defaults and
`model=` given (BatchNorm statistics frozen on perturbed passes: that cost is counted).
pytorch_optimizer runs as documented (`closure()` then `step(closure)`), with its defaults:
on CPU its default is the per-tensor path; a second row forces `foreach=True`. Its GSAM,
WSAM and LookSAM run at flatminima's settings (GSAM ρ = 0.05 fixed, through its
`ProportionScheduler` with equal end points, α = 0.4; WSAM ρ = 0.05, γ = 0.9, decoupled, no
clipping; LookSAM ρ = 0.1, k = 5, α = 0.2, not its own defaults k = 10, α = 0.7). Two
differences cannot be removed: its LookSAM splits the gradient per tensor (flatminima's
uses global vectors, as the paper's formula) and calls the closure on every step, so it
costs two passes on every step, not 1 + 1/k; GSAM and WSAM run their own passes inside
`step`. Sparse SAM's rows learn their mask once before timing, through the per-epoch hook
the runner calls, from 64 single examples (the mask's content does not change the step's
cost). The naive loop (`benchmarks/naive.py`) is the per-parameter SAM that circulates in
blog posts.

**Step time.** One round runs one step of every row, in an order rotated every round, after
untimed warm-up rounds; Python's garbage collector runs between rounds, not inside them.
The forward/backward pass alone and the base optimizer alone are rows of the same rounds.
Each number is a median over rounds with the interquartile range in brackets, and every
ratio or difference is formed *within* a round before the median is taken, so slow
stretches of a shared machine hit both sides of a comparison. `× base step` is the step
time over the base optimizer's step in the same round. *Overhead* is the step time minus
`passes ×` the pass timed alone in the same round — the optimizer's own time, base step
included (*passes*: for flatminima's rows, the forward and backward passes its optimizer
counted, in whole batches, averaged over the timed steps, a backward weighing two forwards:
ESAM's forward-only probe and its backward on the selected examples, micro-batch SAM's
quarter-batch passes and LookSAM's cycle count for what they compute; for the peers, their
closure calls); *beyond base step* subtracts the base step's own overhead as well, leaving
what the sharpness-aware part adds. One torch thread (`torch.set_num_threads(1)`), denormals
flushed.

**Memory.** CPU PyTorch keeps no allocator statistics, so `benchmarks/memory.py` watches
every ATen call through a `TorchDispatchMode`: an output whose storage is not one of the
call's inputs' is a new allocation, and a finalizer on that storage frees it in the books
exactly when PyTorch frees it. Allocations are tagged by where they happen — inside a
forward/backward pass, inside the base optimizer's `step`, or anywhere else (the method).
What the method holds at a moment is its own live allocations plus what a finished pass
allocated that is no longer any parameter's `.grad` (a gradient it took over, a clone it
keeps); it is sampled after each of its allocations and at every pass boundary, over two
steps (the first creates any persistent state). Nothing is computed from the design.
"""

FINDINGS = """\
## Notes on the implementation

* **Foreach kernels on CPU** are a C++ loop over the tensors (one dispatch each, about
  0.5–1.5 µs for a small tensor), not one fused kernel; a Python loop costs about 1.5–4 µs
  per tensor and operation. On the many-small-tensors workload every pass over the
  parameters therefore costs about a millisecond whatever it computes, and the base SGD step
  (momentum and weight decay: four such passes) is about half of flatminima SAM's overhead.
* **Multiplying a list by a Python number** on CPU was the most expensive foreach call:
  PyTorch converts the number again for every tensor. flatminima multiplies float32/float64
  lists by a 0-d tensor of their dtype (same bits, half the time).
* **`torch.compile` of the perturbation arithmetic** (backup copy, ε scaling, w + ε;
  `python -m benchmarks.compile_probe` reproduces this) is not used. Its output is bit for
  bit the eager result, but: on 1,002 small tensors it compiled for about 4 minutes and ran
  2.2× slower than the eager foreach calls (100 tensors: 1.8× slower); on W2-wide's 8 large
  tensors it ran 15–25% faster on that part, which is about 5% of the step, after 4–8 s of
  compilation at the first step, needs a C++ compiler at run time, and recompiles whenever
  the set of parameters with a gradient changes. A gain of a few percent in one regime did
  not pay for that.
"""


def render(results: Results) -> str:
    env = results["environment"]
    lines = [
        "# Benchmarks",
        "",
        f"Generated by `python -m benchmarks{' --quick' if env['mode'] == 'quick' else ''}` "
        f"(results in `benchmarks/results/{env['mode']}.json`); do not edit by hand.",
        "",
    ]
    if env["mode"] == "quick":
        lines += [
            "> **Quick run.** Few rounds, on a machine shared with other work: indicative "
            "only. The full run (`python -m benchmarks`, on a quiet machine) replaces it.",
            "",
        ]
    lines += [
        f"{env['date']} · flatminima {env['git_commit']} · torch {env['torch']} · "
        f"pytorch_optimizer {env['pytorch_optimizer'] or 'not installed'} · Python "
        f"{env['python']} · {env['cpu']} ({env['cpu_count']} cores), {env['threads']} "
        f"thread(s) · {env.get('clock', 'wall')} clock · load average "
        f"{env['load_average_at_start']:.2f} at start, "
        f"{env.get('load_average_at_end', float('nan')):.2f} at end",
        "",
        "## Targets",
        "",
        *_table(["target", "measured", ""], [list(row) for row in _targets(results)]),
        "",
        "## Step time",
        "",
        "Median [interquartile range] over rounds.",
        "",
    ]
    for name, entry in results["workloads"].items():
        lines += _timing_section(name, entry, results["contenders"])
    lines += _memory_section(results)
    lines += [METHOD, FINDINGS]
    return "\n".join(lines).rstrip() + "\n"
