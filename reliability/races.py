"""Race driver: `python -m reliability.races --rounds 5 --backends sqlite,postgresql`.

Steps (triggers and writer by default, or those named with --steps):

- triggers: per round, backend and job, 3 CLI runs, 2 scheduler catch-ups
  and 3 HTTP requests released together (see trigger_race). Exactly one run
  may do the work, and the seven other triggers must be refused with its
  run id. In even rounds the schedulers start first, and the other six
  triggers once a scheduler run is recorded. audit-archival takes the modes delete,
  archive-table and archive-file in turn from round to round.
- writer: an application process writes 200 operations per second while
  voucher-expired and then audit-archival run with small batches, for each
  archival mode (see app_writer). The application must see no error, and
  after a rerun of both jobs the invariants must hold.
- scan (SQLite only, not run by default): the same writer while dry runs of
  both jobs scan a file of --scan-rows expired vouchers and three times as
  many old audit rows. The writer's maximum latency shows how long a job's
  start-up scan made the application wait.

It prints each round's figures and the totals, and exits with 1 when it
found a violation.
"""

from __future__ import annotations

import argparse
import sys
import time

from reliability.app_writer import RATE, WriterFigures, scan_scenario, writer_scenario
from reliability.databases import BACKENDS, Workspace, workspace
from reliability.invariants import MODES, Tally
from reliability.trigger_race import JOBS, race_round

STEPS = ("triggers", "writer", "scan")
DEFAULT_STEPS = ("triggers", "writer")


def trigger_step(space: Workspace, rounds: int, backends: list[str]) -> Tally:
    tally = Tally()
    for backend in backends:
        for number in range(1, rounds + 1):
            mode = MODES[(number - 1) % len(MODES)]
            schedulers_first = number % 2 == 0
            for job in JOBS:
                started = time.monotonic()
                part = race_round(space.fresh(backend), job, mode,
                                  schedulers_first=schedulers_first)
                winner = next((name.removeprefix("won by ") for name in part.counts
                               if name.startswith("won by ")), "nobody")
                label = f"{backend}/{job}" + (f"/{mode}" if job == "audit-archival" else "")
                if schedulers_first:
                    label += " (schedulers first)"
                print(f"  round {number} {label}: {part.counts['triggers started']} triggers, "
                      f"{part.counts['runs that did work']} run did work (won by {winner}), "
                      f"{part.counts['refusals naming the active run']} refusals named it, "
                      f"ledger rows {part.counts['ledger spread ms']} ms apart, "
                      f"{len(part.violations)} violations, "
                      f"{time.monotonic() - started:.1f} s", flush=True)
                tally.add(part)
    return tally


def writer_step(space: Workspace, backends: list[str], *, rate: float, rows: int,
                background: int) -> tuple[Tally, list[WriterFigures]]:
    tally = Tally()
    figures = []
    for backend in backends:
        for mode in MODES:
            part, writer = writer_scenario(space.fresh(backend), mode, expired_vouchers=rows,
                                           old_rows=rows, background=background, rate=rate)
            print(f"  writer {backend}/{mode}: {writer.describe()}, "
                  f"{len(part.violations)} violations", flush=True)
            tally.add(part)
            figures.append(writer)
    return tally, figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5,
                        help="trigger rounds per backend and job (default 5)")
    parser.add_argument("--backends", default="sqlite,postgresql",
                        help="comma-separated: sqlite, postgresql")
    parser.add_argument("--steps", default=",".join(DEFAULT_STEPS),
                        help=f"comma-separated steps: {', '.join(STEPS)}")
    parser.add_argument("--writer-rate", type=float, default=RATE,
                        help=f"application operations per second (default {RATE})")
    parser.add_argument("--writer-rows", type=int, default=3000,
                        help="expired vouchers and old audit rows per writer scenario "
                        "(default 3000)")
    parser.add_argument("--background-rows", type=int, default=20_000,
                        help="vouchers and audit rows per writer scenario that the jobs "
                        "leave alone (default 20000)")
    parser.add_argument("--scan-rows", type=int, default=1_000_000,
                        help="expired vouchers of the scan step, with three times as many "
                        "old audit rows (default 1000000)")
    options = parser.parse_args(argv)
    backends = [name.strip() for name in options.backends.split(",") if name.strip()]
    steps = [name.strip() for name in options.steps.split(",") if name.strip()]
    unknown = sorted(set(backends) - set(BACKENDS)) + sorted(set(steps) - set(STEPS))
    if unknown:
        parser.error(f"unknown backend or step: {', '.join(unknown)}")

    started = time.monotonic()
    total = Tally()
    writers: list[WriterFigures] = []
    with workspace() as space:
        for step in steps:
            print(f"{step}:", flush=True)
            if step == "triggers":
                total.add(trigger_step(space, options.rounds, backends))
            elif step == "scan":
                part, scan = scan_scenario(space.fresh("sqlite"),
                                           expired_vouchers=options.scan_rows,
                                           old_rows=3 * options.scan_rows,
                                           rate=options.writer_rate)
                print(f"  scan sqlite: {scan.describe()}, {len(part.violations)} violations",
                      flush=True)
                total.add(part)
            else:
                part, writers = writer_step(space, backends, rate=options.writer_rate,
                                            rows=options.writer_rows,
                                            background=options.background_rows)
                total.add(part)

    for name in ("triggers started", "runs that did work", "refusals naming the active run"):
        if name in total.counts:
            print(f"{name}: {total.counts[name]}")
    for name, count in sorted(total.counts.items()):
        if name.startswith(("won by", "refusals by")):
            print(f"  {name}: {count}")
    if writers:
        print(f"writer operations: {total.counts['writer operations']} "
              f"({total.counts['writer operations while a job ran']} while a job ran)")
        print(f"writer errors: {total.counts['writer errors']}")
        print(f"writer p50 latency: {max(w.p50_ms for w in writers):.1f} ms (highest of "
              f"{len(writers)} scenarios)")
        print(f"writer p99 latency: {max(w.p99_ms for w in writers):.1f} ms (highest)")
        print(f"writer max latency: {max(w.max_ms for w in writers):.1f} ms")
    print(f"rows checked: {total.rows_checked}")
    print(f"violations found: {len(total.violations)}")
    for violation in total.violations:
        print(f"  {violation}")
    print(f"seconds: {time.monotonic() - started:.0f}")
    return 1 if total.violations else 0


if __name__ == "__main__":
    sys.exit(main())
