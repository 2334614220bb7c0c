"""Reading regular files inside a root directory without following links (checkpoint readers, expert actors).

Every failure that is the file's fault (a link, FIFO, socket, device or directory where a file is
expected; a name that points outside) is a CheckpointError naming the root and the file.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from pathlib import Path
from typing import Any, BinaryIO

from moe_router.errors import CheckpointError

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")


def check_rel(root: Path, rel: Any) -> list[str]:
    """The components of a file name inside `root`, refusing absolute names, '..' and odd characters."""
    if not isinstance(rel, str) or not rel or rel.startswith("/"):
        raise CheckpointError(f"checkpoint {root}: file name {rel!r} in the manifest points outside the checkpoint")
    parts = rel.split("/")
    if ".." in parts:
        raise CheckpointError(f"checkpoint {root}: file name {rel!r} in the manifest points outside the checkpoint")
    if not all(_NAME.fullmatch(p) for p in parts):
        raise CheckpointError(
            f"checkpoint {root}: file name {rel!r} in the manifest is not a plain relative name "
            f"(letters, digits, '.', '_', '-', separated by '/')"
        )
    return parts


def kind(mode: int) -> str:
    """What a stat mode is, in words ('symbolic link', 'FIFO (named pipe)', 'regular file', ...)."""
    for test, name in (
        (stat.S_ISREG, "regular file"),
        (stat.S_ISLNK, "symbolic link"),
        (stat.S_ISFIFO, "FIFO (named pipe)"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISDIR, "directory"),
    ):
        if test(mode):
            return name
    return "special file"


def open_inside(root: Path, rel: str) -> BinaryIO:
    """Open the regular file `rel` of `root` for reading, following no symbolic link.

    Each directory on the way is opened relative to the last with O_NOFOLLOW, the file is checked
    with lstat before it is opened (O_NOFOLLOW | O_NONBLOCK, so a FIFO can never block) and with
    fstat after: a link, FIFO, socket, device or directory is a CheckpointError naming the file.
    A regular file atomically replaced by another between the two (a writer saving) is read as the new one.
    Only `root` itself, the path the caller gave, may be a link. FileNotFoundError when missing.
    """
    parts = check_rel(root, rel)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        for i, name in enumerate(parts):
            st = os.lstat(name, dir_fd=fd)
            last = i == len(parts) - 1
            if not (stat.S_ISREG(st.st_mode) if last else stat.S_ISDIR(st.st_mode)):
                sub = "/".join(parts[: i + 1])
                expected = "a regular file" if last else "a directory"
                raise CheckpointError(
                    f"checkpoint {root}: {sub} is a {kind(st.st_mode)}, not {expected}; "
                    f"only regular files inside the checkpoint are read"
                )
            flags = (os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC) | (0 if last else os.O_DIRECTORY)
            nfd = os.open(name, flags, dir_fd=fd)
            os.close(fd)
            fd = nfd
        after = os.fstat(fd)
        # A file replaced between lstat and open (a writer's atomic os.replace of CURRENT does that) is
        # fine as long as what was opened is a regular file: O_NOFOLLOW kept it from being a link, and
        # the content is checked against its sha256 by the caller.
        if not stat.S_ISREG(after.st_mode):
            raise CheckpointError(
                f"checkpoint {root}: {rel} was replaced by a {kind(after.st_mode)} while it was "
                "being opened; only regular files inside the checkpoint are read"
            )
        f = os.fdopen(fd, "rb")
        fd = -1
        return f
    finally:
        if fd >= 0:
            os.close(fd)


def lstat_inside(root: Path, rel: str) -> os.stat_result | None:
    """lstat of `rel` inside `root` (directories on the way not followed); None when it does not exist."""
    parts = check_rel(root, rel)
    try:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            for name in parts[:-1]:
                st = os.lstat(name, dir_fd=fd)
                if not stat.S_ISDIR(st.st_mode):
                    return None
                nfd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
                os.close(fd)
                fd = nfd
            return os.lstat(parts[-1], dir_fd=fd)
        finally:
            os.close(fd)
    except (FileNotFoundError, NotADirectoryError):
        return None


def read_inside(root: Path, rel: str, limit: int | None = None) -> bytes:
    """All bytes of the regular file `rel` (open_inside), refusing one larger than `limit` bytes."""
    with open_inside(root, rel) as f:
        size = os.fstat(f.fileno()).st_size
        if limit is not None and size > limit:
            raise CheckpointError(f"checkpoint {root}: {rel} is {size} bytes; at most {limit} are expected")
        return f.read()


def sha256_file(path: Path) -> str:
    """sha256 of a file this process wrote or is about to link (save side; reads go through open_inside)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()
