"""PQF ablation on the ResNet-20 Fashion-MNIST baseline (reduced protocol).

Rows at one size target (file bytes, header included): plain PQ (Lloyd k-means, 20
iterations, no permutation), + permutation, + SR-C annealing, full PQF (both); each
post-training and after the same short fine-tuning (the official recipe: Adam 1e-3, cosine
per batch to 1e-6; cross-entropy, or with --distill the foundation's distillation from the
original). "Gap closed" = (PQF - plain PQ) / (fp32 - plain PQ) after fine-tuning.

Reduced protocol (a 2-core machine shared by 5 developers): `--steps` fine-tuning steps of
batch 64 on a seeded, stratified `--train` subset of the training set (more steps than one
pass over it = several epochs, each reshuffled); accuracy on a seeded, stratified `--test`
subset of the test set; one thread. The subsets are always drawn with seed 0.

`--seeds N` repeats every variant for s = 0..N-1 with compression seed s (k-means init,
permutation search) and fine-tuning seed 1000*s (batch order; `fit` reseeds epoch e with
seed + e, so consecutive seeds would share epoch orders); s = 0 is the single-seed run.
The summary gives mean and standard deviation over seeds, the gap closed from the means
and the per-seed paired differences PQF - plain PQ. `--variants` picks rows (comma-separated).

    PYTHONPATH=src .venv/bin/python benchmarks/pqf_fashion_mnist.py --target x20 --block large
    PYTHONPATH=src .venv/bin/python benchmarks/pqf_fashion_mnist.py --target x20 --steps 600 \
        --seeds 3 --variants "plain PQ,PQF (both)"

Writes benchmarks/results/pqf_fashion_mnist_<target>_<block>[_distill][_s<steps>_seeds<N>].json
(the suffix only when steps != 150 or N != 1; `_anneal<I>` added with --anneal), rewritten
after every seed, and prints tables.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

import netshrink
from netshrink.graph import weight_layers
from netshrink.methods import get_method
from netshrink.methods.pqf import official_finetune, paper_size_bits, plan_of, search_again
from netshrink.report import format_table
from netshrink.size import fp32_bits
from netshrink.train import evaluate, fit
from netshrink_lab import zoo
from netshrink_lab.data import fashion_mnist

VARIANTS = {
    "plain PQ": dict(permute=False, anneal=0),
    "+ permutation": dict(permute=True, anneal=0),
    "+ SR-C": dict(permute=False),
    "PQF (both)": dict(permute=True),
}


def paired(rows: list[dict], fp32_acc: float) -> dict | None:
    """Gap closed by PQF over plain PQ from the seed means, and the per-seed paired
    differences PQF_s - PQ_s (mean, sample std, standard error); None without both rows."""
    by = {(r["variant"], r["seed"]): r["tuned_acc"] for r in rows}
    seeds = sorted(s for v, s in by if v == "plain PQ" and ("PQF (both)", s) in by)
    if not seeds:
        return None
    plain = statistics.mean(by["plain PQ", s] for s in seeds)
    full = statistics.mean(by["PQF (both)", s] for s in seeds)
    diffs = [by["PQF (both)", s] - by["plain PQ", s] for s in seeds]
    std = statistics.stdev(diffs) if len(diffs) > 1 else float("nan")
    room = fp32_acc - plain
    return {"seeds": seeds, "plain_mean": plain, "pqf_mean": full, "diffs": diffs,
            "diff_mean": statistics.mean(diffs), "diff_std": std,
            "diff_se": std / len(diffs) ** 0.5,
            "gap_closed": (full - plain) / room if room else float("nan"),
            "gap_closed_se": std / len(diffs) ** 0.5 / abs(room) if room else float("nan")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default="x20")
    p.add_argument("--block", default="large", choices=["small", "large", "auto"])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--train", type=int, default=9600)
    p.add_argument("--test", type=int, default=2000)
    p.add_argument("--distill", action="store_true")
    p.add_argument("--anneal", type=int, default=None, help="SR-C passes (default: pqf's)")
    p.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1 per variant")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated subset of: {', '.join(VARIANTS)}")
    p.add_argument("--untrained", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants or args.seeds < 1:
        p.error(f"bad --variants {unknown} or --seeds {args.seeds}; variants: {list(VARIANTS)}")
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    if args.untrained:  # smoke test of the script only
        model = zoo.create("resnet20").eval()
    else:
        model, _ = zoo.load_baseline("resnet20")
    # fit draws its own seeded batch order (Finetune.seed): the loader only gives the data
    train = DataLoader(fashion_mnist("train", subset=args.train, seed=0), batch_size=64)
    test = DataLoader(fashion_mnist("test", subset=args.test, seed=0), batch_size=500)
    fp32_acc = evaluate(model, test)
    # more steps than one pass over the subset: whole epochs of equal length
    epochs = math.ceil(args.steps / len(train))
    if args.steps % epochs:
        p.error(f"--steps {args.steps} is not {epochs} equal epochs of <= {len(train)} steps")
    method = get_method("pqf")
    extra = {} if args.anneal is None else {"anneal": args.anneal}
    loss = "CE + distillation" if args.distill else "CE"
    suffix = "" if (args.steps, args.seeds) == (150, 1) else f"_s{args.steps}_seeds{args.seeds}"
    suffix += "" if args.anneal is None else f"_anneal{args.anneal}"
    name = f"pqf_fashion_mnist_{args.target}_{args.block}{'_distill' if args.distill else ''}"
    out = Path(__file__).parent / "results" / f"{name}{suffix}.json"
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            tune = official_finetune(epochs=epochs, batch_size=64,
                                     max_steps_per_epoch=args.steps // epochs,
                                     distill=args.distill, progress=False, seed=1000 * seed)
            for label in variants:
                opts = {**extra, **VARIANTS[label]}
                kw = dict(block=args.block, seed=seed, **opts)
                start = time.perf_counter()
                post = netshrink.compress(model, "pqf", args.target, **kw)
                post_s = time.perf_counter() - start
                perm = search_again(model, post) if opts.get("permute") else None
                plan = plan_of(post, [n for n, _ in weight_layers(model)])
                # = compress(..., data=train, finetune=tune) without encoding twice
                start = time.perf_counter()
                tuned = copy.deepcopy(post)
                fit(tuned, train, tune, teacher=model)
                method.finalize(tuned, None)
                tuned.eval()
                tune_s = time.perf_counter() - start
                path = Path(tmp) / "m.nsk"
                size = netshrink.save(tuned, path)
                assert size == path.stat().st_size
                rows.append({
                    "variant": label, "seed": seed, "finetune_seed": tune.seed,
                    "options": opts, "file_bytes": size,
                    "ratio": fp32_bits(model) / 8 / size,
                    "paper_ratio": paper_size_bits(model) / paper_size_bits(tuned),
                    "post_acc": evaluate(post, test), "tuned_acc": evaluate(tuned, test),
                    "compress_s": post_s, "tune_s": tune_s,
                    "perm_groups": len(perm.groups) if perm else 0,
                    "perm_logdet_drop": perm.improvement if perm else 0.0,
                    "perm_search_s": perm.seconds if perm else 0.0,
                    "mean_sqnr_db": sum(v["sqnr_db"] for v in
                                        post.netshrink_info["layers"].values())
                    / len(post.netshrink_info["layers"]),
                    "plan": {k: str(v) for k, v in plan.items()},
                })
                print({k: v for k, v in rows[-1].items() if k != "plan"}, flush=True)
            summary = {v: {"n": len(accs), "mean": statistics.mean(accs),
                           "std": statistics.stdev(accs) if len(accs) > 1 else float("nan")}
                       for v in variants
                       for accs in [[r["tuned_acc"] for r in rows if r["variant"] == v]]}
            gap = paired(rows, fp32_acc)
            out.write_text(json.dumps({  # after every seed, so an interrupted run keeps rows
                "protocol": {"target": args.target, "block": args.block, "steps": args.steps,
                             "epochs": epochs, "batch": 64, "train_subset": args.train,
                             "test_subset": args.test, "loss": loss, "threads": 1,
                             "seeds_done": seed + 1, "seeds": args.seeds,
                             "compress_seed": "s", "finetune_seed": "1000*s"},
                "fp32_acc": fp32_acc, "summary": summary, "paired": gap,
                "gap_closed": gap["gap_closed"] if gap else None, "rows": rows}, indent=1))
    print(f"ResNet-20 Fashion-MNIST, target {args.target}, block {args.block}, fine-tuning "
          f"{args.steps} steps x 64 ({epochs} epochs, {loss}) on {args.train} train images; "
          f"accuracy on {args.test} test images; fp32 {fp32_acc:.4f}; seeds 0..{args.seeds - 1}")
    print(format_table(
        ["variant", "seed", "file bytes", "ratio", "paper ratio", "SQNR dB", "post-training",
         "fine-tuned", "perm s", "tune s"],
        [[r["variant"], r["seed"], r["file_bytes"], f"x{r['ratio']:.1f}",
          f"x{r['paper_ratio']:.1f}", f"{r['mean_sqnr_db']:.2f}", f"{r['post_acc']:.4f}",
          f"{r['tuned_acc']:.4f}", f"{r['perm_search_s']:.1f}", f"{r['tune_s']:.0f}"]
         for r in rows]))
    print(format_table(["variant", "seeds", "fine-tuned mean", "std"],
                       [[v, s["n"], f"{s['mean']:.4f}", f"{s['std']:.4f}"]
                        for v, s in summary.items()]))
    if gap:
        print(f"PQF - plain PQ per seed: {', '.join(f'{d:+.4f}' for d in gap['diffs'])}; "
              f"mean {gap['diff_mean']:+.4f}, std {gap['diff_std']:.4f}, "
              f"s.e. {gap['diff_se']:.4f}")
        print(f"gap to fp32 closed by PQF over plain PQ (fine-tuned, from the means): "
              f"{gap['gap_closed']:.1%} +- {gap['gap_closed_se']:.1%} (s.e. of the paired mean)")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
