"""HTTP Range requests (RFC 9110, section 14) over a stored result: one byte range per request."""

from __future__ import annotations

import re
from urllib.parse import quote

from service.problems import ProblemError

SINGLE_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(first, last) inclusive for a satisfiable single range; None to send the whole file.

    Multiple ranges and malformed headers are ignored (the whole file is a valid answer to them);
    a range starting past the end raises 416.
    """
    if not header:
        return None
    match = SINGLE_RANGE.fullmatch(header.strip())
    if match is None or match[1] == match[2] == "":
        return None
    if match[1] == "":  # suffix range: the last N bytes
        length = int(match[2])
        if length == 0:
            raise _unsatisfiable(size)
        return max(size - length, 0), size - 1
    first = int(match[1])
    if match[2] and int(match[2]) < first:
        return None  # invalid: ignored
    if first >= size:
        raise _unsatisfiable(size)
    return first, min(int(match[2]), size - 1) if match[2] else size - 1


def _unsatisfiable(size: int) -> ProblemError:
    return ProblemError(
        "range-not-satisfiable", f"The file has {size} bytes.", {"Content-Range": f"bytes */{size}"}, size=size
    )


def content_disposition(filename: str) -> str:
    """``attachment`` with an ASCII fallback name and the exact UTF-8 one (RFC 6266)."""
    fallback = filename.encode("ascii", "replace").decode().replace('"', "_").replace("?", "_")
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename)}"
