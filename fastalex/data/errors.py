"""The errors fastalex.data raises: all are DataError, and also the built-in error they resemble,
so `except FileNotFoundError` or `except ValueError` work as well as `except DataError`."""

__all__ = ["DataError", "DatasetNotFoundError", "NotAFolderError"]


class DataError(Exception):
    """Base of every fastalex.data error: the message says what is wrong and, where it can, how to fix it."""


class DatasetNotFoundError(DataError, FileNotFoundError):
    """The data is not where it was looked for (the message names every place tried), or a folder is empty."""


class NotAFolderError(DataError, NotADirectoryError):
    """A path that should be a folder is a file."""
