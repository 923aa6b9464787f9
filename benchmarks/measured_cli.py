"""Run the voucher-jobs command and record this process's peak RSS when it exits.

`python benchmarks/measured_cli.py FILE ARGS...` runs `voucher-jobs ARGS...`
and writes the peak resident set size, in KiB, to FILE at exit. It reads
VmHWM from /proc/self/status, which counts this program only. wait4's
ru_maxrss would not do: Linux carries a process's peak across exec, so a
child forked from a large benchmark process reports the parent's memory.
"""

from __future__ import annotations

import atexit
import sys
from pathlib import Path


def _peak_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def main() -> None:
    peak_file = Path(sys.argv[1])
    sys.argv = ["voucher-jobs", *sys.argv[2:]]
    atexit.register(lambda: peak_file.write_text(str(_peak_kib())))
    from voucher_jobs.cli.main import main as voucher_jobs

    voucher_jobs()


if __name__ == "__main__":
    main()
