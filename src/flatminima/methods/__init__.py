"""One module per method; each is a small class that chooses the engine's parts."""

from flatminima.methods.asam import ASAM
from flatminima.methods.fisher_sam import FisherSAM
from flatminima.methods.friendly_sam import FriendlySAM
from flatminima.methods.monge_sam import MongeSAM
from flatminima.methods.sam import SAM
from flatminima.methods.sparse_sam import FisherMaskSAM, SparseSAM
from flatminima.methods.tilted_sam import TiltedSAM

BY_NAME = {
    "sam": SAM,
    "asam": ASAM,
    "fisher-sam": FisherSAM,
    "monge-sam": MongeSAM,
    "tilted-sam": TiltedSAM,
    "friendly-sam": FriendlySAM,
    "sparse-sam": SparseSAM,
    "fisher-mask-sam": FisherMaskSAM,
}
"""Command-line name → class, read by :mod:`flatminima.registry`."""

__all__ = [
    "ASAM",
    "BY_NAME",
    "SAM",
    "FisherMaskSAM",
    "FisherSAM",
    "FriendlySAM",
    "MongeSAM",
    "SparseSAM",
    "TiltedSAM",
]
