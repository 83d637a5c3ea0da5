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
  netshrink compress --model torchvision:resnet18 --weights r18.safetensors \
      --data imagefolder:photos/ --method kmeans --target x8 -o r18.nsk
  netshrink eval r20.nsk --data fashion-mnist
  netshrink eval r18.nsk --data imagefolder:photos/ --model torchvision:resnet18 \
      --weights r18.safetensors
  netshrink inspect r20.nsk
  netshrink demo
  netshrink demo --methods kmeans,pqf --target x16 --epochs 2
"""


def _parse_option(text: str, flag: str = "--option") -> tuple[str, Any]:
    """'key=value' with value parsed as JSON where possible (8 -> int, false -> bool)."""
    if "=" not in text:
        raise ConfigError(f"{flag} takes key=value, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def _floats(text: str | None, flag: str) -> tuple[float, ...] | None:
    """'0.5,0.5,0.5' -> (0.5, 0.5, 0.5)."""
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"{flag} takes comma-separated numbers, got {text!r}") from None


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", metavar="FILE",
                   help="weights for --model: safetensors or a torch state dict")
    p.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="keyword argument of the model's constructor (hf: a config "
                        "override), e.g. --model-arg num_classes=10 (repeatable)")


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="fashion-mnist",
                   help="fashion-mnist, imagefolder:DIR (class sub-folders or a flat "
                        "folder), text:FILE_OR_DIR (hf: language models) or npz:FILE "
                        "(arrays x, optional y)")
    p.add_argument("--image-size", type=int, help="image input size (default: the model's)")
    p.add_argument("--mean", help="image normalisation mean, e.g. 0.485,0.456,0.406 "
                                  "(default: the model's, else ImageNet's)")
    p.add_argument("--std", help="image normalisation std (default: the model's, else "
                                 "ImageNet's)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per text block")
    p.add_argument("--eval-fraction", type=float, default=0.2,
                   help="share of the files / documents / rows held out for evaluation "
                        "(not for fashion-mnist, which has its own test split)")


def _add_calibration_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calibrate", choices=["auto", "on", "off"], default="auto",
                   help="input-aware re-encoding of palette layers on the calibration split "
                        "(auto: when the method supports it and no fine-tuning is asked)")
    p.add_argument("--calibration-samples", type=int, metavar="N",
                   help="calibration samples (default 128)")
    p.add_argument("--reconstruct", type=int, default=0, metavar="STEPS",
                   help="block-wise reconstruction (BRECQ, soft codes) on the calibration "
                        "samples after compressing, STEPS Adam steps per block, for every "
                        "method (default 0: off)")


def _calibrate(args: argparse.Namespace, method: str) -> Any:
    """--calibrate / --calibration-samples as compress's `calibrate=` for `method`
    (checked here, before any work). With --calibration-samples, "auto" keeps its rule:
    only methods that calibrate, only without fine-tuning."""
    from .calibrate import Calibrate
    from .methods import get_method
    from .reconstruct import Reconstruct

    samples, steps = args.calibration_samples, args.reconstruct
    if steps < 0:
        raise ConfigError(f"--reconstruct takes steps per block >= 0, got {steps}")
    if args.calibrate == "off":
        if samples is not None or steps:
            flag = "--calibration-samples" if samples is not None else "--reconstruct"
            raise ConfigError(f"{flag} goes with --calibrate auto or on")
        return False
    if steps:  # reconstruction runs for every method, after fine-tuning if any
        return Calibrate(samples=Calibrate.samples if samples is None else samples,
                         reconstruct=Reconstruct(steps=steps, codes="soft"))
    if samples is None:
        return True if args.calibrate == "on" else "auto"
    config = Calibrate(samples=samples)
    if args.calibrate == "auto" and (not get_method(method).calibrates or args.epochs > 0):
        return False
    return config


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
                       description="Compress a model (a zoo name, torchvision:NAME, "
                                   "timm:NAME, hf:DIR or file.py:FACTORY, with --weights), "
                                   "optionally fine-tune with distillation on --data, "
                                   "report, measure and save.")
    src = c.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", metavar="SPEC",
                     help="a zoo name (without --weights: its cached Fashion-MNIST baseline, "
                          "trained first if missing), torchvision:NAME, timm:NAME, hf:DIR "
                          "or path/to/file.py:FACTORY")
    src.add_argument("--checkpoint", help="deprecated: use --model ARCH --weights FILE")
    c.add_argument("--arch", help="deprecated: the zoo architecture of --checkpoint")
    _add_model_args(c)
    c.add_argument("--method", default="kmeans")
    c.add_argument("--target", default="4bit", help="'1.5MB', '800KB', 'x20' or '3bit'")
    _add_data_args(c)
    _add_calibration_args(c)
    c.add_argument("--epochs", type=int, default=0, help="fine-tuning epochs (0: none)")
    c.add_argument("--lr", type=float, help="fine-tuning learning rate (default 1e-3, Adam)")
    c.add_argument("--batch-size", type=int, default=128)
    c.add_argument("--bn-recalibration", type=int, default=0, metavar="BATCHES",
                   help="after fine-tuning, re-estimate BatchNorm statistics on this many "
                        "training batches")
    c.add_argument("--subset-train", type=int, help="use this many calibration/training items")
    c.add_argument("--subset-test", type=int, help="measure on this many evaluation items")
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

    e = sub.add_parser("eval", help="accuracy (or agreement, perplexity) and size of a .nsk "
                                    "file",
                       description="Load a .nsk file and measure it on the evaluation split "
                                   "of --data: accuracy on labelled data, perplexity on text, "
                                   "else top-1 agreement with the original model (--model "
                                   "SPEC --weights FILE). Files of zoo, torchvision:, timm: "
                                   "and hf: models rebuild themselves; file.py: models need "
                                   "--model.")
    e.add_argument("file")
    e.add_argument("--model", metavar="SPEC",
                   help="the model's spec, when the file cannot rebuild it (file.py:) or "
                        "to measure agreement with the original (with --weights)")
    _add_model_args(e)
    _add_data_args(e)
    e.add_argument("--subset-test", type=int)
    e.add_argument("--batch-size", type=int, default=256)
    e.add_argument("--seed", type=int, default=0, help="seed of the evaluation split")

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
    s.add_argument("--model", required=True, metavar="SPEC",
                   help="zoo name (its cached baseline), torchvision:NAME, timm:NAME, hf:DIR "
                        "or path/file.py:factory")
    _add_model_args(s)
    _add_data_args(s)
    _add_calibration_args(s)
    s.add_argument("--methods", default="all", help="'all' or comma-separated methods")
    s.add_argument("--targets", default="x4,x8,x16",
                   help="comma-separated targets: ratios 'x8', sizes '100KB', bits '3bit'")
    s.add_argument("--metric", default="auto",
                   choices=["auto", "accuracy", "agreement", "perplexity"],
                   help="auto: accuracy when the data has labels, perplexity on text, else "
                        "agreement with the original")
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


def _model_spec(args: argparse.Namespace) -> tuple[str, str | None]:
    """(--model SPEC, --weights FILE); the deprecated --checkpoint/--arch map onto them."""
    if getattr(args, "checkpoint", None):
        if not args.arch:
            raise ConfigError("--checkpoint needs --arch (deprecated: use --model ARCH "
                              "--weights FILE)")
        if args.weights:
            raise ConfigError("--checkpoint and --weights name the same thing: use --weights")
        logger.warning("--checkpoint/--arch are deprecated: use --model %s --weights %s",
                       args.arch, args.checkpoint)
        return args.arch, args.checkpoint
    if getattr(args, "arch", None):
        raise ConfigError("--arch goes with --checkpoint (deprecated); with --model, "
                          "--model names the architecture")
    return args.model, args.weights


def _model_args(args: argparse.Namespace) -> dict[str, Any]:
    return dict(_parse_option(o, "--model-arg") for o in args.model_arg)


def _load_model(args: argparse.Namespace, spec: str, weights: str | None) -> Any:
    """The model to compress: a zoo name without weights is its cached baseline (trained
    first if missing, only on fashion-mnist); anything else `load_model`."""
    from netshrink_lab import zoo

    from .sources import load_model

    model_args = _model_args(args)
    if spec in zoo.MODELS and weights is None and not model_args:
        data = args.data.strip().lower().replace("_", "-")
        if data != "fashion-mnist":
            raise ConfigError(f"zoo model {spec!r} without --weights means its cached "
                              f"Fashion-MNIST baseline; for --data {args.data} pass --weights")
        model, meta = zoo.load_or_train_baseline(spec, data)
        logger.info("baseline %s: test accuracy %s", spec, meta.get("test_accuracy"))
        return model.eval()
    model = load_model(spec, weights, model_args)
    if weights is None and spec.startswith(("torchvision:", "timm:")):
        logger.warning("no --weights: %s has random weights (nothing is downloaded)", spec)
    return model


def _check_data(spec: str) -> None:
    import netshrink_lab.data  # noqa: F401  (registers fashion-mnist)

    from .datasources import check_data_spec

    check_data_spec(spec)


def _load_data(args: argparse.Namespace, model: Any, subset_train: int | None = None) -> Any:
    import netshrink_lab.data  # noqa: F401  (registers fashion-mnist)

    from .datasources import load_data

    data = load_data(args.data, model=model, image_size=args.image_size,
                     mean=_floats(args.mean, "--mean"), std=_floats(args.std, "--std"),
                     seq_len=args.seq_len, batch_size=args.batch_size,
                     eval_fraction=args.eval_fraction, seed=args.seed,
                     subset_train=subset_train, subset_eval=args.subset_test)
    logger.info("data %s", data.describe())
    return data


def _score_text(model: Any, data: Any, reference: Any) -> str:
    from .datasources import score

    try:
        return str(score(model, data, reference))
    except ConfigError as e:
        return f"no score ({e})"


def cmd_compress(args: argparse.Namespace) -> None:
    from . import api, fileformat
    from .methods import get_method
    from .report import report
    from .size import parse_target
    from .train import Finetune, init_distributed, is_main_process

    # everything typed is checked before any model is loaded, trained or data read
    options = dict(_parse_option(o) for o in args.option)
    get_method(args.method).make_config(**options)
    parse_target(args.target)
    calibrate = _calibrate(args, args.method)
    _floats(args.mean, "--mean")
    _floats(args.std, "--std")
    _model_args(args)
    finetune = None
    if args.epochs > 0:
        finetune = Finetune(epochs=args.epochs, lr=args.lr, checkpoint_dir=args.checkpoint_dir,
                            resume=args.resume, seed=args.seed,
                            bn_recalibration_batches=args.bn_recalibration)
    spec, weights = _model_spec(args)
    _check_data(args.data)
    if weights is not None and not Path(weights).is_file():
        raise ConfigError(f"weights file {weights} "
                          f"{'is a directory' if Path(weights).is_dir() else 'does not exist'}")
    init_distributed()
    model = _load_model(args, spec, weights)
    data = _load_data(args, model, args.subset_train)
    small = api.compress(model, args.method, args.target, data=data.train, finetune=finetune,
                         min_weights=args.min_weights, seed=args.seed, strict=args.strict,
                         calibrate=calibrate, **options)
    if not is_main_process():
        return
    size = fileformat.save(small, args.output)
    print(report(small))
    if data.labelled or data.kind == "text":
        scores = (f"baseline {_score_text(model, data, model)}, compressed "
                  f"{_score_text(small, data, model)}")
    else:  # unlabelled: the original agrees with itself by definition
        scores = f"compressed {_score_text(small, data, model)} with the original"
    print(f"{data.describe()}\n{scores}; wrote {args.output} ({size} bytes)")


def cmd_eval(args: argparse.Namespace) -> None:
    import netshrink_lab.zoo  # noqa: F401  (registers the zoo architectures files name)

    from . import fileformat
    from .datasources import score
    from .report import report
    from .sources import load_model

    _check_data(args.data)
    like = reference = None
    if args.model:
        like = load_model(args.model, model_args=_model_args(args))
        if args.weights:
            reference = load_model(args.model, args.weights, _model_args(args))
    elif args.weights or args.model_arg:
        raise ConfigError("--weights and --model-arg go with --model SPEC")
    model = fileformat.load(args.file, like)
    data = _load_data(args, model)
    result = score(model, data, reference)
    rep = report(model)
    size = Path(args.file).stat().st_size
    print(f"{args.file}: {result} on {data.n_eval} evaluation items of {data.spec}; file "
          f"{size} bytes (x{rep.baseline_bytes / size:.2f} vs fp32 "
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
    """(model, calibration / fine-tuning loader, evaluation loader, metric) of `netshrink
    sweep`, from --model/--weights/--data exactly as `compress` reads them: accuracy on
    labelled data, perplexity on text, else top-1 agreement with the original model."""
    spec, weights = args.model, args.weights
    if weights is not None and not Path(weights).is_file():
        raise ConfigError(f"weights file {weights} "
                          f"{'is a directory' if Path(weights).is_dir() else 'does not exist'}")
    model = _load_model(args, spec, weights)
    data = _load_data(args, model, args.subset_train)
    metric = ("accuracy" if data.labelled else
              "perplexity" if data.kind == "text" else "agreement")
    return model, data.train, data.eval, metric


def cmd_sweep(args: argparse.Namespace) -> None:
    from .sweep import run_sweep
    from .train import Finetune

    names, targets, options = _sweep_plan(args)
    calibration = {m: _calibrate(args, m) for m in names}  # "auto" decides per method
    _floats(args.mean, "--mean")
    _floats(args.std, "--std")
    _model_args(args)
    _check_data(args.data)
    finetune = None
    if args.epochs > 0:
        finetune = Finetune(epochs=args.epochs, lr=args.lr, seed=args.seed)
    model, train, test, metric = _resolve(args)
    out_dir = Path(args.out_dir or Path("runs/sweep") / f"{args.model}-{args.data}".replace(
        ":", "_").replace("/", "_"))
    describe = {"model": args.model, "weights": args.weights, "model_args": args.model_arg,
                "data": args.data, "image_size": args.image_size, "mean": args.mean,
                "std": args.std, "seq_len": args.seq_len, "eval_fraction": args.eval_fraction,
                "subset_train": args.subset_train, "subset_test": args.subset_test,
                "seed": args.seed, "batch_size": args.batch_size}
    result = run_sweep(model, names, targets, train_data=train, eval_data=test,
                       out_dir=out_dir, metric=args.metric if args.metric != "auto" else metric,
                       finetune=finetune, options=options, describe=describe,
                       calibrate=calibration,
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
