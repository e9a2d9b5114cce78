"""Domain errors. The CLI turns each into one line on stderr and exit code 2.

Messages name the library's *parameters*, never the CLI's flags: write a parameter name in
backticks (`` `memory_budget` ``) and pass the one at fault as `param=`. The CLI rewrites
every backticked name that is an option of the command being run into its flag
(`--memory-budget`); a Python caller reads the parameter name as written.

    raise ConfigError(
        "expected one of `memory_budget` or `target_memory`, got both; drop one",
        param="target_memory",
    )
"""

from __future__ import annotations


class BatchlabError(Exception):
    """Base class of every error batchlab raises for bad input or an impossible request.

    Messages follow one shape: what was expected, what was given, and how to fix it.
    `param` is the name of the parameter at fault, when one is (`"memory_budget"`), for
    callers that want to point at it; the message itself names it in backticks.
    """

    def __init__(self, *args: object, param: str | None = None) -> None:
        super().__init__(*args)
        self.param = param


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


class OutputError(BatchlabError):
    """An output path cannot be written (a directory where a file goes, a path under a file...)."""


class TaskCodeError(TaskError):
    """The user's own task code broke the Task contract while batchlab ran it.

    Raised for what the code *returned* (a model factory that returns a string, metrics that
    return a list); an exception the code *raised* keeps its own type, so callers (and the
    OOM handling of the probes) still see it, and the CLI names the function it came from.
    """
