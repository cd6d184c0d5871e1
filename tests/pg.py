"""A throwaway PostgreSQL cluster for the tests: ``initdb`` into a temporary directory, the
server on a free loopback port with its socket in that directory, stopped and deleted by
``destroy()``. Uses the Debian ``postgresql`` package (``/usr/lib/postgresql/*/bin``);
run as root, the server runs as the ``postgres`` user the package creates (``initdb``
refuses root). Password authentication (SCRAM) even on loopback, with a random password,
so the tests use the URL form a real deployment uses."""

from __future__ import annotations

import os
import pwd
import re
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

import psycopg

from tests.helpers import free_port

SUPERUSER = "kms_test"
# Test-only speed: nothing here must survive a crash of the machine.
SERVER_SETTINGS = {
    "listen_addresses": "'127.0.0.1'",
    "fsync": "off",
    "full_page_writes": "off",
    "max_connections": "200",
    "shared_buffers": "64MB",
    "log_min_messages": "warning",
    "log_connections": "off",
}


class PgUnavailable(RuntimeError):
    """The PostgreSQL binaries (Debian package ``postgresql``) are not installed."""


def bin_dir() -> Path:
    """The newest installed PostgreSQL's bin directory."""
    found = [p for p in Path("/usr/lib/postgresql").glob("*/bin") if (p / "initdb").exists()]
    if not found:
        raise PgUnavailable(
            "PostgreSQL is not installed: `make system-deps` installs the Debian package "
            "postgresql (or set KMS_TEST_POSTGRES=0 to skip the PostgreSQL tests)"
        )
    return max(found, key=lambda p: int(re.sub(r"\D", "", p.parent.name) or 0))


