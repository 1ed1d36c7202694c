"""Reading a submit request body as it streams in: JSON, or multipart with at most one media file.

The file goes straight to a temporary file, hashed on the way; the byte count is checked on every chunk,
so an oversized upload is refused (413) as soon as it crosses the limit, without buffering it.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, MultipartState, parse_options_header

from service.problems import ProblemError

FILE_FIELDS = ("video", "image")
MAX_JSON_BYTES = 1 << 20  # a JSON submit carries parameters only
MAX_FIELD_BYTES = 64 << 10  # one multipart text field
FORM_OVERHEAD_BYTES = 1 << 20  # multipart headers and text fields on top of the file
SAFE_FILENAME = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass
class UploadedFile:
    field: str  # "video" or "image"
    filename: str | None
    path: Path
    size: int = 0
    sha256: str = ""


@dataclass
class SubmitBody:
    fields: dict[str, Any] = field(default_factory=dict)
    file: UploadedFile | None = None


def too_large(limit: int) -> ProblemError:
    return ProblemError("upload-too-large", f"The limit is {limit} bytes.", limit_bytes=limit)


def safe_filename(name: str | None) -> str | None:
    """The client's file name reduced to a harmless basename (it ends up in Content-Disposition)."""
    if not name:
        return None
    cleaned = SAFE_FILENAME.sub("_", name.replace("\\", "/").rsplit("/", 1)[-1]).strip("._")
    return cleaned[:120] or None


async def read_submit_body(
    content_type: str | None, content_length: str | None, chunks: AsyncIterator[bytes], tmp_dir: Path, max_bytes: int
) -> SubmitBody:
    media_type, options = parse_options_header(content_type or "")
    if content_length and content_length.isdigit() and int(content_length) > max_bytes + FORM_OVERHEAD_BYTES:
        raise too_large(max_bytes)  # refused before a single byte is read
    if media_type == b"application/json":
        return await _read_json(chunks)
    if media_type == b"multipart/form-data" and options.get(b"boundary"):
        return await _read_multipart(options[b"boundary"], chunks, tmp_dir, max_bytes)
    raise ProblemError(
        "unsupported-media-type",
        "POST /v1/jobs takes application/json (text-only) or multipart/form-data (with a video or image).",
    )


async def _read_json(chunks: AsyncIterator[bytes]) -> SubmitBody:
    body = bytearray()
    async for chunk in chunks:
        body += chunk
        if len(body) > MAX_JSON_BYTES:
            raise too_large(MAX_JSON_BYTES)
    try:
        fields = json.loads(body or b"{}")
    except ValueError as err:
        raise ProblemError("validation-error", f"The body is not valid JSON: {err}") from err
    except RecursionError as err:  # the decoder recurses once per nesting level
        raise ProblemError("validation-error", "The JSON body is nested too deeply.") from err
    if not isinstance(fields, dict):
        raise ProblemError("validation-error", "The JSON body must be an object of job parameters.")
    check_scalar_values(fields)
    return SubmitBody(fields=fields)


def check_scalar_values(value: Any) -> None:
    """Refuse text that is not a sequence of Unicode scalar values: JSON's \\ud800-style escapes decode to lone
    surrogates, which no UTF-8 encoder (ours, Redis's cjson, a client's) accepts later."""
    if isinstance(value, dict):
        for key, item in value.items():
            check_scalar_values(key)
            check_scalar_values(item)
    elif isinstance(value, list):
        for item in value:
            check_scalar_values(item)
    elif isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:
            raise ProblemError(
                "validation-error",
                f"A string in the JSON body holds a lone UTF-16 surrogate (U+{ord(value[err.start]):04X}).",
            ) from err


class _MultipartCollector:
    """Callbacks of python-multipart's streaming parser: text fields into memory, the file to disk."""

    def __init__(self, tmp_dir: Path, max_bytes: int) -> None:
        self.body = SubmitBody()
        self.tmp_dir = tmp_dir
        self.max_bytes = max_bytes
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._headers: dict[bytes, bytes] = {}
        self._name = ""
        self._value = bytearray()
        self._out: BinaryIO | None = None
        self._hash = hashlib.sha256()

    def callbacks(self) -> dict[str, Any]:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda data, start, end: self._header_name.extend(data[start:end]),
            "on_header_value": lambda data, start, end: self._header_value.extend(data[start:end]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
        }

    def _part_begin(self) -> None:
        self._headers.clear()
        self._value.clear()

    def _header_end(self) -> None:
        self._headers[bytes(self._header_name).lower()] = bytes(self._header_value)
        self._header_name.clear()
        self._header_value.clear()

    def _headers_finished(self) -> None:
        disposition, options = parse_options_header(self._headers.get(b"content-disposition"))
        name = options.get(b"name", b"").decode("utf-8", "replace")
        if disposition != b"form-data" or not name:
            raise ProblemError("validation-error", "Every multipart part needs a Content-Disposition with a name.")
        self._name = name
        filename = options.get(b"filename")
        if filename is None and name not in FILE_FIELDS:
            return
        if name not in FILE_FIELDS:
            raise ProblemError("validation-error", f"Unexpected file field {name!r}; send 'video' or 'image'.")
        if self.body.file is not None:
            raise ProblemError("validation-error", "Send one file: either 'video' or 'image'.")
        path = self.tmp_dir / "upload"
        self.body.file = UploadedFile(
            name, safe_filename(filename.decode("utf-8", "replace") if filename else None), path
        )
        self._out = path.open("wb")

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if self._out is None:
            self._value += chunk
            if len(self._value) > MAX_FIELD_BYTES:
                raise ProblemError("validation-error", f"Field {self._name!r} is longer than {MAX_FIELD_BYTES} bytes.")
            return
        file = self.body.file
        assert file is not None
        file.size += len(chunk)
        if file.size > self.max_bytes:
            raise too_large(self.max_bytes)
        self._hash.update(chunk)
        self._out.write(chunk)

    def _part_end(self) -> None:
        if self._out is None:
            if self._name in self.body.fields:
                raise ProblemError("validation-error", f"Field {self._name!r} is given twice.")
            self.body.fields[self._name] = self._value.decode("utf-8", "replace")
            return
        self._out.close()
        self._out = None
        assert self.body.file is not None
        self.body.file.sha256 = self._hash.hexdigest()

    def close(self) -> None:
        if self._out is not None:
            self._out.close()


async def _read_multipart(boundary: bytes, chunks: AsyncIterator[bytes], tmp_dir: Path, max_bytes: int) -> SubmitBody:
    collector = _MultipartCollector(tmp_dir, max_bytes)
    parser = MultipartParser(boundary, collector.callbacks(), max_size=max_bytes + FORM_OVERHEAD_BYTES)
    received = 0
    try:
        async for chunk in chunks:
            received += len(chunk)
            if received > max_bytes + FORM_OVERHEAD_BYTES:
                raise too_large(max_bytes)
            parser.write(chunk)
    except MultipartParseError as err:
        raise ProblemError("validation-error", f"The multipart body is malformed: {err}") from err
    finally:
        collector.close()
    if parser.state not in (MultipartState.END, MultipartState.BOUNDARY_PADDING):
        raise ProblemError("validation-error", "The multipart body ends before its closing boundary.")
    return collector.body
