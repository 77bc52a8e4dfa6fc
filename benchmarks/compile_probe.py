"""Does ``torch.compile`` speed up SAM's perturbation arithmetic? (Answer on CPU: no.)

    python -m benchmarks.compile_probe                # W2-wide's 8 tensors, 100 small ones
    python -m benchmarks.compile_probe --small 1002   # W2-many-small's count (minutes)

Compiles the foreach arithmetic the engine runs between the two passes — back the weights
up, scale the gradients into ε, add ε to the weights — and times it against the same eager
calls, interleaved. Reports compile time, both medians, and whether the results agree bit
for bit. The findings are quoted in docs/benchmarks.md; this script reproduces them.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import Tensor


def perturb(params: list[Tensor], grads: list[Tensor], backup: list[Tensor], scale: Tensor) -> None:
    torch._foreach_copy_(backup, params)
    torch._foreach_mul_(grads, scale)
    torch._foreach_add_(params, grads)


def probe(name: str, shapes: list[tuple[int, ...]], rounds: int) -> None:
    generator = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=generator) for s in shapes]
    grads = [torch.randn(s, generator=generator) for s in shapes]
    backup = [torch.empty_like(p) for p in params]
    scale = torch.tensor(1e-3)
    compiled = torch.compile(perturb, fullgraph=True, dynamic=False)
    start = time.perf_counter()
    compiled(params, grads, backup, scale)
    compile_s = time.perf_counter() - start

    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    for _ in range(rounds):
        for label, fn in (("eager", perturb), ("compiled", compiled)):
            start = time.perf_counter()
            fn(params, grads, backup, scale)
            times[label].append(time.perf_counter() - start)

    inputs = [[t.clone() for t in ts] for ts in (params, grads, backup)]
    expected = [[t.clone() for t in ts] for ts in (params, grads, backup)]
    compiled(*inputs, scale)
    perturb(*expected, scale)
    same = all(
        torch.equal(a, b) for xs, ys in zip(inputs, expected, strict=True)
        for a, b in zip(xs, ys, strict=True)
    )
    eager, fused = (statistics.median(times[k]) * 1e3 for k in ("eager", "compiled"))
    print(
        f"{name}: compile {compile_s:.1f} s; eager {eager:.3f} ms, compiled {fused:.3f} ms "
        f"({fused / eager:.2f}x); bit-identical: {same}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", type=int, default=100, help="number of small tensors")
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(1)
    wide = [(2048, 1024), (2048,), (2048, 2048), (2048,), (1024, 2048), (1024,), (10, 1024), (10,)]
    probe("W2-wide shapes (8 tensors)", wide, args.rounds)
    small = [(16, 16) if i % 2 == 0 else (16,) for i in range(args.small)]
    probe(f"{args.small} small tensors", small, args.rounds)


if __name__ == "__main__":
    main()
