"""One module per method; each is a small class that chooses the engine's parts."""

from flatminima.methods.asam import ASAM
from flatminima.methods.bilateral_sam import BilateralSAM
from flatminima.methods.esam import ESAM
from flatminima.methods.fisher_sam import FisherSAM
from flatminima.methods.friendly_sam import FriendlySAM
from flatminima.methods.gsam import GSAM
from flatminima.methods.looksam import LookSAM
from flatminima.methods.micro_batch_sam import MicroBatchSAM
from flatminima.methods.momentum_sam import MomentumSAM
from flatminima.methods.monge_sam import MongeSAM
from flatminima.methods.sam import SAM
from flatminima.methods.sparse_sam import FisherMaskSAM, SparseSAM
from flatminima.methods.tilted_sam import TiltedSAM
from flatminima.methods.wsam import WSAM

BY_NAME = {
    "sam": SAM,
    "asam": ASAM,
    "fisher-sam": FisherSAM,
    "monge-sam": MongeSAM,
    "tilted-sam": TiltedSAM,
    "friendly-sam": FriendlySAM,
    "gsam": GSAM,
    "wsam": WSAM,
    "looksam": LookSAM,
    "momentum-sam": MomentumSAM,
    "bilateral-sam": BilateralSAM,
    "esam": ESAM,
    "msam": MicroBatchSAM,
    "sparse-sam": SparseSAM,
    "fisher-mask-sam": FisherMaskSAM,
}
"""Command-line name → class, read by :mod:`flatminima.registry`."""

__all__ = [
    "ASAM",
    "BY_NAME",
    "ESAM",
    "GSAM",
    "SAM",
    "WSAM",
    "BilateralSAM",
    "FisherMaskSAM",
    "FisherSAM",
    "FriendlySAM",
    "LookSAM",
    "MicroBatchSAM",
    "MomentumSAM",
    "MongeSAM",
    "SparseSAM",
    "TiltedSAM",
]
