"""Measures the memory an optimizer itself holds, in copies of the model's parameters.

CPU PyTorch keeps no allocator statistics, so the tracker watches every ATen call through a
:class:`~torch.utils._python_dispatch.TorchDispatchMode`. An output whose storage is not the
storage of one of the call's inputs is a new allocation; a finalizer on that storage's Python
object (which PyTorch keeps alive exactly as long as the storage itself) marks it freed. The
live set is therefore exact, views and all, and independent of the allocator.

Each allocation is tagged by where it happened:

* inside a forward/backward pass (the closure) — activations, the autograd graph, gradients;
* inside the base optimizer's ``step`` — momentum buffers and the base step's own temporaries;
* anywhere else — the sharpness-aware method's own work.

What the method holds at a moment is the live bytes of its own allocations, plus the live
bytes allocated by a *finished* pass that are no longer any parameter's ``.grad`` (a gradient
the method took over, like Tilted SAM's running sum, or a clone a peer keeps). The current
gradients, the base optimizer's state and temporaries, and everything a pass allocates while
it runs are excluded: every method needs them, and they are the same for all. The method's
holding cannot change while a pass runs, so sampling it after each of its own allocations and
at every pass boundary finds its peak.
"""

from __future__ import annotations

import operator
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from benchmarks.contenders import Contender
from benchmarks.workloads import Workload

_grad_of = operator.attrgetter("grad")

PASS = "pass"
BASE = "base"
METHOD = "method"


@dataclass
class _Allocation:
    nbytes: int
    tag: str
    pass_index: int  # the pass that allocated it, -1 outside passes


class AllocationTracker(TorchDispatchMode):
    """Tracks live storages allocated while it is active and who allocated them."""

    def __init__(self) -> None:
        super().__init__()
        self.params: list[Tensor] = []
        """The parameters whose current ``.grad`` is not counted as the method's."""
        self.live: dict[int, _Allocation] = {}
        self._method_bytes = 0  # live bytes tagged METHOD
        self._kept_bytes = 0  # live bytes allocated by passes that have finished
        self._tag = METHOD
        self._pass_index = -1  # the pass being allocated for, -1 outside passes
        self._running_pass = -1
        self._passes_started = 0
        self.peak_held = 0
        self.peak_held_during_passes = 0

    # -- dispatch ----------------------------------------------------------------------

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {
            id(t.untyped_storage()) for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)
        }
        allocated = False
        for t in tree_leaves(out):
            if not isinstance(t, Tensor):
                continue
            storage = t.untyped_storage()
            key = id(storage)
            if key in inputs or key in self.live or storage.nbytes() == 0:
                continue
            allocation = _Allocation(storage.nbytes(), self._tag, self._pass_index)
            self.live[key] = allocation
            if allocation.tag == METHOD:
                self._method_bytes += allocation.nbytes
            weakref.finalize(storage, self._freed, key)
            allocated = True
        if allocated and self._tag != PASS:
            self._sample()
        return out

    def _freed(self, key: int) -> None:
        allocation = self.live.pop(key)
        if allocation.tag == METHOD:
            self._method_bytes -= allocation.nbytes
        elif allocation.tag == PASS and allocation.pass_index != self._running_pass:
            self._kept_bytes -= allocation.nbytes

    # -- where we are ------------------------------------------------------------------

    @contextmanager
    def forward_backward(self) -> Iterator[None]:
        """Wraps one pass: its allocations are the model's, not the optimizer's."""
        self._sample()
        self.peak_held_during_passes = max(self.peak_held_during_passes, self.held())
        previous = self._tag
        self._tag, self._pass_index = PASS, self._passes_started
        self._running_pass = self._pass_index
        self._passes_started += 1
        try:
            yield
        finally:
            self._tag, self._running_pass = previous, -1
            self._kept_bytes += sum(
                a.nbytes for a in self.live.values() if a.pass_index == self._pass_index
            )
            self._pass_index = -1
            self._sample()

    @contextmanager
    def base_step(self) -> Iterator[None]:
        """Wraps the base optimizer's step: its state and temporaries are not the method's."""
        previous = self._tag
        self._tag = BASE
        try:
            yield
        finally:
            self._tag = previous

    # -- what the method holds ---------------------------------------------------------

    def held(self) -> int:
        """Bytes the method holds now (see the module docstring for what counts)."""
        # Allocated by a finished pass and still alive: a gradient, or something the method
        # kept (a gradient it took over, a clone). Only the second kind is the method's.
        grads = [g for g in map(_grad_of, self.params) if g is not None]
        gradient_storages = set(map(id, map(Tensor.untyped_storage, grads)))
        kept = self._kept_bytes
        own = self._method_bytes
        for key in gradient_storages:
            allocation = self.live.get(key)
            if allocation is None:
                continue
            if allocation.tag == PASS:
                kept -= allocation.nbytes
            elif allocation.tag == METHOD:
                # A copy the method made and handed back as the gradient (WSAM's decoupled step
                # descends with the kept clean gradient): it is the current gradient now.
                own -= allocation.nbytes
        return own + kept

    def _sample(self) -> None:
        if self._tag == PASS:
            return
        # held() looks at every parameter's gradient; its upper bound is free. Skipping the
        # samples that cannot raise the peak keeps per-parameter loops from going quadratic.
        if self._method_bytes + self._kept_bytes <= self.peak_held:
            return
        self.peak_held = max(self.peak_held, self.held())


@dataclass
class MemoryResult:
    """Bytes held by the method, in units of the model's trainable parameter bytes."""

    peak: float
    """The most the method held at any moment of the measured steps."""
    during_passes: float
    """The most it held while a forward/backward pass ran (what adds to activation memory)."""
    between_steps: float
    """What it still holds after its step, gradients excluded: its persistent state."""
    state: float | None = None
    """The storage of the tensors in the method's own ``optimizer.state`` after the steps
    (Friendly SAM's EMA, Sparse SAM's mask), however stored and whenever allocated (also
    before the tracker started, e.g. by a mask refresh); ``None`` for rows without one."""


def state_bytes(tensors: list[Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (a storage shared by views counts
    once; a bit-packed mask counts its packed bytes)."""
    storages = {}
    for t in tensors:
        storage = t.untyped_storage()
        storages[storage.data_ptr(), storage.nbytes()] = storage.nbytes()
    return sum(storages.values())


def measure(contender: Contender, workload: Workload, *, steps: int) -> MemoryResult:
    """Runs ``steps`` steps of ``contender`` under the tracker.

    The model is built outside the tracker (its weights are nobody's overhead); the optimizer
    is too, but every tensor it creates lazily on its first step is seen.
    """
    tracker = AllocationTracker()
    prepared = contender.build(workload, tracker)
    tracker.params = prepared.params
    parameter_bytes = sum(p.numel() * p.element_size() for p in prepared.params)
    with tracker:
        for _ in range(steps):
            prepared.step()
        for p in prepared.params:
            p.grad = None
        between = tracker.held()
    state = None
    if prepared.method_state is not None:
        state = state_bytes(prepared.method_state()) / parameter_bytes
    return MemoryResult(
        peak=tracker.peak_held / parameter_bytes,
        during_passes=tracker.peak_held_during_passes / parameter_bytes,
        between_steps=between / parameter_bytes,
        state=state,
    )
