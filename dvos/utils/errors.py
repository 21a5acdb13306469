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


class Stopped(BaseException):
    """The job stopped on request before its end (a signal, the time budget). Not an error in the
    input, so not a `DvosError`; a `BaseException`, so that no `except Exception` on the way (around
    a damaged video, say) takes it for a failure of its own. The CLI exits with `exit_status`."""

    exit_status = 1


class Interrupted(Stopped):
    """SIGTERM or SIGINT: exit status 128 + the signal's number (143, 130), as a shell reports it."""

    def __init__(self, signum: int, detail: str = "") -> None:
        import signal

        super().__init__(f"stopped by {signal.Signals(signum).name}" + (f" {detail}" if detail else ""))
        self.signum = int(signum)
        self.exit_status = 128 + int(signum)


class TimeBudgetSpent(Stopped):
    """`trainer.max_time` ended training before its last step: exit status 75 (EX_TEMPFAIL of
    sysexits.h, "try again later"), which a job script can requeue on."""

    exit_status = 75
