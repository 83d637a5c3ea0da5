"""netshrink: compress trained PyTorch networks and get a file that really is that small.

    small = netshrink.compress(model, method="kmeans", target="4bit",
                               data=train_loader, finetune=netshrink.Finetune(epochs=1))
    netshrink.save(small, "model.nsk")
    again = netshrink.load("model.nsk", model_like)
    print(netshrink.report(small))
"""

from .api import compress, sqnr_db
from .calibrate import Calibrate, calibration_inputs
from .compat import install_import_hook
from .datasources import DataSource, Score, load_data, register_dataset, score
from .errors import (
    ConfigError,
    DataError,
    FormatError,
    IncompleteCompressionError,
    InfeasibleTargetError,
    NetshrinkError,
    NonFiniteError,
    SweepConfigError,
)
from .fileformat import inspect_file, load, save
from .kmeans import kmeans
from .layers import CompressedLayer, PalettizedLayer
from .methods import Method, get_method, methods, register_method
from .reconstruct import Reconstruct, reconstruct
from .report import Report, report
from .size import Target, model_bits, parse_target
from .sources import load_model
from .sweep import SweepResult, run_sweep
from .synthetic import synthesize_inputs
from .train import Finetune, StepHook, agreement, evaluate, fidelity, fit, perplexity

install_import_hook()  # torchvision, timm and transformers import after `import netshrink`

__version__ = "0.1.0"

__all__ = [
    "Calibrate", "CompressedLayer", "ConfigError", "DataError", "DataSource", "Finetune",
    "FormatError", "IncompleteCompressionError", "InfeasibleTargetError", "Method",
    "NetshrinkError", "NonFiniteError", "PalettizedLayer", "Reconstruct", "Report", "Score",
    "StepHook", "SweepConfigError", "SweepResult", "Target", "agreement",
    "calibration_inputs", "compress", "evaluate", "fidelity", "fit", "get_method",
    "inspect_file", "kmeans", "load", "load_data", "load_model", "methods", "model_bits",
    "parse_target", "perplexity", "reconstruct", "register_dataset", "register_method",
    "report", "run_sweep", "save", "score", "sqnr_db", "synthesize_inputs",
]
