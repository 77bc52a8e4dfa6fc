"""Generates the documentation pages that must not be retyped (run by mkdocs-gen-files).

* one page per method, from the method class itself: its docstring's maths, the constructor's
  signature, and the hyperparameter table from the method's ``declaration`` (name, default,
  accepted range from the check, paper symbol, meaning, whether it shapes the whole step);
* the method index (every registered method, passes per step);
* the sharpness page's plots, computed by the library on a small model at build time.

Everything about a method that this file reads goes through :func:`method_facts`, so a change
in how methods declare themselves is a change to that one function.
"""

from __future__ import annotations

import inspect
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mkdocs_gen_files
import torch

from flatminima import methods


@dataclass(frozen=True)
class Row:
    name: str
    default: Any
    accepted: str
    symbol: str
    meaning: str
    step_level: bool


@dataclass(frozen=True)
class MethodFacts:
    cli_name: str
    cls: type
    summary: str
    maths: str
    notes: str
    example: str
    signature: str
    rows: list[Row]
    passes: int
    manual_two_pass: bool


def method_facts(cli_name: str, cls: type) -> MethodFacts:
    """What the pages say about one method, read from the class (its declaration and docstring)."""
    rows = [
        Row(
            name=row.name,
            default=row.default,
            accepted=(row.check.__doc__ or "").strip().rstrip("."),
            symbol=row.symbol,
            meaning=row.meaning,
            step_level=row.step_level,
        )
        for row in cls.declaration
    ]
    summary, maths, notes, example = _split_docstring(inspect.getdoc(cls) or "")
    parameters = list(inspect.signature(cls.__init__).parameters.values())[1:]
    signature = f"flatminima.{cls.__name__}({_without_annotations(parameters)})"
    return MethodFacts(
        cli_name=cli_name,
        cls=cls,
        summary=summary,
        maths=maths,
        notes=notes,
        example=example,
        signature=signature,
        rows=rows,
        passes=cls.passes_per_step(dict(cls.hyperparameter_defaults)),
        manual_two_pass=_manual_two_pass_works(cls),
    )


def _without_annotations(parameters: list[inspect.Parameter]) -> str:
    return str(inspect.Signature([p.replace(annotation=p.empty) for p in parameters]))[1:-1]


def _manual_two_pass_works(cls: type) -> bool:
    """Whether ``first_step()`` accepts a step of this method with its defaults, tried on a
    one-parameter model (the engine refuses it with ``TypeError`` where it does not apply)."""
    weight = torch.nn.Parameter(torch.ones(2))
    # SGD with momentum: the base every method accepts (Momentum SAM perturbs along it).
    optimizer = cls(torch.optim.SGD([weight], lr=0.1, momentum=0.9))
    weight.pow(2).sum().backward()
    try:
        optimizer.first_step()
    except TypeError:
        return False
    optimizer.abort_step()
    return True


def _split_docstring(doc: str) -> tuple[str, str, str, str]:
    """(summary, text before the symbol table, text between the table and Args, example)."""
    lines = doc.splitlines()
    summary_end = lines.index("") if "" in lines else len(lines)
    summary = " ".join(line.strip() for line in lines[:summary_end])
    rest = lines[summary_end:]
    table = [i for i, line in enumerate(rest) if re.fullmatch(r"=+( +=+)+", line.strip())]
    args = next((i for i, line in enumerate(rest) if line.startswith("Args:")), len(rest))
    example_at = next((i for i, line in enumerate(rest) if line.startswith("Example")), None)
    if table:
        maths, notes = rest[: table[0]], rest[table[-1] + 1 : args]
    else:
        maths, notes = rest[:args], []
    example = ""
    if example_at is not None:
        code = []
        for line in rest[example_at + 1 :]:
            stripped = line.strip()
            if stripped.startswith((">>> ", "... ")) or stripped in (">>>", "..."):
                code.append(stripped[4:])
        example = "\n".join(code)
    return summary, _markdown("\n".join(maths)), _markdown("\n".join(notes)), example


def _markdown(text: str) -> str:
    """reStructuredText-ish docstring prose as Markdown: ``code`` becomes `code`, and the
    maths' underscores and asterisks are escaped so that they are not read as emphasis."""
    text = text.replace("``", "`")
    text = re.sub(r":(?:class|func|meth|mod|attr):`~?([^`]+)`", r"`\1`", text)
    parts = re.split(r"(`[^`]*`)", text)
    escaped = [p if p.startswith("`") else re.sub(r"([_*\\])", r"\\\1", p) for p in parts]
    return "".join(escaped).strip()


