"""Reading the small text files users hand us, and writing every output atomically.

`atomic_path` is the one way anything is written: into a temporary file beside the target, then
renamed over it, so an interrupted write leaves the old file (or none), never half of one. It
refuses a target that exists and is not a regular file (a folder, a device), before writing.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from infinisim.core.errors import InfinisimError

_UMASK = os.umask(0o022)
os.umask(_UMASK)


def read_text(path: str | Path, what: str = "file") -> str:
    """A text file's contents, or one line saying why it cannot be read."""
    path = Path(path)
    if not path.exists():
        raise InfinisimError(f"no such {what}", path)
    if not path.is_file():
        raise InfinisimError(f"not a {what} (a folder or a device)", path)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InfinisimError("not a text file (not UTF-8)", path) from None
    except OSError as exc:
        raise InfinisimError(f"cannot read ({exc.strerror or exc})", path) from None


def read_yaml(path: Path, what: str = "file") -> Any:
    """Parsed YAML, or one line naming the file and the line where it is malformed."""
    text = read_text(path, what)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise InfinisimError(f"malformed YAML ({getattr(exc, 'problem', exc)})", path,
                             f"line {mark.line + 1}" if mark else "yaml") from None


def check_mapping(data: Any, path: Path, known: tuple[str, ...], required: tuple[str, ...], not_mapping: str,
                  missing: str = "missing field") -> dict[str, Any]:
    """`data` is a mapping with no key outside `known` and every key of `required`, or one line
    naming the file and the key at fault."""
    if not isinstance(data, dict):
        raise InfinisimError(not_mapping, path)
    for key in data:
        if key not in known:
            raise InfinisimError(f"unknown key (known: {', '.join(known)})", path, str(key))
    for key in required:
        if key not in data:
            raise InfinisimError(missing, path, key)
    return data


def check_output_file(path: str | Path, field: str | None = None) -> Path:
    """`path` may be written as a file: it is one already, or nothing is there (its folder may not
    exist yet). Checked before any work, so a long run never ends on a path it cannot write."""
    path = Path(path)
    if path.exists() and not path.is_file():
        raise InfinisimError("exists and is not a regular file: refusing to replace it", path, field)
    _check_parent(path, field)
    return path


def check_output_dir(path: str | Path, field: str | None = None) -> Path:
    """`path` may be written into as a folder: it is one already, or nothing is there."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InfinisimError("exists and is not a folder", path, field)
    _check_parent(path, field)
    return path


def _check_parent(path: Path, field: str | None) -> None:
    parent = next((p for p in (path.absolute(), *path.absolute().parents) if p.exists()), None)
    if parent is not None and path.absolute() != parent and not parent.is_dir():
        raise InfinisimError(f"{parent} is not a folder", path, field)
    if parent is not None and not os.access(parent if parent.is_dir() else parent.parent, os.W_OK):
        raise InfinisimError("cannot write here (permission denied)", path, field)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` for the block to write; renamed over `path` (mode 0644 less
    the umask, as a plain open would make it) when the block succeeds, removed when it fails.
    Temporary files an earlier killed writer left beside `path` are removed first."""
    path = check_output_file(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f".{path.name}.*.tmp"):
            stale.unlink(missing_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise InfinisimError(f"cannot write ({exc.strerror or exc})", path) from None
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with tmp.open("rb+") as f:
            os.fsync(f.fileno())
        tmp.chmod(0o666 & ~_UMASK)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise InfinisimError(f"cannot write ({exc.strerror or exc})", path) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_json(data: Any, path: str | Path) -> Path:
    """JSON as any parser reads it: NaN and infinities become null."""
    return write_text_atomic(path, json.dumps(strict_json(data), indent=1, default=float, allow_nan=False))


def strict_json(data: Any) -> Any:
    """`data` with every float that JSON cannot hold (NaN, +-inf) replaced by None."""
    if isinstance(data, float):
        return data if data == data and abs(data) != float("inf") else None
    if isinstance(data, dict):
        return {k: strict_json(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [strict_json(v) for v in data]
    if hasattr(data, "item") and callable(data.item) and getattr(data, "ndim", 1) == 0:  # numpy scalars
        return strict_json(data.item())
    return data
