"""Errors geod raises for bad input: each message names the file, row or field at fault."""


class GeodError(Exception):
    """Base of every error caused by the user's input or data (the CLI prints it without a traceback)."""


class ManifestError(GeodError):
    """A pair manifest is malformed (bad column, bad row)."""


class InputReadError(GeodError):
    """A source file (image, depth, disparity) is missing, unreadable or of the wrong shape."""


class FormatError(GeodError):
    """A target dataset does not follow the targets format."""


class TeacherError(GeodError):
    """A teacher cannot be built or cannot handle its input."""


class StudentError(GeodError):
    """A student cannot be built from the given name, path or checkpoint."""


class ConfigError(GeodError):
    """A configuration value is out of range or inconsistent."""
