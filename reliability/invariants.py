"""Seed data and the invariants that every fault scenario checks afterwards.

A check never raises on a broken invariant: it appends a description to
`Tally.violations`, so that the driver can count every violation of a long
run. Tests assert that the list is empty. `Tally.rows_checked` counts each
voucher, audit row and archived record that a check looked at.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import insert, select

from tests.conftest import Database
from voucher_jobs.data.schema import (
    archive_files,
    audit_archive,
    runs,
    voucher_audit_logs,
    vouchers,
)

T0 = datetime(2026, 12, 4, 10, 0, 0, tzinfo=timezone.utc)
AT = "2026-12-04T10:00:00Z"
RETENTION_DAYS = 730
CUTOFF = T0 - timedelta(days=RETENTION_DAYS)
MODES = ("delete", "archive-table", "archive-file")
# The form of expiry instants in EXPIRED rows' metadata; it sorts in time order.
ISO = "%Y-%m-%dT%H:%M:%S.%fZ"
logs = voucher_audit_logs


@dataclass
class Tally:
    """Figures of one suite: faults injected, rows checked, violations found."""

    kills: int = 0
    rows_checked: int = 0
    violations: list[str] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)

    def expect(self, condition: bool, description: str) -> None:
        if not condition:
            self.violations.append(description)

    def add(self, other: Tally) -> None:
        self.kills += other.kills
        self.rows_checked += other.rows_checked
        self.violations.extend(other.violations)
        self.counts.update(other.counts)


# --- voucher-expired -------------------------------------------------------


def seed_vouchers(db: Database, expired: int, prefix: str = "V") -> None:
    """Add `expired` live vouchers past T0, plus deleted and future ones that stay unlogged."""
    rows = [dict(code=f"{prefix}{i:07d}", type="PERCENTAGE",
                 expiry_date=T0 - timedelta(seconds=i + 1), deleted_at=None,
                 created_at=T0 - timedelta(days=30)) for i in range(expired)]
    rows += [dict(code=f"{prefix}D{i:05d}", type="FIXED", expiry_date=T0 - timedelta(days=1),
                  deleted_at=T0 - timedelta(hours=1), created_at=T0 - timedelta(days=30))
             for i in range(10)]
    rows += [dict(code=f"{prefix}F{i:05d}", type="FIXED",
                  expiry_date=T0 + timedelta(minutes=i + 1), deleted_at=None,
                  created_at=T0 - timedelta(days=30)) for i in range(10)]
    with db.engine.begin() as connection:
        connection.execute(insert(vouchers), rows)


def _expired_rows(db: Database) -> list[Any]:
    return db.rows(select(logs.c.voucher_id, logs.c.metadata)
                   .where(logs.c.action == "EXPIRED"))


def check_expiry_at_most_once(db: Database, tally: Tally) -> None:
    """No voucher has two EXPIRED rows for one expiry instant."""
    rows = _expired_rows(db)
    tally.rows_checked += len(rows)
    per_instant = Counter((row.voucher_id, row.metadata["expiry_date"]) for row in rows)
    doubles = sorted(key for key, count in per_instant.items() if count > 1)
    tally.expect(not doubles, f"{db.backend}: EXPIRED written twice for {doubles[:5]}")


def check_expiry_complete(db: Database, tally: Tally, reference: datetime = T0) -> None:
    """Every live voucher expired at `reference` has one EXPIRED row for its instant."""
    check_expiry_at_most_once(db, tally)
    live = db.rows(select(vouchers.c.id, vouchers.c.expiry_date, vouchers.c.deleted_at))
    tally.rows_checked += len(live)
    logged = {(row.voucher_id, row.metadata["expiry_date"]) for row in _expired_rows(db)}
    missing = []
    for voucher in live:
        instant = voucher.expiry_date.astimezone(timezone.utc)
        expected = voucher.deleted_at is None and instant <= reference
        key = (voucher.id, instant.strftime(ISO))
        if expected and key not in logged:
            missing.append(voucher.id)
    tally.expect(not missing, f"{db.backend}: {len(missing)} expired vouchers unlogged, "
                              f"such as {missing[:5]}")
    deleted_before = {v.id for v in live
                      if v.deleted_at is not None and v.deleted_at < reference}
    wrongly = sorted(key for key in logged
                     if key[0] in deleted_before or key[1] > reference.strftime(ISO))
    tally.expect(not wrongly, f"{db.backend}: deleted or future vouchers logged: {wrongly[:5]}")


# --- audit-archival --------------------------------------------------------


def seed_audit_rows(db: Database, old: int, new: int) -> None:
    """Add `old` rows before the cutoff and `new` rows at or after it."""
    moments = [CUTOFF - timedelta(seconds=old - i) for i in range(old)]
    moments += [CUTOFF + timedelta(seconds=i) for i in range(new)]
    db.add_audit_rows(moments)


def snapshot(db: Database) -> dict[int, tuple[Any, ...]]:
    """Return every audit row by id, to compare against after the runs."""
    return {row.id: tuple(row) for row in db.rows(select(logs))}


def old_ids_of(rows: dict[int, tuple[Any, ...]]) -> set[int]:
    return {row_id for row_id, row in rows.items() if row[6] < CUTOFF}


def manifest_path(data_file: Path) -> Path:
    return data_file.with_name(data_file.name.removesuffix(".jsonl.gz") + ".manifest.json")


def read_archive(directory: Path, tally: Tally, label: str) -> dict[str, list[dict[str, Any]]]:
    """Read every data file with a manifest and check its row count and checksum."""
    records: dict[str, list[dict[str, Any]]] = {}
    if not directory.exists():
        return records
    for data_file in sorted(directory.glob("*.jsonl.gz")):
        manifest_file = manifest_path(data_file)
        if not manifest_file.exists():
            continue
        manifest = json.loads(manifest_file.read_text())
        content = gzip.decompress(data_file.read_bytes())
        lines = content.splitlines()
        tally.expect(manifest["file"] == data_file.name,
                     f"{label}: manifest of {data_file.name} names {manifest['file']}")
        tally.expect(manifest["rows"] == len(lines),
                     f"{label}: {data_file.name} has {len(lines)} rows, manifest {manifest['rows']}")
        tally.expect(manifest["sha256_uncompressed"] == hashlib.sha256(content).hexdigest(),
                     f"{label}: checksum of {data_file.name} differs from its manifest")
        records[data_file.name] = [json.loads(line) for line in lines]
        tally.rows_checked += len(lines)
    return records


def check_archival(db: Database, mode: str, before: dict[int, tuple[Any, ...]],
                   archive_dir: Path, tally: Tally, *, complete: bool,
                   untouched: set[int] | None = None) -> None:
    """Check the archival invariants, after a fault (`complete=False`) or a full rerun.

    Every row older than the cutoff is live or archived exactly once; rows
    at or after the cutoff are unchanged (only those in `untouched`, when
    another writer may update the rest). After a full rerun no old row is
    live, no partial file is left, and every registered file is complete.
    """
    label = f"{db.backend}/{mode}"
    old_ids = old_ids_of(before)
    now_rows = snapshot(db)
    tally.rows_checked += len(now_rows)
    live_old = {row_id for row_id, row in now_rows.items() if row[6] < CUTOFF}
    strangers = live_old - old_ids
    tally.expect(not strangers, f"{label}: old rows appeared: {sorted(strangers)[:5]}")

    newer = untouched if untouched is not None else set(before) - old_ids
    changed = [row_id for row_id in newer if now_rows.get(row_id) != before[row_id]]
    tally.expect(not changed, f"{label}: rows newer than the cutoff changed: {changed[:5]}")

    archived: Counter[int] = Counter()
    copies: dict[int, tuple[Any, ...]] = {}
    if mode == "archive-table":
        for row in db.rows(select(audit_archive)):
            archived[row.id] += 1
            copies[row.id] = tuple(row)[:7]
        tally.rows_checked += sum(archived.values())
        both = live_old & set(archived)
        tally.expect(not both, f"{label}: rows both live and archived: {sorted(both)[:5]}")
    elif mode == "archive-file":
        for records in read_archive(archive_dir, tally, label).values():
            for record in records:
                archived[record["id"]] += 1
                copies[record["id"]] = (
                    record["id"], record["voucher_id"], record["action"], record["actor_type"],
                    record["code"], record["metadata"],
                    datetime.fromisoformat(record["created_at"]),
                )
    twice = sorted(row_id for row_id, count in archived.items() if count > 1)
    tally.expect(not twice, f"{label}: rows archived more than once: {twice[:5]}")
    outside = sorted(set(archived) - old_ids)
    tally.expect(not outside, f"{label}: archived rows that were not eligible: {outside[:5]}")
    altered = sorted(row_id for row_id, copy in copies.items()
                     if row_id in before and copy != before[row_id])
    tally.expect(not altered, f"{label}: archived copies differ from the rows: {altered[:5]}")
    if mode != "delete":
        lost = sorted(old_ids - live_old - set(archived))
        tally.expect(not lost, f"{label}: rows neither live nor archived: {lost[:5]}")

    if complete:
        tally.expect(not live_old, f"{label}: {len(live_old)} old rows still live after rerun")
        partial = sorted(path.name for path in archive_dir.rglob("*.tmp")) \
            if archive_dir.exists() else []
        tally.expect(not partial, f"{label}: partial files left: {partial}")
        if mode == "archive-file":
            statuses = {row.name: row.status for row in db.rows(select(archive_files))}
            files = sorted(path.name for path in archive_dir.glob("*.jsonl.gz"))
            tally.expect(sorted(statuses) == files,
                         f"{label}: registered files {sorted(statuses)} differ from {files}")
            tally.expect(set(statuses.values()) <= {"complete"},
                         f"{label}: files not complete: {statuses}")


def check_runs_interrupted(db: Database, run_ids: list[int], tally: Tally) -> None:
    """Every killed run is marked interrupted once a later run has started."""
    if not run_ids:
        return
    rows = db.rows(select(runs.c.id, runs.c.status).where(runs.c.id.in_(run_ids)))
    wrong = sorted((row.id, row.status) for row in rows if row.status != "interrupted")
    tally.expect(not wrong and len(rows) == len(run_ids),
                 f"{db.backend}: killed runs not marked interrupted: {wrong}")
