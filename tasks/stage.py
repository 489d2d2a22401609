"""What every stage shares: the job it is given, and writing its outputs atomically.

A stage's folder is `<out>/<stage>/<key>/`, where the key (computed by `flows/graph.py`)
hashes the stage's code, the settings it reads and the *content* of its inputs. The folder
is built under a temporary name and renamed when complete, so it exists whole or not at all.
It holds the outputs, `parameters.json` (what the key was made from) and `result.json`,
the small handle downstream stages receive: output file names with their content hashes,
a summary for people, and `meta`, small keyed facts (e.g. the class names).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tasks.hashing import sha256_file, sha256_json

RESULT = "result.json"
PARAMETERS = "parameters.json"


@dataclass(frozen=True)
class Job:
    """One stage's work order: its settings by name, the results of the stages it needs,
    and the external inputs (data files) as they are located in *this* run."""

    stage: str
    key: str
    out: str
    settings: dict = field(default_factory=dict)
    upstream: dict = field(default_factory=dict)
    inputs: dict = field(default_factory=dict)
    components: dict = field(default_factory=dict)

    @property
    def folder(self) -> Path:
        return stage_folder(self.out, self.stage, self.key)

    @property
    def scratch(self) -> Path:
        """Survives a killed run (training checkpoints); removed when the stage completes."""
        return self.folder.with_name(f"{self.key}.partial")

    def path(self, stage: str, output: str) -> Path:
        """Where an upstream stage's output lies under this run's --out."""
        return output_path(self.out, self.upstream[stage], output)

    @contextmanager
    def output(self):
        """A StageWriter; on success its folder is moved into place atomically."""
        final = self.folder
        final.parent.mkdir(parents=True, exist_ok=True)
        writer = StageWriter(self, final.with_name(f"{self.key}.tmp-{uuid.uuid4().hex[:8]}"))
        writer.tmp.mkdir()
        try:
            yield writer
            if writer.result is None:
                raise RuntimeError(f"stage {self.stage} wrote no result")
            write_json(writer.tmp / PARAMETERS, self.components)
        except BaseException:
            shutil.rmtree(writer.tmp, ignore_errors=True)
            raise
        if final.exists():  # a complete folder whose Prefect record was lost: same key, same content
            shutil.rmtree(final)
        os.replace(writer.tmp, final)
        shutil.rmtree(self.scratch, ignore_errors=True)


class StageWriter:
    def __init__(self, job: Job, tmp: Path):
        self.job = job
        self.tmp = tmp
        self.outputs: dict[str, dict] = {}
        self.result: dict | None = None

    def path(self, file: str) -> Path:
        """Where to write `file` now (inside the temporary folder)."""
        target = self.tmp / file
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def add(self, name: str, file: str, keyed: bool = True, same_as_key: bool = False) -> None:
        """Declare an output. Keyed outputs carry a content hash that downstream keys use;
        unkeyed ones (timings, logs) never make downstream stages rerun. `same_as_key`: the
        file is a pure function of this stage's key, which then stands for its content (for
        outputs too large to hash, such as the decoded array)."""
        if same_as_key:
            digest = {"sha256": f"{self.job.stage}-key:{self.job.key}"}
        else:
            digest = {"sha256": _digest(self.tmp / file)} if keyed else {}
        self.outputs[name] = {"file": file, **digest}

    def finish(self, summary: dict, meta: dict | None = None) -> dict:
        write_json(self.path("summary.json"), summary)
        self.result = {"stage": self.job.stage, "key": self.job.key, "outputs": self.outputs,
                       "summary": summary, "meta": meta or {}}
        write_json(self.path(RESULT), self.result)
        return self.result


def _digest(path: Path) -> str:
    """Content hash of a file, or of every file below a folder (names and bytes)."""
    if path.is_file():
        return sha256_file(path)
    files = sorted(p for p in path.rglob("*") if p.is_file())
    return sha256_json([[str(p.relative_to(path)), sha256_file(p)] for p in files])


def stage_folder(out: str | os.PathLike, stage: str, key: str) -> Path:
    return Path(out) / stage / key


def output_path(out: str | os.PathLike, result: dict, output: str) -> Path:
    return stage_folder(out, result["stage"], result["key"]) / result["outputs"][output]["file"]


def read_result(out: str | os.PathLike, stage: str, key: str) -> dict | None:
    """The handle of a completed stage folder, or None."""
    try:
        return json.loads((stage_folder(out, stage, key) / RESULT).read_text())
    except (OSError, ValueError):
        return None


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


def logger():
    """Prefect's run logger inside a flow or task run (shown in the UI), else a plain one."""
    import logging

    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("agelens")
