"""Print the markdown table of a sweep's results.json (BENCHMARKS.md's sweep tables are
this script's output, not typed by hand); with --publish, first copy a sweep folder's
results.json, pareto.png and pareto.svg to benchmarks/results/<name>.{json,png,svg}.

    python benchmarks/sweep_table.py benchmarks/results/sweep_resnet20_fashion_mnist.json
    python benchmarks/sweep_table.py --publish runs/bench/sweep_x sweep_x
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def publish(sweep_dir: Path, name: str) -> Path:
    """Copy the sweep's JSON and plots to benchmarks/results/<name>.*; return the JSON."""
    for src, ext in (("results.json", "json"), ("pareto.png", "png"), ("pareto.svg", "svg")):
        if (sweep_dir / src).exists():
            shutil.copyfile(sweep_dir / src, RESULTS / f"{name}.{ext}")
    return RESULTS / f"{name}.json"


def markdown(results: dict) -> str:
    """One row per cell, the fp32 baseline first; failed cells' reasons below the table."""
    metric = results["metric"]
    lines = [f"| method | target | file bytes | ratio | bits/weight | {metric} | seconds |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in [results["baseline"], *results["rows"]]:
        if r["status"] != "ok":
            lines.append(f"| {r['method']} | {r['target']} | - | - | - | failed | "
                         f"{r['seconds']:.0f} |")
            continue
        lines.append(f"| {r['method']} | {r['target']} | {r['file_bytes']:,.0f} | "
                     f"x{r['ratio']:.1f} | {r['bits_per_weight']:.2f} | {r['score']:.4f} | "
                     f"{r['seconds']:.0f} |")
    failed = [r for r in results["rows"] if r["status"] != "ok"]
    if failed:
        lines.append("")
        lines += [f"- {r['method']} {r['target']} failed: {r['error']}" for r in failed]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="?", help="a results.json")
    p.add_argument("--publish", nargs=2, metavar=("SWEEP_DIR", "NAME"))
    args = p.parse_args()
    path = publish(Path(args.publish[0]), args.publish[1]) if args.publish else args.results
    if path is None:
        p.error("give a results.json or --publish SWEEP_DIR NAME")
    print(markdown(json.loads(Path(path).read_text())))


if __name__ == "__main__":
    main()
