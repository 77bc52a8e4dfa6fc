"""Shared test settings: one thread (two cores are shared; thread count changes results)."""

import torch

torch.set_num_threads(1)
