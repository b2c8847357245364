"""The one error type users see: a one-line message naming the file and field at fault."""

from __future__ import annotations

from pathlib import Path


class InfinisimError(Exception):
    """Bad input or an impossible request. The CLI prints it as one line and exits non-zero."""

    def __init__(self, message: str, path: str | Path | None = None, field: str | None = None):
        where = ": ".join(str(part) for part in (path, field) if part)
        super().__init__(f"{where}: {message}" if where else message)
        self.path, self.field = path, field
