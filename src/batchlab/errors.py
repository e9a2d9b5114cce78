"""Domain errors. The CLI turns each into one line on stderr and exit code 2."""

from __future__ import annotations


class BatchlabError(Exception):
    """Base class of every error batchlab raises for bad input or an impossible request.

    Messages follow one shape: what was expected, what was given, and how to fix it.
    """


class ConfigError(BatchlabError, ValueError):
    """A setting is out of range or malformed (batch size, learning rate, target, size...)."""


class TaskError(BatchlabError):
    """A task could not be loaded, or it breaks the Task contract."""


class MemoryBudgetError(BatchlabError):
    """Nothing fits in the memory budget."""


class DeviceError(BatchlabError):
    """The requested device is not available."""


class NoiseEstimateError(BatchlabError):
    """The gradient noise scale cannot be measured as asked (for example a non-finite gradient)."""


class SweepError(BatchlabError):
    """A sweep directory cannot be used as asked (a different spec, an unreadable store...)."""
