"""A full disk while an archive file is written: a small tmpfs as the archive folder.

Mounting needs root (CAP_SYS_ADMIN). `tmpfs_available` returns whether this
process may mount, so that callers skip the scenario elsewhere.
"""

from __future__ import annotations

import os
import secrets
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

from sqlalchemy import insert, select

from reliability.invariants import CUTOFF, Tally, check_archival, snapshot
from reliability.kills import arguments
from tests.conftest import Database
from voucher_jobs.data.schema import runs, voucher_audit_logs

SMALL = "256k"
ROWS = 1500
# Random hex does not compress below half its size, so ROWS rows of this
# much metadata make a file of about 450 KiB, more than SMALL holds.
METADATA_BYTES = 600


def tmpfs_available() -> bool:
    return os.geteuid() == 0 and Path("/proc/filesystems").read_text().find("tmpfs") >= 0


@contextmanager
def small_tmpfs(directory: Path) -> Iterator[Path]:
    """Mount a SMALL tmpfs at directory, and unmount it at the end."""
    directory.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SMALL}", "tmpfs", str(directory)],
                   check=True, capture_output=True, text=True)
    try:
        yield directory
    finally:
        subprocess.run(["umount", str(directory)], check=True, capture_output=True, text=True)


def disk_full_scenario(db: Database) -> Tally:
    """Run archive-file mode into a full folder, then again with space, and check."""
    tally = Tally()
    rows = [dict(voucher_id=i, action="UPDATED", actor_type="ADMIN", code=f"C{i}",
                 metadata={"blob": secrets.token_hex(METADATA_BYTES // 2)},
                 created_at=CUTOFF - timedelta(seconds=ROWS - i))
            for i in range(ROWS)]
    with db.engine.begin() as connection:
        connection.execute(insert(voucher_audit_logs), rows)
    before = snapshot(db)
    archive_dir = db.workdir / "archive"
    env = db.env(VOUCHER_JOBS_ARCHIVE_FILE_ROWS="100000", VOUCHER_JOBS_RETRY_ATTEMPTS="0")
    with small_tmpfs(archive_dir):
        result = db.cli(*arguments(db, "archive-file", rerun=True), env=env)
        tally.counts["disk-full runs"] += 1
        tally.expect(result.returncode == 1,
                     f"disk-full: run exited with {result.returncode}: {result.stderr[-500:]}")
        tally.expect(str(archive_dir) in result.stderr and "No space left" in result.stderr,
                     f"disk-full: the error does not name the folder: {result.stderr[-500:]}")
        left = sorted(path.name for path in archive_dir.iterdir())
        tally.expect(left == [], f"disk-full: files left in the full folder: {left}")
        live = db.count(voucher_audit_logs)
        tally.rows_checked += live
        tally.expect(live == len(before), f"disk-full: {len(before) - live} rows were deleted")
        [failed] = db.rows(select(runs.c.status).order_by(runs.c.id.desc()).limit(1))
        tally.expect(failed.status == "failed", f"disk-full: the run is {failed.status}")
        subprocess.run(["mount", "-o", "remount,size=16m", str(archive_dir)], check=True)
        result = db.cli(*arguments(db, "archive-file", rerun=True), env=env)
        tally.expect(result.returncode == 0,
                     f"disk-full: rerun exited with {result.returncode}: {result.stderr[-500:]}")
        check_archival(db, "archive-file", before, archive_dir, tally, complete=True)
    return tally
