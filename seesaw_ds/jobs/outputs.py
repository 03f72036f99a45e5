"""Job output: a folder of parquet shards plus manifest.json, written so that a crash never leaves a partial shard.

Layout of output.dir:
    manifest.json                      fingerprint of the output-determining recipe parts, the recipe, the load call
    part-r000-00000.parquet            replica 0, shard 0 (one row per finished input row; with sampling.n > 1,
                                       n rows per input row, all in the same shard)
    part-r001-00000.parquet            replica 1, shard 0
    .tmp-part-r000-00001.parquet.PID   a shard being written (ignored; removed when its replica restarts)
    .seesaw-job.lock                   host and pid of the job writing here (jobs/output_lock.py)

Load the rows with (also `load_output(dir)`):
    datasets.load_dataset("parquet", data_files=f"{dir}/part-*.parquet", split="train")

NOTE: a shard appears only by `os.replace` of a fully written, fsynced temporary file in the same folder, so
every `part-*.parquet` is complete; resume reads their `id` column and skips those rows. With sampling.n > 1
an input row's n samples are one unit: buffered together and never split between shards, so a row is either
wholly in the folder or wholly redone.
"""
from __future__ import annotations

import datetime
import glob
import json
import os
import re
from typing import Any, Mapping

import pyarrow as pa
import pyarrow.parquet as pq

from seesaw_ds.jobs.fingerprint import fingerprint_changes, fingerprint_hash, job_fingerprint  # noqa: F401
from seesaw_ds.jobs.recipe import OutputSection, Recipe
from seesaw_ds.jobs.shard_schema import (CORE_FIELDS, LOGPROBS_FIELD, RESERVED_COLUMNS,  # noqa: F401
                                         TOKEN_ID_FIELDS, is_unknown, output_schema, resolve_schema)
from seesaw_ds.jobs.schema import RecipeError

MANIFEST_NAME = "manifest.json"
SHARD_GLOB = "part-*.parquet"
TMP_PREFIX = ".tmp-"
_SHARD_RE = re.compile(r"^part-r(\d+)-(\d+)\.parquet$")
FORMAT_VERSION = 1

class OutputError(RuntimeError):
    pass


def shard_name(replica: int, seq: int) -> str:
    return f"part-r{replica:03d}-{seq:05d}.parquet"


# ---- atomic files --------------------------------------------------------------------------------------------
def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(directory: str, name: str, write) -> str:
    """write(file object) into a temporary file of `directory`, fsync it, rename it to `name`."""
    final = os.path.join(directory, name)
    tmp = os.path.join(directory, f"{TMP_PREFIX}{name}.{os.getpid()}")
    with open(tmp, "wb") as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, final)
    _fsync_dir(directory)
    return final


def existing_shards(directory: str) -> list[tuple[int, int, str]]:
    """(replica, seq, path) of every complete shard, sorted."""
    found = []
    for path in glob.glob(os.path.join(directory, SHARD_GLOB)):
        match = _SHARD_RE.match(os.path.basename(path))
        if match:
            found.append((int(match.group(1)), int(match.group(2)), path))
    return sorted(found)


def _remove_leftovers(directory: str, replica: int | None) -> int:
    """Delete temporary files of `replica` (all replicas when None); returns how many."""
    pattern = f"{TMP_PREFIX}part-r{replica:03d}-*" if replica is not None else f"{TMP_PREFIX}*"
    paths = glob.glob(os.path.join(directory, pattern))
    for path in paths:
        os.remove(path)
    return len(paths)


