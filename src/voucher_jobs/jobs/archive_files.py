"""The file sink of audit-archival: gzip-compressed JSON Lines plus a manifest.

A file goes through these steps, and its rows are deleted only after the last:

1. Rows are read page by page and streamed into `.NAME.jsonl.gz.tmp`.
2. The file is flushed and fsynced, then read back: its row count and the
   SHA-256 of its uncompressed content must match what was written.
3. The manifest (`NAME.manifest.json`) is written and fsynced, both files
   are renamed to their final names, and the folder is fsynced.
4. The file is registered in `voucher_jobs_archive_files` with status
   `exported`. Only now are its rows deleted from the live table, by id, in
   short transactions; the status then becomes `complete`.

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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, func, insert, select, update

from voucher_jobs.data.audit_batches import Key, delete_ids, read_page
from voucher_jobs.data.schema import archive_files
from voucher_jobs.data.types import as_utc, utc_now

FORMAT = "voucher-jobs-audit-archive/1"
DATA_SUFFIX = ".jsonl.gz"
MANIFEST_SUFFIX = ".manifest.json"


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


def export_file(
    engine: Engine,
    directory: Path,
    cutoff: datetime,
    after: Key | None,
    *,
    max_rows: int,
    page_size: int,
    run_id: int,
    sequence: int,
    stop_requested: Callable[[], bool],
) -> Manifest | None:
    """Write the next eligible rows (at most max_rows) to a verified archive file.

    Returns None when no row is eligible, or when a stop was requested before
    the file was complete. In both cases no file is left behind.
    """
    directory.mkdir(parents=True, exist_ok=True)
    stem = f"voucher_audit_logs.run{run_id:08d}.{sequence:05d}"
    temporary = directory / f".{stem}{DATA_SUFFIX}.tmp"
    try:
        manifest = _write_rows(
            engine, temporary, stem, cutoff, after, max_rows, page_size, run_id, stop_requested
        )
        if manifest is None:
            temporary.unlink(missing_ok=True)
            return None
        verify_data_file(temporary, manifest)
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
        os.replace(temporary, directory / f"{stem}{DATA_SUFFIX}")
        os.replace(manifest_temporary, directory / f"{stem}{MANIFEST_SUFFIX}")
        _fsync_directory(directory)
        return manifest
    except BaseException as exc:
        # Disk full, a read error or an interrupt: nothing was deleted yet,
        # so removing the partial files loses nothing.
        temporary.unlink(missing_ok=True)
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
    engine, temporary, stem, cutoff, after, max_rows, page_size, run_id, stop_requested
) -> Manifest | None:
    digest = hashlib.sha256()
    count = 0
    first: Key | None = None
    last: Key | None = None
    min_id: int | None = None
    max_id: int | None = None
    with open(temporary, "wb") as raw:
        # mtime=0 keeps the gzip header free of the write time, so the same
        # rows always give the same bytes.
        with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as compressed:
            while count < max_rows:
                with engine.connect() as connection:
                    page = read_page(connection, cutoff, last or after, min(page_size, max_rows - count))
                if not page:
                    break
                for row in page:
                    line = row_to_line(row)
                    compressed.write(line)
                    digest.update(line)
                key = Key(as_utc(page[-1].created_at), page[-1].id)
                first = first or Key(as_utc(page[0].created_at), page[0].id)
                last = key
                page_ids = [row.id for row in page]
                min_id = min(page_ids) if min_id is None else min(min_id, *page_ids)
                max_id = max(page_ids) if max_id is None else max(max_id, *page_ids)
                count += len(page)
                if stop_requested():
                    return None
        raw.flush()
        os.fsync(raw.fileno())
    if count == 0 or first is None or last is None or min_id is None or max_id is None:
        return None
    return Manifest(
        name=f"{stem}{DATA_SUFFIX}",
        rows=count,
        sha256=digest.hexdigest(),
        first_key=first,
        last_key=last,
        min_id=min_id,
        max_id=max_id,
        cutoff=cutoff,
        run_id=run_id,
        exported_at=utc_now(),
    )


def iter_lines(path: Path) -> Iterator[bytes]:
    """Yield the uncompressed lines of an archive file."""
    with gzip.open(path, "rb") as handle:
        yield from io.BufferedReader(handle)  # type: ignore[arg-type]


def verify_data_file(path: Path, manifest: Manifest) -> None:
    """Read the file back and check its row count and checksum."""
    digest = hashlib.sha256()
    count = 0
    try:
        for line in iter_lines(path):
            digest.update(line)
            count += 1
    except (OSError, EOFError) as exc:
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
    directory: Path,
    manifest: Manifest,
    batch_size: int,
    on_batch: Callable[[int], bool],
) -> tuple[int, bool]:
    """Delete the live rows of a registered file in batches of batch_size ids.

    `on_batch` receives the rows each batch deleted and returns False to stop
    early. Returns the rows deleted and whether the file is now complete.
    """
    deleted = 0
    ids: list[int] = []
    for row_id in iter_ids(directory / manifest.name):
        ids.append(row_id)
        if len(ids) == batch_size:
            count = delete_ids(engine, ids, manifest.cutoff)
            deleted += count
            ids = []
            if not on_batch(count):
                return deleted, False
    if ids:
        count = delete_ids(engine, ids, manifest.cutoff)
        deleted += count
        on_batch(count)
    with engine.begin() as connection:
        connection.execute(
            update(archive_files)
            .where(archive_files.c.name == manifest.name)
            .values(status="complete", completed_at=utc_now())
        )
    return deleted, True


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
    if not directory.exists():
        return []
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
            f"their manifest is missing from {directory}. Their rows were not all "
            "deleted. Restore the files, or point VOUCHER_JOBS_ARCHIVE_DIR at the "
            "folder that holds them."
        )
    return pending
