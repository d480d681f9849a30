"""The one exception type that user-facing code raises for bad input.

The CLI turns a :class:`GpedError` into a single clear line on stderr and a non-zero exit;
anything else is a bug and keeps its traceback.
"""


class GpedError(Exception):
    """Bad input from a user: config, command line, data files, checkpoints."""


class ConfigError(GpedError):
    """A config value that cannot be used."""


class DataError(GpedError):
    """A data set that cannot be found, read or trusted."""
