"""Exception types of deepstrf.

Each one subclasses the built-in exception users already catch, so code
written against deepSTRF (which raises ``AssertionError``) keeps working.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class IncompatibleDatasetsError(AssertionError, ValueError):
    """Two datasets cannot be concatenated (different dt, F or frame size).

    Both an ``AssertionError`` (what deepSTRF raises) and a ``ValueError``;
    raised explicitly, so it survives ``python -O``.
    """


class InvalidArgumentError(AssertionError, ValueError):
    """An argument out of its range where deepSTRF asserts it (e.g. a non-positive smoothing
    window): an ``AssertionError`` as there, and a ``ValueError``; raised explicitly."""


class StoreError(OSError):
    """A store cannot be read or written as asked."""


class StoreExistsError(StoreError, FileExistsError):
    """The destination already holds a store and ``overwrite`` is False."""


class StoreNotFoundError(StoreError, FileNotFoundError):
    """No deepstrf store at the given URL."""


class VersionNotFoundError(StoreNotFoundError):
    """The store holds no version of that fingerprint, prefix or tag (or a pool's pinned version was
    pruned); ``versions`` lists those it holds, ``versioned`` says whether it has versions at all."""

    def __init__(self, message: str, versions: list | tuple = (), versioned: bool = True) -> None:
        super().__init__(message)
        self.versions, self.versioned = list(versions), versioned


class SourceUnreadableError(StoreError):
    """A store (opened on its own, or a pool's source) refused or failed the reads that open it
    (credentials, endpoint, network): the message names its URL (and the source) and the options
    to check."""


class IncompleteStoreError(StoreNotFoundError):
    """The URL holds the remains of an interrupted write, not a complete store."""


class ReadOnlyStoreError(StoreError, PermissionError):
    """The URL's protocol (e.g. ``http(s)://``) can only be read."""


class FormatVersionError(StoreError, ValueError):
    """The store was written in a format version this reader does not know."""


class IntegrityError(StoreError, ValueError):
    """Stored bytes are corrupt, truncated or inconsistent with the index."""


class SourceChangedError(IntegrityError):
    """A pool references a source whose fingerprint changed after pooling."""


class UntrustedReferenceError(StoreError, PermissionError):
    """A pool references a location outside its own root and the allowed roots."""


class StreamStalledError(StoreError, TimeoutError):
    """DataLoader workers stopped delivering batches (stuck or dead); the message names each
    worker, what it was reading and for how long."""


class NWBImportError(ValueError):
    """An NWB file cannot be imported as asked: a table, column or series is missing, or its layout is
    not supported. The message names what is missing and the argument that selects another one."""


class NWBReadError(OSError):
    """An NWB file cannot be opened or read (missing, not HDF5/NWB, unreachable)."""


class ClusterError(OSError):
    """The Dask cluster asked for (``--dask``) cannot be started or reached, or dask is not installed."""


class UsageError(ValueError):
    """A command's arguments do not fit together, found once they are parsed (``deepstrf concat``
    given no source, or not one ``--name`` per source): the CLI prints the command's usage and the
    message, and exits 2 as for any other wrong command line."""


def error_types() -> tuple[type[Exception], ...]:
    """Every exception type of this module (what the CLI reports as a message, without a traceback)."""
    return tuple(e for e in globals().values() if isinstance(e, type) and issubclass(e, Exception))


class UnsafeMainError(RuntimeError):
    """No start method can run DataLoader workers for this ``__main__`` here (a script that runs its
    work at top level, on a platform without a safe fork; or a start method given explicitly that
    would run it again in every worker). The message names the fix."""


def environment_errors() -> tuple[type[BaseException], ...]:
    """Errors raised by the file system, the network or an object store's client (botocore is
    imported only when an error is being matched)."""
    try:
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:
        return (OSError,)
    return OSError, BotoCoreError, ClientError


def command_line_words(message: str) -> str:
    """A library error's message in the words of a command that takes ``--overwrite``: the
    advice ``overwrite=True`` becomes ``--overwrite``."""
    return message.replace("overwrite=True", "--overwrite")


def unreadable(url: str, error: BaseException) -> str:
    """What to say about a store at ``url`` whose reads failed with an environment ``error``."""
    return (f"{url} could not be read ({type(error).__name__}: {error}); check the storage options that apply "
            "to it (its credentials and endpoint: -S/-L/--options on the command line, "
            "storage_options={prefix: {...}} in Python) and that the store is there")


@contextlib.contextmanager
def reading_store(url: str) -> Iterator[None]:
    """Errors of the file system, network or client while reading the store at ``url`` become a
    :class:`SourceUnreadableError` naming it (:func:`unreadable`); a :class:`StoreError` passes."""
    try:
        yield
    except StoreError:
        raise
    except environment_errors() as e:
        raise SourceUnreadableError(unreadable(url, e)) from e
