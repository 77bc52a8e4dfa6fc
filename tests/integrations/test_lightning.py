"""PyTorch Lightning with the real package, on CPU (flatminima.integrations.lightning)."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

pl = pytest.importorskip("pytorch_lightning", reason="pytorch-lightning is not installed")

from pytorch_lightning.plugins.precision import MixedPrecision  # noqa: E402

from flatminima import methods  # noqa: E402
from flatminima.integrations.lightning import precision_plugin  # noqa: E402

METHODS = list(methods.BY_NAME)
logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
logging.getLogger("lightning").setLevel(logging.ERROR)


def data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(64, 8, generator=generator)
    y = torch.randint(0, 4, (64,), generator=generator)
    return list(zip(x.split(16), y.split(16), strict=True))


def network() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 4))


def build(name: str, net: nn.Module):
    extra = {"generator": torch.Generator().manual_seed(7)} if name == "tilted-sam" else {}
    base = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    return methods.BY_NAME[name](base, model=net, **extra)


class Module(pl.LightningModule):
    def __init__(self, method: str = "sam") -> None:
        super().__init__()
        self.net = network()
        self.method = method

    def training_step(self, batch, index):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("loss", loss)
        return loss

    def configure_optimizers(self):
        return build(self.method, self.net)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(data(), batch_size=None)  # the batches as they are


class ManualModule(Module):
    def __init__(self, method: str = "sam", form: str = "closure") -> None:
        super().__init__(method)
        self.automatic_optimization = False
        self.form = form

    def training_step(self, batch, index):
        optimizer = self.optimizers()
        x, y = batch
        if self.form == "closure":

            def closure():
                loss = F.cross_entropy(self.net(x), y)
                self.manual_backward(loss)
                return loss

            return optimizer.step(closure)
        optimizer.zero_grad()
        self.manual_backward(F.cross_entropy(self.net(x), y))
        optimizer.first_step()
        self.manual_backward(F.cross_entropy(self.net(x), y))
        optimizer.second_step()
        return None


def fit(module, *, epochs: int = 2, ckpt_path=None, **kwargs) -> pl.Trainer:
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, ckpt_path=ckpt_path)
    return trainer


def plain_loop(name: str, *, epochs: int = 2, clip: float | None = None):
    """The same training without Lightning: step(closure) per batch."""
    net = network()
    optimizer = build(name, net)
    losses = []
    for _ in range(epochs):
        for x, y in data():

            def closure(x=x, y=y):
                loss = F.cross_entropy(net(x), y)
                loss.backward()
                if clip is not None:
                    torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
                return loss

            losses.append(float(optimizer.step(closure).detach()))
    return net, losses


def state(net: nn.Module) -> list[torch.Tensor]:
    return [t.detach().clone() for t in net.state_dict().values()]


def assert_same(a: nn.Module, b: nn.Module) -> None:
    for x, y in zip(state(a), state(b), strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize("name", METHODS)
def test_automatic_optimization_equals_a_plain_loop_batchnorm_included(name):
    module = Module(name)
    fit(module, plugins=[precision_plugin()])
    reference, losses = plain_loop(name)
    assert_same(module.net, reference)  # weights and BatchNorm running statistics
    # The logged loss is the loss at w (the first pass), not the perturbed one.
    if methods.BY_NAME[name].manual_two_pass:
        assert float(module.trainer.callback_metrics["loss"]) == pytest.approx(losses[-1], abs=0)


def test_without_the_plugin_fp32_still_trains_exactly():
    module = Module("sam")
    fit(module)
    assert_same(module.net, plain_loop("sam")[0])


def test_gradient_clip_val_clips_every_pass_like_the_plain_loop():
    module = Module("sam")
    fit(module, plugins=[precision_plugin()], gradient_clip_val=0.05)
    assert_same(module.net, plain_loop("sam", clip=0.05)[0])


@pytest.mark.parametrize("name", ["sam", "tilted-sam"])
def test_fp16_with_a_grad_scaler_tracks_fp32(name):
    module = Module(name)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    fit(module, plugins=[precision_plugin("16-mixed", "cpu", scaler=scaler)])
    reference = Module(name)
    fit(reference, plugins=[precision_plugin()])
    for a, b in zip(module.net.parameters(), reference.net.parameters(), strict=True):
        assert float((a - b).abs().max()) < 2e-2
    assert scaler.get_scale() >= 2.0**12  # no spurious overflow backed it off


def test_fp16_with_clipping_tracks_fp32_with_clipping():
    module = Module("sam")
    fit(
        module,
        plugins=[precision_plugin("16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=64.0))],
        gradient_clip_val=0.05,
    )
    reference = Module("sam")
    fit(reference, plugins=[precision_plugin()], gradient_clip_val=0.05)
    for a, b in zip(module.net.parameters(), reference.net.parameters(), strict=True):
        assert float((a - b).abs().max()) < 2e-2


def test_fp16_without_the_plugin_is_a_loud_error():
    """Lightning runs the closure itself and calls scaler.step(optimizer) without it."""
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    with pytest.raises(TypeError, match="needs a closure"):
        fit(Module("sam"), plugins=[plugin])


@pytest.mark.parametrize("name", ["sam", "tilted-sam"])
def test_bf16_mixed_trains(name):
    module = Module(name)
    fit(module, plugins=[precision_plugin("bf16-mixed", "cpu")])
    assert all(torch.isfinite(p).all() for p in module.net.parameters())
    assert module.trainer.global_step == 8


def test_checkpoint_resume_continues_bit_for_bit(tmp_path):
    straight = Module("friendly-sam")
    fit(straight, epochs=2, plugins=[precision_plugin()])
    first = Module("friendly-sam")
    trainer = fit(first, epochs=1, plugins=[precision_plugin()])
    trainer.save_checkpoint(tmp_path / "one.ckpt")
    resumed = Module("friendly-sam")
    fit(resumed, epochs=2, ckpt_path=tmp_path / "one.ckpt", plugins=[precision_plugin()])
    assert_same(resumed.net, straight.net)


def test_gradient_accumulation_is_refused_in_one_line():
    with pytest.raises(RuntimeError, match="gradient accumulation"):
        fit(Module("sam"), accumulate_grad_batches=2, plugins=[precision_plugin()])


@pytest.mark.parametrize("name", ["sam", "tilted-sam"])
def test_manual_optimization_with_step_closure_advances_global_step(name):
    module = ManualModule(name)
    trainer = fit(module, epochs=5, max_steps=6)
    assert trainer.global_step == 6  # max_steps stops training
    reference = ManualModule(name)
    fit(reference, epochs=2)
    assert_same(reference.net, plain_loop(name)[0])


def test_manual_first_step_second_step_is_refused_and_leaves_the_weights():
    """The manual two-pass form does not go through Lightning's step (no global_step):
    refused loudly (Lightning's own message), with the weights put back to w."""
    module = ManualModule("sam", form="first_second")
    before = [p.detach().clone() for p in module.net.parameters()]
    with pytest.raises(Exception, match="closure"):
        fit(module, epochs=1)
    for a, b in zip(module.net.parameters(), before, strict=True):
        assert torch.equal(a, b)


class OneCycleModule(Module):
    def configure_optimizers(self):
        optimizer = build(self.method, self.net)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.2, total_steps=9)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


def test_one_cycle_schedule_drives_the_base_learning_rate():
    module = OneCycleModule("sam")
    fit(module, plugins=[precision_plugin()])
    # The same schedule on a bare SGD, stepped as often as the 8 training steps.
    bare = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1, momentum=0.9)
    schedule = torch.optim.lr_scheduler.OneCycleLR(bare, max_lr=0.2, total_steps=9)
    for _ in range(8):
        bare.step()
        schedule.step()
    base = module.optimizers().optimizer.base_optimizer
    assert base.param_groups[0]["lr"] == pytest.approx(bare.param_groups[0]["lr"], rel=1e-12)
    assert base.param_groups[0]["momentum"] == pytest.approx(bare.param_groups[0]["momentum"])
