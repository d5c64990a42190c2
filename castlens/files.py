"""Files: the one way castlens writes a file, so that no reader ever sees half of one.

Every result, part, vector and figure goes through :func:`atomic_write`: the bytes go to a hidden temporary file
``.<name>.<random>.tmp`` in the target's folder, are flushed to disk, and the temporary file is renamed over the
target (``os.replace`` is atomic within one file system). A killed writer leaves at most a ``.*.tmp`` file, which
:func:`remove_stale_temp` deletes when a run reopens its folder. Knows no model.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["atomic_write", "write_json", "as_json", "remove_stale_temp", "TEMP_GLOB"]

TEMP_GLOB = ".*.tmp"


def atomic_write(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` (text is UTF-8 encoded) to ``path`` atomically; creates the folder. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """``obj`` as indented JSON (one space, non-ASCII kept, trailing newline), written atomically."""
    return atomic_write(path, json.dumps(obj, indent=1, ensure_ascii=False) + "\n")


def as_json(obj: Any) -> Any:
    """``obj`` as JSON reads it back (tuples become lists), so what is saved compares equal to what is loaded."""
    return json.loads(json.dumps(obj))


def remove_stale_temp(folder: str | os.PathLike, recursive: bool = True) -> list[Path]:
    """Delete the temporary files a killed writer left in ``folder`` (and below); returns what was removed."""
    folder = Path(folder)
    stale = list(folder.rglob(TEMP_GLOB) if recursive else folder.glob(TEMP_GLOB)) if folder.is_dir() else []
    for p in stale:
        p.unlink(missing_ok=True)
    return stale
