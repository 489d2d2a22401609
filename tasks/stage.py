"""What every stage shares: its cache key, its output folder and atomic writes.

A stage's cache key is the hash of its code, its settings and the *content* hashes
of its inputs (never their paths, never the run id). The key also names the folder
the stage writes to, `<out>/<stage>/<digest>/`, and Prefect's result record lives
inside that folder, so deleting the folder is enough to make the stage run again.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path

from tasks.hashing import sha256_file, sha256_json

RESULT_RECORD = ".prefect-result"
NOT_KEYED = ("out", "device")  # where results go and which chip computes them are not what they are
# Not part of a key: where inputs are, and summaries (derived from content that is keyed,
# but holding timings that differ between identical runs).
UNKEYED_FIELDS = ("dir", "path", "image_root", "summary")


@functools.cache
def code_digest(modules: tuple[str, ...]) -> str:
    """Hash of the source files of the given modules: the stage's code version."""
    digests = []
    for name in modules:
        origin = importlib.util.find_spec(name).origin
        digests.append(sha256_file(origin))
    return sha256_json(digests)


def canonical(value):
    """Replace file handles by their content hash; drop locations and summaries."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        if "sha256" in value:
            return {"sha256": value["sha256"]}
        return {k: canonical(v) for k, v in value.items() if k not in UNKEYED_FIELDS}
    if isinstance(value, (list, tuple)):
        return [canonical(v) for v in value]
    if isinstance(value, Path):
        raise TypeError(f"pass files to stages as handles with a sha256, not as a path: {value}")
    return value


class StageKey:
    """A Prefect `cache_key_fn`: `<stage>/<digest>/.prefect-result`."""

    def __init__(self, stage: str, code: tuple[str, ...]):
        self.stage = stage
        self.code = tuple(code)

    def digest(self, parameters: dict) -> str:
        keyed = {k: v for k, v in parameters.items() if k not in NOT_KEYED}
        payload = {"stage": self.stage, "code": code_digest(self.code), "inputs": canonical(keyed)}
        return sha256_json(payload)[:24]

    def __call__(self, context, parameters: dict) -> str:
        return f"{self.stage}/{self.digest(parameters)}/{RESULT_RECORD}"


class StageDir:
    """A stage's output folder, built under a temporary name and renamed when complete."""

    def __init__(self, final: Path):
        self.final = final
        self.tmp = final.with_name(f"{final.name}.tmp-{uuid.uuid4().hex[:8]}")
        # Survives a killed run (checkpoints); removed once the stage completes.
        self.scratch = final.with_name(f"{final.name}.partial")

    def path(self, name: str) -> Path:
        """Where to write `name` now."""
        target = self.tmp / name
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def final_path(self, name: str) -> str:
        return str(self.final / name)

    def handle(self, name: str) -> dict:
        """A small, cacheable reference to an output file: final path and content hash."""
        return {"path": self.final_path(name), "sha256": sha256_file(self.tmp / name)}


@contextmanager
def stage_output(final: Path, parameters: dict | None = None):
    """Yield a StageDir; on success move it into place atomically, on failure remove it.

    `parameters` (the stage's inputs and settings) are recorded beside the outputs.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    out = StageDir(final)
    out.tmp.mkdir()
    if parameters is not None:
        write_json(out.tmp / "parameters.json", {k: v for k, v in parameters.items() if k not in NOT_KEYED})
    try:
        yield out
    except BaseException:
        shutil.rmtree(out.tmp, ignore_errors=True)
        raise
    if final.exists():  # an earlier run's output whose cache record was lost
        shutil.rmtree(final)
    os.replace(out.tmp, final)
    shutil.rmtree(out.scratch, ignore_errors=True)


def current_stage_dir() -> Path:
    """The output folder of the running Prefect task, derived from its cache key."""
    from prefect.context import TaskRunContext

    ctx = TaskRunContext.get()
    key = ctx.task.cache_key_fn(ctx, ctx.parameters)
    return Path(ctx.parameters["out"]).resolve() / Path(key).parent


def task_output():
    """`stage_output` for the running Prefect task: its key's folder, its parameters recorded."""
    from prefect.context import TaskRunContext

    return stage_output(current_stage_dir(), TaskRunContext.get().parameters)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _jsonable(value):
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return str(value)


def write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=2, sort_keys=True, default=_jsonable).encode())
