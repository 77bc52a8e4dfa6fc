"""Sparse SAM (Mi, Shen, Ren, Zhou, Sun, Ji, Tao; NeurIPS 2022) and the Fisher-mask FSAM of
Zhong, Ding, Shen, Mi, Liu, Du, Tao (EMNLP 2022 Findings), its preset for language models."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from flatminima import hyperparameters as hp
from flatminima import kernels, sharded
from flatminima.directions import GradientDirection
from flatminima.engine import SharpnessAwareOptimizer
from flatminima.neighborhoods import MaskedBall
from flatminima.passes import frozen_running_statistics

MASK = "sparse_sam_mask"
"""Key of the perturbation mask in the state: bit-packed, ⌈n/8⌉ uint8 bytes for a parameter
(a local shard under FSDP2) of n coordinates (:func:`flatminima.kernels.pack_mask`)."""

MASK_SHAPE = "sparse_sam_mask_shape"
"""Key of the packed mask's shape (the parameter's, or its local shard's) in the state."""

FISHER = "fisher"
DYNAMIC = "dynamic"
SCORES = ("weight", "gradient", "random")


def _one_of(*choices: str) -> hp.Check:
    """A check that accepts exactly one of ``choices``."""

    def check(name: str, value: Any) -> None:
        if value not in choices:
            accepted = ", ".join(repr(c) for c in choices)
            raise ValueError(f"{name} must be one of {accepted}, got {value!r}")

    check.__doc__ = f"one of {', '.join(choices)}"
    return check


def live_count(size: int, sparsity: float) -> int:
    """How many of ``size`` coordinates a mask of sparsity ``s`` keeps: round((1 − s)·size).

    The authors floor in SSAM-F (``int(N·(1 − s))``, which turns 0.9999… into 0) and keep
    N − ⌈N·s⌉ in SSAM-D's initial mask; all three agree whenever (1 − s)·N is an integer."""
    return min(size, max(0, round((1.0 - sparsity) * size)))


def death_rate(drop_rate: float, epoch: int, total_epochs: int) -> float:
    """dr(e) = drop_rate·(1 + cos(π·e/E))/2 (the authors' ``DeathRate_Scheduler``, T_start 0)."""
    return drop_rate * (1.0 + math.cos(math.pi * epoch / total_epochs)) / 2.0


