"""How many SR-C passes (I) PQF's annealed k-means needs: MSE and time against plain
k-means (Lloyd, random init as PQF's code; and k-means++) on real weights, to choose the
default I (docs/methods/pqf.md#annealed-k-means).

Weights: pretrained EfficientNet-Lite0's pointwise convs (subvectors of d=4 consecutive
input channels, k=256, the paper's 1x1 setting; each output row divided by its max |w|
as PQF does for these layers in netshrink) - every 4th such layer, to keep it short.

    PYTHONPATH=src .venv/bin/python benchmarks/pqf_anneal.py

Writes benchmarks/results/pqf_anneal.json and prints a table.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torch import nn

from netshrink.compat import torchvision_shim
from netshrink.kmeans import kmeans
from netshrink.layers import channel_scales, weight_rows
from netshrink.report import format_table
from netshrink_lab.pretrained import efficientnet_lite0


def main() -> None:
    torch.set_num_threads(1)
    torchvision_shim()
    model = efficientnet_lite0()
    sets = []
    convs = [(n, m) for n, m in model.named_modules()
             if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.weight.numel() >= 8192]
    for name, m in convs[::4]:
        rows = weight_rows(m.weight.detach().float(), 0)
        _, rows = channel_scales(rows, "float16")
        x = rows.reshape(-1, 4)
        k = min(256, 2 ** int(torch.tensor(x.shape[0] / 4).log2().floor()))
        sets.append((name, x, k))
    settings = [("lloyd random", dict(init="random", iters=20)),
                ("lloyd random", dict(init="random", iters=100)),
                ("lloyd kmeans++", dict(init="kmeans++", iters=20))]
    settings += [(f"SR-C I={i}", dict(init="random", anneal=i)) for i in (10, 20, 50, 100)]
    rows_out = []
    for label, kw in settings:
        start = time.perf_counter()
        mse = 0.0
        n = 0
        for _, x, k in sets:
            r = kmeans(x, k, seed=0, tol=0.0, **kw)
            mse += r.inertia
            n += x.numel()
        seconds = time.perf_counter() - start
        rows_out.append({"setting": label, **{k: v for k, v in kw.items() if k != "init"},
                         "mse": mse / n, "seconds": seconds})
        print(rows_out[-1], flush=True)
    base = rows_out[0]["mse"]
    print(format_table(["k-means", "passes", "MSE", "vs lloyd-20", "seconds"],
                       [[r["setting"], r.get("iters", r.get("anneal", 0)), f"{r['mse']:.3e}",
                         f"{r['mse'] / base:.3f}", f"{r['seconds']:.1f}"] for r in rows_out]))
    out = Path(__file__).parent / "results" / "pqf_anneal.json"
    out.write_text(json.dumps({"layers": [(n, tuple(x.shape), k) for n, x, k in sets],
                               "rows": rows_out, "threads": 1}, indent=1))


if __name__ == "__main__":
    main()
