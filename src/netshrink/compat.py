"""Compatibility with the packages around torch that netshrink's users and tests combine.

`torchvision_shim()`: PyPI's torchvision (pinned in constraints.txt) lacks two operator
schemas on this CPU build of torch (its compiled `_C` extension does not load), so
importing torchvision, timm or transformers fails with "operator torchvision::nms does not
exist". The shim defines them.

`install_import_hook()` (called at `import netshrink`, which does not import torchvision)
puts a one-shot finder on `sys.meta_path`: when torchvision is first imported, by the user
or by timm / transformers, it checks whether torchvision's `_C` extension loads and applies
the shim only when it does not. Where `_C` loads (a matching torchvision build), nothing is
defined, so torchvision registers its own operators as usual.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from pathlib import Path
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


def _extension_loads(package_dir: Path) -> bool:
    """Whether torchvision's compiled operators (`_C`) load here; torchvision itself loads
    the same library the same way when it is imported, so loading it first changes nothing."""
    for lib in sorted(package_dir.glob("_C.*")):
        if lib.suffix in (".so", ".pyd", ".dylib"):
            try:
                torch.ops.load_library(str(lib))
                return True
            except (OSError, RuntimeError):
                return False
    return False


def prepare_torchvision() -> None:
    """Before torchvision is first imported: apply `torchvision_shim()` when its compiled
    operators do not load (this CPU build), and do nothing where they do. Called by the
    import hook and by `netshrink.load_model`; a no-op once torchvision is imported."""
    if _SHIM or "torchvision" in sys.modules:
        return
    spec = importlib.machinery.PathFinder.find_spec("torchvision")
    if spec is not None and spec.origin and not _extension_loads(Path(spec.origin).parent):
        torchvision_shim()


class _TorchvisionFinder(importlib.abc.MetaPathFinder):
    """Applies `torchvision_shim()` before the first import of torchvision when its
    compiled operators do not load, then steps aside (returns None: the normal finders
    import the package) and removes itself."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> None:
        if fullname != "torchvision":
            return None
        _remove_hook()
        prepare_torchvision()
        return None


def _remove_hook() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _TorchvisionFinder)]


def install_import_hook() -> None:
    """Make `import torchvision` (and timm / transformers, which import it) work after
    `import netshrink` with no extra call; a no-op when torchvision is already imported."""
    if "torchvision" in sys.modules or any(isinstance(f, _TorchvisionFinder)
                                           for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _TorchvisionFinder())
