"""The report: ``report.md`` with a table and figures per setting, and the same tables as
plain text for the terminal.

This module only assembles: the numbers come from :mod:`~flatminima.experiments.summary`,
their cells from :mod:`~flatminima.experiments.tables`, the figures from
:mod:`~flatminima.experiments.plots`. Each setting's figures go to its own directory (named by
its slug); writing that directory again first removes the PNG files (and the landscape JSON)
left there by an earlier report, so that no stale figure survives beside the new ones.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from flatminima.experiments.files import write_text_atomically
from flatminima.experiments.plots import Plot, draw_all, plot_landscape, plot_sharpness
from flatminima.experiments.store import Store
from flatminima.experiments.summary import (
    REFERENCE_METHOD,
    Selection,
    Setting,
    check_selection_rule,
    landscapes,
    measurement_differences,
    measurement_views,
    select_by_validation,
    summarize,
    swept_hyperparameters,
    tracked_sharpness,
    unfinished_runs,
)
from flatminima.experiments.tables import (
    CORRELATION_HEADERS,
    SELECTION_HEADERS,
    TABLE_HEADERS,
    TRACKING_HEADERS,
    correlation_rows,
    failure_lines,
    markdown_table,
    measured_on,
    selection_rows,
    sharpness_headers,
    sharpness_rows,
    table_rows,
    text_table,
    tracking_rows,
    validation_lines,
)
from flatminima.registry import BASE_OPTIMIZER

NOTES = f"""\
Final test accuracy is the last epoch's, on the clean test set. The 95% CI is Student-t over
seeds, clipped to [0, 100] % (with few seeds the interval can reach past what an accuracy can
be). Δ columns are paired over the seeds both arms finished (same initialisation, data subset,
label noise and batch order), in percentage points; Δ vs {REFERENCE_METHOD} pairs with the
{REFERENCE_METHOD} arm that has the same ρ when several were run. "{BASE_OPTIMIZER}" is the base
optimizer alone (the setting's SGD or AdamW, without perturbation); "passes ×" is the measured
number of forward/backward passes relative to it; "time ×" the training wall time (evaluation
excluded) relative to it: with several worker processes on a busy machine it is noisier than
the pass count. A run on several processes (DistributedDataParallel) counts every process: its
passes in full global batches, its time summed over the processes (process-seconds).
"seeds" counts the finished runs in the statistics, "2 of 3" when a run
failed; a failed run is in no statistic, and an arm whose runs all failed keeps a row that
says so. A diverged run (its weights became non-finite and training stopped at that epoch) is
finished: its final test accuracy, that of the model when it stopped, counts in the mean, the
CI and the Δ columns, and its note gives the epoch. Its passes and time cover fewer epochs than
the budget, so the cost ratios leave out diverged runs, of the arm and of {BASE_OPTIMIZER}
alike."""

SHARPNESS_NOTES = """\
Sharpness (`flatminima sharpness`) is measured from each run's final weights on its own training
examples with the labels it was trained on (noisy ones included), in eval mode: λ_max is the
largest Hessian eigenvalue of the training loss (Lanczos), tr(H) its trace (Hutchinson, the
probes' standard error is in the database), worst-case sharpness the mean over batches of
max over ‖ε‖₂ ≤ ρ of L(w + ε) − L(w) (projected ascent); all are in the database's `sharpness`
table with the settings used. The Spearman coefficient ranks every measured run of the setting
together, whatever its method or seed: negative means the sharper runs had the lower test
accuracy. Its p-value (exact over all pairings up to 8 runs, Student-t beyond) is per
measure and not corrected for testing six of them; with a handful of runs, and methods that
differ in more than flatness, it describes these runs, it does not show that flatness causes
accuracy. The landscape is the training loss along one random filter-normalised direction (Li
et al., 2018) through each measured run, the same random draw for every run."""

SELECTION_NOTES = f"""\
Hyperparameters chosen on validation data (`--select-by validation`): within a setting, the
runs of one method that differ only in their hyperparameters are that method's sweep. Each
setting of the sweep is scored by its mean final validation accuracy (the last epoch's, on
examples held out from the training set, disjoint from the training subset) over the seeds
every setting of the sweep finished with a validation accuracy, so that every mean is over the
same seeds; the highest mean is chosen, an exact tie going to the setting listed first (the
smaller values of the swept hyperparameters). The test set takes no part in the choice. The
main table then gives the chosen setting's test accuracy over all its finished seeds, and its
paired differences to the {BASE_OPTIMIZER} and {REFERENCE_METHOD} arms each at their own chosen
setting; "validation acc." is the chosen setting's score and the number of seeds it is over.
The validation labels carry the same label noise as the training labels (the held-out examples
are training examples, corrupted alike), as a practitioner's own validation data would: a
choice made on them is one a user could make, and it can differ from the setting that is best
on the clean test set. The sweep plots keep every value run, the chosen one ringed."""

TRACKING_NOTES = """\
λ_max during training (`--track-sharpness N`) is the largest eigenvalue of the Hessian of the
training loss on a fixed subset of 512 of the run's training examples (positions drawn with seed
0, the same at every epoch and for every method of a seed; labels as trained, noisy ones
included), by Lanczos with at most 20 Hessian-vector products, in eval mode, after every N-th
epoch and the last. The threshold 2(1+β)/η is where SGD with heavy-ball momentum β (PyTorch's)
becomes unstable on a quadratic whose largest curvature is λ_max (2/η without momentum), η the
learning rate of the epoch's last step. SAM's predicted edge of stability follows Agarwala &
Dauphin (ICML 2023): for unnormalised SAM (ε = ρg) on a quadratic the update multiplies the
component along an eigenvector of curvature λ by 1 − ηλ(1 + ρλ), so it is stable while
ηλ(1 + ρλ) < 2, and with momentum while ηλ(1 + ρλ) < 2(1 + β); the edge is the λ where equality
holds. This library's SAM is normalised (ε = ρg/‖g‖): the form used here is the same condition
with ρ replaced by ρ/‖g‖, the unnormalised step of that radius at the current gradient (the
SAM edge Long & Bartlett, 2024, derive), ‖g‖ the mean norm of the mini-batch gradient over the
512 examples in batches of 128, measured with λ_max. Its assumptions: a locally quadratic loss,
‖g‖ constant over the steps that decide stability, mini-batch noise ignored, weight decay
ignored (it adds its coefficient to every eigenvalue), eval-mode BatchNorm. The peak ratios are
the largest λ_max / threshold over the measured epochs (mean over seeds): near 1, the run
reached that edge. Under a cosine schedule η → 0 at the end, so the last epoch's thresholds lie
far above the measured λ_max and the peak ratio is the column to read."""

LANDSCAPE_NUMBERS = "landscape_1d.json"
"""The one non-PNG file the report writes into a setting's directory (beside its figures)."""


@dataclass
class Report:
    settings: list[Setting]
    markdown_path: Path
    plots: list[Path]
    text: str
    """The tables as plain text, for the terminal."""
    unfinished: dict[str, int]
    """Runs in the database that are in no arm's statistics: running or interrupted."""
    figures: list[Plot]
    """What each figure drew (its numbers and caption), in the order of ``plots``."""
    selections: dict[str, list[Selection]] = field(default_factory=dict)
    """The hyperparameters chosen on validation data, by setting slug (empty lists without
    ``select_by``)."""


def remove_earlier_plots(directory: Path) -> list[Path]:
    """Delete the files an earlier report wrote into a setting's directory, before it is
    written again: every ``*.png`` directly in it or in its ``sharpness-<i>`` views, the
    landscape numbers, and the hidden partial files of a report killed while writing. Without this a
    figure the new report no longer draws (a sweep since removed, a setting now at another
    place in the order) would stay, and the landscape JSON would still be linked. Nothing
    else is touched: other files, subdirectories, and everything outside the directory stay."""
    if not directory.is_dir():
        return []
    owned = [*directory.glob("*.png"), directory / LANDSCAPE_NUMBERS]
    for view in directory.glob("sharpness-*"):  # the views of measurement_views
        owned += [*view.glob("*.png"), view / LANDSCAPE_NUMBERS]
    # Hidden partial files of a report killed while writing (see experiments/files.py).
    owned += [*directory.glob(".*.partial*"), *directory.glob("sharpness-*/.*.partial*")]
    removed = [path for path in dict.fromkeys(owned) if path.is_file()]  # once each
    for path in removed:
        path.unlink()
    return removed


def _write_landscape_numbers(setting: Setting, directory: Path) -> Path | None:
    """Every measured landscape of the setting as JSON (arm label → seed → line), atomically."""
    lines = landscapes(setting)
    if not lines:
        return None
    return write_text_atomically(directory / LANDSCAPE_NUMBERS, json.dumps(lines, indent=1) + "\n")


def write_landscape(setting: Setting, directory: Path) -> list[Path]:
    """The setting's landscapes as one PNG (every seed of every arm) and their numbers as JSON
    beside it; nothing when no run of the setting has a landscape."""
    plot = plot_landscape(setting, directory / "landscape_1d.png")
    if plot is None:
        return []
    numbers = _write_landscape_numbers(setting, directory)
    return [plot.path, *([numbers] if numbers else [])]


def write_plots(setting: Setting, directory: Path, chosen: Sequence[str] = ()) -> list[Plot]:
    """The setting's figures, in ``directory`` after clearing the earlier ones out of it
    (:func:`remove_earlier_plots`); none for a setting whose runs all failed. The arms
    labelled in ``chosen`` are marked in the sweep plots."""
    remove_earlier_plots(directory)
    if not setting.finished_arms:
        return []
    directory.mkdir(parents=True, exist_ok=True)
    plots = draw_all(setting, directory, swept_hyperparameters(setting), chosen)
    _write_landscape_numbers(setting, directory)
    return plots


def write_sharpness_plots(view: Setting, directory: Path) -> list[Plot]:
    """The sharpness figures of one measurement (a view of :func:`measurement_views` when a
    setting was measured with several settings)."""
    directory.mkdir(parents=True, exist_ok=True)
    plots = [
        plot_sharpness(view, directory / "accuracy_vs_sharpness.png"),
        plot_landscape(view, directory / "landscape_1d.png"),
    ]
    _write_landscape_numbers(view, directory)
    return [plot for plot in plots if plot is not None]


def _sharpness_section(setting: Setting, out_dir: Path) -> tuple[list[str], list[str]]:
    """The setting's sharpness table and rank correlations, as markdown and as text lines."""
    headers, rows = sharpness_headers(setting), sharpness_rows(setting)
    correlations = correlation_rows(setting)
    correlation_title = (
        "Spearman rank correlation with final test accuracy, over the setting's measured runs "
        "(all methods and seeds pooled):"
    )
    markdown = [
        "### Sharpness beside test accuracy",
        "",
        measured_on(setting),
        "",
        markdown_table(headers, rows),
        "",
        correlation_title,
        "",
        markdown_table(CORRELATION_HEADERS, correlations),
        "",
    ]
    numbers = out_dir / setting.slug / LANDSCAPE_NUMBERS
    if numbers.exists():
        markdown += [f"Landscape numbers: [{numbers.name}]({numbers.relative_to(out_dir)}).", ""]
    text = [
        "sharpness beside test accuracy: " + measured_on(setting),
        "",
        text_table(headers, rows),
        "",
        correlation_title,
        text_table(CORRELATION_HEADERS, correlations),
        "",
    ]
    return markdown, text


def unfinished_line(unfinished: dict[str, int]) -> str:
    """One sentence on the runs in no statistic (the same in report.md and the terminal)."""
    if not unfinished:
        return ""
    why = {
        "failed": " (counted in their setting's table)",
        "interrupted": " (left running by a process that is gone: the same command redoes them)",
    }
    counts = ", ".join(
        f"{count} {state}{why.get(state, '')}" for state, count in sorted(unfinished.items())
    )
    return f"Not in the statistics: {counts}."


def _selection_section(selections: list[Selection]) -> tuple[list[str], list[str]]:
    """The main table of a report with hyperparameters chosen on validation data, as markdown
    and as text lines."""
    rows = selection_rows(selections)
    title = "Hyperparameters chosen on validation data (test accuracy of each choice)"
    markdown = [f"### {title}", "", markdown_table(SELECTION_HEADERS, rows), ""]
    text = [f"{title}:", text_table(SELECTION_HEADERS, rows), ""]
    scores = validation_lines(selections)
    if scores:
        intro = "Mean final validation accuracy (%) of every setting, the choice made on it"
        markdown += [f"{intro}:", "", *(f"- {line}" for line in scores), ""]
        text += [f"{intro}:", *(f"  {line}" for line in scores), ""]
    return markdown, text


def write_report(
    db_path: str | Path,
    out_dir: str | Path,
    *,
    select_by: str | None = None,
    only: Collection[str] | None = None,
    rerun: str | None = None,
) -> Report:
    """Summarise ``db_path`` into ``out_dir/report.md`` and its figures; with
    ``select_by="validation"`` each setting's main table gives every method at the
    hyperparameters chosen on validation data (:func:`~flatminima.experiments.summary.
    select_by_validation`), the table of every arm run after it. ``only``: the configuration
    hashes to report (a study's runs); ``None``, every run of the database. ``rerun``: the
    command that trains what is missing and writes this report again (a study's), named under
    the title."""
    check_selection_rule(select_by)
    db_path, out_dir = Path(db_path), Path(out_dir)
    # A missing file: FileNotFoundError; an empty or foreign one: StoreError.
    with Store(db_path, create=False) as store:
        settings = summarize(store, only)
        unfinished = unfinished_runs(store, only)
    # Every selection is made before anything is written: a setting without a validation
    # split is one error, not a half-written report.
    selections = {
        setting.slug: select_by_validation(setting) if select_by == "validation" else []
        for setting in settings
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    finished = sum(len(a.runs) for s in settings for a in s.arms)
    of_which = "" if only is None else f" (of the {len(only)} runs asked for)"
    markdown = [
        "# flatminima report",
        "",
        f"Database `{db_path}`, {finished} finished runs{of_which}, written "
        f"{datetime.now(timezone.utc).isoformat(timespec='seconds')}.",
    ]
    if rerun is not None:
        markdown.append(f"Rerun (trains what is missing, then writes this report): `{rerun}`.")
    text = []
    if unfinished:
        markdown.append(unfinished_line(unfinished))
        text += [unfinished_line(unfinished), ""]
    figures: list[Plot] = []
    figure_number = 0
    for setting in settings:
        rows = table_rows(setting)
        selected = selections[setting.slug]
        chosen = [selection.chosen.label for selection in selected]
        setting_figures = write_plots(setting, out_dir / setting.slug, chosen)
        figures += setting_figures
        hyperparameters = [f"{arm.label}: {arm.settings}" for arm in setting.arms if arm.settings]
        markdown += ["", f"## {setting.title}", "", f"{setting.training}.", ""]
        text += [setting.title, setting.training, ""]
        if selected:
            markdown_part, text_part = _selection_section(selected)
            markdown += [*markdown_part, "### Every setting run", ""]
            text += [*text_part, "every setting run:"]
        markdown += [markdown_table(TABLE_HEADERS, rows), "", "Hyperparameters:", ""]
        markdown += [f"- {line}" for line in hyperparameters] + [""]
        text += [text_table(TABLE_HEADERS, rows), ""]
        text += ["hyperparameters:", *(f"  {line}" for line in hyperparameters), ""]
        if len(setting.arms_of(REFERENCE_METHOD)) > 1:
            # Several SAM arms (a ρ sweep): say which one each Δ is against, here and not
            # only in the notes at the end of the markdown.
            pairing = (
                f"Δ vs {REFERENCE_METHOD}: against the {REFERENCE_METHOD} arm with the same "
                f"values of the hyperparameters both take (the same ρ); — where none matches."
            )
            markdown += [pairing, ""]
            text += [pairing, ""]
        failures = failure_lines(setting)
        if failures:
            markdown += ["Failed runs (in no statistic):", ""]
            markdown += [f"- {line}" for line in failures] + [""]
            text += ["failed runs:", *(f"  {line}" for line in failures), ""]
        tracking = tracking_rows(setting)
        if tracking:
            title = (
                "λ_max during training against the stability threshold and SAM's predicted edge "
                "(at the last measured epoch; peaks over training; see the notes):"
            )
            markdown += ["### Sharpness during training", "", title, ""]
            markdown += [markdown_table(TRACKING_HEADERS, tracking), ""]
            text += [title, text_table(TRACKING_HEADERS, tracking), ""]
        views = measurement_views(setting)
        differences = measurement_differences(views)
        for view in views:
            if view is not setting:  # one of several measurements: its own figures
                view_figures = write_sharpness_plots(view, out_dir / view.slug)
                setting_figures += view_figures
                figures += view_figures
            markdown_part, text_part = _sharpness_section(view, out_dir)
            if view.slug in differences:
                measured_with = f"measured with {differences[view.slug]}"
                markdown_part[0] += f" ({measured_with})"
                text_part[0] = text_part[0].replace(
                    "sharpness beside", f"sharpness ({measured_with}) beside"
                )
            markdown += markdown_part
            text += text_part
        for figure in setting_figures:
            figure_number += 1
            markdown += [
                f"![{figure.path.stem}]({figure.path.relative_to(out_dir)})",
                "",
                f"*Figure {figure_number}.* {figure.caption}",
                "",
            ]
    if not settings:
        markdown += ["", "No finished or failed runs yet."]
        text.append("No finished or failed runs yet.")
    markdown += ["", NOTES.replace("\n", " "), ""]
    if any(selections.values()):
        markdown += [SELECTION_NOTES.replace("\n", " "), ""]
    if any(measurement_views(setting) for setting in settings):
        markdown += [SHARPNESS_NOTES.replace("\n", " "), ""]
    if any(tracked_sharpness(setting) for setting in settings):
        markdown += [TRACKING_NOTES.replace("\n", " "), ""]
    markdown_path = out_dir / "report.md"
    write_text_atomically(markdown_path, "\n".join(markdown))
    return Report(
        settings,
        markdown_path,
        [figure.path for figure in figures],
        "\n".join(text).rstrip(),
        unfinished,
        figures,
        selections,
    )
