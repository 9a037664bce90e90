"""JSON-lines files (plain, or gzip-compressed when the name ends in ``.gz``): one record a line, every error naming
its file and line. The one reader behind the corpus, QA, cache-source and data-builder files."""
from __future__ import annotations

import gzip
import json
import zlib
from pathlib import Path
from typing import Any, Iterator

PathLike = str | Path


def iter_records(path: PathLike, text_field: str | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) of each non-blank line; with ``text_field``, every record must hold a string there.

    Raises:
        ValueError: a line is not a JSON object (``path:line: ...``) or lacks the string ``text_field``, or the file
            cannot be read as UTF-8 or gzip.
    """
    path = Path(path)
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as lines:
            for line_no, raw in enumerate(lines, start=1):
                if not raw.strip():
                    continue
                try:
                    record = json.loads(raw.strip())
                except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
                    detail = f"{err.msg}: column {err.colno}" if isinstance(err, json.JSONDecodeError) else err
                    raise ValueError(f"{path}:{line_no}: not a JSON record ({detail})") from err
                if not isinstance(record, dict):
                    raise ValueError(f"{path}:{line_no}: a record must be a JSON object, got {type(record).__name__}")
                if text_field is not None and not isinstance(record.get(text_field), str):
                    raise ValueError(f'{path}:{line_no}: the record has no string "{text_field}" field')
                yield line_no, record
    except (EOFError, zlib.error, gzip.BadGzipFile) as err:
        raise ValueError(f"{path}: cannot be read as JSON lines ({err})") from err
