"""Small file helpers every stage shares: atomic writes, content hashes, the digest of a JSON value.

One place for each, so that a fix (an fsync, a larger read block) reaches every writer and every check.
"""
import hashlib
import json
import os
from pathlib import Path
from typing import Any

__all__ = ["atomic_write_text", "atomic_write_json", "file_sha256", "json_digest"]


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through ``PATH.partial`` and a rename: a reader sees the old file or the new
    one, never half of one, and a killed writer leaves the old file as it was."""
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in 4 MB blocks (model weights can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def json_digest(value: Any) -> str:
    """The first 16 hex digits of the sha256 of ``value`` as sorted JSON: the identity of a config section, a
    stage's recipe or a sweep's signature (values JSON cannot hold are hashed by their ``str``)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]
