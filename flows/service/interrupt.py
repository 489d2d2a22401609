"""Ctrl-C and SIGTERM stop a command within seconds, at any stage.

The flow runs in a worker thread while the main thread waits for it and for signals (Prefect's
engine neither lets a run be interrupted nor stops before the running task ends). On a signal,
the run is marked Cancelled, worker processes (a Dask cluster) are stopped and the process exits
with 128 + the signal's number. Nothing half-written is ever served: stage folders appear by
rename when complete, and training resumes from its last saved epoch.
"""

from __future__ import annotations

import contextvars
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path


class Interrupted(BaseException):
    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise(signum, frame):
    raise Interrupted(signum)


def _exit_now(signum, frame):
    print("\nagelens: interrupted; nothing was changed", file=sys.stderr, flush=True)
    os._exit(128 + signum)


@contextmanager
def stop_on_signals(exit_now: bool = False):
    """While the block runs in the main thread, SIGINT and SIGTERM raise Interrupted there or, with
    `exit_now` (before any work: imports, checks, the server starting), end the process at once
    with one line. Raising is unsafe while a C extension imports (torch's aborts), so code that
    wants to stop cleanly opens its own `stop_on_signals()` around its work."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    handler = _exit_now if exit_now else _raise
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


class Lost(Exception):
    """What `work` needs went away (the Prefect server stopped answering)."""


def run_interruptibly(work, on_interrupt, check=None, every: float = 2.0) -> object:
    """`work()` in a thread (with this thread's context: Prefect's settings), interruptible by
    SIGINT and SIGTERM. On a signal `on_interrupt(signum)` runs, then the process exits. `check()`,
    called every `every` seconds, raises Lost when the work cannot go on: `on_interrupt(None)`
    runs, then the error is raised here (the work's thread, a daemon, is left behind)."""
    outcome: dict = {}
    context = contextvars.copy_context()

    def target():
        try:
            outcome["result"] = context.run(work)
        except BaseException as error:  # noqa: BLE001 - handed to the main thread as it is
            outcome["error"] = error

    previous = {s: signal.signal(s, _raise) for s in (signal.SIGINT, signal.SIGTERM)}
    worker = threading.Thread(target=target, name="agelens-run", daemon=True)
    try:
        worker.start()
        checked = time.monotonic()
        while worker.is_alive():
            worker.join(0.25)
            if check is not None and worker.is_alive() and time.monotonic() - checked >= every:
                checked = time.monotonic()
                try:
                    check()
                except Lost:
                    on_interrupt(None)
                    raise
    except Interrupted as stop:
        for s in previous:  # a second Ctrl-C while shutting down ends it at once
            signal.signal(s, lambda *_: os._exit(128 + stop.signum))
        try:
            on_interrupt(stop.signum)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(128 + stop.signum)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def resume_hint(out: str | os.PathLike, since: float) -> str:
    """How a rerun continues: from which epoch, when a training was checkpointed in this run."""
    import json

    newest = None
    for marker in Path(out).expanduser().glob("train/*.partial/checkpoint.json"):
        try:
            if marker.stat().st_mtime >= since and (newest is None or marker.stat().st_mtime > newest.stat().st_mtime):
                newest = marker
        except OSError:
            continue
    if newest is not None:
        try:
            epoch = int(json.loads(newest.read_text())["epoch"])
        except (OSError, ValueError, KeyError, TypeError):
            return "rerun the same command to continue (completed stages are cached)"
        return f"rerun the same command to resume training from epoch {epoch + 1} (epoch {epoch} is saved)"
    return "rerun the same command to continue (completed stages are cached)"


def stop_children() -> None:
    """Terminate this process's descendants in its own session (a Dask cluster's workers); the
    shared Prefect server runs in a session of its own and is left alone."""
    import psutil

    own = os.getsid(0)
    children = []
    for child in psutil.Process().children(recursive=True):
        try:
            if os.getsid(child.pid) == own:
                child.terminate()
                children.append(child)
        except (psutil.Error, OSError):
            continue
    psutil.wait_procs(children, timeout=3)


def cancel_flow_run(run_id, message: str, timeout: float = 5.0) -> None:
    """Mark the flow run Cancelled (best effort, bounded in time)."""
    def mark():
        from prefect.client.orchestration import get_client
        from prefect.states import Cancelled

        with get_client(sync_client=True) as client:
            client.set_flow_run_state(run_id, Cancelled(message=message), force=True)

    done = threading.Thread(target=contextvars.copy_context().run, args=(mark,), daemon=True)
    done.start()
    done.join(timeout)
