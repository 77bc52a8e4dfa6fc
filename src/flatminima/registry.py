"""One table of every method the command line and the runner can build, by name.

The runner, the report and the benchmarks never branch on a method's name: what they need to
know (its hyperparameters and their defaults, how many forward/backward passes a step costs,
how to build it around a base optimizer) lives in its :class:`MethodSpec`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from flatminima import methods

Hyperparameters = Mapping[str, Any]


@dataclass(frozen=True)
class MethodSpec:
    """How to build one method and what it costs."""

    name: str
    summary: str
    hyperparameters: Mapping[str, Any] = field(default_factory=dict)
    """Accepted hyperparameters and their defaults (the authors' published defaults)."""
    build_fn: Callable[..., torch.optim.Optimizer] | None = None
    passes_fn: Callable[[Hyperparameters, int], int] | None = None

    def resolved(self, overrides: Hyperparameters | None = None) -> dict[str, Any]:
        """Defaults updated with ``overrides``; an unknown name raises ``ValueError``."""
        overrides = dict(overrides or {})
        unknown = sorted(set(overrides) - set(self.hyperparameters))
        if unknown:
            accepted = ", ".join(sorted(self.hyperparameters)) or "none"
            raise ValueError(
                f"method {self.name!r} does not take hyperparameter(s) {', '.join(unknown)}; "
                f"accepted: {accepted}"
            )
        return {**self.hyperparameters, **overrides}

    def passes_per_step(self, overrides: Hyperparameters | None = None, step: int = 0) -> int:
        """Forward/backward passes step number ``step`` (from 0) costs with these
        hyperparameters."""
        if self.passes_fn is None:
            return 1
        return self.passes_fn(self.resolved(overrides), step)

    def cycle(self, overrides: Hyperparameters | None = None, horizon: int = 64) -> int:
        """The period of the method's pass pattern (LookSAM's k; 1 for most methods): the
        smallest p with passes(step) = passes(step + p) over the first ``horizon`` steps."""
        pattern = [self.passes_per_step(overrides, step) for step in range(horizon)]
        for period in range(1, horizon // 2 + 1):
            if all(pattern[i] == pattern[i + period] for i in range(horizon - period)):
                return period
        return horizon

    def mean_passes_per_step(self, overrides: Hyperparameters | None = None) -> float:
        """Passes per step averaged over one cycle (1 + 1/k for LookSAM)."""
        period = self.cycle(overrides)
        return sum(self.passes_per_step(overrides, step) for step in range(period)) / period

    def build(
        self,
        base_optimizer: torch.optim.Optimizer,
        model: torch.nn.Module | None = None,
        **overrides: Any,
    ) -> torch.optim.Optimizer:
        """The method wrapped around ``base_optimizer`` (the base optimizer itself for ``base``)."""
        hyperparameters = self.resolved(overrides)
        if self.build_fn is None:
            return base_optimizer
        return self.build_fn(base_optimizer, model=model, **hyperparameters)


def _summary(cls: type) -> str:
    """The docstring's first paragraph, on one line (a summary may wrap in the source)."""
    paragraph = (cls.__doc__ or "").strip().split("\n\n")[0]
    return " ".join(line.strip() for line in paragraph.splitlines())


def _spec_for(name: str, cls: type) -> MethodSpec:
    return MethodSpec(
        name=name,
        summary=_summary(cls),
        hyperparameters=dict(cls.hyperparameter_defaults),
        build_fn=cls,
        passes_fn=cls.passes_per_step,
    )


BASE_OPTIMIZER = "base"
"""The name of the baseline: the base optimizer alone (SGD with momentum or AdamW)."""

OLD_NAMES = {"sgd": BASE_OPTIMIZER}
"""Names earlier versions gave a method, accepted and read as today's (databases keep them)."""

METHODS: dict[str, MethodSpec] = {
    BASE_OPTIMIZER: MethodSpec(
        name=BASE_OPTIMIZER, summary="The base optimizer alone, without any perturbation."
    ),
    **{name: _spec_for(name, cls) for name, cls in methods.BY_NAME.items()},
}


def start_epoch(
    optimizer: torch.optim.Optimizer,
    epoch: int,
    *,
    model: torch.nn.Module,
    loss_fn: Callable[..., torch.Tensor],
    batches: Callable[[], Any],
) -> None:
    """The per-epoch hook a training loop calls before each epoch, whatever the method: it
    lets methods that learn from data outside the step (Sparse SAM's Fisher mask) do so, and
    does nothing for the others and for the bare base optimizer."""
    start = getattr(optimizer, "start_epoch", None)
    if start is not None:
        start(epoch, model=model, loss_fn=loss_fn, batches=batches)


def get_method(name: str) -> MethodSpec:
    """The spec registered under ``name``; ``ValueError`` lists the accepted names."""
    try:
        return METHODS[canonical_method_name(name)]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; accepted: {', '.join(METHODS)}") from None


def canonical_method_name(name: str) -> str:
    """Today's name of a method, given it or an old one (``sgd`` is ``base``)."""
    return OLD_NAMES.get(name, name)


def method_names() -> list[str]:
    """Every registered name, the base optimizer first."""
    return list(METHODS)


def readme_method_table() -> str:
    """The README's method table, generated from each method's declaration (a test holds the
    README to it; ``python -m flatminima.registry`` prints it)."""
    lines = [
        "| class | CLI name | paper | passes / step | extra memory | hyperparameters (defaults) |",
        "|---|---|---|---|---|---|",
    ]
    for name, cls in methods.BY_NAME.items():
        defaults = ", ".join(
            f"`{key}={value!r}`" for key, value in cls.hyperparameter_defaults.items()
        )
        lines.append(
            f"| `{cls.__name__}` | `{name}` | {cls.paper} | {cls.passes_text} | "
            f"{cls.extra_memory} | {defaults} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(readme_method_table())
