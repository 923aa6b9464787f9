"""The machine, the versions and the checkout that a benchmark report describes."""

from __future__ import annotations

import os
import platform
import re
import sqlite3
import subprocess
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_LOCKED = re.compile(r"^([A-Za-z0-9_.\-]+)==([^ ;\\]+)")


def describe_machine(folders: dict[str, Path]) -> dict[str, str]:
    """Return CPU, cores, memory, kernel and the disk under each of folders."""
    described = {
        "CPU": _cpu_model(),
        "cores": str(os.cpu_count()),
        "memory": f"{_meminfo_kib('MemTotal') / 2**20:.1f} GiB",
        "kernel": f"{platform.system()} {platform.release()}",
    }
    for label, folder in folders.items():
        described[f"disk ({label})"] = describe_disk(folder)
    return described


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _meminfo_kib(name: str) -> int:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith(f"{name}:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def describe_disk(folder: Path) -> str:
    """Describe the file system that contains folder: device, type, size, free space."""
    path = str(folder.resolve())
    device, mount_point, fs_type = "unknown", "", "unknown"
    try:
        with open("/proc/mounts") as mounts:
            for line in mounts:
                source, point, kind = line.split()[:3]
                inside = path == point or path.startswith(point.rstrip("/") + "/")
                # Of the mount points above the folder, the deepest one is its file system.
                if inside and len(point) > len(mount_point):
                    device, mount_point, fs_type = source, point, kind
    except OSError:
        pass
    try:
        stats = os.statvfs(folder)
        size = f"{stats.f_blocks * stats.f_frsize / 2**30:,.0f} GiB"
        free = f"{stats.f_bavail * stats.f_frsize / 2**30:,.0f} GiB free"
    except OSError:
        size, free = "size unknown", "free space unknown"
    rotational = _sysfs_block(device, "queue/rotational")
    kind = {"0": "kernel reports it not rotational", "1": "kernel reports it rotational"}.get(
        rotational or "", "")
    model = _sysfs_block(device, "device/model")
    parts = [f"{device} ({fs_type}) at {mount_point}", size, free]
    parts += [text for text in (kind, model) if text]
    return ", ".join(parts)


def _sysfs_block(device: str, attribute: str) -> str | None:
    """Read /sys/block/DISK/ATTRIBUTE for a device such as /dev/vda1."""
    name = Path(device).name
    for candidate in (name, name.rstrip("0123456789"), re.sub(r"p\d+$", "", name)):
        path = Path("/sys/block") / candidate / attribute
        if path.exists():
            try:
                return path.read_text().strip()
            except OSError:
                return None
    return None


def describe_drivers() -> dict[str, str]:
    """Return the versions of Python, SQLite and psycopg's libpq in this process."""
    import psycopg

    # libpq 10 and later report major * 10000 + minor.
    libpq = psycopg.pq.version()
    return {
        "Python": _describe_python(),
        "SQLite": f"{sqlite3.sqlite_version} (the library of Python's sqlite3 module)",
        "psycopg": (f"{psycopg.__version__}, {psycopg.pq.__impl__} implementation, "
                    f"libpq {libpq // 10000}.{libpq % 10000}"),
    }


def _describe_python() -> str:
    """Describe the interpreter without its path, which is local to this machine."""
    venv = ", virtual environment" if sys.prefix != sys.base_prefix else ""
    return f"{platform.python_version()} ({platform.python_implementation()}{venv})"


def locked_packages() -> list[tuple[str, str, str]]:
    """Return (package, locked version, installed version) per run-time dependency.

    The packages are those that voucher-jobs' installed metadata requires
    outside its extras; the locked version comes from requirements.lock.
    """
    locked: dict[str, str] = {}
    lock_file = ROOT / "requirements.lock"
    if lock_file.exists():
        for line in lock_file.read_text().splitlines():
            match = _LOCKED.match(line)
            if match:
                locked[_normalize(match.group(1))] = match.group(2)
    try:
        requirements = metadata.requires("voucher-jobs") or []
    except metadata.PackageNotFoundError:
        requirements = []
    rows = []
    for requirement in requirements:
        if "extra ==" in requirement:
            continue
        name = _normalize(re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0])
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            installed = "not installed"
        rows.append((name, locked.get(name, "not in the lock file"), installed))
    return sorted(rows)


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def git_commit() -> str:
    """Return the checkout's commit, noting uncommitted changes."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
            text=True, check=True,
        ).stdout.strip()
        # --no-optional-locks: only read, so a concurrent git command in the
        # same checkout never finds the index locked by this one.
        changes = subprocess.run(
            ["git", "--no-optional-locks", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT, capture_output=True, text=True, check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    if changes:
        count = len(changes.splitlines())
        return f"{commit} with uncommitted changes to {count} tracked files"
    return commit


def load_average() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg()) + " (1, 5, 15 min)"
