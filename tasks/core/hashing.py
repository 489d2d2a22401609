"""Content hashes for cache keys.

Large files are hashed once per content: a small SQLite memo maps a file's path and stat to its
sha256, so a rerun only stats files. The stat includes the inode and the change time (ctime),
which `touch` cannot set back: rewriting a file's bytes and restoring its size and mtime still
makes it hashed again. The memo is disposable: a damaged one is rebuilt, an unwritable one
is kept in memory for the run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import stat
from collections.abc import Iterable
from pathlib import Path

_CHUNK = 1 << 20
_SQL_VARIABLES = 900  # below SQLite's default limit of host parameters in one statement
_SCHEMA = ("CREATE TABLE IF NOT EXISTS file_stat_hash (path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER,"
           " ctime_ns INTEGER, inode INTEGER, sha256 TEXT)",
           "CREATE TABLE IF NOT EXISTS remembered (key TEXT PRIMARY KEY, value TEXT)")
log = logging.getLogger("agelens")


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


def regular_stat(path: str) -> os.stat_result:
    """os.stat, refusing anything but a regular file (reading a FIFO would never end)."""
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise OSError(f"not a regular file: {path}")
    return st


def _open(db_path: Path | None) -> sqlite3.Connection:
    """The memo's database, created if missing, rebuilt if damaged, in memory if it cannot be written."""
    if db_path is None:
        return _create(sqlite3.connect(":memory:"))
    try:
        db_path.parent.mkdir(parents=True, exist_ok=True)
        return _create(sqlite3.connect(str(db_path), timeout=30))
    except (OSError, sqlite3.OperationalError):  # read-only or busy: hash in memory for this run
        return _create(sqlite3.connect(":memory:"))
    except sqlite3.DatabaseError as error:  # not a database (any more)
        log.warning("the file-hash memo %s was damaged (%s); rebuilding it", db_path, error)
        db_path.unlink(missing_ok=True)
        return _create(sqlite3.connect(str(db_path), timeout=30))


def _create(db: sqlite3.Connection) -> sqlite3.Connection:
    try:
        for statement in _SCHEMA:
            db.execute(statement)
        db.execute("SELECT count(*) FROM file_stat_hash").fetchone()
    except BaseException:
        db.close()
        raise
    return db


def _key(path: str) -> str:
    """A path as SQLite text: itself, or its bytes in hex where they are not UTF-8 (SQLite text
    cannot hold the surrogates Python decodes such bytes to)."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return "bytes:" + path.encode("utf-8", "surrogateescape").hex()


class HashMemo:
    """sha256 of files, remembered by (path, size, mtime, ctime, inode)."""

    def __init__(self, db_path: str | os.PathLike | None):
        self._db: sqlite3.Connection | None = _open(Path(db_path) if db_path is not None else None)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        if self._db is not None:
            try:
                self._db.commit()
            except sqlite3.DatabaseError:
                pass
            self._db.close()
            self._db = None

    def _write(self, sql: str, rows) -> None:
        try:
            self._db.executemany(sql, rows)
            self._db.commit()
        except sqlite3.OperationalError:  # read-only: the memo only saves time
            pass

    def remember(self, key: str, compute) -> str:
        """`compute()` once per `key`: for facts that are slow to derive and never change
        (e.g. the file name of a library version's pretrained weights)."""
        row = self._db.execute("SELECT value FROM remembered WHERE key = ?", (key,)).fetchone()
        if row:
            return row[0]
        value = compute()
        self._write("INSERT OR REPLACE INTO remembered VALUES (?, ?)", [(key, value)])
        return value

    def file(self, path: str | os.PathLike) -> str:
        return self.files([path])[0]

    def files(self, paths: Iterable[str | os.PathLike]) -> list[str]:
        """sha256 of each file, hashing only those whose stat changed. Raises OSError for a
        missing or non-regular file."""
        paths = [os.path.abspath(p) for p in paths]
        stats = [regular_stat(p) for p in paths]
        keys = [_key(p) for p in paths]
        known: dict[str, tuple] = {}
        for start in range(0, len(keys), _SQL_VARIABLES):
            chunk = keys[start : start + _SQL_VARIABLES]
            marks = ",".join("?" * len(chunk))
            rows = self._db.execute(f"SELECT path, size, mtime_ns, ctime_ns, inode, sha256 FROM file_stat_hash "
                                    f"WHERE path IN ({marks})", chunk)
            known.update({row[0]: row[1:] for row in rows})
        digests, fresh = [], []
        for path, key, st in zip(paths, keys, stats):
            mark = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
            hit = known.get(key)
            if hit and tuple(hit[:4]) == mark:
                digests.append(hit[4])
                continue
            digest = sha256_file(path)
            digests.append(digest)
            fresh.append((key, *mark, digest))
        if fresh:
            self._write("INSERT OR REPLACE INTO file_stat_hash VALUES (?,?,?,?,?,?)", fresh)
        return digests
