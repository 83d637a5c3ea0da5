"""Models from a spec string, for the command line and for anyone who has a name, not an
instance: ``load_model("torchvision:resnet18", weights="r18.safetensors")``.

Specs: a registered architecture name (the zoo's, after ``import netshrink_lab.zoo``),
``torchvision:NAME`` (torchvision.models.get_model, never with downloaded weights),
``timm:NAME`` (pretrained=False), ``hf:DIR`` (a local HuggingFace directory; the class named
by config.json's "architectures"; nothing is downloaded) and ``path/to/file.py:FACTORY`` (a
function returning the nn.Module). ``weights``: safetensors or a torch state dict (read with
weights_only=True), checked against the model's keys and shapes first.

Each family is registered with `netshrink.arch.register_family`, so the model records its
spec and arguments (``netshrink_arch``), `save` writes them, and `load` rebuilds
torchvision:, timm: and hf: models from the file alone. file.py: models are never rebuilt
from a file (that would run code a file names); `load` says which ``--model`` to pass.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import inspect
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .arch import ARCH_ATTR, arch_entry, arch_of, create_arch, register_family, registered_archs
from .compat import prepare_torchvision
from .errors import ConfigError

__all__ = ["HFLogits", "MODEL_SPECS", "load_model", "load_weights", "model_preprocessing"]

MODEL_SPECS = ("a registered name (zoo: resnet20, ...), torchvision:NAME, timm:NAME, "
               "hf:DIR or path/to/file.py:FACTORY")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_FILE_SPEC = re.compile(r"(?P<path>.+\.py):(?P<factory>[A-Za-z_]\w*)")


def _import(module: str, spec: str, pip: str) -> Any:
    """Import torchvision / timm / transformers for ``spec``; one clear line when missing."""
    prepare_torchvision()
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ConfigError(f"--model {spec} needs {module} ({e}); install it with: "
                          f"pip install {pip}") from None
    except RuntimeError as e:
        if "torchvision::" in str(e):
            raise ConfigError(f"{module} does not import on this torch build ({e}); call "
                              "netshrink.compat.torchvision_shim() before anything imports "
                              "torchvision") from None
        raise


def _close(name: str, known: list[str]) -> str:
    near = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    return f" (did you mean {', '.join(near)}?)" if near else ""


# --------------------------------------------------------------------------- the families


def _torchvision(name: str, **kwargs: Any) -> nn.Module:
    tv = _import("torchvision", f"torchvision:{name}", "torchvision")
    known = tv.models.list_models()
    if name not in known:
        raise ConfigError(f"unknown torchvision model {name!r}{_close(name, known)}")
    try:
        return tv.models.get_model(name, weights=None, **kwargs)
    except TypeError as e:
        raise ConfigError(f"bad --model-arg for torchvision:{name}: {e}") from None


def _timm(name: str, **kwargs: Any) -> nn.Module:
    timm = _import("timm", f"timm:{name}", "timm")
    known = timm.list_models()
    if name not in known:
        raise ConfigError(f"unknown timm model {name!r}{_close(name, known)}")
    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except TypeError as e:
        raise ConfigError(f"bad --model-arg for timm:{name}: {e}") from None


class HFLogits(nn.Module):
    """A transformers model whose ``forward(x)`` returns one tensor: ``logits`` where the
    model has a head, else ``last_hidden_state``. Integer inputs are ``input_ids``, float
    inputs ``pixel_values``. ``causal_lm`` says whether the logits predict the next token."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.causal_lm = type(model).__name__.endswith(("ForCausalLM", "LMHeadModel"))
        config = getattr(model, "config", None)
        if config is not None and hasattr(config, "use_cache"):
            config.use_cache = False  # one tensor out, no key/value cache

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=x) if x.is_floating_point() else self.model(input_ids=x)
        logits = getattr(out, "logits", None)
        return logits if logits is not None else out.last_hidden_state


def _hf_config(folder: str, kwargs: dict[str, Any]) -> tuple[Any, Any]:
    """(transformers, config) of a local HuggingFace directory; nothing is downloaded."""
    path = Path(folder)
    if not (path / "config.json").is_file():
        raise ConfigError(f"hf:{folder} is not a local HuggingFace model directory (no "
                          f"config.json there; nothing is downloaded): pass --model hf:DIR")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    transformers = _import("transformers", f"hf:{folder}", "transformers")
    config = transformers.AutoConfig.from_pretrained(str(path), **kwargs)
    return transformers, config


