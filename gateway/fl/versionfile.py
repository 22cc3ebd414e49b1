"""The newest global model version a gateway accepted, kept across restarts.

A restarted gateway must never load a signed global older than the one it ran (an
attacker who recorded an old, validly signed model could otherwise replay it after a
restart).  The FL client writes the version here after each global it accepts and
refuses anything older at start-up.  One small JSON file under ``state_dir``, replaced
atomically (write aside, fsync, rename, fsync the directory): a crash leaves the old
file or the new one, never half of either.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

FILE_NAME = "fl-global-version.json"


class VersionFileError(ValueError):
    """The file exists but does not hold a version (refuse rather than guess)."""


def read_version(path: str | os.PathLike | None) -> int | None:
    """The version stored at ``path`` (None: no file yet)."""
    if path is None:
        return None
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise VersionFileError(f"{path}: unreadable ({exc})") from None
    try:
        version = json.loads(text)["version"]
    except (ValueError, KeyError, TypeError):
        raise VersionFileError(f"{path}: not a global-version file") from None
    if type(version) is not int or not 0 <= version < 2**31:
        raise VersionFileError(f"{path}: version {version!r} out of range")
    return version


def write_version(path: str | os.PathLike, version: int) -> None:
    """Store ``version`` at ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"version": int(version)}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # a directory that cannot be opened (some platforms): the rename stands
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
