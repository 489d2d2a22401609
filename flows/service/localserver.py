"""One local Prefect server for every `agelens` command of this machine that has no server
configured (no PREFECT_API_URL), in place of Prefect's per-process temporary server.

Prefect starts a temporary server inside each process: Ctrl-C reaches it with the run (the run
then fails against a dead server), a killed run leaves it running, and several runs starting at
once each start one on the same database and time out. Here a small supervisor process, in a
session of its own (so a terminal's Ctrl-C never reaches it), runs the server and stops it once
no agelens process has used it for `AGELENS_SERVER_LINGER` seconds (default 60, so a rerun
starts at once). Users hold a shared lock while they use it; the kernel releases it when a
process dies, however it dies, so the server never outlives its last user by more than that.

    state dir (PREFECT_HOME/agelens-server): start.lock, users.lock, server.json, server.log
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from agelens.tasks.core.errors import AgelensError

LINGER_SECONDS = 60.0
STARTUP_SECONDS = 120.0  # a loaded 2-core machine migrating the database can take a while


def state_dir() -> Path:
    home = os.environ.get("PREFECT_HOME") or os.path.join(os.path.expanduser("~"), ".prefect")
    return Path(home).expanduser() / "agelens-server"


def _healthy(url: str, timeout: float = 2.0) -> bool:
    import httpx

    try:
        return httpx.get(f"{url}/health", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def refuses(url: str, timeout: float = 5.0) -> bool:
    """Whether nothing listens at the server's address any more (a slow answer is not a refusal)."""
    import httpx

    try:
        httpx.get(f"{url.rstrip('/')}/health", timeout=timeout)
        return False
    except httpx.ConnectError:
        return True
    except httpx.HTTPError:
        return False


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def _flock(path: Path, mode: int):
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, mode)
        yield handle
    finally:
        handle.close()


@contextmanager
def shared_server():
    """The API URL of the shared local server, started if none runs; it is not stopped while
    this block (or any other user's) runs."""
    state = state_dir()
    state.mkdir(parents=True, exist_ok=True)
    with _flock(state / "users.lock", fcntl.LOCK_SH):
        with _flock(state / "start.lock", fcntl.LOCK_EX):
            info = _read(state / "server.json")
            if not (info and _healthy(info["url"])):
                info = _start(state)
        yield info["url"]


def _start(state: Path) -> dict:
    print("agelens: starting the local Prefect server (it stays up a minute after its last user) ...",
          file=sys.stderr, flush=True)
    port = _free_port()
    (state / "server.json").unlink(missing_ok=True)
    log = open(state / "server.log", "ab")
    supervisor = subprocess.Popen([sys.executable, "-m", "agelens.flows.service.localserver", str(state), str(port)],
                                  stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
                                  cwd=str(state))
    log.close()
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if _healthy(url):
            info = {"url": url, "pid": supervisor.pid}
            (state / "server.json").write_text(json.dumps(info))
            return info
        if supervisor.poll() is not None:
            break
        time.sleep(0.25)
    supervisor.kill()
    tail = (state / "server.log").read_text(errors="replace")[-600:].strip().splitlines()
    raise AgelensError(f"the local Prefect server did not start within {STARTUP_SECONDS:.0f} s "
                       f"({tail[-1] if tail else 'no output'}; log: {state / 'server.log'})")


def _die_with_parent() -> None:
    """Linux: the server gets SIGTERM when the supervisor dies, even by SIGKILL."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def supervise(state: Path, port: int, linger: float) -> int:
    """Run the server until nobody has used it for `linger` seconds."""
    import prefect

    env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    server = subprocess.Popen([sys.executable, "-m", "uvicorn", "--app-dir", str(Path(prefect.__file__).parent.parent),
                               "--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1",
                               "--port", str(port), "--log-level", "error", "--lifespan", "on"],
                              env=env, preexec_fn=_die_with_parent)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    idle_since = None
    try:
        while server.poll() is None:
            time.sleep(0.5)
            with _flock(state / "start.lock", fcntl.LOCK_EX), open(state / "users.lock", "a+") as users:
                try:
                    fcntl.flock(users, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    idle_since = None
                    continue
                idle_since = idle_since or time.monotonic()
                if time.monotonic() - idle_since >= linger:
                    info = _read(state / "server.json")
                    if info and info.get("pid") == os.getpid():
                        (state / "server.json").unlink(missing_ok=True)
                    break
    finally:
        if server.poll() is None:
            server.terminate()
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                server.kill()
    return 0


if __name__ == "__main__":
    sys.exit(supervise(Path(sys.argv[1]), int(sys.argv[2]),
                       float(os.environ.get("AGELENS_SERVER_LINGER", LINGER_SECONDS))))