def _hf_class(transformers: Any, config: Any) -> Any:
    """The class config.json's "architectures" names, else AutoModel (no remote code)."""
    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if isinstance(cls, type) and issubclass(cls, nn.Module):
            return cls
    return transformers.AutoModel


def _hf(folder: str, **kwargs: Any) -> nn.Module:
    """The architecture only (random weights): what `load` fills from a .nsk file."""
    transformers, config = _hf_config(folder, kwargs)
    cls = _hf_class(transformers, config)
    build = getattr(cls, "from_config", None) or cls._from_config
    return HFLogits(build(config))


def _hf_pretrained(folder: str, kwargs: dict[str, Any]) -> nn.Module:
    transformers, config = _hf_config(folder, kwargs)
    cls = _hf_class(transformers, config)
    try:
        model = cls.from_pretrained(folder, config=config, dtype=torch.float32)
    except OSError as e:
        raise ConfigError(f"hf:{folder}: cannot load the weights: {e}") from None
    return HFLogits(model)


def _file(spec: str, **kwargs: Any) -> nn.Module:
    """Run FACTORY(**kwargs) of path/to/file.py (the user's code, imported by path)."""
    match = _FILE_SPEC.fullmatch(spec)
    if match is None:
        raise ConfigError(f"a model file spec is path/to/file.py:FACTORY, got {spec!r}")
    path = Path(match["path"])
    if not path.is_file():
        raise ConfigError(f"--model {spec}: {path} does not exist")
    name = "netshrink_user_" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    module = sys.modules.get(name)
    if module is None:
        loader_spec = importlib.util.spec_from_file_location(name, path)
        if loader_spec is None or loader_spec.loader is None:
            raise ConfigError(f"--model {spec}: cannot import {path}")
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[name] = module
        try:
            loader_spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    factory = getattr(module, match["factory"], None)
    if not callable(factory):
        found = sorted(n for n, v in vars(module).items()
                       if inspect.isfunction(v) and not n.startswith("_"))
        raise ConfigError(f"{path} has no function {match['factory']!r} "
                          f"(functions there: {', '.join(found) or 'none'})")
    try:
        inspect.signature(factory).bind(**kwargs)
    except TypeError as e:
        raise ConfigError(f"bad --model-arg for {spec}: {e}") from None
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{spec} returned a {type(model).__name__}, not an nn.Module")
    return model


register_family("torchvision", _torchvision, module=__name__)
register_family("timm", _timm, module=__name__)
register_family("hf", _hf, module=__name__)
register_family("file", _file, module=__name__, rebuild=False)


# --------------------------------------------------------------------------- load_model


