"""Hugging Face Trainer with any flatminima method: a tiny GPT-2 from a config (no download).

``SharpnessAwareTrainer`` runs every pass of the method on every micro-batch of a
gradient-accumulation window, clips the descent gradient with ``max_grad_norm``, handles fp16
(GradScaler) and bf16, logs the loss at w, and resumes from checkpoints bit for bit.

    python examples/hf_trainer_recipe.py
"""

from __future__ import annotations

import functools
import tempfile
import warnings

import torch
import transformers
from transformers import GPT2Config, GPT2LMHeadModel, PrinterCallback, TrainingArguments

import flatminima
from flatminima.integrations.transformers import SharpnessAwareTrainer

if __name__ == "__main__":
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    )
    tokens = torch.randint(0, 64, (32, 16), generator=torch.Generator().manual_seed(1))
    dataset = [{"input_ids": row, "labels": row} for row in tokens]
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            use_cpu=True,  # on a GPU: fp16=True or bf16=True
            per_device_train_batch_size=8,
            gradient_accumulation_steps=2,
            max_grad_norm=1.0,
            num_train_epochs=3,
            learning_rate=3e-3,
            logging_steps=1,
            report_to=[],
            save_strategy="no",
            disable_tqdm=True,
        )
        trainer = SharpnessAwareTrainer(
            model=model,
            args=args,
            train_dataset=dataset,
            sharpness_aware=functools.partial(
                flatminima.SAM, rho=0.05
            ),  # wraps the Trainer's AdamW
        )
        trainer.remove_callback(PrinterCallback)  # quiet: the result is printed below
        trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    print(f"{trainer.state.global_step} SAM steps, loss at w fell: {losses[-1] < losses[0]}")
