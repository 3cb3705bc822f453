"""The on-disk cache of the compiled C kernel, safe to share a machine with other users.

A cached library is executable code: whoever can write it, or its directory, runs code in
every training process that loads it. So, as ssh does with its key files and Python with
bytecode caches in shared directories:

- a cache directory is used only if it belongs to this user and no one else may write it
  (created 0700); otherwise a warning names it and why, and this process compiles into a
  private temporary directory;
- a library (and its .sha256, and the lock file) is used only if it is a regular file, not a
  symlink (opened with O_NOFOLLOW), owned by this user and not group/other-writable, and its
  checksum matches; it is loaded through the very file descriptor that was checked
  (/proc/self/fd/N), so nothing can be swapped in between the check and the load. A library
  that fails a check of owner, mode or type is never loaded: it is rebuilt privately, with a
  warning; one whose checksum does not match (truncated, half-copied: the directory is this
  user's alone) is rebuilt in its place;
- new files are written to private temporary files in the same directory and moved into place
  with os.replace (a reader never sees a partial file); processes starting together (DDP ranks)
  compile once under an exclusive lock (POSIX; without fcntl each compiles for itself).

All of this runs once per process, when the library is first loaded; never on the step's path.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import stat
import tempfile
from pathlib import Path
from typing import Callable

from ..warn import warn_user

NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_warned: set[str] = set()


def default_dir() -> Path:
    root = os.environ.get("SNR_TRITON_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "snr-triton")
    return Path(root)


def _warn(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warn_user(f"SNRAdamW: {message}")


class Stale(OSError):
    """A library of this user's whose checksum does not match: damaged, not planted."""


def _not_ours(st: os.stat_result) -> str | None:
    """Why a file or directory with this status must not be trusted, or None."""
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        return f"it belongs to uid {st.st_uid}, not to this user (uid {os.getuid()})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        who = "group and others" if st.st_mode & stat.S_IWOTH and st.st_mode & stat.S_IWGRP else \
            "others" if st.st_mode & stat.S_IWOTH else "its group"
        return f"it is writable by {who} (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def private_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="snr-triton-"))  # 0700, this user's


def trusted_dir(root: Path) -> Path:
    """`root` if this user alone may write it (created 0700 when missing), else a private directory."""
    try:
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        reason = _not_ours(os.stat(root))
        if reason is None and not os.access(root, os.W_OK):
            reason = "it is not writable"
    except OSError as e:
        reason = f"it is not writable ({e.strerror})"
    if reason is None:
        return root
    private = private_dir()
    _warn(f"the kernel cache {root} is not used: {reason}; compiling into {private} for this process "
          "(set SNR_TRITON_CACHE to a directory of your own, mode 0700)")
    return private


def open_trusted(path: Path) -> int:
    """A read-only descriptor of `path` if it is a regular file of this user's that no one else may
    write, not reached through a symlink; OSError (with the reason) otherwise."""
    fd = os.open(path, os.O_RDONLY | NOFOLLOW)  # ELOOP for a symlink
    try:
        st = os.fstat(fd)
        reason = "it is not a regular file" if not stat.S_ISREG(st.st_mode) else _not_ours(st)
        if reason:
            raise OSError(f"{path}: {reason}")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _read(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    os.lseek(fd, 0, os.SEEK_SET)
    return b"".join(chunks)


def _write_private(directory: Path, name: str, data: bytes | None = None, source: Path | None = None) -> None:
    """`data` (or the file `source`, moved) under `name` in `directory`, through a private
    temporary file there and os.replace: atomic, and never a file anyone else could have written."""
    target = directory / name
    if source is not None:
        os.chmod(source, 0o700)
        os.replace(source, target)
        return
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.")  # 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _checked_load(directory: Path, name: str) -> ctypes.CDLL:
    """Load `name` from `directory` if it and its checksum pass every check; OSError otherwise."""
    fd = open_trusted(directory / name)
    try:
        sum_fd = open_trusted(directory / f"{name}.sha256")
        try:
            expected = _read(sum_fd).decode().strip()
        finally:
            os.close(sum_fd)
        if hashlib.sha256(_read(fd)).hexdigest() != expected:
            raise Stale(f"{directory / name}: its checksum does not match")
        proc_fd = Path(f"/proc/self/fd/{fd}")
        if proc_fd.exists():  # the inode we checked, whatever the name points at now
            return ctypes.CDLL(str(proc_fd))
        lib = ctypes.CDLL(str(directory / name))
        after = os.stat(directory / name)
        st = os.fstat(fd)
        if (after.st_dev, after.st_ino) != (st.st_dev, st.st_ino):
            raise OSError(f"{directory / name}: it was replaced while being loaded")
        return lib
    finally:
        os.close(fd)


def _locked(directory: Path, name: str):
    """An exclusive lock on `directory/name.lock` (0600, checked like the library), or a no-op lock."""
    try:
        import fcntl  # POSIX only: imported where it is used, so this module imports everywhere
    except ImportError:
        return None
    path = directory / f"{name}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | NOFOLLOW, 0o600)
    try:
        st = os.fstat(fd)
        reason = "it is not a regular file" if not stat.S_ISREG(st.st_mode) else _not_ours(st)
        if reason:
            raise OSError(f"{path}: {reason}")
        fcntl.flock(fd, fcntl.LOCK_EX)  # released when the descriptor closes, also if we crash
    except BaseException:
        os.close(fd)
        raise
    return fd


def load(name: str, build: Callable[[Path], None], root: Path | None = None) -> ctypes.CDLL:
    """The library `name` from the cache, built by `build(output path)` when missing or stale; a
    library that fails a check is rebuilt privately with a warning. Raises RuntimeError (no
    compiler, a failed compile) or OSError."""
    directory = trusted_dir(default_dir() if root is None else root)
    try:
        lock = _locked(directory, name)
    except OSError as e:
        _warn(f"the kernel cache's lock file is not used: {e}; compiling privately")
        return _build_and_load(private_dir(), name, build)
    try:
        try:
            return _checked_load(directory, name)
        except (FileNotFoundError, Stale):
            pass  # never built here, or damaged: build it in its place
        except OSError as e:
            _warn(f"the cached kernel is not loaded: {e}; compiling privately")
            return _build_and_load(private_dir(), name, build)
        return _build_and_load(directory, name, build)
    finally:
        if lock is not None:
            os.close(lock)


def _build_and_load(directory: Path, name: str, build: Callable[[Path], None]) -> ctypes.CDLL:
    with tempfile.TemporaryDirectory(dir=directory) as tmp:  # 0700
        out = Path(tmp) / name
        build(out)
        digest = hashlib.sha256(out.read_bytes()).hexdigest()
        _write_private(directory, name, source=out)
    _write_private(directory, f"{name}.sha256", data=digest.encode())
    return _checked_load(directory, name)
