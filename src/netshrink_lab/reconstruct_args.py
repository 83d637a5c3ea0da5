"""The command-line options of the block-reconstruction benchmarks, in one place:
`add_reconstruct_args` declares them, `reconstruct_config` turns them into the
`netshrink.Reconstruct` they describe (benchmarks/reconstruct_*.py)."""

from __future__ import annotations

import argparse

import netshrink


def add_reconstruct_args(p: argparse.ArgumentParser, *, steps: int, batch_size: int,
                         codes: str) -> None:
    """--steps, --lr, --batch-size, --final-steps, --final-lr, --memory-mb, --codes,
    --round-weight, --codes-lr, --soft-start, with these defaults for the first ones."""
    d = netshrink.Reconstruct()
    p.add_argument("--steps", type=int, default=steps, help="Adam steps per block")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--final-steps", type=int, default=d.final_steps)
    p.add_argument("--final-lr", type=float, default=d.final_lr)
    p.add_argument("--memory-mb", type=float, default=3072)
    p.add_argument("--codes", choices=["fixed", "soft"], default=codes)
    p.add_argument("--round-weight", type=float, default=d.round_weight)
    p.add_argument("--codes-lr", type=float, default=d.codes_lr)
    p.add_argument("--soft-start", choices=["codes", "weights"], default=d.soft_start)


def reconstruct_config(args: argparse.Namespace) -> netshrink.Reconstruct:
    """The `Reconstruct` the options of `add_reconstruct_args` ask for."""
    return netshrink.Reconstruct(
        steps=args.steps, lr=args.lr, batch_size=args.batch_size, memory_mb=args.memory_mb,
        final_steps=args.final_steps, final_lr=args.final_lr, codes=args.codes,
        round_weight=args.round_weight, codes_lr=args.codes_lr, soft_start=args.soft_start)
