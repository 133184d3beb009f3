"""User-facing errors.

Every error a user can cause (bad arguments, missing files, data that cannot be used, numerics
that cannot be rescued) is raised as a :class:`SlimGPTError`. The CLI prints its message as one
line and exits with code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class SlimGPTError(Exception):
    """Base class: the message is one line that says what went wrong and what to do."""

    exit_code = 2


class ConfigError(SlimGPTError):
    """An option is out of range or inconsistent (ratio, schedule, output folder)."""


class ModelError(SlimGPTError):
    """The model cannot be found, loaded, or is of an unsupported architecture."""


class DataError(SlimGPTError):
    """Calibration or evaluation data is missing, empty, too short or unreadable."""


class NumericalError(SlimGPTError):
    """NaN/inf activations, or a Hessian that will not factor even with heavy damping."""


class DistributedError(SlimGPTError):
    """Another process of a ``torchrun`` run stopped or stopped answering. The checkpoint beside
    ``--out`` is kept: ``--resume`` continues from the last finished layer or search round."""