def _split(spec: str) -> tuple[str | None, str]:
    """(family or None for a registered name, the rest) of a model spec."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"--model needs a spec: {MODEL_SPECS}")
    spec = spec.strip()
    prefix, sep, rest = spec.partition(":")
    if sep and prefix in ("torchvision", "timm", "hf", "file"):
        if not rest:
            raise ConfigError(f"--model {spec}: the name after '{prefix}:' is missing")
        return prefix, rest
    if _FILE_SPEC.fullmatch(spec):
        return "file", spec
    if spec.endswith(".py") or ".py:" in spec:
        raise ConfigError(f"--model {spec}: a model file spec is path/to/file.py:FACTORY")
    if sep:
        raise ConfigError(f"unknown model family {prefix!r} in --model {spec}; "
                          f"use {MODEL_SPECS}")
    return None, spec


def load_model(spec: str, weights: str | os.PathLike[str] | None = None,
               model_args: dict[str, Any] | None = None) -> nn.Module:
    """Build the model ``spec`` names (see the module docstring) with ``model_args`` as
    keyword arguments (for hf:, config overrides), load ``weights`` if given, and return
    it in eval mode. The model records ``{"name", "kwargs"}`` so a saved file rebuilds it.
    Unknown families or names, bad arguments and weights that do not fit raise ConfigError
    (one line)."""
    args = dict(model_args or {})
    try:
        json.dumps(args)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"--model-arg values must be JSON values: {e}") from None
    family, rest = _split(spec)
    if family is None:
        if arch_entry(rest) is None:
            raise ConfigError(f"unknown model {rest!r}{_close(rest, registered_archs())}; "
                              f"use {MODEL_SPECS} (registered: "
                              f"{', '.join(registered_archs()) or 'none'})")
        model = create_arch(rest, **args)
    elif family == "hf":
        model = _hf_pretrained(rest, args)
        setattr(model, ARCH_ATTR, {"name": f"hf:{rest}", "kwargs": args})
    elif family == "file":
        model = _file(rest, **args)
        setattr(model, ARCH_ATTR, {"name": f"file:{rest}", "kwargs": args})
    else:
        model = create_arch(f"{family}:{rest}", **args)
    if weights is not None:
        load_weights(model, weights, spec)
    return model.eval()


# --------------------------------------------------------------------------- weights


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors and torch.load raise many types for bad files
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ConfigError(f"cannot read weights {path}: {type(e).__name__}: {first[:200]} "
                          f"(expected safetensors or a torch state dict)") from None
    if isinstance(state, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            inner = state.get(key)
            if isinstance(inner, dict) and inner and all(
                    isinstance(v, torch.Tensor) for v in inner.values()):
                state = inner
                break
    if not isinstance(state, dict) or not state or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ConfigError(f"weights {path} are not a state dict of tensors")
    if all(k.startswith("module.") for k in state):  # saved from DistributedDataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_weights(model: nn.Module, weights: str | os.PathLike[str], spec: str = "") -> None:
    """Load a safetensors file or torch state dict into ``model`` (strict), after checking
    keys and shapes: a mismatch raises one ConfigError line with the counts and two
    examples, never a page of keys. For an `HFLogits`, keys may omit its "model." prefix."""
    path = Path(weights)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise ConfigError(f"weights file {weights} {what}")
    state = _read_state(path)
    target = model
    if isinstance(model, HFLogits) and not any(k.startswith("model.") for k in state):
        target = model.model
    expected = target.state_dict()
    shared = {}
    for k, v in expected.items():  # tied weights (an lm_head sharing the embedding)
        shared.setdefault((v.data_ptr(), tuple(v.shape)), []).append(k)
    missing = [k for k in expected if k not in state and not any(
        o in state for o in shared[(expected[k].data_ptr(), tuple(expected[k].shape))])]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {list(state[k].shape)} vs {list(expected[k].shape)}"
             for k in state if k in expected and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        parts = [f"{len(items)} {what} (e.g. {', '.join(items[:2])})"
                 for items, what in ((missing, "missing keys"),
                                     (unexpected, "unexpected keys"),
                                     (wrong, "shape mismatches")) if items]
        name = spec or type(model).__name__
        raise ConfigError(f"weights {weights} do not fit {name}: {'; '.join(parts)}: "
                          f"weights of another architecture or other --model-arg?")
    target.load_state_dict(state, strict=False)


# --------------------------------------------------------------------------- preprocessing


def model_preprocessing(model: nn.Module | None) -> dict[str, Any]:
    """What is known of the input ``model`` expects: any of "image_size", "mean", "std",
    "crop_pct", "channels" and "source" (where it came from). timm models carry their
    pretrained_cfg; torchvision models use ImageNet's; hf: image models their
    preprocessor_config.json; zoo models their image_size / in_channels arguments."""
    if model is None:
        return {}
    out: dict[str, Any] = {}
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first is not None:
        out["channels"] = first.in_channels
    record = arch_of(model) or {}
    name = str(record.get("name", ""))
    kwargs = record.get("kwargs") or {}
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and cfg.get("input_size"):
        out.update(image_size=int(cfg["input_size"][-1]), mean=tuple(cfg["mean"]),
                   std=tuple(cfg["std"]), crop_pct=float(cfg.get("crop_pct", 0.875)),
                   source=f"timm's pretrained_cfg of {name or type(model).__name__}")
    elif name.startswith("torchvision:"):
        out.update(image_size=299 if "inception" in name else 224, mean=IMAGENET_MEAN,
                   std=IMAGENET_STD, crop_pct=0.875, source="torchvision's ImageNet defaults")
    elif name.startswith("hf:"):
        out.update(_hf_preprocessing(Path(name[3:])))
    elif isinstance(kwargs.get("image_size"), int):
        out.update(image_size=kwargs["image_size"], crop_pct=1.0,
                   source=f"the image_size of {name}")
    return out


def _hf_preprocessing(folder: Path) -> dict[str, Any]:
    try:
        cfg = json.loads((folder / "preprocessor_config.json").read_text())
    except (OSError, ValueError):
        return {}
    out: dict[str, Any] = {"source": f"{folder}/preprocessor_config.json"}
    size = cfg.get("crop_size") or cfg.get("size")
    if isinstance(size, dict):
        size = size.get("height") or size.get("shortest_edge")
    if isinstance(size, int):
        out["image_size"] = size
    for key in ("mean", "std"):
        value = cfg.get(f"image_{key}")
        if isinstance(value, list) and value:
            out[key] = tuple(float(v) for v in value)
    return out
