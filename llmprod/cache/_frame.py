"""The envelope persistent backends wrap around each value.

Stores such as diskcache hand back a truncated file without complaint, and a
shared store may hold entries that llmprod never wrote. Each value therefore goes
out with a fixed 36-byte header and is checked on the way back:

```
offset  size  field
0       4     magic b"LPC1"
4       8     expires_at: big-endian float64, Unix seconds, 0.0 = never
12      8     length of the payload in bytes, big-endian uint64
20      16    BLAKE2b-128 of (key, expires_at, payload)
36      n     payload: the caller's bytes, untouched
```

The digest covers the key, so a value file moved under another key also fails.
Nothing here ever decodes the payload; it is handed back as bytes.
"""

from __future__ import annotations

import hashlib
import struct

from llmprod.cache.protocol import CorruptEntryError, UnsafeEntryError

MAGIC = b"LPC1"
_HEADER = struct.Struct(">4sdQ16s")
HEADER_SIZE = _HEADER.size


def _digest(key: str, expires_at: float, payload: bytes | memoryview) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    encoded = key.encode("utf-8", "surrogatepass")
    h.update(struct.pack(">Q", len(encoded)))
    h.update(encoded)
    h.update(struct.pack(">d", expires_at))
    h.update(payload)
    return h.digest()


def header(key: str, payload: bytes, expires_at: float = 0.0) -> bytes:
    """Return the header that goes in front of ``payload``.

    Args:
        key: the key the value is stored under.
        payload: the value.
        expires_at: Unix time after which the entry is stale, 0.0 for never.

    Returns:
        The 36-byte header.
    """
    digest = _digest(key, expires_at, payload)
    return _HEADER.pack(MAGIC, expires_at, len(payload), digest)


def pack(key: str, payload: bytes, expires_at: float = 0.0) -> bytes:
    """Return header and payload joined (one copy of the payload).

    Args:
        key: the key the value is stored under.
        payload: the value.
        expires_at: Unix time after which the entry is stale, 0.0 for never.

    Returns:
        The framed bytes.
    """
    return header(key, payload, expires_at) + payload


def unpack(key: str, blob: bytes) -> tuple[bytes, float]:
    """Check a framed entry and return its payload and expiry.

    Args:
        key: the key the entry was read from.
        blob: the framed bytes as stored.

    Returns:
        ``(payload, expires_at)``.

    Raises:
        UnsafeEntryError: ``blob`` is not an llmprod entry at all (no magic).
        CorruptEntryError: the header is short, or the length or digest is wrong.
    """
    if len(blob) < len(MAGIC) or blob[: len(MAGIC)] != MAGIC:
        raise UnsafeEntryError(
            f"entry for key {key!r} is not in llmprod's format; refusing to decode it"
        )
    if len(blob) < HEADER_SIZE:
        raise CorruptEntryError(f"entry for key {key!r} is truncated inside its header")
    _, expires_at, length, digest = _HEADER.unpack_from(blob)
    view = memoryview(blob)[HEADER_SIZE:]
    if len(view) != length:
        raise CorruptEntryError(
            f"entry for key {key!r} holds {len(view)} bytes, its header says {length}"
        )
    if _digest(key, expires_at, view) != digest:
        raise CorruptEntryError(f"entry for key {key!r} fails its checksum")
    return bytes(view), expires_at
