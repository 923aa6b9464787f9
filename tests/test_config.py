"""Settings from the environment and .env: invalid values stop a run before it writes."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest

from tests.conftest import Database
from voucher_jobs.config import ENV_NAMES
from voucher_jobs.data.engine import DatabaseURLError, normalize_url
from voucher_jobs.data.schema import runs, voucher_audit_logs

SECRET = "secretpw"

# Settings are checked before the first connection, so tests that are not
# about the database run on SQLite only.
sqlite_only = pytest.mark.parametrize("db", ["sqlite"], indirect=True)


def seed_old_audit_rows(db: Database) -> int:
    """Add rows that a run with the default 730-day retention would delete."""
    old = datetime.now(timezone.utc) - timedelta(days=1000)
    db.add_audit_rows([old + timedelta(minutes=i) for i in range(5)])
    return db.count(voucher_audit_logs)


def assert_rejected(db: Database, cli, variable: str, value: str) -> None:
    before = seed_old_audit_rows(db)
    result = cli("run", "audit-archival", env={"DATABASE_URL": db.url, variable: value})
    assert result.exit_code == 2, result.stderr
    assert variable in result.stderr
    assert repr(value) in result.stderr
    assert "Traceback" not in result.stderr
    assert db.count(voucher_audit_logs) == before
    assert db.count(runs) == 0


@pytest.mark.parametrize("value", ["0", "-5", "abc", "", "1.5", "99999999"])
def test_retention_days_rejected(db: Database, cli, value: str) -> None:
    assert_rejected(db, cli, "VOUCHER_AUDIT_RETENTION_DAYS", value)


@sqlite_only
@pytest.mark.parametrize("value", ["0", "-1", "abc", "", "1.5", "100001"])
def test_batch_size_rejected(db: Database, cli, value: str) -> None:
    assert_rejected(db, cli, "VOUCHER_JOBS_BATCH_SIZE", value)


@sqlite_only
@pytest.mark.parametrize("value", ["bogus", "", "archive_table"])
def test_archive_mode_rejected(db: Database, cli, value: str) -> None:
    assert_rejected(db, cli, "VOUCHER_JOBS_ARCHIVE_MODE", value)


def test_archive_mode_any_case(cli, tmp_path) -> None:
    result = cli("config", env={"VOUCHER_JOBS_ARCHIVE_MODE": " Archive-File "})
    assert result.exit_code == 0
    assert "VOUCHER_JOBS_ARCHIVE_MODE=archive-file" in result.stdout


@sqlite_only
@pytest.mark.parametrize("value", ["-1", "abc", "", "3601", "nan", "inf"])
def test_batch_pause_rejected(db: Database, cli, value: str) -> None:
    assert_rejected(db, cli, "VOUCHER_JOBS_BATCH_PAUSE_SECONDS", value)


def test_rejection_names_valid_range(cli) -> None:
    result = cli("run", "audit-archival", env={"VOUCHER_AUDIT_RETENTION_DAYS": "0"})
    assert "from 1 to 36500" in result.stderr


def test_second_alias_gets_hint(cli) -> None:
    result = cli("run", "audit-archival", env={"VOUCHER_JOBS_RETENTION_DAYS": "abc"})
    assert result.exit_code == 2
    assert "'abc'" in result.stderr
    assert "from 1 to 36500" in result.stderr


@pytest.mark.parametrize("url", ["nonsense", "postgresql://u:secretpw@127.0.0.1:notaport/db"])
def test_unparsable_url_rejected(cli, url: str) -> None:
    result = cli("run", "voucher-expired", env={"DATABASE_URL": url})
    assert result.exit_code == 2, result.stderr
    assert "DATABASE_URL" in result.stderr
    assert "is not a valid URL" in result.stderr
    assert SECRET not in result.stdout + result.stderr


def test_unparsable_url_names_value(cli) -> None:
    result = cli("run", "voucher-expired", env={"DATABASE_URL": "nonsense"})
    assert "'nonsense'" in result.stderr


def test_other_scheme_rejected(cli) -> None:
    result = cli("run", "voucher-expired", env={"DATABASE_URL": "mysql://x:secretpw@127.0.0.1/db"})
    assert result.exit_code == 2
    assert "DATABASE_URL" in result.stderr
    assert "'mysql'" in result.stderr
    assert SECRET not in result.stdout + result.stderr


@pytest.mark.parametrize("url", ["", "   "])
def test_blank_url_rejected(cli, url: str) -> None:
    result = cli("run", "voucher-expired", env={"DATABASE_URL": url})
    assert result.exit_code == 2
    assert "DATABASE_URL" in result.stderr
    assert "must not be empty" in result.stderr


@pytest.mark.parametrize("verbose", [[], ["-v"]])
def test_unreachable_server_exits_4(cli, verbose: list[str]) -> None:
    # Nothing listens on port 1 of the loopback address, so the connection
    # is refused at once.
    url = "postgresql://u:secretpw@127.0.0.1:1/db"
    result = cli(*verbose, "run", "voucher-expired", env={"DATABASE_URL": url})
    assert result.exit_code == 4, result.stderr
    assert "cannot reach the database" in result.stderr
    assert SECRET not in result.stdout + result.stderr


@sqlite_only
def test_dotenv_file_is_read(db: Database) -> None:
    # The process gets both variables from .env only. With the default
    # retention of 730 days, only the oldest row would be deleted.
    now = datetime.now(timezone.utc)
    db.add_audit_rows([now - timedelta(days=days) for days in (1000, 500, 100)])
    (db.workdir / ".env").write_text(
        f"DATABASE_URL={db.url}\nVOUCHER_AUDIT_RETENTION_DAYS=400\n", encoding="utf-8"
    )
    environment = db.env()
    del environment["DATABASE_URL"]
    result = db.cli("run", "audit-archival", env=environment)
    assert result.returncode == 0, result.stderr
    assert db.count(voucher_audit_logs) == 1


def test_environment_overrides_dotenv(cli, tmp_path) -> None:
    (tmp_path / ".env").write_text(
        "VOUCHER_JOBS_BATCH_SIZE=50\nVOUCHER_AUDIT_RETENTION_DAYS=400\n", encoding="utf-8"
    )
    result = cli("config", "--json", env={"VOUCHER_JOBS_BATCH_SIZE": "70"})
    values = json.loads(result.stdout)
    assert values["VOUCHER_JOBS_BATCH_SIZE"] == "70"
    assert values["VOUCHER_AUDIT_RETENTION_DAYS"] == "400"


def test_invalid_dotenv_value_rejected(cli, tmp_path) -> None:
    (tmp_path / ".env").write_text("VOUCHER_AUDIT_RETENTION_DAYS=0\n", encoding="utf-8")
    result = cli("run", "audit-archival")
    assert result.exit_code == 2
    assert "VOUCHER_AUDIT_RETENTION_DAYS='0'" in result.stderr


def test_config_masks_password(cli) -> None:
    url = "postgresql://shop:secretpw@127.0.0.1:5432/shop?schema=public"
    result = cli("config", env={"DATABASE_URL": url})
    assert result.exit_code == 0, result.stderr
    assert SECRET not in result.stdout
    assert "shop:***@127.0.0.1" in result.stdout


def test_config_lists_every_variable(cli) -> None:
    result = cli("config")
    assert result.exit_code == 0, result.stderr
    for name in ENV_NAMES.values():
        assert f"{name}=" in result.stdout
    for name in ("DATABASE_URL", "VOUCHER_AUDIT_RETENTION_DAYS", "VOUCHER_JOBS_BATCH_SIZE",
                 "VOUCHER_JOBS_ARCHIVE_MODE", "VOUCHER_JOBS_BATCH_PAUSE_SECONDS"):
        assert f"{name}=" in result.stdout


def test_config_json_has_every_variable(cli) -> None:
    url = "postgresql://shop:secretpw@127.0.0.1:5432/shop"
    result = cli("config", "--json", env={"DATABASE_URL": url, "VOUCHER_JOBS_BATCH_SIZE": "70"})
    values = json.loads(result.stdout)
    assert set(values) == set(ENV_NAMES.values())
    assert values["VOUCHER_JOBS_BATCH_SIZE"] == "70"
    assert SECRET not in result.stdout


def test_normalize_schema_becomes_search_path() -> None:
    url, connect_args = normalize_url("postgresql://shop:pw@db.internal:5432/shop?schema=public")
    assert "schema" not in url.query
    assert "-c search_path=public" in connect_args["options"]
    assert "-c timezone=UTC" in connect_args["options"]
    assert url.drivername == "postgresql+psycopg"
    assert (url.username, url.password, url.host, url.port, url.database) == (
        "shop", "pw", "db.internal", 5432, "shop",
    )


def test_normalize_drops_orm_only_parameters() -> None:
    url, _ = normalize_url(
        "postgresql://u@h/db?schema=public&connection_limit=5&pool_timeout=10"
        "&pgbouncer=true&statement_cache_size=0&socket_timeout=3&sslaccept=strict"
        "&sslmode=require&connect_timeout=3"
    )
    assert dict(url.query) == {"sslmode": "require", "connect_timeout": "3"}


def test_normalize_sets_connect_timeout() -> None:
    url, _ = normalize_url("postgresql://u@h/db")
    assert url.query["connect_timeout"] == "10"


def test_normalize_accepts_postgres_scheme() -> None:
    url, connect_args = normalize_url("postgres://u:pw@h:5433/db")
    assert url.drivername == "postgresql+psycopg"
    assert url.port == 5433
    assert "search_path" not in connect_args["options"]


def test_normalize_sqlite_url() -> None:
    url, connect_args = normalize_url("sqlite:///data/jobs.db")
    assert url.drivername == "sqlite+pysqlite"
    assert url.database == "data/jobs.db"
    assert connect_args == {}


@pytest.mark.parametrize("raw", [
    "postgresql://u@h/db?schema=public;drop",
    "postgresql://u@h/db?schema=a&schema=b",
    "postgresql+asyncpg://u@h/db",
    "sqlite+aiosqlite:///x.db",
    "mysql://u@h/db",
    "nonsense",
])
def test_normalize_rejects(raw: str) -> None:
    with pytest.raises(DatabaseURLError, match="DATABASE_URL"):
        normalize_url(raw)


def test_normalize_error_masks_password() -> None:
    with pytest.raises(DatabaseURLError) as error:
        normalize_url("postgresql://u:secretpw@h:port/db")
    assert SECRET not in str(error.value)
