"""The error list the dashboard filters: each error log file with what it is about.

``GET /logs/errors`` lists names, sizes and codes; a person also wants the
message, the upstream and the request it belongs to. Those are read from the
start and the end of each file (never the whole of a 10 MB one), once: the
summary is kept until the file changes or goes.
"""

from __future__ import annotations

import os
import re
import threading
from collections import Counter, OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson

from ..logs.error_log import ErrorFile, scan_error_files

HEAD_BYTES = 16 * 1024
TAIL_BYTES = 4 * 1024
MESSAGE_LIMIT = 300
#: Summaries kept; more than any sensible ``error_logging.max_files``.
CACHE_SIZE = 5000
# The top-level keys of the ERROR DETAILS and REQUEST CONTEXT objects (indented two spaces).
_FIELD = re.compile(
    rb'^  "(?P<key>error_type|error_message|status_code|url|request_id|model)": (?P<value>.*?),?$',
    re.M,
)

Key = tuple[Path, str, int, float]


def read_summary(path: Path) -> dict[str, Any]:
    """Type, message, status, URL, request id and model of one error log (blocking)."""
    found: dict[str, Any] = {}
    try:
        with open(path, "rb") as f:
            head = f.read(HEAD_BYTES)
            size = os.fstat(f.fileno()).st_size
            tail = b""
            if size > HEAD_BYTES:
                f.seek(max(HEAD_BYTES, size - TAIL_BYTES))
                tail = f.read(TAIL_BYTES)
    except OSError:
        return found
    for chunk in (head, tail):
        for match in _FIELD.finditer(chunk):
            key = match["key"].decode()
            if found.get(key) is not None:
                continue
            try:
                found[key] = orjson.loads(match["value"])
            except orjson.JSONDecodeError:
                continue
    message = found.get("error_message")
    if isinstance(message, str) and len(message) > MESSAGE_LIMIT:
        found["error_message"] = message[: MESSAGE_LIMIT - 3] + "..."
    return found


class ErrorIndex:
    """Summaries of error log files, cached by folder, name, size and time."""

    def __init__(self) -> None:
        self._cache: OrderedDict[Key, dict[str, Any]] = OrderedDict()
        self._lock = threading.Lock()  # listings run in worker threads

    def _summary(self, folder: Path, file: ErrorFile) -> dict[str, Any]:
        key = (folder, file.name, file.size, file.mtime)
        with self._lock:
            found = self._cache.get(key)
        if found is None:
            found = read_summary(folder / file.name)
            with self._lock:
                self._cache[key] = found
                while len(self._cache) > CACHE_SIZE:
                    self._cache.popitem(last=False)
        return found

    def listing(
        self,
        folder: str | os.PathLike[str],
        upstreams: Mapping[str, str],
        *,
        code: str | None = None,
        upstream: str | None = None,
        since: float | None = None,
        limit: int = 100,
    ) -> dict[str, Any]:
        """The error logs in ``folder``, newest first, filtered (blocking: run it in a
        thread). ``upstreams`` maps each upstream's URL as the error log writes it to its name.
        """
        folder = Path(folder)
        files = scan_error_files(folder)
        codes: Counter[str] = Counter()
        rows: list[dict[str, Any]] = []
        for file in reversed(files):
            codes[file.code] += 1
            if code and file.code != code:
                continue
            if since is not None and file.mtime < since:
                continue
            if len(rows) >= limit:
                continue  # still counted above, for the filter's choices
            summary = self._summary(folder, file)
            name = upstreams.get(summary.get("url") or "")
            if upstream and name != upstream:
                continue
            rows.append(
                {
                    **file.as_dict(),
                    "mtime": file.mtime,
                    "type": summary.get("error_type"),
                    "message": summary.get("error_message"),
                    "status": summary.get("status_code"),
                    "request_id": summary.get("request_id"),
                    "model": summary.get("model"),
                    "upstream": name,
                }
            )
        return {
            "total": len(files),
            "codes": dict(codes.most_common()),
            "upstreams": sorted(set(upstreams.values())),
            "files": rows,
        }
