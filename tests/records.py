"""What each method declares about itself; the conformance suite reads only this.

Tests never branch on a method's name: a capability a test needs (a setting that makes the
method the bare base optimizer, one that makes it SAM, its persistent state) is a field here.
Adding a method is one record.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import flatminima
from flatminima.directions import FRIENDLY_EMA
from flatminima.methods.looksam import LOOKSAM_DIRECTION


@dataclass(frozen=True)
class MethodRecord:
    cls: type
    typical: dict[str, Any]
    """Non-trivial hyperparameters the suite runs with."""
    identity: dict[str, Any]
    """Hyperparameters that make the method the bare base optimizer, bit for bit."""
    sam_equivalent: dict[str, Any] | None = None
    """Hyperparameters that make it plain SAM with ``rho = sam_equivalent['rho']``."""
    persistent_state: tuple[str, ...] = ()
    """Keys every parameter's state holds after a step (and that ``state_dict`` saves)."""
    invalid: list[tuple[dict[str, Any], str]] = field(default_factory=list)
    """Bad keyword arguments and the argument name the ``ValueError`` must mention."""
    loss_scale_invariant: bool = True
    """Whether multiplying the loss by c > 0 leaves ε unchanged."""
    descends_with_first_pass_gradient: bool = False
    """Whether the first pass's gradient enters the update (Momentum-SAM, whose only pass it
    is; Bilateral SAM): a non-finite gradient there then reaches the base optimizer."""

    @property
    def id(self) -> str:
        return self.cls.__name__


COMMON_INVALID = [
    ({"rho": -0.1}, "rho"),
    ({"rho": float("nan")}, "rho"),
    ({"rho": float("inf")}, "rho"),
]

RECORDS = [
    MethodRecord(
        cls=flatminima.SAM,
        typical={"rho": 0.1},
        identity={"rho": 0.0},
        sam_equivalent={"rho": 0.1},
        invalid=COMMON_INVALID,
    ),
    MethodRecord(
        cls=flatminima.ASAM,
        typical={"rho": 0.5, "eta": 0.01},
        identity={"rho": 0.0},
        invalid=[*COMMON_INVALID, ({"eta": -1.0}, "eta")],
    ),
    MethodRecord(
        cls=flatminima.FisherSAM,
        typical={"rho": 0.1, "eta": 1.0},
        identity={"rho": 0.0},
        sam_equivalent={"rho": 0.1, "eta": 0.0},
        invalid=[*COMMON_INVALID, ({"eta": -1.0}, "eta")],
        loss_scale_invariant=False,
    ),
    MethodRecord(
        cls=flatminima.MongeSAM,
        typical={"rho": 0.1},
        identity={"rho": 0.0},
        invalid=COMMON_INVALID,
        loss_scale_invariant=False,
    ),
    MethodRecord(
        cls=flatminima.TiltedSAM,
        typical={"rho": 0.05, "tilt": 2.0, "num_samples": 2, "radius": 0.05},
        identity={"rho": 0.0, "radius": 0.0, "num_samples": 1},
        sam_equivalent={"rho": 0.1, "radius": 0.0, "num_samples": 1},
        invalid=[
            *COMMON_INVALID,
            ({"tilt": -1.0}, "tilt"),
            ({"num_samples": 0}, "num_samples"),
            ({"num_samples": 1.5}, "num_samples"),
            ({"radius": -1.0}, "radius"),
            ({"noise_scale": -1.0}, "noise_scale"),
        ],
    ),
    MethodRecord(
        cls=flatminima.FriendlySAM,
        typical={"rho": 0.1, "sigma": 1.0, "lmbda": 0.6},
        identity={"rho": 0.0},
        sam_equivalent={"rho": 0.1, "sigma": 0.0},
        persistent_state=(FRIENDLY_EMA,),
        invalid=[
            *COMMON_INVALID,
            ({"lmbda": 1.0}, "lmbda"),
            ({"lmbda": -0.1}, "lmbda"),
            ({"sigma": -1.0}, "sigma"),
        ],
    ),
]

# -- methods-b (issue 9): LookSAM, Momentum-SAM, Bilateral SAM ------------------------------------

RECORDS += [
    MethodRecord(
        cls=flatminima.LookSAM,
        typical={"rho": 0.1, "k": 2, "alpha": 0.7},
        identity={"rho": 0.0, "alpha": 0.0},
        sam_equivalent={"rho": 0.1, "k": 1},
        persistent_state=(LOOKSAM_DIRECTION,),
        invalid=[
            *COMMON_INVALID,
            ({"k": 0}, "k"),
            ({"k": 2.0}, "k"),
            ({"alpha": -0.1}, "alpha"),
            ({"alpha": float("nan")}, "alpha"),
        ],
    ),
    MethodRecord(
        cls=flatminima.MomentumSAM,
        typical={"rho": 0.5},
        identity={"rho": 0.0},
        invalid=COMMON_INVALID,
        descends_with_first_pass_gradient=True,
    ),
    MethodRecord(
        cls=flatminima.BilateralSAM,
        typical={"rho": 0.1, "rho_min": 0.05},
        identity={"rho": 0.0, "rho_min": 0.0},
        invalid=[*COMMON_INVALID, ({"rho_min": -0.1}, "rho_min"), ({"rho_min": 1e400}, "rho_min")],
        descends_with_first_pass_gradient=True,
    ),
]
