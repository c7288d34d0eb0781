"""Loading a task's evaluation split: a local folder in the hub's schema, or the hub itself."""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DATA_DIR_ENV = "LLMGATE_DATA_DIR"


class DatasetError(Exception):
    """The data for a task could not be found or read; the message says how to fix it."""


@dataclass(frozen=True)
class DatasetRef:
    """Where a split lives: its hub id and config, and its folder name in a local data dir."""

    hub_path: str
    hub_name: str | None
    split: str
    folder: str
    local_split: str | None = None  # the file's name in a local folder when it differs from the split

    @property
    def local_name(self) -> str:
        """The file name (without suffix) of this split in ``data_dir/<folder>/``."""
        return self.local_split or self.split


@dataclass(frozen=True)
class LoadedSplit:
    """The rows of one split, with a hash of their content and where they came from."""

    rows: tuple[dict[str, Any], ...]
    content_hash: str
    origin: str


def content_hash(rows: list[dict[str, Any]] | tuple[dict[str, Any], ...]) -> str:
    """A hash of the rows' content, the same whether they came from the hub or a local file."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps(row, sort_keys=True, ensure_ascii=False, default=str).encode())
        digest.update(b"\n")
    return digest.hexdigest()[:16]


def local_candidates(ref: DatasetRef, data_dir: Path) -> list[Path]:
    """The files that may hold ``ref`` under ``data_dir``, in order of preference."""
    folder = data_dir / ref.folder
    name = ref.local_name
    found = [folder / f"{name}.jsonl", folder / f"{name}.parquet"]
    found += sorted(folder.glob(f"{name}-*.parquet"))
    return [path for path in found if path.is_file()]


def read_jsonl(path: Path) -> tuple[list[dict[str, Any]], list[int]]:
    """Rows of a JSON Lines file and the line number of each; blank lines are skipped."""
    rows: list[dict[str, Any]] = []
    numbers: list[int] = []
    try:
        handle = path.open("rb")
    except OSError as error:
        raise DatasetError(f"cannot read {path}: {error}") from None
    with handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise DatasetError(
                    f"{path}:{number}: not UTF-8 (byte {raw[error.start]:#04x} at column {error.start + 1}); "
                    "JSON Lines files are UTF-8: re-encode the file (e.g. iconv -f latin1 -t utf-8)"
                ) from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DatasetError(f"{path}:{number}: not valid JSON ({error.msg}); fix or remove the line") from None
            if not isinstance(row, dict):
                raise DatasetError(f"{path}:{number}: expected a JSON object per line, got {type(row).__name__}")
            rows.append(row)
            numbers.append(number)
    return rows, numbers


def _read_parquet(paths: list[Path]) -> list[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - pyarrow comes with datasets
        raise DatasetError(f"reading {paths[0]} needs pyarrow: pip install pyarrow") from None
    rows: list[dict[str, Any]] = []
    for path in paths:
        try:
            rows.extend(pq.read_table(path).to_pylist())
        except Exception as error:  # pyarrow's errors have no common base worth naming
            raise DatasetError(
                f"{path}: not a readable Parquet file ({type(error).__name__}: {error}); "
                "replace it, or use a .jsonl file of the same split"
            ) from None
    return rows


def file_stamp(path: Path) -> tuple[int, int, int, int, int]:
    """A file's identity and change time (device, inode, size, mtime, ctime): equal stamps, equal bytes."""
    stat = path.stat()
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns


@functools.lru_cache(maxsize=64)
def _read_local(paths: tuple[Path, ...], stamps: tuple[tuple[int, int, int, int, int], ...]) -> list[dict[str, Any]]:
    """The rows of a split's local files, memoised by the files' stamps: a changed file is read again."""
    jsonl = [p for p in paths if p.suffix == ".jsonl"]
    return read_jsonl(jsonl[0])[0] if jsonl else _read_parquet(list(paths))


def load_split(ref: DatasetRef, data_dir: Path | None) -> LoadedSplit:
    """Rows of ``ref``: from ``data_dir`` (or $LLMGATE_DATA_DIR) when set, else from the hub."""
    if data_dir is None and os.environ.get(DATA_DIR_ENV):
        data_dir = Path(os.environ[DATA_DIR_ENV])
    if data_dir is not None:
        if not data_dir.is_dir():
            raise DatasetError(
                f"data dir {data_dir} does not exist; point --llmgate-data-dir (or ${DATA_DIR_ENV}, "
                "or data_dir in [tool.llmgate]) at a folder with one sub-folder per task"
            )
        paths = local_candidates(ref, data_dir)
        if not paths:
            expected = data_dir / ref.folder / f"{ref.local_name}.jsonl"
            raise DatasetError(
                f"no data for split '{ref.split}' of {ref.hub_path}: expected "
                f"{expected} (or .parquet) in the hub's schema; "
                "add the file, or unset the data dir to load from the Hugging Face hub"
            )
        jsonl = [p for p in paths if p.suffix == ".jsonl"]
        chosen = tuple(jsonl[:1] or paths)
        rows = _read_local(chosen, tuple(file_stamp(p) for p in chosen))
        origin = str(chosen[0])
    else:
        rows = _load_from_hub(ref)
        origin = f"hub:{ref.hub_path}" + (f"/{ref.hub_name}" if ref.hub_name else "") + f":{ref.split}"
    if not rows:
        raise DatasetError(f"{origin}: the split is empty")
    frozen = tuple(rows)
    return LoadedSplit(frozen, content_hash(frozen), origin)


def _load_from_hub(ref: DatasetRef) -> list[dict[str, Any]]:
    try:
        import datasets
    except ImportError:
        raise DatasetError(
            f"loading {ref.hub_path} from the hub needs the datasets package (pip install datasets); "
            f"or pass --llmgate-data-dir with a folder holding {ref.folder}/{ref.local_name}.jsonl"
        ) from None
    try:
        dataset = datasets.load_dataset(ref.hub_path, ref.hub_name, split=ref.split)
    except Exception as error:  # the hub raises many kinds; all mean "not available here"
        raise DatasetError(
            f"could not load {ref.hub_path} ({ref.hub_name or 'default'}, split {ref.split}) from the "
            f"Hugging Face hub: {type(error).__name__}: {error}. Offline? Pass --llmgate-data-dir "
            f"with a folder holding {ref.folder}/{ref.local_name}.jsonl in the hub's schema"
        ) from None
    return [dict(row) for row in dataset]
