"""A throwaway PostgreSQL cluster for tests: Debian's server binaries, a temporary data directory,
a free loopback port, a password; stopped and deleted afterwards.

PostgreSQL refuses to run as root, so as root (CI, this workplace) `initdb` and the server run as
the `postgres` user that Debian's package creates (`runuser -u postgres --`), in a directory
under the system temp dir that this user owns (pytest's `tmp_path` is root-only, mode 0700).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from orchestration_helpers import free_port

TOOLS = ("initdb", "pg_ctl", "postgres")
DEBIAN_PACKAGE_HINT = "install Debian's `postgresql` package (apt-get install -y postgresql)"


def _version_key(path: Path) -> tuple:
    name = path.parents[1].name  # /usr/lib/postgresql/<ver>/bin/initdb
    return tuple(int(p) if p.isdigit() else 0 for p in name.split("."))


def postgres_bindir() -> Path | None:
    """The folder of initdb, pg_ctl and postgres: $CPCSAM_PG_BINDIR, PATH, else the newest
    /usr/lib/postgresql/<ver>/bin (Debian keeps them off PATH)."""
    candidates = []
    if os.environ.get("CPCSAM_PG_BINDIR"):
        candidates.append(Path(os.environ["CPCSAM_PG_BINDIR"]))
    if shutil.which("initdb"):
        candidates.append(Path(shutil.which("initdb")).parent)
    candidates += [p.parent for p in sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=_version_key,
                                            reverse=True)]
    for folder in candidates:
        if all(os.access(folder / tool, os.X_OK) for tool in TOOLS):
            return folder
    return None


def unavailable_reason() -> str | None:
    """Why a cluster cannot be started here (a skip reason), or None."""
    if postgres_bindir() is None:
        return f"PostgreSQL server binaries ({', '.join(TOOLS)}) not found: {DEBIAN_PACKAGE_HINT}"
    if os.geteuid() == 0:
        try:
            import pwd

            pwd.getpwnam("postgres")
        except KeyError:
            return f"running as root and there is no `postgres` user to run the server as: {DEBIAN_PACKAGE_HINT}"
        if not shutil.which("runuser") and not shutil.which("su"):
            return "running as root and neither `runuser` nor `su` is there to run PostgreSQL as `postgres`"
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        return "psycopg2 is not installed (pip install -e '.[test]')"
    return None


class PostgresCluster:
    """`initdb` + `pg_ctl start` on 127.0.0.1:<free port> with password (scram-sha-256) logins only.

        with PostgresCluster() as pg:
            pg.url          # postgresql://cpcsam:<password>@127.0.0.1:<port>/
            pg.connect("mlflow")
    """

    def __init__(self, user: str = "cpcsam", password: str | None = None):
        bindir = postgres_bindir()
        if bindir is None:
            raise RuntimeError(f"no PostgreSQL server binaries: {DEBIAN_PACKAGE_HINT}")
        self.bindir = bindir
        self.user = user
        self.password = password or secrets.token_hex(16)  # URL-safe, nothing to percent-encode
        self.port: int | None = None
        self.root: Path | None = None
        self._as_root = os.geteuid() == 0

    # -- paths and commands
    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def log(self) -> Path:
        return self.root / "postgres.log"

    @property
    def url(self) -> str:
        """The server (no database): what CPCSAM_STACK_DATABASE takes."""
        from urllib.parse import quote

        return f"postgresql://{quote(self.user, safe='')}:{quote(self.password, safe='')}@127.0.0.1:{self.port}/"

    def _cmd(self, tool: str, *args: str) -> list[str]:
        argv = [str(self.bindir / tool), *args]
        if not self._as_root:
            return argv
        if shutil.which("runuser"):
            return ["runuser", "-u", "postgres", "--", *argv]
        import shlex

        return ["su", "postgres", "-s", "/bin/sh", "-c", shlex.join(argv)]

    def _run(self, tool: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        proc = subprocess.run(self._cmd(tool, *args), cwd=self.root, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            log = self.log.read_text()[-3000:] if self.log.exists() else ""
            raise RuntimeError(f"{tool} {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}\n{log}")
        return proc

    def _chown(self, path: Path) -> None:
        if self._as_root:
            import pwd

            entry = pwd.getpwnam("postgres")
            os.chown(path, entry.pw_uid, entry.pw_gid)

    # -- lifecycle
    def start(self, attempts: int = 3) -> "PostgresCluster":
        self.root = Path(tempfile.mkdtemp(prefix="cpcsam-pg-"))  # mode 0700, then owned by the server's user
        try:
            return self._start(attempts)
        except BaseException:
            self.stop()
            raise

    def _start(self, attempts: int) -> "PostgresCluster":
        self._chown(self.root)
        pwfile = self.root / "pwfile"
        pwfile.write_text(self.password + "\n")
        pwfile.chmod(0o600)
        self._chown(pwfile)
        try:
            self._run("initdb", "-D", str(self.data), "-U", self.user, f"--pwfile={pwfile}", "-A", "scram-sha-256",
                      "-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions")
        finally:
            pwfile.unlink(missing_ok=True)
        for attempt in range(attempts):  # a free port can be taken between the probe and the bind
            self.port = free_port()
            options = (f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root} "
                       "-c fsync=off -c synchronous_commit=off -c full_page_writes=off")  # a throwaway cluster
            try:
                self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "-t", "60",
                          "start", timeout=90)
                return self
            except RuntimeError:
                if attempt == attempts - 1:
                    raise
        return self

    def stop(self) -> None:
        """Stop the server (fast shutdown; killed if it will not go) and delete its directory."""
        if self.root is None:
            return
        pid_file = self.data / "postmaster.pid"
        if pid_file.exists():
            try:
                self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "30", "stop", timeout=60)
            except (RuntimeError, subprocess.TimeoutExpired):
                with contextlib.suppress(OSError, ValueError, IndexError):
                    os.kill(int(pid_file.read_text().split()[0]), signal.SIGKILL)
                    time.sleep(1)
        shutil.rmtree(self.root, ignore_errors=True)
        self.root = None

    def __enter__(self) -> "PostgresCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- queries
    def connect(self, database: str = "postgres"):
        import psycopg2

        return psycopg2.connect(host="127.0.0.1", port=self.port, user=self.user, password=self.password,
                                dbname=database, connect_timeout=10)

    def query(self, database: str, sql: str, params: tuple = ()) -> list[tuple]:
        conn = self.connect(database)
        try:
            with conn.cursor() as cur:
                cur.execute(sql, params)
                return cur.fetchall()
        finally:
            conn.close()
