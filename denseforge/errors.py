"""One exception hierarchy for everything denseforge raises on purpose.

Each message says what went wrong and what the user can do about it; the CLI prints it without a
traceback and exits non-zero.
"""


class DenseforgeError(Exception):
    """Base class of every error denseforge raises deliberately."""


class ConfigError(DenseforgeError):
    """The configuration is invalid; the message names the key path."""


class InputError(DenseforgeError):
    """The input (table, folder, shards) cannot be read as configured."""


class RunDirError(DenseforgeError):
    """The run directory is missing, foreign, or in a state that forbids the command."""


class IngestError(DenseforgeError):
    """Ingest could not complete a unit of work after its retries."""


class ModelLoadError(DenseforgeError):
    """A configured model cannot be loaded (wrong name, missing weights, offline hub)."""
