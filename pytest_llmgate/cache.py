"""Content-addressed result store in SQLite, safe for concurrent xdist workers.

A key is a hash of (model fingerprint, task version, prompt hash, request parameters, item id);
``result_key`` refuses to build one without a fingerprint. Each shard is written in one
transaction, so a worker that dies mid-shard leaves the finished shards intact and no half rows.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .models import file_sha256
from .tasks.data import file_stamp

SCHEMA_VERSION = 1
FIX_HINT = "delete or move it, point --llmgate-cache at another file, or run with --llmgate-no-cache"


class CacheError(Exception):
    """The result cache cannot be used; the message names the file and the fix."""


# A file's memoised digest holds only if it was not changed while hashed nor shortly before (a second change within
# the same timestamp tick would keep its ctime): above the timestamp granularity of common file systems (1 s on some).
RACY_NS = 2_000_000_000


def _memoisable(path: Path, identity: tuple[int, ...]) -> bool:
    return file_stamp(path) == identity and time.time_ns() - identity[4] > RACY_NS


def digest_without_cache(path: Path, memo_file: Path) -> str:
    """sha256 of a file, memoised in ``memo_file`` (JSON) by the same identity as :meth:`ResultCache.file_digest`:
    with the result cache off, the model's weights are still hashed once, not on every start.

    The memo is derived data like the dequantized copies beside it: an unreadable one is ignored and rewritten, one
    that cannot be written only costs the next run the hashing; two processes writing at once lose an entry at worst
    (written to a temporary name, then renamed).
    """
    resolved = str(path.resolve())
    identity = file_stamp(path)
    try:
        memo = json.loads(memo_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        memo = {}
    if not isinstance(memo, dict):
        memo = {}
    entry = memo.get(resolved)
    if isinstance(entry, dict) and entry.get("stamp") == list(identity) and isinstance(entry.get("sha256"), str):
        return str(entry["sha256"])
    digest = file_sha256(path)
    if _memoisable(path, identity):
        memo[resolved] = {"stamp": list(identity), "sha256": digest}
        temporary = memo_file.with_name(f".{memo_file.name}.{os.getpid()}")
        try:
            memo_file.parent.mkdir(parents=True, exist_ok=True)
            temporary.write_text(json.dumps(memo, indent=1, sort_keys=True) + "\n", encoding="utf-8")
            os.replace(temporary, memo_file)
        except OSError:
            with contextlib.suppress(OSError):
                temporary.unlink()
    return digest


def result_key(
    *, fingerprint: str, task_version: str, prompt_hash: str, params: Mapping[str, Any], item_id: str
) -> str:
    """The cache key of one item's results on one model."""
    if not fingerprint:
        raise ValueError("a cache key needs the model fingerprint")
    material = json.dumps([fingerprint, task_version, prompt_hash, dict(params), item_id], sort_keys=True)
    return hashlib.sha256(material.encode()).hexdigest()


