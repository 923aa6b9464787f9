"""Fault-injection driver: `python -m reliability.kill_suite --kills 120 --seed 1`.

Steps (all by default, or those named with --steps):

- kills: SIGKILL at random moments in voucher-expired and in every
  audit-archival mode, on each backend, then a rerun and the invariant checks.
- db-faults: a private PostgreSQL cluster restarted mid-run, and the run's
  backend terminated with pg_terminate_backend mid-batch, with and without
  retries.
- disk-full: archive-file mode into a full tmpfs (needs root to mount).

It prints the figures at the end and exits with 1 when it found a violation.
"""

from __future__ import annotations

import argparse
import random
import sys
import time

from sqlalchemy import text

from reliability import db_faults, disk_full, kills
from reliability.databases import BACKENDS, Workspace, workspace
from reliability.invariants import Tally
from reliability.postgres_cluster import Cluster
from tests.conftest import Database
from voucher_jobs.data import migrate
from voucher_jobs.data.engine import create_db_engine

STEPS = ("kills", "db-faults", "disk-full")


def kill_step(space: Workspace, total: int, backends: list[str], rng: random.Random) -> Tally:
    tally = Tally()
    combinations = [(b, s) for b in backends for s in kills.SCENARIOS]
    for (backend, scenario), count in zip(combinations, kills.spread(total, len(combinations))):
        if count == 0:
            continue
        part = kills.kill_scenario(space.fresh(backend), scenario, count, rng)
        print(f"  kills {backend}/{scenario}: {part.kills} kills, {part.rows_checked} rows "
              f"checked, {len(part.violations)} violations", flush=True)
        tally.add(part)
    return tally


def db_fault_step(space: Workspace) -> Tally:
    tally = Tally()
    for scenario, attempts in (("expiry", 2), ("archive-file", 2), ("delete", 0)):
        part = db_faults.terminate_scenario(space.fresh("postgresql"), scenario, attempts)
        print(f"  terminate {scenario} retries={attempts}: {len(part.violations)} violations",
              flush=True)
        tally.add(part)
    cluster = Cluster(password="reliability-restart-pw")
    cluster.start()
    try:
        admin = create_db_engine(cluster.url(), isolation_level="AUTOCOMMIT")
        for index, (scenario, attempts) in enumerate(
                (("expiry", 5), ("archive-table", 5), ("archive-file", 5), ("delete", 0))):
            name = f"jobs{index}"
            with admin.connect() as connection:
                connection.execute(text(f'CREATE DATABASE "{name}"'))
            url = cluster.url(name)
            engine = create_db_engine(url)
            migrate.upgrade(engine)
            workdir = space.root / f"restart{index}"
            workdir.mkdir()
            database = Database("postgresql", url, engine, workdir)
            part = db_faults.restart_scenario(database, cluster.restart, scenario, attempts)
            engine.dispose()
            print(f"  restart {scenario} retries={attempts}: {len(part.violations)} "
                  "violations", flush=True)
            tally.add(part)
        admin.dispose()
    finally:
        cluster.stop()
    return tally


def disk_full_step(space: Workspace, backends: list[str]) -> Tally:
    tally = Tally()
    if not disk_full.tmpfs_available():
        print("  disk-full: skipped, mounting a tmpfs needs root", flush=True)
        return tally
    for backend in backends:
        part = disk_full.disk_full_scenario(space.fresh(backend))
        print(f"  disk-full {backend}: {len(part.violations)} violations", flush=True)
        tally.add(part)
    return tally


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=120, help="SIGKILLs in all (default 120)")
    parser.add_argument("--backends", default="sqlite,postgresql",
                        help="comma-separated: sqlite, postgresql")
    parser.add_argument("--seed", type=int, default=1, help="seed of the kill delays")
    parser.add_argument("--steps", default=",".join(STEPS),
                        help=f"comma-separated steps: {', '.join(STEPS)}")
    options = parser.parse_args(argv)
    backends = [name.strip() for name in options.backends.split(",") if name.strip()]
    steps = [name.strip() for name in options.steps.split(",") if name.strip()]
    unknown = sorted(set(backends) - set(BACKENDS)) + sorted(set(steps) - set(STEPS))
    if unknown:
        parser.error(f"unknown backend or step: {', '.join(unknown)}")

    started = time.monotonic()
    total = Tally()
    with workspace() as space:
        for step in steps:
            print(f"{step}:", flush=True)
            if step == "kills":
                part = kill_step(space, options.kills, backends, random.Random(options.seed))
            elif step == "db-faults":
                part = db_fault_step(space) if "postgresql" in backends else Tally()
            else:
                part = disk_full_step(space, backends)
            total.add(part)

    print(f"seed: {options.seed}")
    print(f"kills performed: {total.kills}")
    for name, count in sorted(total.counts.items()):
        print(f"{name}: {count}")
    print(f"rows checked: {total.rows_checked}")
    print(f"violations found: {len(total.violations)}")
    for violation in total.violations:
        print(f"  {violation}")
    print(f"seconds: {time.monotonic() - started:.0f}")
    return 1 if total.violations else 0


if __name__ == "__main__":
    sys.exit(main())
