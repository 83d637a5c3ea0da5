"""Typed exceptions raised by netshrink, so callers can tell bad input from bugs."""

from __future__ import annotations


class NetshrinkError(Exception):
    """Base class of every error netshrink raises on purpose."""


class ConfigError(NetshrinkError, ValueError):
    """A configuration, target or argument is invalid (raised when it is built)."""


class InfeasibleTargetError(ConfigError):
    """The requested size cannot be met; the message states the feasible range.

    feasible: the tightest target of the same kind the method can meet ("33516B", "x1.9",
    "2.125bit"), where the method knows it; None otherwise."""

    def __init__(self, message: str, feasible: str | None = None) -> None:
        super().__init__(message)
        self.feasible = feasible


class SweepConfigError(ConfigError):
    """A sweep's out_dir holds cells of another configuration (`run_sweep(force=True)` or
    `netshrink sweep --force` discards them)."""


class FormatError(NetshrinkError):
    """A .nsk file is truncated, corrupted, hand-edited or of an unknown version."""


class DataError(NetshrinkError):
    """A data set is missing or malformed (the message says how to install it)."""


class IncompleteCompressionError(ConfigError):
    """`compress(..., strict=True)` found too little of the model compressible."""


class NonFiniteError(NetshrinkError, ValueError):
    """A weight is NaN or infinite (in the input model, or after encoding)."""
