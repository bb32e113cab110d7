"""Errors a user can act on. The CLI prints each as one line and exits with status 2."""


class MgdmError(Exception):
    """Base class: a problem with the user's input, configuration or files, not a bug."""

    exit_code = 2


class ConfigError(MgdmError):
    """A parameter is unknown, mistyped or out of range (the message names the key)."""


class DataError(MgdmError):
    """An input data set or image file is missing, malformed or inconsistent (names the file)."""


class CheckpointError(MgdmError):
    """A checkpoint is missing, unreadable, unsafe or of another architecture."""


class NumericalError(MgdmError):
    """Training produced a non-finite loss; the last good checkpoint was kept."""
