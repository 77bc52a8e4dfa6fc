"""The saddle study (flatminima.experiments.saddle): the problem, escape detection, the
statistics and verdict rule, and the command's files."""

from __future__ import annotations

import math

import pytest
import torch

from flatminima.experiments import saddle
from flatminima.experiments.saddle import (
    Comparison,
    Estimate,
    Outcome,
    SaddleSettings,
    ScalarLinearNetwork,
    bootstrap,
    escape_run,
    monge_trap_radius,
    predicted_to_leave,
    verdict,
)

SMALL = SaddleSettings(seeds=3, budget=150, rhos=(0.1,), loss_scales=(1.0,))


@pytest.mark.parametrize("loss_scale", [1.0, 100.0])
def test_the_full_loss_has_a_strict_saddle_at_the_origin(loss_scale):
    problem = ScalarLinearNetwork(0, SMALL, loss_scale)
    origin = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    (gradient,) = torch.autograd.grad(problem.loss(origin), origin)
    assert torch.equal(gradient, torch.zeros(2, dtype=torch.float64))
    hessian = torch.autograd.functional.hessian(problem.loss, origin.detach())
    eigenvalues = torch.linalg.eigvalsh(hessian)
    assert eigenvalues[0] < 0 < eigenvalues[1]
    # ±2k·mean(xy): the curvature the report quotes.
    expected = torch.tensor([-1.0, 1.0], dtype=torch.float64) * problem.escape_curvature
    torch.testing.assert_close(eigenvalues, expected)
    assert problem.escape_curvature == pytest.approx(2 * loss_scale, rel=0.3)


def test_the_full_loss_from_moments_equals_the_loss_over_every_example():
    problem = ScalarLinearNetwork(3, SMALL, 10.0)
    for weights in ([0.3, -1.2], [1.0, 1.0], [0.0, 0.0]):
        w = torch.tensor(weights, dtype=torch.float64)
        assert problem.full_loss(w) == pytest.approx(float(problem.loss(w)), rel=1e-12)


def test_the_minimum_is_below_the_escape_threshold():
    problem = ScalarLinearNetwork(0, SMALL, 1.0)
    best = problem._xy / problem._xx  # uv at the minimum of the quadratic in uv
    w = torch.tensor([math.sqrt(best), math.sqrt(best)], dtype=torch.float64)
    assert problem.full_loss(w) < problem.escape_threshold < problem.saddle_loss


def test_escape_is_the_first_step_below_the_threshold_and_the_budget_censors():
    found = escape_run("base", None, 1.0, 0, SMALL)
    assert found.escape_step is not None and found.escape_step > 1
    # One step short of it: the run has not escaped; exactly enough: the same step.
    short = SaddleSettings(seeds=3, budget=found.escape_step - 1, rhos=(0.1,), loss_scales=(1.0,))
    assert escape_run("base", None, 1.0, 0, short).escape_step is None
    exact = SaddleSettings(seeds=3, budget=found.escape_step, rhos=(0.1,), loss_scales=(1.0,))
    assert escape_run("base", None, 1.0, 0, exact).escape_step == found.escape_step


def test_a_run_is_determined_by_its_seed():
    for method, rho in (("base", None), ("monge-sam", 0.1)):
        first = escape_run(method, rho, 100.0, 4, SMALL)
        assert escape_run(method, rho, 100.0, 4, SMALL) == first
    steps = {escape_run("base", None, 1.0, seed, SMALL).escape_step for seed in range(5)}
    assert len(steps) > 1  # seeds do differ


def test_sgd_escapes_within_the_budget_and_sam_is_held():
    for seed in range(5):
        assert escape_run("base", None, 1.0, seed, SMALL).escape_step <= 60
        # η·|λ| ≈ 0.4 < 1: SAM's perturbation keeps throwing it back across the saddle.
        assert escape_run("sam", 0.1, 1.0, seed, SMALL).escape_step is None


def test_sgd_and_sam_do_not_depend_on_the_loss_scale_but_monge_sam_does():
    # Learning rate η₀/k: the same trajectory at every k for SGD and SAM, not for Monge SAM.
    steps = {
        k: [escape_run("base", None, k, seed, SMALL).escape_step for seed in range(3)]
        for k in (1.0, 100.0)
    }
    assert steps[1.0] == steps[100.0]
    monge = {k: escape_run("monge-sam", 0.3, k, 0, SMALL).escape_step for k in (1.0, 100.0)}
    assert monge[1.0] is None and monge[100.0] is not None


def test_monge_trap_radius_solves_its_equation_and_the_estimate_reads_it():
    for rho, curvature in ((0.1, 2.0), (1.0, 200.0), (0.03, 0.0)):
        r = monge_trap_radius(rho, curvature)
        assert r * math.sqrt(1 + (curvature * r) ** 2) == pytest.approx(rho)
    assert not predicted_to_leave(1.0, 2.0, 0.2, "sam")  # SAM leaves only when ηλ > 1
    assert predicted_to_leave(1.0, 2.0, 0.6, "sam")
    assert not predicted_to_leave(0.1, 2.0, 0.2, "monge-sam")
    assert predicted_to_leave(0.1, 200.0, 0.002, "monge-sam")


