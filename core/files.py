"""Writing files so that a reader never sees half of one: what every stage uses for its outputs.

A crash (or a ``kill -9``) in the middle of a write leaves the previous
version of the file whole, or no file, never a truncated one: the text goes
to a temporary file in the same directory, which is then renamed over the
target (``os.replace`` is atomic on POSIX and Windows).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` (creating its directory) through a temporary file renamed into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | Path, data: Any) -> None:
    """``data`` as indented JSON (anything JSON lacks written as its ``str``), atomically."""
    write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


def write_jsonl_atomic(path: str | Path, rows: Iterable[Mapping[str, Any]]) -> None:
    """One JSON object a line (a stage's ``data.jsonl``), atomically."""
    write_text_atomic(path, "".join(json.dumps(dict(row)) + "\n" for row in rows))


def now_utc() -> str:
    """The time now, UTC, ISO 8601 to the second (a run record's ``started`` and ``heartbeat``)."""
    import datetime

    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
