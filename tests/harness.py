"""A real Prefect server on 127.0.0.1 with its own home (database), for tests, benchmarks and
the UI screenshot script (not part of agelens itself)."""

from __future__ import annotations

import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
from contextlib import closing, contextmanager
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


def database_template() -> Path:
    """A migrated, empty server database, kept between test sessions: a fresh one spends ~12 s of
    a server's start in migrations. Keyed by Prefect's version, whose migrations it holds."""
    from prefect import __version__

    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "agelens-tests" / f"prefect-{__version__}.db"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrefectServer:
    def __init__(self, home: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/api"
        self.home = home
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        self.env.update(PREFECT_HOME=str(home), PREFECT_API_URL=self.url, PREFECT_UI_API_URL=self.url,
                        PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_LOGGING_LEVEL="WARNING")
        self.process = None

    def __enter__(self):
        prefect = Path(sys.executable).with_name("prefect")
        template = database_template()
        if template.is_file():
            shutil.copyfile(template, self.home / "prefect.db")
        self.log = open(self.home / "server.log", "w")
        self.process = subprocess.Popen([str(prefect), "server", "start", "--host", "127.0.0.1", "--port",
                                         str(self.port)], env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    if not template.is_file():
                        _snapshot(self.home / "prefect.db", template)
                    return self
            except httpx.HTTPError:
                pass
            if self.process.poll() is not None:
                break
            time.sleep(0.5)
        self.__exit__()
        raise RuntimeError(f"prefect server did not start: {(self.home / 'server.log').read_text()[-2000:]}")

    def __exit__(self, *exc):
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.log.close()

    @contextmanager
    def worker(self, pool: str, query_seconds: float = 1.0):
        """A process worker of `pool` (polling every `query_seconds`) while the block runs."""
        prefect = Path(sys.executable).with_name("prefect")
        log = open(self.home / f"worker-{pool}.log", "w")
        env = {**self.env, "PREFECT_WORKER_QUERY_SECONDS": str(query_seconds), "PREFECT_LOGGING_LEVEL": "INFO"}
        process = subprocess.Popen([str(prefect), "worker", "start", "--pool", pool, "--type", "process"], cwd=REPO,
                                   env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            yield process
        finally:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
            log.close()

    def run(self, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
        """A command of this repo's environment against this server."""
        proc = subprocess.run(list(args), cwd=REPO, env=self.env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"{args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return proc

    def prefect(self, *args: str) -> subprocess.CompletedProcess:
        return self.run(str(Path(sys.executable).with_name("prefect")), *args)

    def api(self, method: str, path: str, **kwargs):
        """One API call; a 503 (SQLite busy under load) is retried a few times, as Prefect's client does."""
        for attempt in range(5):
            response = httpx.request(method, f"{self.url}{path}", timeout=30, **kwargs)
            if response.status_code != 503 or attempt == 4:
                break
            time.sleep(1 + attempt)
        response.raise_for_status()
        return response.json()


def _snapshot(database: Path, target: Path) -> None:
    """A consistent copy of a live SQLite database (its write-ahead log included), put in place
    atomically so that concurrent test workers never read half of one."""
    partial = target.with_name(f".{target.name}.{os.getpid()}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with closing(sqlite3.connect(database)) as source, closing(sqlite3.connect(partial)) as copy:
            source.backup(copy)
        os.replace(partial, target)
    except (OSError, sqlite3.Error):  # no cache then: the next server migrates its own database
        partial.unlink(missing_ok=True)
