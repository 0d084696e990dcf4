"""Error types shared by the library and the CLI.

Every error a user can cause (bad path, bad value, bad config, unreadable data, mismatched
checkpoint, missing offline weights) is a :class:`GenAdError`; the CLI prints its message on one
line and exits with status 2.
"""

from __future__ import annotations


class GenAdError(Exception):
    """Base class for user-facing errors (the CLI prints them without a traceback)."""


class ConfigError(GenAdError, ValueError):
    """A config key is unknown, has the wrong type, or holds an impossible value."""


class DataError(GenAdError):
    """Input data is missing, empty, unreadable or of the wrong shape."""


class CheckpointError(GenAdError):
    """A checkpoint or run folder is missing, corrupt, or does not match the config."""


class WeightsNotFoundError(GenAdError):
    """Pretrained weights could not be found offline; the message says where to put them."""


class TrainingDivergedError(GenAdError):
    """A loss became NaN or infinite; the message names the loss and the step."""


class DiskFullError(GenAdError, OSError):
    """The disk (or quota) filled up while writing; the message names the file."""


class FolderLockedError(GenAdError):
    """Another live gen-ad process is writing the same folder; the message names it."""
