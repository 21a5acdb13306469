"""User-facing errors: one line that names the file, key or value at fault.

The CLI prints a `DvosError` as `dvos: error: <message>` and exits with status 2 instead of a
traceback, so every check on user input should raise one of these (or a subclass).
"""


class DvosError(Exception):
    """An error caused by user input (a file, a config key, a value), reported in one line."""


class ConfigError(DvosError):
    """A config key that does not exist, a value of the wrong type, a missing group file."""


class DataError(DvosError):
    """A dataset, video, image or mask that cannot be used as it is."""
