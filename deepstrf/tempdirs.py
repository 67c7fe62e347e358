"""Temporary directories that belong to one process, and are removed when it has ended.

A process removes its own at exit. One that never runs its exit handlers (killed,
or a notebook kernel stopped by its front end) leaves them behind: the name
carries the host, the process-id namespace and the process id, so that the next
process to make one of the same kind removes those of ended processes that share
its host and namespace (never those of another container sharing the folder).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile

from .forksafe import process_alive


OWNER_PATTERN = r"(?P<owner>[^~]+~\d+)~(?P<pid>\d+)"  # what names built with owner() and a pid hold


def owner() -> str:
    """Host and process-id namespace of this process, as put into the names of folders a process
    owns (here, and a local write's staging folders): containers that share a folder and a host
    name but not their process ids must not take each other's pids for their own."""
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:  # not Linux
        namespace = 0
    return f"{socket.gethostname()}~{namespace}"


def ended(found: re.Match) -> bool:
    """Whether a name matched by :data:`OWNER_PATTERN` belongs to a process of this host and
    namespace that has ended."""
    return found["owner"] == owner() and not process_alive(int(found["pid"]))


def _name(kind: str, pid: int) -> str:
    return f"deepstrf-{kind}-{owner()}~{pid}"


def process_dir(kind: str, pid: int | None = None) -> str:
    """The fixed path of process ``pid``'s (default: this one's) directory of ``kind``; not made."""
    return os.path.join(tempfile.gettempdir(), _name(kind, os.getpid() if pid is None else pid))


def new_process_dir(kind: str) -> str:
    """A new directory of ``kind`` for this process (one of several it may have)."""
    remove_ended(kind)
    return tempfile.mkdtemp(prefix=_name(kind, os.getpid()) + "~")


def remove_ended(kind: str) -> None:
    """Remove the directories of ``kind`` that ended processes of this host and process-id namespace left."""
    pattern = re.compile(rf"deepstrf-{re.escape(kind)}-{OWNER_PATTERN}(~[^~]*)?")
    try:
        entries = list(os.scandir(tempfile.gettempdir()))
    except OSError:
        return
    for entry in entries:
        found = pattern.fullmatch(entry.name)
        if found and ended(found):
            shutil.rmtree(entry.path, ignore_errors=True)