def _cell(text: str) -> str:
    return _markdown(text).replace("|", "\\|").replace("\n", " ")


def method_page(facts: MethodFacts) -> str:
    table = [
        "| argument | default | accepted | paper | meaning | same in every param group |",
        "|---|---|---|---|---|---|",
        *(
            f"| `{r.name}` | `{r.default!r}` | {_cell(r.accepted)} | {_cell(r.symbol)} | "
            f"{_cell(r.meaning)} | {'yes' if r.step_level else 'no (per group allowed)'} |"
            for r in facts.rows
        ),
    ]
    manual = (
        "yes: `first_step()` / `second_step()` work"
        if facts.manual_two_pass
        else "no: use `step(closure)` or `evaluations()`"
    )
    sections = [
        f"# {facts.cls.__name__}",
        f"**{_markdown(facts.summary)}**",
        f"```python\n{facts.signature}\n```",
        "## The method",
        facts.maths,
        "## Hyperparameters",
        "Generated from the method's declaration: these are the values the constructor, the "
        "command line (`--param name=value`) and per-group settings are checked against.",
        "\n".join(table),
        "## Cost and forms",
        f"- Command-line name: `{facts.cli_name}`\n"
        f"- Forward/backward passes per step with the defaults: {facts.passes}\n"
        f"- Manual two-pass form: {manual}",
    ]
    if facts.notes:
        sections += ["## Notes", facts.notes]
    if facts.example:
        sections += ["## Example", f"```python\n{facts.example}\n```"]
    return "\n\n".join(sections) + "\n"


def methods_index(all_facts: list[MethodFacts]) -> str:
    lines = [
        "# Methods",
        "Every method wraps a base optimizer instance and is itself a `torch.optim.Optimizer`. "
        "The pages below are generated from the classes.",
        "| class | command-line name | passes / step (defaults) | hyperparameters (defaults) |",
        "|---|---|---|---|",
    ]
    for f in all_facts:
        hyper = ", ".join(f"`{r.name}={r.default!r}`" for r in f.rows)
        lines.append(
            f"| [{f.cls.__name__}]({f.cli_name}.md) | `{f.cli_name}` | {f.passes} | {hyper} |"
        )
    return "\n\n".join(lines[:3]) + "\n\n" + "\n".join(lines[3:]) + "\n"


def sharpness_plots() -> None:
    """The sharpness page's figures: a small classifier trained briefly with SGD and with SAM,
    then a 1-D loss slice of each and the Hessian spectrum of the SAM one."""
    from flatminima.sharpness import landscape_1d, plot_landscape_1d, spectral_density
    from flatminima.sharpness.plots import plot_spectral_density

    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(512, 10, generator=generator)
    y = (x[:, :2].sum(dim=1) > 0).long()
    batches = [(x, y)]

    def loss_fn(model, batch):
        inputs, labels = batch
        return torch.nn.functional.cross_entropy(model(inputs), labels)

    trained = {}
    for label, wrap in (("SGD", None), ("SAM (rho=0.1)", methods.SAM)):
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Linear(10, 32), torch.nn.ReLU(), torch.nn.Linear(32, 2)
        )
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
        if wrap is not None:
            optimizer = wrap(optimizer, rho=0.1)
        for _ in range(200):

            def closure(model=model):
                loss = loss_fn(model, (x, y))
                loss.backward()
                return loss

            if wrap is None:
                optimizer.zero_grad()
                closure()
                optimizer.step()
            else:
                optimizer.step(closure)
        trained[label] = model

    with tempfile.TemporaryDirectory() as tmp:
        landscapes = {
            label: landscape_1d(model, loss_fn, batches, seed=0) for label, model in trained.items()
        }
        figures = {
            "landscape.png": plot_landscape_1d(
                landscapes, Path(tmp, "landscape.png"), title="1-D filter-normalised slice"
            ),
            "spectrum.png": plot_spectral_density(
                spectral_density(trained["SAM (rho=0.1)"], loss_fn, batches, num_iter=30),
                Path(tmp, "spectrum.png"),
                title="Hessian eigenvalue density (SAM)",
            ),
        }
        for name, path in figures.items():
            with mkdocs_gen_files.open(f"sharpness/{name}", "wb") as out:
                out.write(path.read_bytes())


def main() -> None:
    all_facts = [method_facts(name, cls) for name, cls in methods.BY_NAME.items()]
    for facts in all_facts:
        with mkdocs_gen_files.open(f"methods/{facts.cli_name}.md", "w") as page:
            page.write(method_page(facts))
    with mkdocs_gen_files.open("methods/index.md", "w") as page:
        page.write(methods_index(all_facts))
    sharpness_plots()


main()
