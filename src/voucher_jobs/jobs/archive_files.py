"""The file sink of audit-archival: gzip-compressed JSON Lines plus a manifest.

A file goes through these steps, and its rows are deleted only after the last:

1. Rows are streamed into `.NAME.jsonl.gz.tmp`: on PostgreSQL as lines that
   the server builds, sent with one COPY; elsewhere read page by page and
   encoded here.
2. The file is flushed and fsynced, then read back: its row count and the
   SHA-256 of its uncompressed content must match what was written.
3. The manifest (`NAME.manifest.json`) is written and fsynced, both files
   are renamed to their final names, and the folder is fsynced.
4. The file is registered in `voucher_jobs_archive_files` with status
   `exported`. Only now are its rows deleted from the live table, in short
   transactions that delete exactly the file's ids; the status then becomes
   `complete`.

The next run repairs a crash at any step, in `unfinished_files`. It removes
leftover `.tmp` files and data files without a manifest, because none of
their rows was deleted. It verifies and registers a file that has a manifest
but no registration. It finishes deleting the rows of every registered file
whose rows are not all deleted. Every row thus ends up either live or in
exactly one archive file.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import time
import zlib
from array import array
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, func, insert, select, update

from voucher_jobs.data.audit_batches import (
    Key,
    Walk,
    copy_archive_lines,
    created_at_of,
    delete_listed,
    eligible_ids,
    read_page,
    server_metadata_kind,
)
from voucher_jobs.data.schema import archive_files
from voucher_jobs.data.types import as_utc, utc_now
from voucher_jobs.jobs.base import BatchSizer

FORMAT = "voucher-jobs-audit-archive/1"
DATA_SUFFIX = ".jsonl.gz"
# zlib's default level: files about as small as with level 9, written
# several times faster.
COMPRESS_LEVEL = 6
# Rows read per query where Python encodes the lines, and a tenth of the
# ids read per query where PostgreSQL builds them. Reading takes no lock
# that the application waits for, so the size only trades round trips for
# memory.
EXPORT_PAGE_ROWS = 10_000
MANIFEST_SUFFIX = ".manifest.json"
# Uncompressed bytes read at a time when a file is verified.
VERIFY_CHUNK_BYTES = 1 << 20


class ArchiveFileError(Exception):
    """An archive file that is missing, unreadable or fails verification."""


@dataclass(frozen=True)
class Manifest:
    """The contents of a verified archive file: row count, checksum and key range."""

    name: str
    rows: int
    sha256: str
    first_key: Key
    last_key: Key
    min_id: int
    max_id: int
    cutoff: datetime
    run_id: int
    exported_at: datetime

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "file": self.name,
            "rows": self.rows,
            "sha256_uncompressed": self.sha256,
            "first_key": _key_json(self.first_key),
            "last_key": _key_json(self.last_key),
            "min_id": self.min_id,
            "max_id": self.max_id,
            "cutoff": _iso(self.cutoff),
            "run_id": self.run_id,
            "exported_at": _iso(self.exported_at),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Manifest:
        if data.get("format") != FORMAT:
            raise ArchiveFileError(f"unknown manifest format {data.get('format')!r}")
        return cls(
            name=data["file"],
            rows=int(data["rows"]),
            sha256=data["sha256_uncompressed"],
            first_key=_key_from_json(data["first_key"]),
            last_key=_key_from_json(data["last_key"]),
            min_id=int(data["min_id"]),
            max_id=int(data["max_id"]),
            cutoff=datetime.fromisoformat(data["cutoff"]),
            run_id=int(data["run_id"]),
            exported_at=datetime.fromisoformat(data["exported_at"]),
        )


def _iso(value: datetime) -> str:
    return as_utc(value).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _key_json(key: Key) -> dict[str, Any]:
    return {"created_at": _iso(key.created_at), "id": key.id}


def _key_from_json(data: dict[str, Any]) -> Key:
    return Key(datetime.fromisoformat(data["created_at"]), int(data["id"]))


def row_to_line(row: Any) -> bytes:
    """Serialize one audit row as a JSON line with sorted keys."""
    record = {
        "id": row.id,
        "voucher_id": row.voucher_id,
        "action": row.action,
        "actor_type": row.actor_type,
        "code": row.code,
        "metadata": row.metadata,
        "created_at": _iso(row.created_at),
    }
    return json.dumps(record, sort_keys=True, separators=(",", ":")).encode() + b"\n"


def _fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _write_durably(path: Path, content: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(content)
        handle.flush()
        os.fsync(handle.fileno())


@dataclass(frozen=True)
class WrittenFile:
    """A data file written and fsynced under its temporary name, not verified yet."""

    directory: Path
    stem: str
    manifest: Manifest
    ids: Sequence[int]

    @property
    def temporary(self) -> Path:
        return self.directory / f".{self.stem}{DATA_SUFFIX}.tmp"

    def discard(self) -> None:
        """Remove the file. Call it only before the file's rows are deleted."""
        self.temporary.unlink(missing_ok=True)


