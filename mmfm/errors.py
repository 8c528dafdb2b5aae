"""Errors a user can cause. Each names the file / key / model at fault and what to do about it.

The CLI turns any `MmfmError` into one line on stderr and exit code 2.
"""


class MmfmError(Exception):
    """Base class of every user-facing mmfm error."""


class ConfigError(MmfmError, KeyError):
    """A config file, key or value is wrong."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class DataError(MmfmError):
    """A data file is missing, corrupt, or too many samples are bad."""


class ModelError(MmfmError):
    """An unknown model name, or weights that do not fit the architecture."""


class ZooError(MmfmError):
    """A model-zoo download, verification or manifest problem."""


class InputError(MmfmError, ValueError):
    """Bad input handed to the inference API (non-image bytes, empty question, ...)."""