def test_bootstrap_interval_holds_the_statistic_and_is_a_point_for_constant_data():
    values = [3.0, 8.0, 1.0, 12.0, 5.0, 7.0]
    for statistic, exact in (("mean", 6.0), ("median", 6.0)):
        estimate = bootstrap(values, statistic)
        assert estimate.value == exact
        assert estimate.low <= exact <= estimate.high
        assert estimate.low < estimate.high
    assert bootstrap([4.0] * 5, "mean") == Estimate(4.0, 4.0, 4.0)
    median = bootstrap([math.inf, math.inf, math.inf, 2.0], "median")
    assert math.isinf(median.value) and math.isinf(median.high)
    with pytest.raises(ValueError, match="at least two"):
        bootstrap([1.0], "mean")


def _comparison(low, high, *, identical=False, diverged=False):
    estimate = Estimate((low + high) / 2, low, high)
    return Comparison(0.1, estimate, saddle.direction(estimate), identical, diverged)


def test_the_verdict_rule():
    faster, slower, tie = _comparison(5, 9), _comparison(-9, -5), _comparison(-1, 2)
    exact_tie = _comparison(0, 0, identical=True)
    assert verdict([tie, faster]) == saddle.REPRODUCED
    assert verdict([faster, slower]) == saddle.NOT_REPRODUCED
    assert verdict([exact_tie, exact_tie]) == saddle.NOT_REPRODUCED
    assert verdict([exact_tie, tie]) == saddle.INCONCLUSIVE
    # A diverged ρ is left out: here the only "faster" comes from one.
    assert verdict([tie, _comparison(5, 9, diverged=True)]) == saddle.INCONCLUSIVE
    assert verdict([_comparison(5, 9, diverged=True)]) == saddle.INCONCLUSIVE


def test_summaries_pair_by_seed_and_count_never_escaped_runs():
    settings = SaddleSettings(seeds=2, budget=10, rhos=(0.1,), loss_scales=(1.0,))
    outcomes = [
        Outcome("base", 1.0, None, 0, 3),
        Outcome("base", 1.0, None, 1, 4),
        Outcome("sam", 1.0, 0.1, 0, None),
        Outcome("sam", 1.0, 0.1, 1, 9),
        Outcome("monge-sam", 1.0, 0.1, 0, 5),
        Outcome("monge-sam", 1.0, 0.1, 1, 6),
    ]
    (summary,) = saddle.summarize(outcomes, settings)
    sam = next(arm for arm in summary.arms if arm.method == "sam")
    assert (sam.escaped, sam.runs, sam.capped_mean.value) == (1, 2, 9.5)
    (monge,) = summary.monge_vs_sam
    assert monge.difference.value == pytest.approx(((10 - 5) + (9 - 6)) / 2)
    assert not monge.identical and not monge.diverged
    assert summary.monge_verdict == saddle.REPRODUCED  # both seeds 3 or more steps sooner


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--rhos", "0.1,-1"], "--rhos must be positive"),
        (["--seeds", "1"], "--seeds must be an integer ≥ 2"),
        (["--escape-fraction", "1.5"], "--escape-fraction must be in (0, 1)"),
        (["--loss-scales", "a"], "--loss-scales takes comma-separated numbers"),
    ],
)
def test_bad_options_get_one_line_errors(tmp_path, capsys, arguments, message):
    with pytest.raises(SystemExit):
        saddle.main(["--out", str(tmp_path), *arguments])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in error


def test_the_command_writes_the_report_and_its_figure(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "reproductions"
    arguments = ["--seeds", "2", "--budget", "40", "--rhos", "0.1,1", "--loss-scales", "1,100"]
    assert saddle.main(["--out", str(out), *arguments]) == 0
    report = (out / saddle.REPORT_NAME).read_text()
    figure = out / saddle.FIGURE_NAME
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"]({saddle.FIGURE_NAME})" in report
    assert "python -m flatminima.experiments.saddle --out " in report
    assert "--seeds 2 --budget 40" in report
    assert "## Loss scale k = 1" in report and "## Loss scale k = 100" in report
    assert report.count("| Monge SAM | ") == 4
    # Every verdict is one of the three sentences, never softened.
    verdicts = [line for line in report.splitlines() if line.startswith("Monge SAM less")]
    assert len(verdicts) == 2
    allowed = (saddle.REPRODUCED, saddle.NOT_REPRODUCED, saddle.INCONCLUSIVE)
    for line in verdicts:
        assert sum(f"**{word}**" in line for word in allowed) == 2


def test_the_committed_report_was_written_by_the_command_with_its_current_defaults():
    """docs/reproductions/monge_saddle.md is regenerated, never edited: its header's command
    must parse to today's defaults (rerun the command after changing them)."""
    from pathlib import Path

    report = Path(__file__).resolve().parents[2] / "docs" / "reproductions" / saddle.REPORT_NAME
    header = report.read_text().splitlines()[2]
    command = header.split("`")[1]
    prefix = "python -m flatminima.experiments.saddle "
    assert command.startswith(prefix)
    settings, out, _ = saddle.parse_arguments(command.removeprefix(prefix).split())
    assert settings == SaddleSettings()
    assert out == Path("docs/reproductions")
    assert (report.parent / saddle.FIGURE_NAME).exists()
