"""One exception hierarchy for everything denseforge raises on purpose.

Each message says what went wrong and what the user can do about it; the CLI prints it without a
traceback and exits non-zero.
"""


def shorten(value: object, limit: int = 60) -> str:
    """`repr(value)` cut to `limit` characters, for messages that quote what a user gave."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 15]}… ({len(text)} chars)"


class DenseforgeError(Exception):
    """Base class of every error denseforge raises deliberately; the CLI exits with `exit_code`."""

    exit_code = 2


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


class SetupError(DenseforgeError):
    """A stage or expert cannot start (its model does not load, its server does not answer, the
    cluster cannot hold its workers); found before anything is downloaded."""


class RunFailedError(DenseforgeError):
    """The run started but cannot finish as asked; `status` shows it as failed with this reason."""

    exit_code = 1


class StageFailedError(RunFailedError):
    """A stage failed on more items than its `max_error_rate` allows (or on all of them)."""

    def __init__(self, stage: str, message: str):
        super().__init__(message)
        self.stage = stage


class FailedUnitsError(RunFailedError):
    """The run finished, but some units never downloaded (their rows are reject rows)."""

    exit_code = 3


class StorageError(DenseforgeError):
    """A store cannot be used: a missing bucket, wrong credentials, no filesystem for the URL, an
    `--out` that holds another run; the message names the URL and the cause."""


class Interrupted(KeyboardInterrupt):
    """SIGTERM (a cancelled or preempted cluster job) or SIGINT: the driver stops cleanly and the
    run is left `interrupted` and resumable."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.exit_code = 128 + signum


class NodeLostError(RunFailedError):
    """A Ray node was lost and the run made no progress for `ray.node_loss_timeout_s` after it."""
