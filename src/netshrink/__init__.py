"""netshrink: compress trained PyTorch networks and get a file that really is that small.

    small = netshrink.compress(model, method="kmeans", target="4bit",
                               data=train_loader, finetune=netshrink.Finetune(epochs=1))
    netshrink.save(small, "model.nsk")
    again = netshrink.load("model.nsk", model_like)
    print(netshrink.report(small))
"""

from .api import compress, sqnr_db
from .errors import (
    ConfigError,
    DataError,
    FormatError,
    IncompleteCompressionError,
    InfeasibleTargetError,
    NetshrinkError,
    NonFiniteError,
)
from .fileformat import inspect_file, load, save
from .kmeans import kmeans
from .layers import CompressedLayer, PalettizedLayer
from .methods import Method, get_method, methods, register_method
from .reconstruct import Reconstruct, reconstruct
from .report import Report, report
from .size import Target, model_bits, parse_target
from .synthetic import synthesize_inputs
from .train import Finetune, StepHook, agreement, evaluate, fidelity, fit

__version__ = "0.1.0"

__all__ = [
    "CompressedLayer", "ConfigError", "DataError", "Finetune", "FormatError",
    "IncompleteCompressionError", "InfeasibleTargetError", "Method", "NetshrinkError",
    "NonFiniteError", "PalettizedLayer", "Reconstruct", "Report", "StepHook", "Target",
    "agreement", "compress", "evaluate", "fidelity", "fit", "get_method", "inspect_file",
    "kmeans", "load", "methods", "model_bits", "parse_target", "reconstruct",
    "register_method", "report", "save", "sqnr_db", "synthesize_inputs",
]
