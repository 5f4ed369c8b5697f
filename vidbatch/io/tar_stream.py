"""Reading a tar stream member by member, each member's size known from its header before its data.

WebDataset (and `tarfile` in stream mode) read a member's whole data into memory before anyone can
look at its size, and read pax / GNU long-name headers whole too: a header that declares 1.5 GiB costs
1.5 GiB. Here the caller sees every member's name and size first and reads its data only if it wants
to; data it does not read is skipped in bounded chunks (or by seeking). Compressed streams (gzip,
bzip2, xz, found by their magic bytes) are inflated on the fly, chunk by chunk, so a member's declared
size is its inflated size and the same size check is the decompression limit.

Headers are parsed with the standard library (`tarfile.TarInfo.frombuf`); pax (`x`) and GNU long
name (`L`) records are read only up to `MAX_EXTENDED_HEADER_BYTES`.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import tarfile
from dataclasses import dataclass
from typing import BinaryIO, Iterator

BLOCK = 512
CHUNK = 1 << 20
MAX_EXTENDED_HEADER_BYTES = 1 << 20
_MAGIC = ((b"\x1f\x8b", "gzip"), (b"BZh", "bzip2"), (b"\xfd7zXZ\x00", "xz"))


class TarFormatError(Exception):
    """The stream is not a readable tar (bad header checksum, truncated): nothing after it can be read."""


@dataclass(frozen=True)
class TarMember:
    """One member as its headers describe it, before any of its data is read.

    `name` is the member's path with bytes that are not UTF-8 written as `\\xNN`; `size` is the data's
    length (inflated, for a compressed stream); `error` says why the member's headers cannot be trusted
    (an oversized pax or long-name record, skipped unread), else None.
    """

    name: str
    size: int
    is_file: bool
    error: str | None = None


class _Chain:
    """`head` then the rest of `raw`: the bytes read to detect a compression go back in front."""

    def __init__(self, head: bytes, raw: BinaryIO):
        self._head, self._raw = head, raw

    def read(self, size: int = -1) -> bytes:
        if self._head:
            data, self._head = (self._head[:size], self._head[size:]) if size >= 0 else (self._head, b"")
            return data
        return self._raw.read(size)


def open_decompressed(raw: BinaryIO) -> tuple[BinaryIO, str | None]:
    """`raw` inflated on the fly when it starts with gzip, bzip2 or xz magic: (stream, compression or None)."""
    head = raw.read(6)
    chained = _Chain(head, raw)
    for magic, name in _MAGIC:
        if head.startswith(magic):
            opener = {"gzip": gzip.GzipFile, "bzip2": bz2.BZ2File, "xz": lzma.LZMAFile}[name]
            return (opener(fileobj=chained) if name == "gzip" else opener(chained)), name  # type: ignore[return-value]
    if _seekable(raw):  # a plain local file: skipped members are seeked over, not read
        raw.seek(-len(head), 1)
        return raw, None
    return chained, None  # type: ignore[return-value]


def _seekable(stream: object) -> bool:
    try:
        return bool(stream.seekable())  # type: ignore[attr-defined]
    except (AttributeError, OSError, ValueError):
        return False


def _text(raw: str) -> str:
    """A name `tarfile` decoded with surrogateescape, with undecodable bytes shown as `\\xNN`."""
    return raw.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _parse_pax(data: bytes) -> dict[str, str]:
    """The `path` and `size` records of a pax extended header (`"%d %s=%s\\n"` records); others ignored."""
    records: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0 or not data[pos:space].isdigit():
            break
        length = int(data[pos:space])
        if length <= 0:
            break
        keyword, _, value = data[space + 1: pos + length].rstrip(b"\n").partition(b"=")
        if keyword in (b"path", b"size"):
            records[keyword.decode()] = value.decode("utf-8", "backslashreplace")
        pos += length
    return records


class TarStream:
    """Iterates the members of a tar stream; `read` gives the current member's data, if wanted.

    Usage: `for member in stream.members(): if member.size <= limit: data = stream.read()`. A member
    not read is skipped when the iteration moves on. Raises TarFormatError on a damaged tar.
    """

    def __init__(self, raw: BinaryIO):
        self._raw = raw
        # Inflating readers "seek" by inflating: they are read through like pipes.
        self._seekable = _seekable(raw) and not isinstance(raw, (gzip.GzipFile, bz2.BZ2File, lzma.LZMAFile))
        self._position = 0          # bytes consumed from the (inflated) stream
        self._left = 0              # data bytes of the current member not yet consumed
        self._padding = 0           # zero bytes after them, up to the next 512-byte block

    def _read_exact(self, size: int) -> bytes:
        parts, got = [], 0
        while got < size:
            data = self._raw.read(min(size - got, CHUNK))
            if not data:
                break
            parts.append(data)
            got += len(data)
        self._position += got
        return b"".join(parts)

    def _discard(self, size: int) -> None:
        """Consumes `size` bytes in bounded chunks (or one seek); a short stream is a truncated tar."""
        if self._seekable and size > CHUNK:
            end = self._raw.seek(0, 2)
            target = self._raw.seek(self._position)  # where we are: nothing buffered is lost
            if target + size > end:
                raise TarFormatError(f"tar stream truncated at byte {end}")
            self._raw.seek(target + size)
            self._position += size
            return
        while size > 0:
            step = min(size, CHUNK)
            if len(self._read_exact(step)) < step:
                raise TarFormatError(f"tar stream truncated at byte {self._position}")
            size -= step

    def read(self) -> bytearray:
        """The current member's whole data (the caller has checked its size), filled in place: peak
        memory is the member plus one chunk."""
        data = bytearray(self._left)
        got = 0
        while got < len(data):
            chunk = self._raw.read(min(len(data) - got, CHUNK))
            if not chunk:
                raise TarFormatError(f"tar stream truncated at byte {self._position + got}")
            data[got: got + len(chunk)] = chunk
            got += len(chunk)
        self._position += got
        self._left = 0
        return data

    def _next_header(self) -> tarfile.TarInfo | None:
        self._discard(self._left + self._padding)
        self._left = self._padding = 0
        block = self._read_exact(BLOCK)
        if not block or block == bytes(BLOCK):  # end of archive (or an archive with no end blocks)
            return None
        if len(block) < BLOCK:
            raise TarFormatError(f"tar stream truncated at byte {self._position} (inside a header)")
        try:
            return tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
        except tarfile.HeaderError as exc:
            raise TarFormatError(f"bad tar header at byte {self._position - BLOCK}: {exc}") from None

    def _set_data(self, size: int) -> None:
        self._left, self._padding = size, -size % BLOCK

    def members(self) -> Iterator[TarMember]:
        extended: dict[str, str] = {}
        error: str | None = None
        while (info := self._next_header()) is not None:
            if info.type in (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK):
                size = info.size
                self._set_data(size)
                if size > MAX_EXTENDED_HEADER_BYTES:
                    error = (f"a {size}-byte extended tar header (more than {MAX_EXTENDED_HEADER_BYTES}) "
                             "precedes this member; skipped unread")
                    continue
                data = bytes(self.read())
                if info.type == tarfile.XHDTYPE:
                    extended.update(_parse_pax(data))
                elif info.type == tarfile.GNUTYPE_LONGNAME:
                    extended["path"] = data.rstrip(b"\0").decode("utf-8", "backslashreplace")
                continue
            size = int(extended["size"]) if extended.get("size", "").isdigit() else info.size
            self._set_data(size)
            name = extended.get("path") or _text(info.name)
            yield TarMember(name=name, size=size, is_file=info.isreg(), error=error)
            extended, error = {}, None

    @property
    def position(self) -> int:
        """Bytes of the (inflated) stream consumed so far."""
        return self._position
