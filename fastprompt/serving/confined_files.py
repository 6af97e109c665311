"""Files opened only inside one directory: the security boundary of serving adapters from a directory.

A client names an adapter; the server opens that adapter's files under ``DIR``. Nothing a client sends,
and nothing placed in ``DIR`` (links, FIFOs, huge files), may make it read anything else:

- each path is resolved (symlinks followed) and must lie inside ``DIR`` (else :class:`OutsideDirectory`),
  then opened component by component from ``DIR`` with ``O_NOFOLLOW``, so what is opened is what was
  checked (a link swapped in meanwhile fails to open);
- only regular files are opened (never a FIFO or a device) and read whole, at most ``MAX_FILE_BYTES``.

:class:`ConfinedDir` opens, :func:`read_whole` reads. The store that uses them (names, loading, reloads,
the LRU bound) is :mod:`fastprompt.serving.adapter_dir`.
"""

from __future__ import annotations

import os
import stat

from ..prompted_embeds.adapter_files import AdapterFileError

MAX_FILE_BYTES = 256 * 1024 * 1024


class OutsideDirectory(Exception):
    """A path that resolves outside the directory."""


class ConfinedDir:
    """File access confined to one directory (its real path, taken once)."""

    def __init__(self, path):
        self.real = os.path.realpath(os.fspath(path))
        if not os.path.isdir(self.real):
            raise ValueError(
                f"the adapter directory {os.fspath(path)!r} does not exist (or is not a directory)"
            )

    def _parts(self, relative: str) -> list[str]:
        """The components of ``relative``'s real path below the root, or ``OutsideDirectory``."""
        real = os.path.realpath(os.path.join(self.real, relative))
        if not real.startswith(self.real + os.sep):
            raise OutsideDirectory(relative)
        return real[len(self.real) + 1 :].split(os.sep)

    def open(self, relative: str) -> int | None:
        """A read-only descriptor of the regular file ``relative`` (None: no such regular file);
        ``OutsideDirectory`` if its real path leaves the root. Opened from the root, one component at a time,
        none of them followed as a link: what is opened is the checked path."""
        parts = self._parts(relative)
        fd = os.open(self.real, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for part in parts[:-1]:
                flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
                fd, parent = os.open(part, flags, dir_fd=fd), fd
                os.close(parent)
            try:
                if not stat.S_ISREG(os.stat(parts[-1], dir_fd=fd, follow_symlinks=False).st_mode):
                    return None  # never open a FIFO or a device
            except FileNotFoundError:
                return None
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
            fd, parent = os.open(parts[-1], flags, dir_fd=fd), fd
            os.close(parent)
        except (FileNotFoundError, NotADirectoryError):
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            return None
        return fd


def read_whole(fd: int, name: str, file: str, size: int) -> bytes:
    """The whole regular file ``fd`` (of ``size`` bytes at its stat; at most one byte more is read, so a file
    that grew shows as changed), or ``AdapterFileError`` where ``size`` exceeds ``MAX_FILE_BYTES``.
    ``name`` / ``file`` name it in the message (never a server path)."""
    if size > MAX_FILE_BYTES:
        raise AdapterFileError(
            f"{name}/{file} is {size} bytes, more than the {MAX_FILE_BYTES // 2**20} MiB a served "
            "adapter file may have"
        )
    chunks, total = [], 0
    while total <= size:
        chunk = os.read(fd, size + 1 - total)
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)
