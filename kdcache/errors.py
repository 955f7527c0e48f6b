"""Errors a user can act on. The CLI prints their message, never a traceback."""


class KdcacheError(Exception):
    """Base class: the message names the file or field at fault and what to do."""


class DataError(KdcacheError):
    """A dataset path, split file or image is missing or unreadable."""


class CacheError(KdcacheError):
    """A cache file is missing, incomplete, corrupt or does not fit the run."""


class CheckpointError(KdcacheError):
    """A checkpoint is missing, unreadable or belongs to another architecture."""


class ConfigError(KdcacheError, ValueError):
    """An option value is out of range or does not go with the others; the message names the option."""


class OutputError(KdcacheError):
    """An output file or folder cannot be written (read-only, not a folder, disk full)."""
