"""Model identity: a fingerprint of the weights, tokenizer and numeric setup.

Answer caches key on it, and the int8 loader names its saved weights by it, so
two processes (or two copies of a model folder) agree on what "the same model" is.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any

from llmprod.canonical import canonical_json

FINGERPRINT_VERSION = 1
"""Bumped when the hashed parts change (old fingerprints then never match)."""

# Files besides the weights that decide what a model answers: its config, and
# everything that turns text into ids and ids back into text.
FINGERPRINT_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
)
WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".pth")
_SAMPLE_BYTES = 2**20
_MAX_SAFETENSORS_HEADER = 100 * 2**20


def model_fingerprint(
    model_path: str | os.PathLike[str],
    dtype: str,
    quantization: str | None,
    extra: str = "",
) -> str:
    """Return a fingerprint of a model's weights, tokenizer and numeric setup.

    Hashed (SHA-256), by file name relative to the folder, never by path or
    modification time, so two processes, or two copies of the folder, agree:

    * ``config.json`` (as canonical JSON when it parses) and the tokenizer,
      generation-config and chat-template files that exist
      (:data:`FINGERPRINT_FILES`), in full;
    * each weights file (``*.safetensors``, ``*.gguf``, ``*.bin``...): its size,
      and the SHA-256 of its first and last MiB; for safetensors also every
      tensor's name, dtype and shape from the header;
    * ``dtype``, ``quantization`` and ``extra``.

    It reads about 2 MiB per weights file, so it takes milliseconds on a
    multi-GB model. An edit inside a weights file that keeps its size, header,
    first and last MiB is not seen; pass a revision or a full checksum as
    ``extra`` when weights are patched in place.

    Args:
        model_path: a transformers folder, or a single weights file (``.gguf``).
        dtype: the dtype the model runs in, e.g. ``"float32"``.
        quantization: e.g. ``"int8"``, or ``None``.
        extra: anything else that changes the output (a revision, a LoRA name).

    Returns:
        The hex SHA-256.

    Raises:
        FileNotFoundError: ``model_path`` does not exist.
        ValueError: a safetensors header is malformed.
    """
    path = Path(model_path)
    if not path.exists():
        raise FileNotFoundError(f"model path {path} does not exist")
    h = hashlib.sha256()

    def part(tag: str, data: bytes) -> None:
        h.update(tag.encode("utf-8") + b"\x00" + struct.pack(">Q", len(data)))
        h.update(data)

    part("fingerprint-version", str(FINGERPRINT_VERSION).encode())
    part("dtype", str(dtype).encode("utf-8"))
    part("quantization", str(quantization).encode("utf-8"))
    part("extra", extra.encode("utf-8", "surrogatepass"))
    if path.is_dir():
        for name in FINGERPRINT_FILES:
            f = path / name
            if f.is_file():
                part(f"file:{name}", _file_digest_source(f))
        weights = sorted(
            p
            for p in path.rglob("*")
            if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)
        )
        if not weights:
            raise FileNotFoundError(f"no weights files in {path}")
        root = path
    else:
        weights = [path]
        root = path.parent
    for w in weights:
        rel = w.relative_to(root).as_posix()
        part(f"weights:{rel}", _weights_summary(w))
    return h.hexdigest()


def _file_digest_source(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name == "config.json":
        try:
            return canonical_json(json.loads(data))
        except (ValueError, TypeError, RecursionError):
            return data
    return data


def _weights_summary(path: Path) -> bytes:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(_SAMPLE_BYTES)
        if size > _SAMPLE_BYTES:
            f.seek(max(size - _SAMPLE_BYTES, _SAMPLE_BYTES))
            tail = f.read(_SAMPLE_BYTES)
        else:
            tail = b""
        tensors = _safetensors_layout(f, size) if path.suffix == ".safetensors" else []
    doc = {
        "size": size,
        "head": hashlib.sha256(head).hexdigest(),
        "tail": hashlib.sha256(tail).hexdigest(),
        "tensors": tensors,
    }
    return canonical_json(doc)


def _safetensors_layout(f: Any, size: int) -> list[list[Any]]:
    f.seek(0)
    raw = f.read(8)
    if len(raw) != 8:
        raise ValueError(f"{f.name}: not a safetensors file (shorter than 8 bytes)")
    (n,) = struct.unpack("<Q", raw)
    if n > min(_MAX_SAFETENSORS_HEADER, size - 8):
        raise ValueError(f"{f.name}: safetensors header size {n} is impossible")
    try:
        header = json.loads(f.read(n))
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"{f.name}: unreadable safetensors header: {exc}") from exc
    if not isinstance(header, dict):
        raise ValueError(f"{f.name}: safetensors header is not an object")
    out: list[list[Any]] = []
    for name in sorted(header):
        if name == "__metadata__":
            continue
        info = header[name]
        if not isinstance(info, dict):
            raise ValueError(f"{f.name}: bad safetensors entry for {name!r}")
        out.append([name, info.get("dtype"), info.get("shape")])
    return out
