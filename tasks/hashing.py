"""Content hashes for cache keys.

Large files are hashed once per content: a small SQLite memo maps
(path, size, mtime_ns) to the file's sha256, so a rerun only stats files.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from collections.abc import Iterable
from pathlib import Path

_CHUNK = 1 << 20


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_json(obj) -> str:
    """Hash of a JSON-able object, independent of dict order."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return sha256_bytes(text.encode())


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class HashMemo:
    """sha256 of files, remembered by (path, size, mtime_ns)."""

    def __init__(self, db_path: str | os.PathLike | None):
        self._db = None
        if db_path is not None:
            Path(db_path).parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(db_path), timeout=30)
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS file_hash (path TEXT PRIMARY KEY,"
                " size INTEGER, mtime_ns INTEGER, sha256 TEXT)"
            )
            self._db.execute("CREATE TABLE IF NOT EXISTS remembered (key TEXT PRIMARY KEY, value TEXT)")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        if self._db is not None:
            self._db.commit()
            self._db.close()
            self._db = None

    def remember(self, key: str, compute) -> str:
        """`compute()` once per `key`: for facts that are slow to derive and never change
        (e.g. the file name of a library version's pretrained weights)."""
        if self._db is not None:
            row = self._db.execute("SELECT value FROM remembered WHERE key = ?", (key,)).fetchone()
            if row:
                return row[0]
        value = compute()
        if self._db is not None:
            self._db.execute("INSERT OR REPLACE INTO remembered VALUES (?, ?)", (key, value))
            self._db.commit()
        return value

    def file(self, path: str | os.PathLike) -> str:
        return self.files([path])[0]

    def files(self, paths: Iterable[str | os.PathLike]) -> list[str]:
        """sha256 of each file, hashing only those whose size or mtime changed."""
        paths = [os.path.abspath(p) for p in paths]
        stats = [os.stat(p) for p in paths]
        known: dict[str, tuple[int, int, str]] = {}
        if self._db is not None and paths:
            for start in range(0, len(paths), 900):
                chunk = paths[start : start + 900]
                marks = ",".join("?" * len(chunk))
                rows = self._db.execute(
                    f"SELECT path, size, mtime_ns, sha256 FROM file_hash WHERE path IN ({marks})",
                    chunk,
                )
                known.update({p: (s, m, h) for p, s, m, h in rows})
        digests, fresh = [], []
        for path, st in zip(paths, stats):
            hit = known.get(path)
            if hit and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
                digests.append(hit[2])
                continue
            digest = sha256_file(path)
            digests.append(digest)
            fresh.append((path, st.st_size, st.st_mtime_ns, digest))
        if self._db is not None and fresh:
            self._db.executemany("INSERT OR REPLACE INTO file_hash VALUES (?,?,?,?)", fresh)
            self._db.commit()
        return digests
