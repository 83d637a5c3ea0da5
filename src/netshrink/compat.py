"""Compatibility with the packages around torch that netshrink's users and tests combine.

`torchvision_shim()`: PyPI's torchvision (pinned in constraints.txt) lacks two operator
schemas on this CPU build of torch, so importing torchvision, timm or transformers fails.
Calling the shim first defines them. It is never called at `import netshrink`.
"""

from __future__ import annotations

from typing import Any

import torch

_SHIM: list[Any] = []


def torchvision_shim() -> None:
    """Define torchvision's nms/qnms operator schemas once, so that torchvision, timm and
    transformers import on this CPU build of torch (harmless where they already exist)."""
    if _SHIM:
        return
    try:
        lib = torch.library.Library("torchvision", "DEF")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _SHIM.append(lib)  # keep the registration alive
    except RuntimeError:
        _SHIM.append(None)  # already defined by a working torchvision
