"""Stable digests: of config-like objects (fingerprints) and of files (weights, memoised)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from core.atomic import atomic_write_text
from core.config import to_dict


def canonical_json(obj: Any) -> str:
    return json.dumps(to_dict(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def sha256_of(obj: Any) -> str:
    """Stable hex digest of a config-like object (key order does not matter)."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()


def musk_home() -> Path:
    """Where musk keeps converted models and hash memos (MUSK_HOME, default ~/.cache/musk)."""
    return Path(os.environ.get("MUSK_HOME", Path.home() / ".cache" / "musk"))


def sha256_file(path: Path) -> str:
    """SHA-256 of a file, memoised by (path, size, mtime) in MUSK_HOME: a 15 GB model is hashed once."""
    memo_path = musk_home() / "sha256-memo.json"
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    if key in memo:
        return memo[key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    memo[key] = h.hexdigest()
    memo_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(memo_path, json.dumps(memo))
    return memo[key]
