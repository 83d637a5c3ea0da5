"""DKM train-step time and peak memory on coremltools' benchmark block (issue 13).

Model: Linear(768, 3072) + GELU + Linear(3072, 768) (4.7M weights), batch 32 of 768-d
inputs, 4 bits per weight (k = 16, d = 1), both layers DKM, Adam. One training step =
forward (soft k-means in both layers) + backward + optimizer step. Each variant runs in its
own subprocess so that its peak RSS (ru_maxrss) is its own; "delta" subtracts the RSS
measured just before the first step (torch, the model, the DKM state).

Variants: `lean` (custom autograd Function, fp32 weights), `unique` (the same with the
model in bfloat16: eDKM uniquification, at most 65,536 distinct values per layer),
`naive` (the paper's unrolled autograd graph, the reference; optional: `--naive`).
`--blocks 6` stacks six blocks (28M weights).

    PYTHONPATH=src python benchmarks/dkm_memory.py --threads 1 [--blocks 6] [--naive]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def _block(nn):  # noqa: ANN001, ANN202
    return [nn.Linear(768, 3072), nn.GELU(), nn.Linear(3072, 768)]


def run_variant(variant: str, blocks: int, steps: int, threads: int, iters: int) -> dict:
    import torch
    from torch import nn

    import netshrink
    from netshrink.methods.dkm import DKMLayer

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(blocks) for m in _block(nn)])
    dtype = torch.bfloat16 if variant == "unique" else torch.float32
    model = model.to(dtype)
    t0 = time.perf_counter()
    student = netshrink.compress(model, "dkm", "4bit", finalize=False, iters=iters,
                                 unique=(variant == "unique"))
    init_s = time.perf_counter() - t0
    if variant == "naive":
        from netshrink.methods.dkm.soft import naive_dkm

        def soft(self):  # noqa: ANN001, ANN202
            out, c, self.last_iters = naive_dkm(self._vectors(), self.codebook, self.tau,
                                                self.iters, self.epsilon, self.stop)
            with torch.no_grad():
                self.codebook.copy_(c)
            return self._to_weight(out)

        DKMLayer.soft_weight = soft
    student.train()
    opt = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=1e-4)
    x = torch.randn(32, 768, dtype=dtype)
    target = torch.randn(32, 768, dtype=dtype)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    times, iters_run = [], []
    for _ in range(steps):
        t = time.perf_counter()
        loss = torch.nn.functional.mse_loss(student(x).float(), target.float())
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
        iters_run.append([m.last_iters for m in student.modules() if isinstance(m, DKMLayer)])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    n_weights = sum(m.latent.numel() for m in student.modules() if isinstance(m, DKMLayer))
    return {"variant": variant, "blocks": blocks, "weights": n_weights, "threads": threads,
            "iters_cap": iters, "steps": steps, "iters_run": iters_run,
            "init_s": round(init_s, 2),
            "first_step_s": round(times[0], 3),
            "step_s": round(sum(times[1:]) / max(1, len(times) - 1), 3),
            "peak_rss_mb": round(peak), "rss_before_steps_mb": round(rss_before),
            "delta_mb": round(peak - rss_before)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--blocks", type=int, default=1)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--naive", action="store_true", help="also run the unrolled reference")
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.blocks, args.steps, args.threads,
                                     args.iters)))
        return
    variants = ["lean", "unique"] + (["naive"] if args.naive else [])
    rows = []
    for v in variants:
        cmd = [sys.executable, __file__, "--variant", v, "--blocks", str(args.blocks),
               "--steps", str(args.steps), "--threads", str(args.threads),
               "--iters", str(args.iters)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            rows.append({"variant": v, "error": res.stderr.strip().splitlines()[-1:]})
        else:
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    RESULTS.mkdir(exist_ok=True)
    suffix = "" if args.threads == 1 else f"_{args.threads}threads"
    out = RESULTS / f"dkm_memory_{args.blocks}block{suffix}.json"
    out.write_text(json.dumps(rows, indent=1))
    print(f"\n{'variant':8} {'weights':>9} {'step s':>7} {'1st s':>6} {'peak MB':>8} "
          f"{'delta MB':>8}")
    for r in rows:
        if "error" in r:
            print(f"{r['variant']:8} error: {r['error']}")
            continue
        print(f"{r['variant']:8} {r['weights']:>9} {r['step_s']:>7} {r['first_step_s']:>6} "
              f"{r['peak_rss_mb']:>8} {r['delta_mb']:>8}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
