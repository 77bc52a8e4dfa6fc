"""The Hugging Face Trainer with the real package, on CPU: a tiny GPT-2 built from a config
(nothing downloaded), every flatminima method (flatminima.integrations.transformers)."""

from __future__ import annotations

import functools
import logging
import math
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed")
pytest.importorskip("accelerate", reason="accelerate is not installed")

from accelerate.state import AcceleratorState, GradientState  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments  # noqa: E402

from flatminima import methods  # noqa: E402
from flatminima.integrations.transformers import SharpnessAwareTrainer  # noqa: E402

METHODS = list(methods.BY_NAME)
transformers.logging.set_verbosity_error()
logging.getLogger("accelerate").setLevel(logging.ERROR)


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=32,
        n_positions=16,
        n_embd=16,
        n_layer=1,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config)


def dataset(size: int = 16) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(3)
    rows = torch.randint(0, 32, (size, 8), generator=generator)
    return [{"input_ids": row, "labels": row} for row in rows]


def arguments(tmp_path, **overrides) -> TrainingArguments:
    settings = {
        "output_dir": str(tmp_path),
        "use_cpu": True,
        "report_to": [],
        "per_device_train_batch_size": 4,
        "max_steps": 4,
        "learning_rate": 1e-2,
        "logging_steps": 1,
        "save_strategy": "no",
        "disable_tqdm": True,
        "seed": 0,
        "data_seed": 0,
        **overrides,
    }
    return TrainingArguments(**settings)


def train(tmp_path, *, method: str = "sam", trainer_class=SharpnessAwareTrainer, **overrides):
    model = tiny_gpt2()
    extra = {"generator": torch.Generator().manual_seed(7)} if method == "tilted-sam" else {}
    kwargs = {}
    if trainer_class is SharpnessAwareTrainer:
        kwargs["sharpness_aware"] = functools.partial(methods.BY_NAME[method], **extra)
        if overrides.pop("sgd", False):  # SGD with momentum, which every method accepts
            base = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
            kwargs = {"optimizers": (methods.BY_NAME[method](base, model=model, **extra), None)}
    resume = overrides.pop("resume_from_checkpoint", None)
    scaler = overrides.pop("scaler", None)
    on_model = overrides.pop("on_model", None)
    if overrides.pop("float64", False):
        model = model.double()
    if on_model is not None:
        on_model(model)
    trainer = trainer_class(
        model=model, args=arguments(tmp_path, **overrides), train_dataset=dataset(), **kwargs
    )
    if scaler is not None:
        trainer.accelerator.scaler = scaler  # accelerate gives CPU fp16 no scaler: CUDA's path
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train(resume_from_checkpoint=resume)
    return trainer


def weights(trainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in trainer.model.parameters()]


def same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_the_plain_trainer_cannot_run_a_sharpness_aware_step(tmp_path):
    model = tiny_gpt2()
    optimizer = methods.SAM(torch.optim.AdamW(model.parameters(), lr=1e-2))
    trainer = Trainer(
        model=model,
        args=arguments(tmp_path),
        train_dataset=dataset(),
        optimizers=(optimizer, None),
    )
    with pytest.raises(TypeError, match="needs a closure"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()


@pytest.mark.parametrize("name", METHODS)
def test_every_method_runs_all_its_passes_on_every_micro_batch(tmp_path, name):
    forwards = []
    trainer = train(
        tmp_path,
        method=name,
        gradient_accumulation_steps=2,
        sgd=True,
        on_model=lambda m: m.register_forward_hook(lambda *_: forwards.append(1)),
    )
    passes = sum(methods.BY_NAME[name].passes_per_step(None, step) for step in range(4))
    assert len(forwards) == 2 * passes  # micro-batches × passes of the four steps
    assert trainer.state.global_step == 4
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)


