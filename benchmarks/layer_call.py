"""Per-call cost of running a host module with a substituted weight (layers.call_with_weight).

Compares the direct path that `CompressedLayer` takes for plain nn.Linear / nn.Conv2d
(F.linear / host._conv_forward) with `torch.func.functional_call`, which every other host
kind goes through. Small layer and batch, so the overhead, not the arithmetic, dominates.

    .venv/bin/python benchmarks/layer_call.py
"""

from __future__ import annotations

import timeit

import torch
from torch import nn
from torch.func import functional_call

from netshrink.layers import call_with_weight


def per_call_us(fn, repeats: int = 5, number: int = 2000) -> float:
    return min(timeit.repeat(fn, repeat=repeats, number=number)) / number * 1e6


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    cases = {"Linear(64, 64)": (nn.Linear(64, 64), torch.randn(8, 64)),
             "Conv2d(16, 16, 3)": (nn.Conv2d(16, 16, 3, padding=1), torch.randn(1, 16, 8, 8))}
    print(f"torch {torch.__version__}, 1 thread; microseconds per call (best of 5)")
    print(f"{'layer':<20}{'direct':>10}{'functional_call':>18}")
    for name, (host, x) in cases.items():
        weight = host.weight.detach().clone()
        with torch.no_grad():
            direct = per_call_us(lambda h=host, w=weight, x=x: call_with_weight(h, w, (x,), {}))
            generic = per_call_us(
                lambda h=host, w=weight, x=x: functional_call(h, {"weight": w}, (x,)))
        print(f"{name:<20}{direct:>10.1f}{generic:>18.1f}")


if __name__ == "__main__":
    main()