# ---- preparing the folder (once per job) ---------------------------------------------------------------------
def check_resumable(directory: str, resume: bool, fingerprint: Mapping[str, Any]) -> bool:
    """True when `directory` holds a manifest these rows may be added to; raise OutputError when its rows were
    made with another recipe, model or data, or when it has shards it may not resume. Changes nothing."""
    manifest_path = os.path.join(directory, MANIFEST_NAME)
    shards = existing_shards(directory)
    if os.path.exists(manifest_path):
        with open(manifest_path, encoding="utf-8") as handle:
            manifest = json.load(handle)
        changes = fingerprint_changes(manifest.get("fingerprint", {}), fingerprint)
        if changes:
            raise OutputError(f"output.dir {directory} holds rows made with a different recipe: "
                              f"{'; '.join(changes)}; use a new output.dir or output.overwrite=true")
        if shards and not resume:
            raise OutputError(f"output.dir {directory} already has {len(shards)} shards and output.resume is "
                              f"false; use a new output.dir or output.overwrite=true")
        return True
    if shards:
        raise OutputError(f"output.dir {directory} has {len(shards)} shards but no {MANIFEST_NAME}; "
                          f"use a new output.dir or output.overwrite=true")
    return False


def prepare_output_dir(output: OutputSection, fingerprint: Mapping[str, Any], recipe: Recipe) -> str:
    """Create or check output.dir against the fingerprint; call once per job before replicas start writing."""
    if not output.dir:
        raise RecipeError("output.dir", "is required")
    directory = os.path.abspath(os.path.expanduser(output.dir))
    os.makedirs(directory, exist_ok=True)
    manifest_path = os.path.join(directory, MANIFEST_NAME)
    if output.overwrite:
        from seesaw_ds.jobs.output_lock import other_live_owner
        owner = other_live_owner(directory)
        if owner is not None:   # NOTE: never wipe a folder another live job writes into
            raise OutputError(f"output.dir {directory} is in use by another job ({owner}); output.overwrite "
                              f"does not touch it; wait for that job or use another output.dir")
        for _, _, path in existing_shards(directory):
            os.remove(path)
        _remove_leftovers(directory, None)
        if os.path.exists(manifest_path):
            os.remove(manifest_path)
    for path in glob.glob(os.path.join(directory, f"{TMP_PREFIX}{MANIFEST_NAME}.*")):
        os.remove(path)  # a manifest write cut short
    if check_resumable(directory, output.resume, fingerprint):
        return directory
    manifest = {
        "format": FORMAT_VERSION, "fingerprint": dict(fingerprint), "fingerprint_hash": fingerprint_hash(fingerprint),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "load": f'datasets.load_dataset("parquet", data_files="{directory}/{SHARD_GLOB}", split="train")',
        "shard_pattern": "part-r{replica:03d}-{seq:05d}.parquet", "recipe": recipe.to_dict(),
    }
    text = json.dumps(manifest, indent=2, sort_keys=False).encode()
    atomic_write(directory, MANIFEST_NAME, lambda handle: handle.write(text))
    return directory


def read_completed_ids(directory: str, samples_per_row: int = 1) -> set[str]:
    """Ids of every row in every complete shard of `directory` (all replicas). With `samples_per_row` > 1 each
    id must hold samples 0..n-1 once, in one shard (rows are written as units); anything else is refused."""
    done: set[str] = set()
    columns = ["id"] if samples_per_row == 1 else ["id", "sample_index"]
    for _, _, path in existing_shards(directory):
        try:
            table = pq.read_table(path, columns=columns)
        except (OSError, pa.ArrowException) as err:
            raise OutputError(f"cannot read shard {path} ({err}); move it away and rerun to redo its rows") from None
        ids = table.column("id").to_pylist()
        if samples_per_row > 1:
            _check_whole_rows(path, ids, table.column("sample_index").to_pylist(), samples_per_row, done)
        done.update(ids)
    return done


def _check_whole_rows(path: str, ids: list[str], indexes: list[int], n: int, earlier: set[str]) -> None:
    """Every id of a shard holds sample indexes 0..n-1 exactly once, and no earlier shard holds it."""
    samples: dict[str, list[int]] = {}
    for row_id, index in zip(ids, indexes):
        samples.setdefault(row_id, []).append(index)
    for row_id, got in samples.items():
        if sorted(got) != list(range(n)) or row_id in earlier:
            where = "also in another shard" if row_id in earlier else f"sample_index {sorted(got)}"
            raise OutputError(f"shard {path} holds row id {row_id!r} with {where}, not samples 0..{n - 1} once "
                              f"(sampling.n={n}); move the shard away and rerun to redo its rows")


