"""The project's exceptions: every one names the problem and the fix.

All derive from `UnclipError`, so a caller can catch the whole family; each also derives from the
built-in exception a Python user would expect (`ValueError` for a bad value, `FileNotFoundError` for a
missing file), so generic handlers keep working.
"""


class UnclipError(Exception):
    """Base class of every error unclip_mini raises on purpose."""


class ConfigError(UnclipError, ValueError):
    """An unknown preset, an invalid field value, a parameter of the wrong type."""


class DataError(UnclipError, ValueError):
    """Bad input data: a missing or unreadable image, an empty caption, a wrong image size."""


class CaptionTooLong(DataError):
    """A caption that does not fit the text encoder's context length."""


class CheckpointError(UnclipError, RuntimeError):
    """A missing, torn, corrupt or foreign checkpoint."""


class ArtifactError(UnclipError, RuntimeError):
    """A run-folder artifact that is missing or was made with an incompatible config."""


class TrainingDiverged(UnclipError, FloatingPointError):
    """The loss became NaN or infinite."""


class DeviceError(UnclipError, RuntimeError):
    """A device was requested that this machine does not have."""
