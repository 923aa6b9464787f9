"""A private PostgreSQL 15 cluster in a temporary folder, for faults that hit the server.

It listens on 127.0.0.1 only, on a free port, with its Unix socket in its
own folder. TCP connections need the password; local socket connections
are trusted, for pg_ctl. Run as root, initdb and pg_ctl run as the
`postgres` user, because PostgreSQL refuses to run as root.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

BIN = Path(os.environ.get("VOUCHER_JOBS_PG_BIN", "/usr/lib/postgresql/15/bin"))
SUPERUSER = "postgres"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Cluster:
    """initdb, start, restart and stop one private cluster."""

    def __init__(self, password: str) -> None:
        self.password = password
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="voucher-jobs-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self._owner = pwd.getpwnam("postgres") if os.geteuid() == 0 else None
        if self._owner:
            os.chown(self.root, self._owner.pw_uid, self._owner.pw_gid)

    def url(self, database: str = "postgres", user: str = SUPERUSER,
            password: str | None = None) -> str:
        secret = self.password if password is None else password
        return f"postgresql://{user}:{secret}@127.0.0.1:{self.port}/{database}"

    def _run(self, *command: str) -> None:
        prefix = ["runuser", "-u", "postgres", "--"] if self._owner else []
        result = subprocess.run([*prefix, *command], capture_output=True, text=True,
                                timeout=120, cwd=self.root)
        if result.returncode != 0:
            raise RuntimeError(f"{command[0]} failed with {result.returncode}: "
                               f"{result.stderr.strip()}\n{self._log_tail()}")

    def _log_tail(self) -> str:
        return self.log.read_text()[-2000:] if self.log.exists() else ""

    def start(self) -> None:
        password_file = self.root / "password"
        password_file.write_text(self.password + "\n")
        if self._owner:
            os.chown(password_file, self._owner.pw_uid, self._owner.pw_gid)
        self._run(str(BIN / "initdb"), "-D", str(self.data), "-U", SUPERUSER,
                  f"--pwfile={password_file}", "--auth-local=trust",
                  "--auth-host=scram-sha-256", "--no-sync")
        password_file.unlink()
        self._pg_ctl("start")

    def _pg_ctl(self, action: str, *extra: str) -> None:
        options = (f"-c listen_addresses=127.0.0.1 -p {self.port} "
                   f"-k {self.root} -c fsync=off")
        self._run(str(BIN / "pg_ctl"), action, "-w", "-t", "60", "-D", str(self.data),
                  "-l", str(self.log), "-o", options, *extra)

    def restart(self) -> None:
        self._pg_ctl("restart", "-m", "fast")

    def stop(self) -> None:
        """Stop the server if it runs and remove the folder."""
        if (self.data / "postmaster.pid").exists():
            self._run(str(BIN / "pg_ctl"), "stop", "-w", "-m", "immediate",
                      "-D", str(self.data))
        shutil.rmtree(self.root, ignore_errors=True)
