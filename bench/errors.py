"""The errors mergebench reports to its user: one base class, so the command line catches them by type.

Every error a user can cause and fix (a bad name, value, file, manifest, dataset, suite or results folder)
derives from :class:`MergebenchError` and says what to do; ``mergebench`` prints its message without a
traceback and exits with 2. Anything else is a bug and keeps its traceback. Each class also derives from
the standard exception it refines (``ValueError``, ``KeyError``, ``FileNotFoundError``, ``OSError``), so
code that catches those keeps working.
"""

from __future__ import annotations


class MergebenchError(Exception):
    """Base of the errors that name what is wrong and how to fix it (printed without a traceback)."""


class InputError(MergebenchError, ValueError):
    """A value given on the command line, in a file or to the API is not acceptable."""


class NotFoundError(MergebenchError, KeyError):
    """A name (suite, task, split, dataset card, expert) that does not exist."""

    def __str__(self):  # KeyError quotes its message; show it plainly
        return str(self.args[0]) if self.args else ""


class MissingFileError(MergebenchError, FileNotFoundError):
    """A file or folder the command needs is not there (not built, not downloaded, mistyped)."""


class UnsafeNameError(InputError):
    """A name that would become a file or folder name is not a plain path component."""


class DiskFullError(MergebenchError, OSError):
    """A file could not be written: its filesystem is full (or the user's quota is spent)."""


def disk_full_message(path, error: BaseException | None = None) -> str:
    """What to do when writing ``path`` found its filesystem full: free space there, or move the cache."""
    where = f"writing {path}" if path else "writing a file"
    return (f"no space left on the device {where}{f' ({error.strerror})' if getattr(error, 'strerror', None) else ''}:"
            f" free space there, or point MERGEBENCH_CACHE (the cache) or --results (the records) at a folder on a "
            f"filesystem with room")