class SparseSAM(SharpnessAwareOptimizer):
    """Sparse SAM: perturb only the coordinates of a binary mask, ε = ρ·m ⊙ g/(‖g‖ + ξ).

    SAM's perturbation restricted to a subset of the weights (paper §3): m is a persistent
    bool mask with a fraction 1 − s of ones, and ε = ρ·m ⊙ g/(‖g‖ + 1e-7) with the norm of the
    *unmasked* gradient, as the authors' ``SSAMF``/``SSAMD.first_step`` (so ‖ε‖ ≤ ρ; whether
    the paper divides by ‖m ⊙ g‖ is not verified). s = 0 is SAM, s = 1 the base optimizer.
    Two passes per step; the mask is learnt outside the step, from data:

    * ``mask="fisher"`` (SSAM-F): m keeps the top-(1 − s) coordinates of the empirical Fisher
      F̂ = Σᵢ (∇ℓᵢ)², summed over ``num_samples`` single examples (batch size 1, the model in
      its current mode). Like the authors' code, the mask starts all zeros: until the first
      refresh a step is the base optimizer's (with two passes).
    * ``mask="dynamic"`` (SSAM-D): m starts as a random subset of density 1 − s. An update at
      epoch e drops d = ⌊K·dr(e)⌋ of the K live coordinates, those with the lowest death score,
      and regrows d among the dead ones, those with the highest growth score; the death rate
      follows dr(e) = drop_rate·(1 + cos(π·e/E))/2 with E = ``total_epochs``. Scores:
      ``weight`` |w|, ``gradient`` |g| (the gradient of the first batch given), ``random``.

    Both refresh through :meth:`refresh_mask` (model, loss function, batches), which any
    training loop may call; :meth:`start_epoch`, which the runner calls before each epoch,
    refreshes every ``update_every`` epochs (epochs 0, k, 2k, ...), as the authors' trainers.
    After every refresh the mask has exactly K = round((1 − s)·N) ones among the N trainable
    coordinates.

    Where it differs from the authors' code (Mi-Peng/Sparse-Sharpness-Aware-Minimization,
    ``solver/sam.py``), on purpose:

    * Their refresh runs after the first step of an epoch (SSAM-F) or in its middle, after ε
      was built with the old mask (SSAM-D); ours runs before the epoch's first step, so that
      the mask of the epoch is learnt at the weights the epoch starts from.
    * SSAM-F: their first Fisher sample's gradient is added onto the gradient left over from
      the step's perturbed pass (``p.grad`` is not zeroed first), and their batch-size-1 passes
      update BatchNorm's running statistics; ours takes each example's gradient with
      ``torch.autograd.grad`` (``p.grad`` untouched) with running statistics frozen. Their
      progress print divides by ``num_samples // 10``, so ``num_samples < 10`` crashes there.
    * SSAM-D: their keep count ⌊(N − N·s)(1 − dr)⌋ is not reduced when the regrow count is
      capped at N·s, so the density falls from 1 − s at the first update (0.8 → 0.6 with the
      defaults); ours keeps K − d and regrows d (d ≤ N − K), so the density stays 1 − s. Their
      weight score is taken at the perturbed point w + ε (the update runs after
      ``first_step``); ours at w. Their gradient score is the clean gradient of the epoch's
      first batch; ours the gradient of the first batch :meth:`refresh_mask` receives.
    * The mask is one *bit* per coordinate (bit-packed, 8 to a byte), not a float copy of
      the parameters.
    * Ties in a top-k (equal Fisher scores, zeros among them) are broken by the coordinate's
      position in the whole model, the lowest first: a fixed rule, the same with and without
      sharding, where ``torch.topk`` (theirs) leaves the choice to its implementation.

    The mask in memory: the state holds each parameter's mask packed, ⌈n/8⌉ uint8 bytes for n
    coordinates (coordinate i in bit i mod 8 of byte ⌊i/8⌋, row-major; key ``MASK``) and its
    shape (key ``MASK_SHAPE``), which ``state_dict()`` saves as they are; a checkpoint of the
    earlier format (one bool per coordinate) still loads. The mask is unpacked only where it
    is applied, one tensor at a time (a large tensor 2¹⁷ coordinates at a time), so ε is the
    same multiplication by a bool mask as before, bit for bit. :meth:`masks` gives unpacked
    copies.

    Sharded parameters (FSDP2, ``fully_shard``; HSDP): each process keeps the mask of its
    shards, and the mask is the one the unsharded model gets, coordinate for coordinate. The
    top-k runs over the whole model: the k-th largest score by a bisection over the scores'
    bit patterns (64 one-scalar all-reduces), ties placed by one all-gather of each process's
    tie counts. SSAM-D's random draws (the initial mask, random scores) are drawn for the
    whole model on every process from ``generator`` (seed it alike everywhere) and cut to
    the process's shards: identical to the unsharded draws, at the cost of a whole-model
    permutation (4 bytes a coordinate) or random vector, transiently. The refresh's passes
    are FSDP passes whose gradients FSDP averages over the processes, so every process must
    pass the same batches (checked by a digest, one all-reduce per batch); its gradients are
    taken through ``p.grad``, which is set aside and put back.

    Cost: :attr:`cost` counts every pass :meth:`refresh_mask` runs, in the unit of a step's
    passes (full training batches): each single example of SSAM-F adds 1/B forward and 1/B
    backward, B the size of the batch it came from; SSAM-D's gradient score adds one pass.
    Memory: the packed mask (P/32 for float32 parameters, P/64 for float64, in units of a
    parameter copy) plus the backup during a step. Once, in the step that draws SSAM-D's
    initial mask and before the backup is taken, an int32 permutation of the coordinates and
    a bool per coordinate exist (1.25 copies for float32 weights, the class's
    ``memory_copies``; 0.625 for float64). A refresh holds the scores (1 P in float32 or
    better) and their int64 sort keys while it runs (8 bytes a coordinate, twice while the
    k-th largest is found without sharding).

    {hyperparameters}

    Args:
        base_optimizer: the optimizer instance that takes the descent step.
        rho: radius ρ ≥ 0 (per group).
        sparsity: fraction s of coordinates *not* perturbed.
        mask: ``"fisher"`` (SSAM-F) or ``"dynamic"`` (SSAM-D).
        update_every: refresh the mask every this many epochs (:meth:`start_epoch`).
        num_samples: single examples in the empirical Fisher (``mask="fisher"``).
        drop_rate: the largest death rate (``mask="dynamic"``).
        drop_strategy: death score, ``"weight"``, ``"gradient"`` or ``"random"``.
        growth_strategy: growth score, ``"weight"``, ``"gradient"`` or ``"random"``.
        total_epochs: E, the length of the death rate's cosine (the number of training
            epochs); required with ``mask="dynamic"``.
        model: see :class:`flatminima.SAM`.
        foreach: use ``torch._foreach_*`` kernels (default) or a per-tensor loop.
        generator: draws the random initial mask and random scores (default: torch's).

    Example:
        >>> import torch, flatminima
        >>> model = torch.nn.Linear(3, 2)
        >>> base = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> optimizer = flatminima.SparseSAM(base, rho=0.05, sparsity=0.5, num_samples=8)
        >>> data = [(torch.randn(4, 3), torch.randint(0, 2, (4,))) for _ in range(2)]
        >>> loss_fn = torch.nn.functional.cross_entropy
        >>> optimizer.refresh_mask(model, loss_fn, data)  # or the runner's start_epoch
        >>> optimizer.mask_density()
        0.5
        >>> x, y = data[0]
        >>> def closure():
        ...     loss = loss_fn(model(x), y)
        ...     loss.backward()
        ...     return loss
        >>> loss = optimizer.step(closure)
    """

    paper = "Mi et al., NeurIPS 2022"
    passes_text = "2 (+ a refresh every `update_every` epochs: `num_samples` single examples)"
    extra_memory = "1 P (backup) + 1 bit per weight (packed mask)"
    # The step's peak is the backup and the packed mask, 1 + 1/32 for float32 weights; the
    # step that draws SSAM-D's first mask holds an int32 permutation and a bool per weight
    # before the backup exists: 1.25 for float32 weights, the largest it holds.
    memory_copies = 1.25

    declaration = (
        hp.Hyperparameter(
            "rho", 0.05, hp.non_negative, "ρ", "radius (authors' configs/defaulf_cfg.py)"
        ),
        hp.Hyperparameter(
            "sparsity",
            0.2,
            hp.unit_interval,
            "s",
            "fraction of coordinates not perturbed (authors' default)",
            step_level=True,
        ),
        hp.Hyperparameter(
            "mask",
            FISHER,
            _one_of(FISHER, DYNAMIC),
            "-",
            "'fisher' (SSAM-F) or 'dynamic' (SSAM-D)",
            step_level=True,
        ),
        hp.Hyperparameter(
            "update_every",
            5,
            hp.positive_int,
            "-",
            "epochs between mask refreshes (authors' update_freq)",
            step_level=True,
        ),
        hp.Hyperparameter(
            "num_samples",
            1024,
            hp.positive_int,
            "N_F",
            "single examples in the empirical Fisher (SSAM-F; authors' default)",
            step_level=True,
        ),
        hp.Hyperparameter(
            "drop_rate",
            0.5,
            hp.unit_interval,
            "α",
            "largest death rate of the cosine schedule (SSAM-D; authors' default)",
            step_level=True,
        ),
        hp.Hyperparameter(
            "drop_strategy",
            "gradient",
            _one_of(*SCORES),
            "-",
            "death score: 'weight', 'gradient' or 'random' (SSAM-D; authors' default)",
            step_level=True,
        ),
        hp.Hyperparameter(
            "growth_strategy",
            "random",
            _one_of(*SCORES),
            "-",
            "growth score: 'weight', 'gradient' or 'random' (SSAM-D; authors' default)",
            step_level=True,
        ),
        hp.Hyperparameter(
            "total_epochs",
            None,
            hp.optional(hp.positive_int),
            "E",
            "epochs of training, the death rate's period (SSAM-D; required there)",
            step_level=True,
        ),
    )

    def __init__(
        self,
        base_optimizer: torch.optim.Optimizer,
        *,
        rho: float = 0.05,
        sparsity: float = 0.2,
        mask: str = FISHER,
        update_every: int = 5,
        num_samples: int = 1024,
        drop_rate: float = 0.5,
        drop_strategy: str = "gradient",
        growth_strategy: str = "random",
        total_epochs: int | None = None,
        model: nn.Module | None = None,
        foreach: bool | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(
            base_optimizer,
            hyperparameters={
                "rho": rho,
                "sparsity": sparsity,
                "mask": mask,
                "update_every": update_every,
                "num_samples": num_samples,
                "drop_rate": drop_rate,
                "drop_strategy": drop_strategy,
                "growth_strategy": growth_strategy,
                "total_epochs": total_epochs,
            },
            direction=GradientDirection(),
            neighborhood=MaskedBall(self._masks_of),
            model=model,
            foreach=foreach,
        )
        self.generator = generator

    @classmethod
    def _check_hyperparameters(cls, values: Mapping[str, Any]) -> None:
        super()._check_hyperparameters(values)
        if values.get("mask") == DYNAMIC and values.get("total_epochs", 0) is None:
            raise ValueError(
                "total_epochs must be an integer >= 1 with mask='dynamic' (E, the number of "
                "training epochs, sets the death rate's cosine schedule), got None"
            )

    # -- the mask ------------------------------------------------------------------------

    def masks(self) -> list[Tensor]:
        """The mask of every trainable parameter, in group order: bool tensors shaped like
        the parameters (like their local shards under FSDP2), unpacked copies of the state."""
        params = self._trainable()
        return [
            kernels.unpack_mask(m, local.numel()).view(local.shape)
            for m, local in zip(self._masks_of(params), _locals(params), strict=True)
        ]

    def mask_density(self) -> float:
        """The fraction of trainable coordinates the mask perturbs (over every shard: under
        FSDP2 a collective, to call on every process)."""
        params = self._trainable()
        layout = sharded.CoordinateLayout(params)
        live = sum(int(m.sum()) for m in self.masks())
        return layout.total(live) / layout.size if layout.size else 0.0

    def start_epoch(
        self,
        epoch: int,
        *,
        model: nn.Module,
        loss_fn: Callable[..., Tensor],
        batches: Callable[[], Iterable[Any]],
    ) -> None:
        """Refreshes the mask before epochs 0, k, 2k, ... (k = ``update_every``)."""
        if epoch % int(self.param_groups[0]["update_every"]) == 0:
            self.refresh_mask(model, loss_fn, batches(), epoch=epoch)

    def refresh_mask(
        self,
        model: nn.Module,
        loss_fn: Callable[..., Tensor],
        batches: Iterable[Any],
        *,
        epoch: int | None = None,
    ) -> None:
        """Learns the mask from data now, from any training loop.

        ``batches`` yields ``(inputs, targets)`` with the examples along the first dimension
        (shuffle it as for training) and ``loss_fn(model(inputs), targets)`` is the mean loss.
        SSAM-F reads the first ``num_samples`` examples one at a time; SSAM-D needs ``epoch``
        (from 0) for its death rate and, with a gradient score, reads the first batch. The
        model's mode is kept and BatchNorm running statistics are left as they were;
        ``p.grad`` is not touched. One example per pass, in train mode as the authors', is
        not possible for BatchNorm on flat features (BatchNorm1d): call ``model.eval()``
        first for such a model. Under DistributedDataParallel every process should call it;
        the scores are summed over the processes so that all learn the same mask (not
        tested with several processes). Under FSDP2 every process must call it with the
        same batches (checked: a one-line error otherwise) and the same generator state.
        """
        group = self.param_groups[0]
        params = self._trainable()
        if not params:
            return
        network = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        sparsity = float(group["sparsity"])
        layout = sharded.CoordinateLayout(params)
        with torch.no_grad(), frozen_running_statistics(network):
            if group["mask"] == FISHER:
                scores = self._fisher_scores(network, loss_fn, batches, params)
                _all_reduce_sum(model, scores)
                count = live_count(layout.size, sparsity)
                self._set_masks(params, _top_coordinates(scores, None, count, layout))
            else:
                if epoch is None:
                    raise ValueError(
                        "refresh_mask needs epoch= (counted from 0) with mask='dynamic': the "
                        "death rate follows the epoch"
                    )
                self._drop_and_regrow(network, model, loss_fn, batches, params, epoch, layout)

    def _fisher_scores(
        self,
        model: nn.Module,
        loss_fn: Callable[..., Tensor],
        batches: Iterable[Any],
        params: list[Tensor],
    ) -> list[Tensor]:
        """F̂ = Σᵢ (∇ℓᵢ)² over the first ``num_samples`` examples, one example per pass (of
        this process's shards under FSDP2)."""
        wanted = int(self.param_groups[0]["num_samples"])
        scores = [
            torch.zeros_like(t, dtype=kernels.accumulation_dtype(t.dtype)) for t in _locals(params)
        ]
        seen = 0
        for inputs, targets in batches:
            size = len(targets)
            _same_batch_everywhere(inputs, targets, params)
            for i in range(min(size, wanted - seen)):
                with torch.enable_grad():
                    loss = loss_fn(model(inputs[i : i + 1]), targets[i : i + 1])
                    grads = _gradients(loss, params)
                used = [k for k, g in enumerate(grads) if g is not None]
                squares = [grads[k].to(scores[k].dtype) for k in used]
                kernels.add_squares_([scores[k] for k in used], squares, foreach=self.foreach)
                self.cost.forward += 1.0 / size
                self.cost.backward += 1.0 / size
            seen += min(size, wanted - seen)
            if seen == wanted:
                return scores
        raise ValueError(
            f"refresh_mask needs num_samples={wanted} examples for the Fisher mask, the batches "
            f"held {seen}; lower num_samples or pass more batches"
        )

    def _drop_and_regrow(
        self,
        network: nn.Module,
        model: nn.Module,
        loss_fn: Callable[..., Tensor],
        batches: Iterable[Any],
        params: list[Tensor],
        epoch: int,
        layout: sharded.CoordinateLayout,
    ) -> None:
        """SSAM-D's update: keep K − d live coordinates by death score, regrow d dead ones."""
        group = self.param_groups[0]
        live = [m.reshape(-1) for m in self.masks()]
        size = layout.size
        alive = layout.total(sum(int(m.sum()) for m in live))
        target = live_count(size, float(group["sparsity"]))
        total_epochs = group["total_epochs"]
        rate = death_rate(float(group["drop_rate"]), epoch, int(total_epochs))
        drops = min(math.floor(target * rate), size - max(target, alive))
        kept = min(alive, target - drops)
        strategies = (group["drop_strategy"], group["growth_strategy"])
        gradients = None
        if "gradient" in strategies:
            gradients = self._batch_gradient(network, loss_fn, batches, params)
            _all_reduce_sum(model, gradients)
        death = self._scores(group["drop_strategy"], params, gradients, layout)
        keep = _top_coordinates(death, live, kept, layout)
        del death
        growth = self._scores(group["growth_strategy"], params, gradients, layout)
        dead = [~m for m in live]
        grown = _top_coordinates(growth, dead, target - kept, layout)
        self._set_masks(params, [a | b for a, b in zip(keep, grown, strict=True)])

    def _batch_gradient(
        self,
        model: nn.Module,
        loss_fn: Callable[..., Tensor],
        batches: Iterable[Any],
        params: list[Tensor],
    ) -> list[Tensor]:
        """The gradient of the first batch (one full pass, counted), zeros where unused."""
        for inputs, targets in batches:
            _same_batch_everywhere(inputs, targets, params)
            with torch.enable_grad():
                loss = loss_fn(model(inputs), targets)
                grads = _gradients(loss, params)
            self.cost.forward += 1.0
            self.cost.backward += 1.0
            return [
                torch.zeros_like(t) if g is None else g
                for t, g in zip(_locals(params), grads, strict=True)
            ]
        raise ValueError("refresh_mask got no batch for the gradient score (SSAM-D)")

    def _scores(
        self,
        strategy: str,
        params: list[Tensor],
        gradients: list[Tensor] | None,
        layout: sharded.CoordinateLayout,
    ) -> list[Tensor]:
        """One flat score tensor per (local) parameter. Random scores are drawn for the whole
        model, as without sharding, and each process keeps its shards' part."""
        if strategy == "random":
            whole = torch.rand(layout.size, generator=self.generator)
            return [
                whole[start : start + t.numel()].to(t.device)
                for t, start in zip(layout.locals, layout.starts, strict=True)
            ]
        source = layout.locals if strategy == "weight" else gradients
        assert source is not None
        return [t.detach().abs().reshape(-1) for t in source]

    def _random_mask(self, params: list[Tensor], sparsity: float) -> list[Tensor]:
        """A uniformly random subset of round((1 − s)·N) coordinates of the whole model (each
        process keeps its shards' part: the same subset as without sharding)."""
        layout = sharded.CoordinateLayout(params)
        size = layout.size
        # The draw in int32 (4 bytes a weight; the same permutation as in int64) and the bool
        # mask, nothing else; both are freed before the step's backup is taken.
        index = torch.int32 if size < 2**31 else torch.int64
        order = torch.randperm(size, generator=self.generator, dtype=index)
        flat = torch.zeros(size, dtype=torch.bool)
        flat[order[: live_count(size, sparsity)]] = True
        del order
        return [
            flat[start : start + t.numel()].view(t.shape).to(t.device)
            for t, start in zip(layout.locals, layout.starts, strict=True)
        ]

    def _trainable(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"] if p.requires_grad]

    def _masks_of(self, params: list[Tensor]) -> list[Tensor]:
        """The packed masks of ``params`` (the state itself), made on first use (see
        :meth:`_make_missing_masks`)."""
        if any(MASK not in self.state[p] for p in params):
            self._make_missing_masks()
        return [self.state[p][MASK] for p in params]

    def _make_missing_masks(self) -> None:
        """Masks are made on first use (the first step, refresh or read), like a base
        optimizer's buffers: the dynamic mask's random draw over every trainable parameter,
        the Fisher mask all zeros (as the authors' ``init_mask``). A parameter added after
        that gets an all-False mask: it is not perturbed until the next refresh."""
        params = self._trainable()
        missing = [p for p in params if MASK not in self.state[p]]
        if len(missing) == len(params) and self.param_groups[0]["mask"] == DYNAMIC:
            sparsity = float(self.param_groups[0]["sparsity"])
            self._set_masks(params, self._random_mask(params, sparsity))
            return
        self._set_masks(missing, [torch.zeros_like(t, dtype=torch.bool) for t in _locals(missing)])

    def _set_masks(self, params: list[Tensor], masks: list[Tensor]) -> None:
        """Stores bool masks (shaped like the parameters' local tensors) packed."""
        for p, m in zip(params, masks, strict=True):
            self.state[p][MASK] = kernels.pack_mask(m)
            self.state[p][MASK_SHAPE] = tuple(m.shape)

    def _load_extra_state(self, extra: Mapping[str, Any]) -> None:
        """``torch.optim.Optimizer.load_state_dict`` casts every state tensor of a floating
        parameter to the parameter's dtype (exact for bytes 0..255, even in bfloat16): the
        packed mask is uint8 again here. A checkpoint of the earlier format (one bool per
        coordinate, no shape entry) is packed on load."""
        for p, entry in self.state.items():
            if MASK not in entry:
                continue
            mask = entry[MASK]
            if MASK_SHAPE not in entry:  # the earlier format: a bool tensor shaped like p
                local = _locals([p])[0]
                self._set_masks([p], [(mask != 0).reshape(local.shape)])
            elif mask.dtype != torch.uint8:
                entry[MASK] = mask.to(torch.uint8)
            entry[MASK_SHAPE] = tuple(int(n) for n in entry[MASK_SHAPE])


class FisherMaskSAM(SparseSAM):
    """Fisher-mask FSAM: Sparse SAM's Fisher mask, for fine-tuning language models with Adam.

    Zhong et al. (EMNLP 2022 Findings, arXiv 2210.05497) perturb only the coordinates of
    largest empirical Fisher information, ε = m ⊙ ρ·g/‖g‖, the construction of SSAM-F
    (:class:`SparseSAM` with ``mask="fisher"``, same research group), and fine-tune
    BERT/ELECTRA/ALBERT/RoBERTa with Adam as the base optimizer. No official code was found;
    the paper's sparse ratio, mask-update interval (which summaries give in *iterations*),
    Fisher sample count and normaliser are **UNVERIFIED** (spec §14), so the defaults below
    are SSAM-F's. To refresh every k iterations instead of every k epochs, call
    :meth:`refresh_mask` from the training loop every k steps. Everything else, the
    differences from SSAM-F's code included, is :class:`SparseSAM`'s.

    {hyperparameters}

    Args:
        base_optimizer: the optimizer instance (AdamW in the paper's setting).
        rho: radius ρ ≥ 0.
        sparsity: fraction of coordinates not perturbed (1 − the paper's kept fraction).
        update_every: epochs between refreshes (:meth:`start_epoch`).
        num_samples: single examples in the empirical Fisher.
        model: see :class:`flatminima.SAM`.
        foreach: use ``torch._foreach_*`` kernels (default) or a per-tensor loop.

    Example:
        >>> import torch, flatminima
        >>> model = torch.nn.Linear(3, 2)
        >>> base = torch.optim.AdamW(model.parameters(), lr=1e-3)
        >>> optimizer = flatminima.FisherMaskSAM(base, sparsity=0.5, num_samples=8)
        >>> data = [(torch.randn(4, 3), torch.randint(0, 2, (4,))) for _ in range(2)]
        >>> optimizer.refresh_mask(model, torch.nn.functional.cross_entropy, data)
        >>> optimizer.mask_density()
        0.5
    """

    paper = "Zhong et al., EMNLP 2022 Findings"
    passes_text = SparseSAM.passes_text
    extra_memory = SparseSAM.extra_memory

    declaration = tuple(
        row
        for row in SparseSAM.declaration
        if row.name in ("rho", "sparsity", "update_every", "num_samples")
    )

    def __init__(
        self,
        base_optimizer: torch.optim.Optimizer,
        *,
        rho: float = 0.05,
        sparsity: float = 0.2,
        update_every: int = 5,
        num_samples: int = 1024,
        model: nn.Module | None = None,
        foreach: bool | None = None,
    ) -> None:
        super().__init__(
            base_optimizer,
            rho=rho,
            sparsity=sparsity,
            mask=FISHER,
            update_every=update_every,
            num_samples=num_samples,
            model=model,
            foreach=foreach,
        )


INT64_MAX = (1 << 63) - 1


def _order_keys_(keys: Tensor, scores: Tensor, eligible: Tensor | None) -> None:
    """Writes into ``keys`` int64 keys ordered as the float ``scores`` (NaN above +inf, as
    ``torch.topk`` ranks it); coordinates not ``eligible`` get the smallest key, below every
    score's."""
    keys.copy_(scores.reshape(-1).double().view(torch.int64))
    negative = keys < 0
    keys[negative] ^= INT64_MAX  # the bits of negative floats order them the other way
    if eligible is not None:
        keys.masked_fill_(~eligible.reshape(-1), -INT64_MAX - 1)


def _top_coordinates(
    scores: list[Tensor],
    eligible: list[Tensor] | None,
    count: int,
    layout: sharded.CoordinateLayout,
) -> list[Tensor]:
    """Masks of the ``count`` largest (eligible) scores over the whole model, shaped like
    ``layout.locals``.

    The rule, the same with and without shards: every score above the count-th largest
    score t, then the scores equal to t in the order of their coordinates' numbers in the
    whole model (:class:`flatminima.sharded.CoordinateLayout`), the lowest first, until
    ``count`` are kept. Without shards t is a ``kthvalue``; on shards it is found by bisection
    over the keys, one scalar all-reduce per halving (64), and one all-gather of each process's
    tie counts places the ties.
    """
    shapes = [t.shape for t in layout.locals]
    if count <= 0:
        return [torch.zeros(shape, dtype=torch.bool) for shape in shapes]
    # One int64 key per coordinate, the tensors' keys as views of one flat tensor.
    flat = torch.empty(sum(s.numel() for s in scores), dtype=torch.int64)
    keys = list(flat.split([s.numel() for s in scores]))
    for k, s, e in zip(keys, scores, eligible or scores, strict=True):
        _order_keys_(k, s, None if eligible is None else e)
    threshold = _count_th_largest(flat, keys, count, layout)
    above = [k > threshold for k in keys]
    room = count - layout.total(sum(int(a.sum()) for a in above))
    ties = [k == threshold for k in keys]
    del keys, flat
    tie_counts = [int(t.sum()) for t in ties]
    everyone = layout.gathered([*tie_counts, *layout.starts])
    n = len(ties)
    for j, (tie, start) in enumerate(zip(ties, layout.starts, strict=True)):
        before = sum(row[i] for row in everyone for i in range(n) if row[n + i] < start and row[i])
        allowed = room - before
        if allowed <= 0:
            continue
        if allowed < tie_counts[j]:
            tie[tie.nonzero()[allowed:, 0]] = False
        above[j] |= tie
    return [a.view(shape) for a, shape in zip(above, shapes, strict=True)]


def _count_th_largest(
    flat: Tensor, keys: list[Tensor], count: int, layout: sharded.CoordinateLayout
) -> int:
    """The ``count``-th largest key over every shard (``flat``: this process's keys, of
    which ``keys`` are the per-tensor views)."""
    if layout.group is None:
        return int(torch.kthvalue(flat, flat.numel() - count + 1).values)
    low, high = -INT64_MAX - 1, INT64_MAX  # count(keys ≥ low) ≥ count always holds
    while low < high:
        middle = (low + high + 1) // 2
        if layout.total(sum(int((k >= middle).sum()) for k in keys)) >= count:
            low = middle
        else:
            high = middle - 1
    return low


def _locals(params: list[Tensor]) -> list[Tensor]:
    """The tensors this process holds: the local shards of DTensors, plain tensors as they are."""
    return [p.to_local() if sharded.is_sharded([p]) else p for p in params]


def _gradients(loss: Tensor, params: list[Tensor]) -> list[Tensor | None]:
    """∇loss of each parameter (of its local shard under FSDP2), ``p.grad`` left as it was.

    Without sharding ``torch.autograd.grad``; under FSDP2 the gradient reaches the sharded
    parameters only through the backward's reduce-scatter into ``p.grad``, so the gradients
    there are set aside, the backward runs, and they are put back."""
    if not sharded.is_sharded(params):
        return list(torch.autograd.grad(loss, params, allow_unused=True))
    kept = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        loss.backward()
        return [None if p.grad is None else p.grad.to_local() for p in params]
    finally:
        for p, g in zip(params, kept, strict=True):
            p.grad = g


def _same_batch_everywhere(inputs: Tensor, targets: Tensor, params: list[Tensor]) -> None:
    """Under FSDP2 the refresh's passes average their gradient over the processes, which is
    the unsharded model's gradient only if every process passes the same examples."""
    if not sharded.is_sharded(params):
        return
    digest = 0.0
    for t in (inputs, targets):
        flat = t.detach().reshape(-1).double()
        digest += float((flat * torch.arange(1, flat.numel() + 1, dtype=torch.float64)).sum())
    sharded.same_on_every_process(digest, params, "refresh_mask's batches")


def _all_reduce_sum(model: nn.Module, tensors: list[Tensor]) -> None:
    """Under DistributedDataParallel, sums ``tensors`` over the processes, so that every
    process learns the same mask from all of their data."""
    if not isinstance(model, nn.parallel.DistributedDataParallel):
        return
    import torch.distributed as dist

    for t in tensors:
        dist.all_reduce(t, group=model.process_group)
