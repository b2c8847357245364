"""Reading and writing the small text files users hand us or keep (profiles, sweeps, results)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from infinisim.core.errors import InfinisimError


def read_yaml(path: Path) -> Any:
    """Parsed YAML, or one line naming the file and the line where it is malformed."""
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise InfinisimError(f"malformed YAML ({getattr(exc, 'problem', exc)})", path,
                             f"line {mark.line + 1}" if mark else "yaml") from None
    except UnicodeDecodeError:
        raise InfinisimError("not a text file", path) from None


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Temp file, then rename: an interrupted write leaves the old file (or none), never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path
