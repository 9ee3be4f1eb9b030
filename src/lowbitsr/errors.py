"""Exceptions raised by lowbitsr.

Every error a user can trigger with bad input is a subclass of :class:`LowbitsrError` whose
message names the offending file/key and says what to do. The CLI prints these as one line.
"""

from __future__ import annotations


class LowbitsrError(Exception):
    """Base class of all user-facing lowbitsr errors."""


class ImageError(LowbitsrError):
    """An image file is missing, unreadable, corrupt, of an unsupported mode or too large."""


class DatasetError(LowbitsrError):
    """A dataset folder is missing, empty, or laid out unexpectedly."""


class CheckpointError(LowbitsrError):
    """A checkpoint is missing, unsafe, corrupt, or does not match the model architecture."""


class ConfigError(LowbitsrError):
    """A config file has an unknown key, a wrong type or an invalid value."""