def write_file(
    engine: Engine,
    directory: Path,
    walk: Walk,
    after_id: int,
    *,
    max_rows: int,
    page_size: int,
    run_id: int,
    sequence: int,
    stop_requested: Callable[[], bool],
    read_rows: Callable[[Connection, Walk, int, int], list[Any]] = read_page,
    table: str = "voucher_audit_logs",
) -> WrittenFile | None:
    """Write the next eligible rows (at most max_rows) to a temporary data file.

    This is step 1 and the fsync of step 2; finish_file does the rest.
    Returns None when no row is eligible or when a stop was requested before
    the file was complete; no file is then left behind. `read_rows` reads
    each page where Python encodes the lines. `table` is the quoted name of
    the table that PostgreSQL reads where it builds them. Partition
    retirement passes a single partition to both.
    """
    directory.mkdir(parents=True, exist_ok=True)
    stem = f"voucher_audit_logs.run{run_id:08d}.{sequence:05d}"
    temporary = directory / f".{stem}{DATA_SUFFIX}.tmp"
    with _removed_on_failure(directory, stem):
        written = _write_rows(
            engine, temporary, stem, walk, after_id, max_rows, page_size, run_id, stop_requested,
            read_rows, table,
        )
        if written is None:
            temporary.unlink(missing_ok=True)
            return None
        manifest, ids = written
        return WrittenFile(directory, stem, manifest, ids)


def finish_file(written: WrittenFile) -> tuple[Manifest, Sequence[int]]:
    """Verify a written file, write its manifest and give both their final names.

    Returns the manifest and the ids of the file's rows, in file order.
    """
    directory, stem, manifest = written.directory, written.stem, written.manifest
    with _removed_on_failure(directory, stem):
        verify_data_file(written.temporary, manifest)
        taken = [path.name for path in (directory / f"{stem}{DATA_SUFFIX}",
                                         directory / f"{stem}{MANIFEST_SUFFIX}")
                 if path.exists()]
        if taken:
            # Replacing a file whose rows may be deleted already would lose them.
            raise ArchiveFileError(
                f"archive file {', '.join(taken)} already exists in {directory}; "
                "it is not replaced. Check the folder for files of another run."
            )
        manifest_temporary = directory / f".{stem}{MANIFEST_SUFFIX}.tmp"
        _write_durably(manifest_temporary, json.dumps(manifest.to_json(), indent=2).encode())
        os.replace(written.temporary, directory / f"{stem}{DATA_SUFFIX}")
        os.replace(manifest_temporary, directory / f"{stem}{MANIFEST_SUFFIX}")
        _fsync_directory(directory)
        return manifest, written.ids


@contextmanager
def _removed_on_failure(directory: Path, stem: str) -> Iterator[None]:
    """Remove the temporary files of stem when the block fails, and name the folder."""
    try:
        yield
    except BaseException as exc:
        # Disk full, a read error or an interrupt: nothing was deleted yet,
        # so removing the partial files loses nothing.
        (directory / f".{stem}{DATA_SUFFIX}.tmp").unlink(missing_ok=True)
        (directory / f".{stem}{MANIFEST_SUFFIX}.tmp").unlink(missing_ok=True)
        if isinstance(exc, OSError):
            # A write error such as ENOSPC names no file, so name the folder.
            raise ArchiveFileError(
                f"writing archive file {stem}{DATA_SUFFIX} in {directory} failed: {exc}. "
                "No row of it was deleted. Free space in that folder, or set "
                "VOUCHER_JOBS_ARCHIVE_DIR to another one, and run again."
            ) from exc
        raise


