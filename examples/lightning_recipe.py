"""PyTorch Lightning: automatic optimization with any flatminima method (CPU, seconds).

``configure_optimizers`` returns the flatminima optimizer (``model=`` the network, for
BatchNorm); the precision plugin hands Lightning's closure to every pass, logs the loss at w,
and with ``"16-mixed"`` attaches the GradScaler.

    python examples/lightning_recipe.py
"""

from __future__ import annotations

import logging
import warnings

import pytorch_lightning as pl
import torch
from torch import nn
from torch.nn import functional as F

import flatminima
from flatminima.integrations.lightning import precision_plugin


class Classifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(20, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 5))

    def training_step(self, batch, index):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("loss", loss)  # the loss at w: the plugin mutes the perturbed pass's log
        return loss

    def configure_optimizers(self):
        base = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
        return flatminima.SAM(base, rho=0.05, model=self.net)


def loader() -> torch.utils.data.DataLoader:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(256, 20, generator=generator)
    y = (x[:, :5].argmax(dim=1)).long()
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)


if __name__ == "__main__":
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    model = Classifier()
    trainer = pl.Trainer(
        max_epochs=5,
        accelerator="cpu",
        plugins=[precision_plugin("32-true")],  # "16-mixed" on a GPU, "bf16-mixed"
        gradient_clip_val=1.0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    first = F.cross_entropy(
        model.net.eval()(loader().dataset.tensors[0]), loader().dataset.tensors[1]
    )
    trainer.fit(model, loader())
    last = float(trainer.callback_metrics["loss"])
    print(f"trained {trainer.global_step} steps, loss fell: {last < float(first)}")
