"""User-facing errors: the CLI prints their message and exits non-zero, without a traceback."""


class MetaclError(Exception):
    """A problem the user can fix (bad config, bad file, bad argument)."""


class ConfigError(MetaclError):
    """A config key, value or override is invalid."""


class DataError(MetaclError):
    """A dataset file or folder is missing or malformed."""


class RunInterrupted(MetaclError):
    """The run was stopped by a signal after writing a checkpoint; `--resume` continues it."""


class RunDiverged(MetaclError):
    """The loss became NaN or infinite; the run stopped there (its last checkpoint is finite)."""