class ShardWriter:
    """Buffers rows of one replica and writes them as atomic parquet shards."""

    def __init__(self, directory: str, replica: int = 0, schema: pa.Schema | None = None, samples_per_row: int = 1):
        self.directory, self.replica, self.samples_per_row = directory, replica, samples_per_row
        self.removed_leftovers = _remove_leftovers(directory, replica)
        shards = existing_shards(directory)
        own = [seq for rep, seq, _ in shards if rep == replica]
        self.next_seq = max(own) + 1 if own else 0
        self.schema = schema if schema is not None or not shards else pq.read_schema(shards[0][2])
        for _, _, path in shards if self.schema is not None else ():  # types fixed by earlier shards stay
            if not any(is_unknown(f) for f in self.schema):
                break
            earlier = pq.read_schema(path)
            self.schema = pa.schema([earlier.field(f.name) if is_unknown(f) and f.name in earlier.names
                                     and not is_unknown(earlier.field(f.name)) else f for f in self.schema])
        self.done_ids = read_completed_ids(directory, samples_per_row)
        self.rows: list[dict[str, Any]] = []
        self.rows_written = 0
        self.shards_written = 0

    def add(self, row: dict[str, Any]) -> None:
        """One output row; with samples_per_row n > 1, add a row's n samples one after the other (a unit)."""
        self.rows.append(row)

    def flush(self, max_rows: int | None = None) -> str | None:
        """Write the first `max_rows` buffered rows (all when None) as one shard; returns its path. With
        samples_per_row n > 1, `max_rows` is rounded up to whole units of n rows: a shard never splits a row."""
        n = self.samples_per_row
        if len(self.rows) % n:
            raise OutputError(f"{len(self.rows)} buffered rows are not whole units of {n} samples")
        rows = self.rows if max_rows is None else self.rows[:-(-max_rows // n) * n]
        if not rows:
            return None
        if self.schema is None or any(is_unknown(f) for f in self.schema):
            self.schema = resolve_schema(self.schema, rows)
        table = pa.Table.from_pylist(rows, schema=self.schema)
        name = shard_name(self.replica, self.next_seq)
        if os.path.exists(os.path.join(self.directory, name)):
            raise OutputError(f"shard {name} already exists in {self.directory}; is another replica {self.replica} "
                              f"writing here?")
        path = atomic_write(self.directory, name, lambda handle: pq.write_table(table, handle))
        self.done_ids.update(row["id"] for row in rows)
        self.next_seq += 1
        self.rows_written += len(rows)
        self.shards_written += 1
        self.rows = self.rows[len(rows):]
        return path


def load_output(directory: str, cache_dir: str | None = None):
    """All rows of a job folder as a `datasets.Dataset` (order: shard by shard; sort by row_index if needed)."""
    import datasets
    return datasets.load_dataset("parquet", data_files=os.path.join(directory, SHARD_GLOB), split="train",
                                 cache_dir=cache_dir)


class DiscardWriter:
    """ShardWriter's surface for a rank that steps its replica's engine but does not write (not the writer).

    NOTE: it must see the same completed ids as its writer: build it after the folder is prepared and before
    the replica's first engine step (the writer cannot write before every rank of the replica has stepped)."""

    def __init__(self, directory: str, replica: int = 0, samples_per_row: int = 1):
        self.directory, self.replica = directory, replica
        self.done_ids = read_completed_ids(directory, samples_per_row)
        self.rows: list[dict[str, Any]] = []
        self.rows_written = 0
        self.shards_written = 0

    def add(self, row: dict[str, Any]) -> None:
        pass

    def flush(self, max_rows: int | None = None) -> None:
        return None