class PgCluster:
    """One cluster in its own temporary directory; ``create()`` runs initdb and starts it."""

    def __init__(self, base: Path, port: int, password: str) -> None:
        self.base = base
        self.port = port
        self.password = password
        self.data = base / "data"
        self.log = base / "server.log"
        self._bin = bin_dir()
        self._as_postgres = os.geteuid() == 0

    @classmethod
    def create(cls) -> PgCluster:
        # as root the server runs as postgres, which must reach the directory: not under a
        # private TMPDIR
        parent = "/tmp" if os.geteuid() == 0 else None
        base = Path(tempfile.mkdtemp(prefix="kms-pg-", dir=parent))
        cluster = cls(base, free_port(), secrets.token_urlsafe(18))
        try:
            cluster._initdb()
            cluster.start()
        except BaseException:
            cluster.destroy()
            raise
        return cluster

    # -- server process -------------------------------------------------------------------

    def _run(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [str(self._bin / tool), *args]
        if self._as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        if check and done.returncode != 0:
            raise RuntimeError(f"{tool} failed: {done.stdout}{done.stderr}{self.log_tail()}")
        return done

    def _initdb(self) -> None:
        pwfile = self.base / "pwfile"
        pwfile.write_text(self.password + "\n")
        pwfile.chmod(0o600)
        if self._as_postgres:
            user = pwd.getpwnam("postgres")
            for path in (self.base, pwfile):
                os.chown(path, user.pw_uid, user.pw_gid)
        self._run(
            "initdb",
            "--pgdata",
            str(self.data),
            "--username",
            SUPERUSER,
            "--pwfile",
            str(pwfile),
            "--auth",
            "scram-sha-256",
            "--encoding",
            "UTF8",
            "--locale",
            "C",
            "--no-sync",
            "--no-instructions",
        )
        pwfile.unlink()
        settings = {**SERVER_SETTINGS, "port": str(self.port)}
        settings["unix_socket_directories"] = f"'{self.base}'"
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.writelines(f"{k} = {v}\n" for k, v in settings.items())

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        self._run("pg_ctl", "--pgdata", str(self.data), "--log", str(self.log), "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``fast``: roll back open transactions, disconnect clients)."""
        self._run("pg_ctl", "--pgdata", str(self.data), "--mode", mode, "-w", "stop")

    def running(self) -> bool:
        done = self._run("pg_ctl", "--pgdata", str(self.data), "status", check=False)
        return done.returncode == 0

    def destroy(self) -> None:
        """Stop the server if it runs and delete the whole directory. Never raises."""
        try:
            if self.data.exists() and self.running():
                self.stop("immediate")
        finally:
            shutil.rmtree(self.base, ignore_errors=True)

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return "\n" + self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    # -- databases ------------------------------------------------------------------------

    def url(self, database: str = "postgres", driver: str = "postgresql+psycopg") -> str:
        """A SQLAlchemy URL of ``database`` (with the password)."""
        return f"{driver}://{SUPERUSER}:{self.password}@127.0.0.1:{self.port}/{database}"

    def execute(self, *sql: str, database: str = "postgres") -> list[tuple[Any, ...]]:
        """Run statements in autocommit mode; the rows of the last one (if any)."""
        dsn = self.url(database, driver="postgresql")
        rows: list[tuple[Any, ...]] = []
        with psycopg.connect(dsn, autocommit=True) as conn:
            for statement in sql:
                cur = conn.execute(statement.encode())
                rows = cur.fetchall() if cur.description else []
        return rows

    def create_database(self, name: str, template: str | None = None) -> None:
        """CREATE DATABASE (a copy of ``template`` if given: no connection may be open to
        the template)."""
        clause = f" TEMPLATE {template} STRATEGY FILE_COPY" if template else ""
        self.execute(f"CREATE DATABASE {name}{clause}")

    def drop_database(self, name: str) -> None:
        self.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def dump(self, database: str, *args: str) -> bytes:
        """``pg_dump`` of ``database`` (plain SQL), as a backup would take it."""
        cmd = [
            str(self._bin / "pg_dump"),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--username",
            SUPERUSER,
            *args,
            database,
        ]
        env = {**os.environ, "PGPASSWORD": self.password}
        return subprocess.run(cmd, capture_output=True, env=env, timeout=120, check=True).stdout


def fresh_name(prefix: str = "kms_t") -> str:
    return f"{prefix}_{secrets.token_hex(6)}"


class PgDatabase:
    """One database of a PgCluster (made fresh for a test)."""

    def __init__(self, cluster: PgCluster, name: str) -> None:
        self.cluster = cluster
        self.name = name
        self.url = cluster.url(name)

    def execute(self, *sql: str) -> list[tuple[Any, ...]]:
        return self.cluster.execute(*sql, database=self.name)

    def run(self, sql: str, *params: object) -> int:
        """One statement with ``%s`` parameters, in autocommit mode; the rows it touched."""
        dsn = self.cluster.url(self.name, driver="postgresql")
        with psycopg.connect(dsn, autocommit=True) as conn:
            return conn.execute(sql.encode(), params).rowcount

    def refuse_inserts(self, table: str, when: str = "true") -> None:
        """A real database refusal: every insert into ``table`` whose row matches the SQL
        condition ``when`` (on NEW) raises, as a full disk would."""
        self.execute(
            "CREATE OR REPLACE FUNCTION kms_test_refuse() RETURNS trigger LANGUAGE plpgsql"
            " AS $$ BEGIN RAISE EXCEPTION 'disk full'; END $$",
            f"CREATE TRIGGER refuse BEFORE INSERT ON {table} FOR EACH ROW"
            f" WHEN ({when}) EXECUTE FUNCTION kms_test_refuse()",
        )

    def accept_inserts(self, table: str) -> None:
        self.execute(f"DROP TRIGGER refuse ON {table}")

    def tuples_holding(self, table: str, needle: bytes) -> int:
        """Tuples on ``table``'s pages, live or dead, whose bytes contain ``needle``."""
        pages = f"generate_series(0, pg_relation_size('{table}') / 8192 - 1) AS page"
        rows = self.execute(
            "CREATE EXTENSION IF NOT EXISTS pageinspect",
            f"SELECT t_data FROM {pages}, heap_page_items(get_raw_page('{table}', page::int))",  # noqa: S608
        )
        return sum(1 for (data,) in rows if isinstance(data, bytes) and needle in data)


def rerun(module: ModuleType, skip: set[str]) -> dict[str, object]:
    """The names of a test module (tests and fixtures), so that another module collects
    the same tests again with its own fixtures; ``skip`` names tests that reach into the
    SQLite file (each has a PostgreSQL version beside the rerun)."""
    names = {k: v for k, v in vars(module).items() if not k.startswith("__")}
    unknown = skip - names.keys()
    assert not unknown, f"{module.__name__} has no {sorted(unknown)}"
    return {k: v for k, v in names.items() if k not in skip}