@pytest.mark.parametrize("name", ["sam", "friendly-sam", "tilted-sam"])
def test_gradient_accumulation_equals_the_full_batch(tmp_path, name):
    accumulated = train(
        tmp_path / "a",
        method=name,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        float64=True,
    )
    full = train(tmp_path / "b", method=name, per_device_train_batch_size=4, float64=True)
    for a, b in zip(weights(accumulated), weights(full), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)  # updates are ~1e-2


def test_the_logged_loss_is_the_loss_at_w(tmp_path):
    """Step 1 starts from the same weights and batch as a plain Trainer: same logged loss."""
    ours = train(tmp_path / "a", max_steps=1)
    plain = train(tmp_path / "b", max_steps=1, trainer_class=Trainer)
    assert ours.state.log_history[0]["loss"] == plain.state.log_history[0]["loss"]


def test_max_grad_norm_clips_the_descent_gradient(tmp_path):
    model = tiny_gpt2()
    before = [p.detach().clone() for p in model.parameters()]
    lr, max_norm = 0.5, 1e-3
    optimizer = methods.SAM(torch.optim.SGD(model.parameters(), lr=lr), model=model)
    trainer = SharpnessAwareTrainer(
        model=model,
        args=arguments(tmp_path, max_steps=1, max_grad_norm=max_norm, lr_scheduler_type="constant"),
        train_dataset=dataset(),
        optimizers=(optimizer, None),
    )
    trainer.train()
    moved = torch.sqrt(
        sum((p - b).square().sum() for p, b in zip(model.parameters(), before, strict=True))
    )
    assert float(moved) == pytest.approx(lr * max_norm, rel=1e-4)  # clipped to the threshold
    assert trainer.state.log_history[0]["grad_norm"] > max_norm  # the norm before clipping


@pytest.mark.parametrize("name", ["sam", "tilted-sam"])
def test_fp16_grad_scaler_path_is_exact_with_a_power_of_two_scale(tmp_path, name):
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=1000)
    scaled = train(tmp_path / "a", method=name, gradient_accumulation_steps=2, scaler=scaler)
    plain = train(tmp_path / "b", method=name, gradient_accumulation_steps=2)
    assert same(weights(scaled), weights(plain))
    assert scaler.get_scale() == 2.0**12


def test_fp16_overflow_skips_the_step_and_the_schedule(tmp_path):
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127)  # the scaled loss overflows float32
    trainer = train(tmp_path, max_steps=1, scaler=scaler)
    assert trainer.accelerator.optimizer_step_was_skipped
    assert scaler.get_scale() == 2.0**126
    assert same(weights(trainer), [p.detach() for p in tiny_gpt2().parameters()])


def test_bf16_trains(tmp_path):
    trainer = train(tmp_path, bf16=True)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)


def test_resume_from_checkpoint_is_bit_identical(tmp_path):
    straight = train(tmp_path / "a", method="friendly-sam", max_steps=4)
    train(tmp_path / "b", method="friendly-sam", max_steps=4, save_strategy="steps", save_steps=2)
    resumed = train(
        tmp_path / "c",
        method="friendly-sam",
        max_steps=4,
        resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-2"),
    )
    assert same(weights(resumed), weights(straight))


def test_a_trainer_without_a_flatminima_optimizer_is_refused(tmp_path):
    trainer = SharpnessAwareTrainer(
        model=tiny_gpt2(), args=arguments(tmp_path), train_dataset=dataset()
    )
    with pytest.raises(TypeError, match="needs a flatminima optimizer"):
        trainer.train()


def test_one_cycle_schedule_passed_to_the_trainer(tmp_path):
    model = tiny_gpt2()
    optimizer = methods.SAM(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=4)
    trainer = SharpnessAwareTrainer(
        model=model,
        args=arguments(tmp_path),
        train_dataset=dataset(),
        optimizers=(optimizer, scheduler),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    rates = [entry["learning_rate"] for entry in trainer.state.log_history if "loss" in entry]
    assert rates[0] == pytest.approx(0.1 / 25)  # OneCycleLR's initial rate, then it climbs
    assert max(rates) > rates[0]
