"""flatminima: sharpness-aware optimizers for PyTorch.

Every method wraps a base optimizer *instance* and is itself a ``torch.optim.Optimizer``::

    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    optimizer = flatminima.SAM(base, rho=0.05, model=model)
    loss = optimizer.step(closure)  # closure: forward + backward, returns the loss
"""

from flatminima.engine import Evaluation, Evaluations, SharpnessAwareOptimizer
from flatminima.methods import (
    ASAM,
    ESAM,
    GSAM,
    SAM,
    WSAM,
    BilateralSAM,
    FisherMaskSAM,
    FisherSAM,
    FriendlySAM,
    LookSAM,
    MicroBatchSAM,
    MomentumSAM,
    MongeSAM,
    SparseSAM,
    TiltedSAM,
)

__version__ = "0.1.0"

__all__ = [
    "ASAM",
    "ESAM",
    "GSAM",
    "SAM",
    "WSAM",
    "BilateralSAM",
    "Evaluation",
    "Evaluations",
    "FisherMaskSAM",
    "FisherSAM",
    "FriendlySAM",
    "LookSAM",
    "MicroBatchSAM",
    "MomentumSAM",
    "MongeSAM",
    "SharpnessAwareOptimizer",
    "SparseSAM",
    "TiltedSAM",
    "__version__",
]