def _write_rows(
    engine, temporary, stem, walk, after_id, max_rows, page_size, run_id, stop_requested,
    read_rows, table,
) -> tuple[Manifest, Sequence[int]] | None:
    digest = hashlib.sha256()
    with engine.connect() as connection:
        metadata_kind = server_metadata_kind(connection)
    with open(temporary, "wb") as raw:
        # mtime=0 keeps the gzip header free of the write time, so the same
        # rows always give the same bytes.
        with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0,
                           compresslevel=COMPRESS_LEVEL) as compressed:

            def write(chunk: bytes) -> None:
                compressed.write(chunk)
                digest.update(chunk)

            if metadata_kind:
                written = _copy_from_server(engine, walk, after_id, max_rows, metadata_kind,
                                            write, table)
            else:
                written = _read_in_pages(engine, walk, after_id, max_rows, page_size, read_rows,
                                         write, stop_requested)
            if written is None:
                return None
        raw.flush()
        os.fsync(raw.fileno())
    ids, first, last = written
    manifest = Manifest(
        name=f"{stem}{DATA_SUFFIX}",
        rows=len(ids),
        sha256=digest.hexdigest(),
        first_key=first,
        last_key=last,
        # The walk is in id order, so the first and last rows hold the
        # lowest and highest ids.
        min_id=first.id,
        max_id=last.id,
        cutoff=walk.cutoff,
        run_id=run_id,
        exported_at=utc_now(),
    )
    return manifest, ids


def lines_built_by_server(engine: Engine) -> bool:
    """Tell whether write_file has PostgreSQL build the lines (json or jsonb metadata)."""
    with engine.connect() as connection:
        return server_metadata_kind(connection) is not None


def _copy_from_server(engine, walk, after_id, max_rows, metadata_kind, write, table):
    """Write the lines of the next max_rows eligible rows, built by PostgreSQL.

    The ids and the lines are read in one REPEATABLE READ transaction, so
    both see the same rows, and the line count is checked against the ids.
    """
    lines = 0

    def counted(chunk: bytes) -> None:
        nonlocal lines
        lines += chunk.count(b"\n")
        write(chunk)

    with engine.connect() as connection:
        connection.execution_options(isolation_level="REPEATABLE READ")
        with connection.begin():
            ids = _ids_in_pages(connection, walk, after_id, max_rows, table)
            if not ids:
                return None
            times = created_at_of(connection, [ids[0], ids[-1]])
            copy_archive_lines(connection, walk, after_id, ids[-1], metadata_kind, counted,
                               table)
    if lines != len(ids):
        raise ArchiveFileError(
            f"the export of ids {ids[0]} to {ids[-1]} gave {lines} lines for {len(ids)} "
            "rows. No row of it was deleted."
        )
    return ids, Key(as_utc(times[ids[0]]), ids[0]), Key(as_utc(times[ids[-1]]), ids[-1])


def _ids_in_pages(connection, walk, after_id, max_rows, table) -> array:
    """Read the ids of the next max_rows eligible rows, a page of them per query.

    Paging keeps the ids of a file of millions of rows in the 8-byte array
    only, never all of them as a list of Python ints (about 36 bytes each).
    """
    ids = array("q")
    while len(ids) < max_rows:
        page_size = min(EXPORT_PAGE_ROWS * 10, max_rows - len(ids))
        page = eligible_ids(connection, walk, after_id, page_size, table)
        ids.extend(page)
        if len(page) < page_size:
            break
        after_id = page[-1]
    return ids


def _read_in_pages(engine, walk, after_id, max_rows, page_size, read_rows, write,
                   stop_requested):
    """Write the lines of the next max_rows eligible rows, formatted by Python."""
    # 8 bytes an id, so a file of 10 million rows keeps 80 MB, not 300.
    ids = array("q")
    first: Key | None = None
    last: Key | None = None
    while len(ids) < max_rows:
        size = min(page_size, max_rows - len(ids))
        with engine.connect() as connection:
            page = read_rows(connection, walk, after_id, size)
        if not page:
            break
        write(b"".join(row_to_line(row) for row in page))
        first = first or Key(as_utc(page[0].created_at), page[0].id)
        last = Key(as_utc(page[-1].created_at), page[-1].id)
        after_id = last.id
        ids.extend(row.id for row in page)
        if stop_requested():
            return None
    if first is None or last is None:
        return None
    return ids, first, last


def iter_lines(path: Path) -> Iterator[bytes]:
    """Yield the uncompressed lines of an archive file."""
    with gzip.open(path, "rb") as handle:
        yield from io.BufferedReader(handle)  # type: ignore[arg-type]


def verify_data_file(path: Path, manifest: Manifest) -> None:
    """Read the file back and check its row count and checksum."""
    digest = hashlib.sha256()
    count = 0
    try:
        with gzip.open(path, "rb") as handle:
            while chunk := handle.read(VERIFY_CHUNK_BYTES):
                digest.update(chunk)
                count += chunk.count(b"\n")
    except (OSError, EOFError, zlib.error) as exc:
        raise ArchiveFileError(f"archive file {path} cannot be read: {exc}") from exc
    if count != manifest.rows or digest.hexdigest() != manifest.sha256:
        raise ArchiveFileError(
            f"archive file {path} failed verification: {count} rows with SHA-256 "
            f"{digest.hexdigest()}, expected {manifest.rows} rows with {manifest.sha256}"
        )


