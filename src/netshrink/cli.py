"""The `netshrink` command line: train-baseline, compress, eval, inspect, methods, demo.

Every command is a thin layer over the Python API; errors netshrink raises on purpose are
printed as one line (exit code 2), anything else is a bug and shows its traceback. The
experiment harness (`netshrink_lab`: zoo models and baselines, Fashion-MNIST, the demo) is
imported only inside the commands that use it, never at `import netshrink.cli`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

from .errors import ConfigError, NetshrinkError

logger = logging.getLogger("netshrink")

EPILOG = """examples:
  netshrink train-baseline resnet20 --data fashion-mnist
  netshrink compress --model resnet20 --method kmeans --target 3bit --epochs 1 -o r20.nsk
  netshrink eval r20.nsk --data fashion-mnist
  netshrink inspect r20.nsk
  netshrink demo
  netshrink demo --methods kmeans,pqf --target x16 --epochs 2
"""


def _parse_option(text: str) -> tuple[str, Any]:
    """'key=value' with value parsed as JSON where possible (8 -> int, false -> bool)."""
    if "=" not in text:
        raise ConfigError(f"--option takes key=value, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="netshrink", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Compress trained PyTorch networks (kmeans, PQF, DKM, ALDS, SMH) and "
                    "write a .nsk file whose size is the size reported.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    tb = sub.add_parser("train-baseline", help="train a zoo model and cache its weights",
                        description="Train a reference model from the zoo on an offline data "
                                    "set and cache the checkpoint (safetensors) for compress.")
    tb.add_argument("model", help="zoo model name (`netshrink methods` lists them)")
    tb.add_argument("--data", default="fashion-mnist")
    tb.add_argument("--epochs", type=int, default=4)
    tb.add_argument("--lr", type=float, default=0.05)
    tb.add_argument("--batch-size", type=int, default=128)
    tb.add_argument("--subset-train", type=int, help="train on a random subset (quick runs)")
    tb.add_argument("--subset-test", type=int, help="measure on a random test subset")
    tb.add_argument("--seed", type=int, default=0)
    tb.add_argument("--checkpoint-dir", help="write a resumable checkpoint every epoch here")
    tb.add_argument("--resume", action="store_true", help="continue from --checkpoint-dir")

    c = sub.add_parser("compress", help="compress a model and write a .nsk file",
                       description="Compress a zoo model (its cached baseline) or a safetensors "
                                   "checkpoint, optionally fine-tune with distillation, "
                                   "report and save.")
    src = c.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="zoo model name; uses its cached baseline "
                                     "(trained first if missing)")
    src.add_argument("--checkpoint", help="a safetensors state dict (needs --arch)")
    c.add_argument("--arch", help="zoo architecture of --checkpoint, e.g. resnet20")
    c.add_argument("--method", default="kmeans")
    c.add_argument("--target", default="4bit", help="'1.5MB', '800KB', 'x20' or '3bit'")
    c.add_argument("--data", default="fashion-mnist")
    c.add_argument("--epochs", type=int, default=0, help="fine-tuning epochs (0: none)")
    c.add_argument("--lr", type=float, help="fine-tuning learning rate (default 1e-3, Adam)")
    c.add_argument("--batch-size", type=int, default=128)
    c.add_argument("--bn-recalibration", type=int, default=0, metavar="BATCHES",
                   help="after fine-tuning, re-estimate BatchNorm statistics on this many "
                        "training batches")
    c.add_argument("--subset-train", type=int)
    c.add_argument("--subset-test", type=int)
    c.add_argument("--min-weights", type=int, default=1024,
                   help="layers with fewer weights stay dense (default 1024)")
    c.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="method option, e.g. --option per_channel=false (repeatable)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--strict", action="store_true",
                   help="fail instead of warning when less than half of the weights (or an "
                        "unsupported layer of over 1%% of them) cannot be compressed")
    c.add_argument("--checkpoint-dir", help="fine-tuning checkpoints (one per epoch)")
    c.add_argument("--resume", action="store_true", help="resume fine-tuning from "
                                                          "--checkpoint-dir")
    c.add_argument("-o", "--output", required=True, help="the .nsk file to write")

    e = sub.add_parser("eval", help="accuracy and size of a .nsk file",
                       description="Load a .nsk file of a zoo model and measure its test "
                                   "accuracy and size.")
    e.add_argument("file")
    e.add_argument("--data", default="fashion-mnist")
    e.add_argument("--subset-test", type=int)
    e.add_argument("--batch-size", type=int, default=256)

    i = sub.add_parser("inspect", help="the per-layer report of a .nsk file",
                       description="Print the per-layer report stored in a .nsk file and "
                                   "how its bytes split into data and header.")
    i.add_argument("file")
    i.add_argument("--json", action="store_true", help="print the raw manifest")

    sub.add_parser("methods", help="list compression methods and zoo models")

    d = sub.add_parser("demo", help="compare the methods on ResNet-20 / Fashion-MNIST",
                       description="Load (or train once, cached) a ResNet-20 on Fashion-MNIST, "
                                   "compress it with every method to one common file-size "
                                   "target, post-training and with the same short "
                                   "distillation, save, reload and evaluate each .nsk file, "
                                   "and print one table.")
    d.add_argument("--methods", help="comma-separated methods (default: all registered, "
                                     "kmeans first)")
    d.add_argument("--target", default=None,
                   help="the common target: a ratio 'x8' (default), a size '100KB' or "
                        "bits '3bit'")
    d.add_argument("--epochs", type=int, default=1,
                   help="fine-tuning epochs per method (0: post-training only)")
    d.add_argument("--subset-train", type=int, default=10000,
                   help="training images used for fine-tuning (default 10000, a short run)")
    d.add_argument("--subset-test", type=int, help="test images (default: all 10,000)")
    d.add_argument("--no-post-training", action="store_true",
                   help="skip the post-training measurement (one compression per method)")
    d.add_argument("--out-dir", default="runs/demo", help="where the .nsk files go")
    _add_sweep_parser(sub)
    return p


def _add_sweep_parser(sub: Any) -> None:
    """`netshrink sweep`: every method at every target, a table, a Pareto plot, a report."""
    s = sub.add_parser(
        "sweep", help="every method at every target: table, Pareto plot, HTML report",
        description="Compress one model with every method at every target, save, reload and "
                    "measure each .nsk file (accuracy with labels, else top-1 agreement with "
                    "the original), and write results.csv/.json, pareto.png/.svg and "
                    "report.html to --out-dir. A re-run skips finished cells.")
    s.add_argument("--model", required=True, help="zoo model name (its cached baseline, "
                                                  "trained first if missing)")
    s.add_argument("--data", default="fashion-mnist")
    s.add_argument("--methods", default="all", help="'all' or comma-separated methods")
    s.add_argument("--targets", default="x4,x8,x16",
                   help="comma-separated targets: ratios 'x8', sizes '100KB', bits '3bit'")
    s.add_argument("--metric", default="auto", choices=["auto", "accuracy", "agreement"],
                   help="auto: accuracy when the data has labels, else agreement")
    s.add_argument("--epochs", type=int, default=0, help="fine-tuning epochs (0: none)")
    s.add_argument("--lr", type=float, help="fine-tuning learning rate (default 1e-3, Adam)")
    s.add_argument("--batch-size", type=int, default=128)
    s.add_argument("--subset-train", type=int, help="calibration / fine-tuning examples")
    s.add_argument("--subset-test", type=int, help="evaluation examples")
    s.add_argument("--min-weights", type=int, default=1024,
                   help="layers with fewer weights stay dense (default 1024)")
    s.add_argument("--option", action="append", default=[], metavar="[METHOD.]KEY=VALUE",
                   help="method option for every swept method that has it, or for one "
                        "method with METHOD.KEY (repeatable)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out-dir", help="default: runs/sweep/<model>-<data>")
    s.add_argument("--force", action="store_true",
                   help="discard a sweep of another configuration in --out-dir")


def _load_source(args: argparse.Namespace) -> Any:
    from netshrink_lab import zoo

    if args.checkpoint:
        if not args.arch:
            raise ConfigError("--checkpoint needs --arch (a zoo architecture name)")
        from safetensors.torch import load_file

        model = zoo.create(args.arch)
        model.load_state_dict(load_file(args.checkpoint))
        return model.eval()
    model, meta = zoo.load_or_train_baseline(args.model, args.data)
    logger.info("baseline %s: test accuracy %s", args.model, meta.get("test_accuracy"))
    return model.eval()


def cmd_compress(args: argparse.Namespace) -> None:
    from netshrink_lab.data import get_loaders

    from . import api, fileformat
    from .report import report
    from .train import Finetune, evaluate, init_distributed, is_main_process

    init_distributed()
    model = _load_source(args)
    train, test = get_loaders(args.data, batch_size=args.batch_size,
                              subset_train=args.subset_train, subset_test=args.subset_test,
                              seed=args.seed)
    finetune = None
    if args.epochs > 0:
        finetune = Finetune(epochs=args.epochs, lr=args.lr, checkpoint_dir=args.checkpoint_dir,
                            resume=args.resume, seed=args.seed,
                            bn_recalibration_batches=args.bn_recalibration)
    options = dict(_parse_option(o) for o in args.option)
    small = api.compress(model, args.method, args.target, data=train, finetune=finetune,
                         min_weights=args.min_weights, seed=args.seed, strict=args.strict,
                         **options)
    if not is_main_process():
        return
    size = fileformat.save(small, args.output)
    print(report(small))
    print(f"baseline accuracy {evaluate(model, test):.4f}, compressed {evaluate(small, test):.4f}; "
          f"wrote {args.output} ({size} bytes)")


def cmd_eval(args: argparse.Namespace) -> None:
    from torch.utils.data import DataLoader

    import netshrink_lab.zoo  # noqa: F401  (registers the zoo architectures files name)
    from netshrink_lab.data import get_dataset

    from . import fileformat
    from .report import report
    from .train import evaluate

    model = fileformat.load(args.file)
    test = DataLoader(get_dataset(args.data, "test", subset=args.subset_test),
                      batch_size=args.batch_size)
    rep = report(model)
    size = Path(args.file).stat().st_size
    print(f"{args.file}: accuracy {evaluate(model, test):.4f} on {len(test.dataset)} test "
          f"images; file {size} bytes (x{rep.baseline_bytes / size:.2f} vs fp32 "
          f"{rep.baseline_bytes:.0f} B)")


def cmd_inspect(args: argparse.Namespace) -> None:
    from .fileformat import inspect_file
    from .report import report_from_manifest

    info = inspect_file(args.file)
    if args.json:
        print(json.dumps(info["manifest"], indent=1, sort_keys=True))
        return
    rep = report_from_manifest(info["manifest"], info["header_bytes"])
    print(rep)


def cmd_methods(_: argparse.Namespace) -> None:
    from netshrink_lab import zoo

    from .methods import get_method, methods

    for name in methods():
        method = get_method(name)
        print(f"{name:10s} {method.summary}")
        defaults = method.make_config()
        options = ", ".join(f"{f.name}={getattr(defaults, f.name)!r}"
                            for f in dataclasses.fields(defaults))
        print(textwrap.fill(f"options: {options}", width=100, initial_indent=" " * 11,
                            subsequent_indent=" " * 13))
    print("zoo models: " + ", ".join(zoo.names()))


def cmd_train_baseline(args: argparse.Namespace) -> None:
    from netshrink_lab import zoo

    from .train import init_distributed, is_main_process

    init_distributed()
    _, meta = zoo.train_baseline(args.model, args.data, epochs=args.epochs, lr=args.lr,
                                 batch_size=args.batch_size, subset_train=args.subset_train,
                                 subset_test=args.subset_test, seed=args.seed,
                                 checkpoint_dir=args.checkpoint_dir, resume=args.resume)
    if not is_main_process():
        return
    print(f"{args.model} on {args.data}: test accuracy {float(meta['test_accuracy']):.4f} "
          f"after {args.epochs} epochs in {float(meta['train_seconds']):.0f} s; cached at "
          f"{zoo.baseline_path(args.model, args.data)}")


def cmd_demo(args: argparse.Namespace) -> None:
    from netshrink_lab.demo import DEFAULT_TARGET, run_demo

    from .methods import get_method

    names = [m.strip() for m in (args.methods or "").split(",") if m.strip()] or None
    for name in names or []:
        get_method(name)  # an unknown name fails here, before anything runs
    run_demo(names, args.target or DEFAULT_TARGET, epochs=args.epochs,
             subset_train=args.subset_train, subset_test=args.subset_test,
             out_dir=Path(args.out_dir), post_training=not args.no_post_training)


def _sweep_plan(args: argparse.Namespace) -> tuple[list[str], list[str], dict[str, dict]]:
    """Methods, targets and per-method options of `netshrink sweep`, all checked (an error
    is a ConfigError: one line, exit 2) before any model or data is loaded."""
    from .methods import get_method, methods
    from .size import parse_target

    if args.methods.strip() == "all":
        names = sorted(methods(), key=lambda m: (m != "kmeans", m))  # the baseline first
    else:
        names = list(dict.fromkeys(m.strip() for m in args.methods.split(",") if m.strip()))
    targets = list(dict.fromkeys(t.strip() for t in args.targets.split(",") if t.strip()))
    if not names or not targets:
        raise ConfigError("--methods and --targets need at least one entry each")
    known = {m: {f.name for f in dataclasses.fields(get_method(m).config_cls)} for m in names}
    for t in targets:
        parse_target(t)
    options: dict[str, dict[str, Any]] = {m: {} for m in names}
    for text in args.option:
        key, value = _parse_option(text)
        method, _, name = key.rpartition(".")
        if method and method not in names:
            raise ConfigError(f"--option {text}: {method!r} is not among the swept methods "
                              f"({', '.join(names)})")
        takers = [m for m in ([method] if method else names) if name in known[m]]
        if not takers:
            raise ConfigError(f"--option {text}: no swept method has an option {name!r} "
                              "(`netshrink methods` lists them)")
        for m in takers:
            options[m][name] = value
    for m in names:
        get_method(m).make_config(**options[m])  # values of the wrong kind fail here
    if args.epochs < 0:
        raise ConfigError("--epochs must be >= 0")
    return names, targets, options


def _resolve(args: argparse.Namespace) -> tuple[Any, Any, Any, str]:
    """The seam between `netshrink sweep` and model/data loading: (model, train loader,
    evaluation loader, metric name). For now a zoo model (its cached baseline, trained
    first if missing) on a `netshrink_lab.data` data set, measured by accuracy."""
    from netshrink_lab import zoo
    from netshrink_lab.data import get_loaders

    if args.model not in zoo.names():
        raise ConfigError(f"unknown zoo model {args.model!r}; known: {', '.join(zoo.names())}")
    model, meta = zoo.load_or_train_baseline(args.model, args.data)
    logger.info("baseline %s: test accuracy %s", args.model, meta.get("test_accuracy"))
    train, test = get_loaders(args.data, batch_size=args.batch_size,
                              subset_train=args.subset_train, subset_test=args.subset_test,
                              seed=args.seed)
    return model.eval(), train, test, "accuracy"


def cmd_sweep(args: argparse.Namespace) -> None:
    from .sweep import run_sweep
    from .train import Finetune

    names, targets, options = _sweep_plan(args)
    finetune = None
    if args.epochs > 0:
        finetune = Finetune(epochs=args.epochs, lr=args.lr, seed=args.seed)
    model, train, test, metric = _resolve(args)
    out_dir = Path(args.out_dir or Path("runs/sweep") / f"{args.model}-{args.data}".replace(
        ":", "_").replace("/", "_"))
    describe = {"model": args.model, "data": args.data, "subset_train": args.subset_train,
                "subset_test": args.subset_test, "seed": args.seed,
                "batch_size": args.batch_size}
    result = run_sweep(model, names, targets, train_data=train, eval_data=test,
                       out_dir=out_dir, metric=args.metric if args.metric != "auto" else metric,
                       finetune=finetune, options=options, describe=describe,
                       compress_kwargs={"min_weights": args.min_weights, "seed": args.seed},
                       force=args.force)
    print(f"\n{args.model} on {args.data}: {result.metric} of each reloaded .nsk file; "
          f"{'post-training' if finetune is None else f'{args.epochs} epoch(s) fine-tuning'}"
          "; seconds: compress and save\n")
    print(result.table())
    print("\nwrote " + ", ".join(str(p) for p in result.files.values()))


COMMANDS = {"compress": cmd_compress, "eval": cmd_eval, "inspect": cmd_inspect,
            "methods": cmd_methods, "train-baseline": cmd_train_baseline, "demo": cmd_demo,
            "sweep": cmd_sweep}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    start = time.perf_counter()
    try:
        COMMANDS[args.command](args)
    except NetshrinkError as e:
        print(f"netshrink: error: {e}", file=sys.stderr)
        return 2
    logger.debug("done in %.1f s", time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