class ResultCache:
    """Item results keyed by content; one connection per process, opened lazily."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._connection: sqlite3.Connection | None = None
        self._identity: tuple[int, int] | None = None  # (device, inode) of the file this connection opened
        self.read_only = False  # the file can be read but not written: results are not stored
        self.notes: list[str] = []  # what went wrong with the cache during the run, for the summary

    def check(self) -> None:
        """Open the cache now, so an unusable file stops the run before anything is computed (CacheError)."""
        self.connection  # noqa: B018 - opening is the check

    def _explain(self, error: BaseException) -> CacheError:
        reason = getattr(error, "strerror", None) or str(error)
        if isinstance(error, sqlite3.DatabaseError) and "not a database" in str(error):
            reason = "it is not a SQLite database (another program's file, or a damaged cache)"
        return CacheError(f"llmgate cache {self.path}: {reason}; {FIX_HINT}")

    def _open_identity(self) -> tuple[int, int] | None:
        try:
            stat = self.path.stat()
        except OSError:
            return None
        return stat.st_dev, stat.st_ino

    @property
    def connection(self) -> sqlite3.Connection:
        """The process's connection, creating the database on first use (CacheError when it cannot)."""
        if self._connection is None:
            if self.path.is_dir():
                raise CacheError(f"llmgate cache {self.path}: is a folder, not a file; {FIX_HINT}")
            try:
                self._connection = self._connect()
            except (sqlite3.Error, OSError) as error:
                raise self._explain(error) from None
            self._identity = self._open_identity()
        return self._connection

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(self.path, timeout=120, isolation_level=None)
        connection.execute("PRAGMA busy_timeout = 120000")
        try:
            self._retry(lambda: connection.execute("PRAGMA journal_mode = WAL"))
            self._retry(
                lambda: connection.executescript(
                    """
                CREATE TABLE IF NOT EXISTS results (
                    key TEXT PRIMARY KEY, model TEXT NOT NULL, task_version TEXT NOT NULL,
                    value TEXT NOT NULL, created REAL NOT NULL);
                CREATE TABLE IF NOT EXISTS file_digests_v2 (
                    path TEXT PRIMARY KEY, device INTEGER NOT NULL, inode INTEGER NOT NULL,
                    size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, ctime_ns INTEGER NOT NULL,
                    sha256 TEXT NOT NULL);
                CREATE TABLE IF NOT EXISTS verdicts (
                    key TEXT PRIMARY KEY, value TEXT NOT NULL, created REAL NOT NULL);
                """
                )
            )
            self._retry(lambda: connection.execute("BEGIN IMMEDIATE"))  # can this process write?
            connection.execute("ROLLBACK")
        except sqlite3.OperationalError as error:
            if "readonly" not in str(error):
                connection.close()
                raise
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            self._become_read_only()
        connection.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()  # a file that is not a database fails here
        return connection

    def _become_read_only(self) -> None:
        self.read_only = True
        self._note(
            f"llmgate cache {self.path} is read-only: results are read from it, but this run's "
            "results are not stored (make it writable, or point --llmgate-cache at a writable file)"
        )

    def _note(self, message: str) -> None:
        if message not in self.notes:
            self.notes.append(message)

    def _follow_file(self) -> None:
        """Reopen when the file was deleted or replaced since it was opened: writing on would store nothing."""
        if self._connection is not None and self._open_identity() != self._identity:
            self.close()
            self._note(
                f"llmgate cache {self.path} was deleted or replaced during the run; later results were "
                "stored in a new file there (results stored in the old file before that went with it)"
            )

    @staticmethod
    def _retry(action: Any, attempts: int = 20) -> Any:
        # WAL switching and schema creation take an exclusive lock that busy_timeout does not cover.
        for attempt in range(attempts):
            try:
                return action()
            except sqlite3.OperationalError as error:
                if "locked" not in str(error) or attempt == attempts - 1:
                    raise
                time.sleep(0.05 * (attempt + 1))
        return None

    def _select(self, table: str, keys: Iterable[str]) -> dict[str, Any]:
        """Decoded values of ``table`` for the keys that are present, 500 keys per query."""
        keys = list(keys)
        found: dict[str, Any] = {}
        self._follow_file()
        try:
            for start in range(0, len(keys), 500):
                chunk = keys[start : start + 500]
                marks = ",".join("?" * len(chunk))
                for key, value in self.connection.execute(
                    f"SELECT key, value FROM {table} WHERE key IN ({marks})", chunk
                ):
                    found[key] = json.loads(value)
        except sqlite3.OperationalError as error:
            if self.read_only and "no such table" in str(error):
                return found  # a read-only cache written by an older version: nothing of that kind stored
            raise self._explain(error) from None
        except (sqlite3.Error, ValueError) as error:
            raise self._explain(error) from None
        return found

    def _insert(self, sql: str, payload: list[tuple[Any, ...]]) -> bool:
        """Insert ``payload`` rows in one transaction: a crash stores all of them or none.

        False when the cache is read-only (nothing stored); CacheError when the write fails.
        """
        if not payload:
            return True
        if self.read_only:
            return False
        self._follow_file()

        def write() -> None:
            connection = self.connection
            connection.execute("BEGIN IMMEDIATE")
            try:
                connection.executemany(sql, payload)
                connection.execute("COMMIT")
            except BaseException:
                connection.execute("ROLLBACK")
                raise

        try:
            self._retry(write)
        except sqlite3.OperationalError as error:
            if "readonly" not in str(error):  # a read-only file in WAL mode opens for writing and fails here
                raise self._explain(error) from None
            self._become_read_only()
            return False
        except (sqlite3.Error, OSError) as error:
            raise self._explain(error) from None
        return True

    def get_many(self, keys: Iterable[str]) -> dict[str, Any]:
        """Stored values for the keys that are present."""
        return self._select("results", keys)

    def put_many(self, rows: Iterable[tuple[str, str, str, Any]]) -> bool:
        """Store (key, model fingerprint, task version, value) rows in one transaction; False when read-only."""
        now = time.time()
        payload = [(key, model, version, json.dumps(value), now) for key, model, version, value in rows]
        return self._insert("INSERT OR REPLACE INTO results VALUES (?, ?, ?, ?, ?)", payload)

    def count(self, model: str | None = None) -> int:
        """Number of stored results, for one model fingerprint or all."""
        if model is None:
            return int(self.connection.execute("SELECT COUNT(*) FROM results").fetchone()[0])
        return int(self.connection.execute("SELECT COUNT(*) FROM results WHERE model = ?", (model,)).fetchone()[0])

    def file_digest(self, path: Path) -> str:
        """sha256 of a file, memoised by its identity and change time (as git's index does): weights are hashed once.

        The memo holds while (resolved path, device, inode, size, mtime, ctime) are all unchanged: a tool that
        changes the bytes and restores size and mtime (``cp -p``, ``rsync -t``, ``tar x``) cannot restore the
        ctime, and a file put in another's place has another inode. A file that changed while it was read, or
        less than two seconds before (a second change within the same timestamp tick would keep its ctime),
        is hashed but not memoised.
        """
        resolved = str(path.resolve())
        identity = file_stamp(path)  # (device, inode, size, mtime, ctime)
        self._follow_file()
        try:
            row = self.connection.execute(
                "SELECT sha256 FROM file_digests_v2 WHERE path = ? AND device = ? AND inode = ? AND size = ? "
                "AND mtime_ns = ? AND ctime_ns = ?",
                (resolved, *identity),
            ).fetchone()
        except sqlite3.OperationalError as error:
            # A read-only cache written by an older version lacks the table: hash without a memo.
            if not (self.read_only and "no such table" in str(error)):
                raise self._explain(error) from None
            row = None
        except sqlite3.Error as error:
            raise self._explain(error) from None
        if row:
            return str(row[0])
        digest = file_sha256(path)
        if _memoisable(path, identity):
            self._insert(
                "INSERT OR REPLACE INTO file_digests_v2 VALUES (?, ?, ?, ?, ?, ?, ?)", [(resolved, *identity, digest)]
            )
        return digest

    # Sandbox verdicts of code tasks. A verdict is a function of the program text, the limits, the sandbox
    # and the interpreter (all in its key, see tasks/coding.py), not of a model: no fingerprint here.
    def get_verdicts(self, keys: Sequence[str]) -> dict[str, dict[str, Any]]:
        """Stored sandbox verdicts of the keys that are present."""
        return self._select("verdicts", keys)

    def put_verdicts(self, verdicts: Mapping[str, Mapping[str, Any]]) -> None:
        """Store sandbox verdicts by key, in one transaction (a failure is noted, never raised: they are a speed-up)."""
        now = time.time()
        try:
            self._insert(
                "INSERT OR REPLACE INTO verdicts VALUES (?, ?, ?)",
                [(key, json.dumps(dict(value)), now) for key, value in verdicts.items()],
            )
        except CacheError as error:
            self._note(f"{error} (sandbox verdicts of this run were not stored)")

    def close(self) -> None:
        """Close this process's connection."""
        if self._connection is not None:
            with contextlib.suppress(sqlite3.Error):
                self._connection.close()
            self._connection = None