def iter_ids(path: Path) -> Iterator[int]:
    for line in iter_lines(path):
        yield int(json.loads(line)["id"])


def files_of_run(engine: Engine, run_id: int) -> int:
    """Return how many archive files run_id has registered."""
    with engine.connect() as connection:
        return connection.execute(
            select(func.count()).select_from(archive_files).where(archive_files.c.run_id == run_id)
        ).scalar_one()


def register(engine: Engine, manifest: Manifest) -> None:
    """Record a verified file as exported: from now on its rows may be deleted."""
    with engine.begin() as connection:
        connection.execute(
            insert(archive_files).values(
                name=manifest.name,
                run_id=manifest.run_id,
                status="exported",
                row_count=manifest.rows,
                sha256=manifest.sha256,
                first_created_at=manifest.first_key.created_at,
                last_created_at=manifest.last_key.created_at,
                min_id=manifest.min_id,
                max_id=manifest.max_id,
                cutoff=manifest.cutoff,
                exported_at=manifest.exported_at,
            )
        )


def delete_archived_rows(
    engine: Engine,
    manifest: Manifest,
    ids: Sequence[int],
    sizer: BatchSizer,
    on_batch: Callable[[int, float], bool],
) -> bool:
    """Delete the live rows of a registered file, the listed ids, in batches.

    `ids` are the ids of the file's rows. The sizer sets each batch's size.
    `on_batch` receives the rows each batch deleted and its seconds, and
    returns False to stop early. Returns whether the file is now complete.
    """
    position = 0
    while position < len(ids):
        chunk = ids[position:position + sizer.size]
        position += len(chunk)
        started = time.monotonic()
        count = delete_listed(engine, chunk, manifest.cutoff)
        if not on_batch(count, time.monotonic() - started) and position < len(ids):
            return False
    with engine.begin() as connection:
        connection.execute(
            update(archive_files)
            .where(archive_files.c.name == manifest.name)
            .values(status="complete", completed_at=utc_now())
        )
    return True


def read_manifest(path: Path) -> Manifest:
    try:
        return Manifest.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError) as exc:
        raise ArchiveFileError(f"manifest {path} cannot be read: {exc}") from exc


def unfinished_files(engine: Engine, directory: Path, log: Callable[..., None]) -> list[Manifest]:
    """Repair what a crash left in directory; return files whose rows need deleting.

    Removes partial files, registers verified files that the crash left
    unregistered, and lists every registered file still in status exported.
    """
    # A folder that does not exist contains no file, but the ledger may still
    # list files of an earlier run as exported. Those stop the run below,
    # because their rows would otherwise be exported again into this folder.
    for leftover in directory.glob(".*.tmp"):
        log("archive_file_partial_removed", file=leftover.name)
        leftover.unlink()
    with engine.connect() as connection:
        registered = {
            row.name: row.status
            for row in connection.execute(select(archive_files.c.name, archive_files.c.status))
        }
    for data_file in directory.glob(f"*{DATA_SUFFIX}"):
        manifest_path = data_file.with_name(data_file.name[: -len(DATA_SUFFIX)] + MANIFEST_SUFFIX)
        if data_file.name not in registered and not manifest_path.exists():
            # Renamed, but the crash came before its manifest: no row of it
            # was deleted, so the next export writes them again.
            log("archive_file_incomplete_removed", file=data_file.name)
            data_file.unlink()
    pending = []
    for manifest_path in sorted(directory.glob(f"*{MANIFEST_SUFFIX}")):
        manifest = read_manifest(manifest_path)
        status = registered.get(manifest.name)
        if status == "complete":
            continue
        verify_data_file(directory / manifest.name, manifest)
        if status is None:
            log("archive_file_registered_late", file=manifest.name, rows=manifest.rows)
            register(engine, manifest)
        pending.append(manifest)
    missing = [
        name for name, status in registered.items()
        if status == "exported" and name not in {m.name for m in pending}
    ]
    if missing:
        raise ArchiveFileError(
            f"archive files {', '.join(sorted(missing))} are registered as exported but "
            f"their manifest is missing from {directory}. Some of their rows may still be "
            "in voucher_audit_logs, and archiving them again would copy them into a second "
            "file. Restore the files, or point --archive-dir (VOUCHER_JOBS_ARCHIVE_DIR) at "
            "the folder that holds them."
        )
    return pending
