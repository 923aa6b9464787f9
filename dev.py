#!/usr/bin/env python3
"""Set up the development environment and run the project's commands.

    python3 dev.py demo [ARGS]   run `voucher-jobs demo` on the embedded SQLite database
    python3 dev.py test [ARGS]   run the test suite (arguments go to pytest)
    python3 dev.py run ARGS      run any `voucher-jobs` command
    python3 dev.py bench [ARGS]  run the benchmark suite and write docs/benchmarks.md
    python3 dev.py lock          regenerate requirements.lock (needs uv)

Each command first makes sure that `.venv` exists and matches
requirements.lock, installing the locked versions (hashes checked) when the
lock file has changed. Only Python 3.11 or newer is needed.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
LOCK = ROOT / "requirements.lock"
STAMP = VENV / ".requirements.sha256"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")


def _fingerprint() -> str:
    digest = hashlib.sha256()
    for path in (LOCK, ROOT / "pyproject.toml"):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def ensure_venv() -> None:
    """Create .venv and install the locked dependencies if anything changed."""
    if sys.version_info < (3, 11):
        sys.exit(f"voucher-jobs needs Python 3.11 or newer; this is {sys.version.split()[0]}.")
    if not (BIN / "python").exists():
        print(f"Creating {VENV} ...", file=sys.stderr)
        venv.create(VENV, with_pip=True)
    fingerprint = _fingerprint()
    if STAMP.exists() and STAMP.read_text() == fingerprint:
        return
    print("Installing the locked dependencies ...", file=sys.stderr)
    pip = [str(BIN / "python"), "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "install", "--require-hashes", "-r", str(LOCK)], check=True)
    subprocess.run(
        [*pip, "install", "--no-deps", "--no-build-isolation", "-e", str(ROOT)], check=True
    )
    STAMP.write_text(fingerprint)


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(__doc__)
        return 0 if argv else 2
    command, arguments = argv[0], argv[1:]
    if command == "lock":
        return subprocess.call([
            "uv", "pip", "compile", "pyproject.toml", "requirements-build.in",
            "--extra", "test", "--generate-hashes", "--python-version", "3.11",
            "--universal", "-o", str(LOCK),
        ], cwd=ROOT)
    if command not in ("demo", "test", "run", "bench"):
        print(f"unknown command {command!r}; use demo, test, run, bench or lock",
              file=sys.stderr)
        return 2
    ensure_venv()
    if command == "test":
        return subprocess.call([str(BIN / "python"), "-m", "pytest", *arguments], cwd=ROOT)
    if command == "bench":
        return subprocess.call([str(BIN / "python"), "-m", "benchmarks.suite", *arguments],
                               cwd=ROOT)
    program = [str(BIN / "voucher-jobs")]
    return subprocess.call(program + (["demo"] if command == "demo" else []) + arguments)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
