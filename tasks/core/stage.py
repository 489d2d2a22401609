"""What every stage shares: its declaration, the job it is given, and writing its outputs atomically.

A stage is one module `tasks/<name>.py` holding
  * `STAGE = Stage(...)`: what it needs, which settings it reads, its named outputs and the type
    of its summary (a pydantic model, validated when the stage writes it);
  * `run(job)`: its work. Libraries are imported inside `run`, so reading every declaration
    (the graph, `agelens status`) imports neither torch, pandas nor Prefect;
  * presentation, optional: `describe(summary)` (one line in the CLI), `report_section(view)`
    (markdown parts of the study report) and `tables(view)` (Prefect table artifacts). These
    never change what a stage computes, so they are left out of its code version: editing them
    reruns the report, never the stage (flows/pipeline/codeversion.py).

A stage's folder is `<out>/<stage>/<key>/`, where the key (computed by `flows/pipeline/graph.py`) hashes
the stage's code, the settings it reads and the *content* of its inputs. The folder is built
under a temporary name and renamed when complete, so it exists whole or not at all. It holds the
outputs, `parameters.json` (what the key was made from) and `result.json`, the small handle
later stages receive: output file names with their sizes and content hashes, the summary, and
`meta`, small keyed facts later stages read (e.g. the class names).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import os
import shutil
import uuid
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from agelens.tasks.core.hashing import sha256_file, sha256_json

RESULT = "result.json"
PARAMETERS = "parameters.json"
# Functions of a stage module that only present its results (see the module docstring).
PRESENTATION = ("describe", "report_section", "tables")
EARLIER = ("*",)  # `needs` of a stage that reads every stage before it (the report)


class Summary(BaseModel):
    """A stage's summary for people: what it did, in numbers. Subclassed by every stage."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class Stage:
    """A stage's declaration. `needs`: the stages whose results it reads (EARLIER: every stage
    before it in the graph); `reads`: settings that change its results (part of its key);
    `uses`: settings it reads that do not (device, inference batch size); `inputs`: external
    data it reads, keyed by content (`flows/pipeline/inputs.py`); `outputs`: the names it writes."""

    name: str
    summary: type[Summary]
    needs: tuple[str, ...] = ()
    reads: tuple[str, ...] = ()
    uses: tuple[str, ...] = ()
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    presents: bool = False  # shows the stages it needs (their presentation is part of its code)

    @property
    def module(self) -> str:
        return f"agelens.tasks.{self.name}"

    @property
    def reads_model(self) -> bool:
        """Whether it loads the trained model (so the model settings are checked before it runs)."""
        return "train" in self.needs

    def presentation(self, name: str) -> Callable | None:
        """The module's `describe`, `report_section` or `tables`, if it has one."""
        return getattr(importlib.import_module(self.module), name, None)

    def describe(self, summary: dict) -> str:
        present = self.presentation("describe")
        return present(self.summary.model_validate(summary)) if present else ""


@functools.cache
def spec(name: str) -> Stage:
    """The declaration of stage `name` (its module's STAGE)."""
    return importlib.import_module(f"agelens.tasks.{name}").STAGE


@dataclass(frozen=True)
class Job:
    """One stage's work order: its settings by name, the results of the stages it needs, the
    facts (`meta`) of every stage before it, and the external inputs (data files) as they are
    located in *this* run."""

    stage: str
    key: str
    out: str
    settings: dict = field(default_factory=dict)
    upstream: dict = field(default_factory=dict)
    context: dict = field(default_factory=dict)
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

    def summary(self, stage: str):
        """An upstream stage's summary, typed."""
        return spec(stage).summary.model_validate(self.upstream[stage]["summary"])

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
        outputs too large to hash, such as the decoded array). Every output records its size,
        so a damaged folder is noticed before it is reused."""
        declared = spec(self.job.stage).outputs
        if name not in declared:
            raise RuntimeError(f"stage {self.job.stage} declares outputs {declared}, not {name!r}")
        target = self.tmp / file
        if same_as_key:
            digest = {"sha256": f"{self.job.stage}-key:{self.job.key}"}
        else:
            digest = {"sha256": _digest(target)} if keyed else {}
        self.outputs[name] = {"file": file, "bytes": _size(target), **digest}

    def finish(self, summary: Summary, meta: dict | None = None) -> dict:
        expected = spec(self.job.stage).summary
        if not isinstance(summary, expected):
            raise TypeError(f"stage {self.job.stage} must write a {expected.__name__}, not {type(summary).__name__}")
        values = summary.model_dump(mode="json")
        write_json(self.path("summary.json"), values)
        self.result = {"stage": self.job.stage, "key": self.job.key, "outputs": self.outputs,
                       "summary": values, "meta": meta or {}}
        write_json(self.path(RESULT), self.result)
        return self.result


def _digest(path: Path) -> str:
    """Content hash of a file, or of every file below a folder (names and bytes)."""
    if path.is_file():
        return sha256_file(path)
    files = sorted(p for p in path.rglob("*") if p.is_file())
    return sha256_json([[str(p.relative_to(path)), sha256_file(p)] for p in files])


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def stage_folder(out: str | os.PathLike, stage: str, key: str) -> Path:
    return Path(out) / stage / key


def output_path(out: str | os.PathLike, result: dict, output: str) -> Path:
    return stage_folder(out, result["stage"], result["key"]) / result["outputs"][output]["file"]


def read_result(out: str | os.PathLike, stage: str, key: str) -> dict | None:
    """The handle of a completed stage folder, or None."""
    try:
        result = json.loads((stage_folder(out, stage, key) / RESULT).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(result, dict) or not isinstance(result.get("outputs"), dict) or result.get("key") != key:
        return None
    return result


# Outputs up to this size are re-hashed (through the hash memo: stat only, when unchanged)
# before a stage folder is reused; larger ones (weights, the decoded array) are checked by size.
VERIFY_BYTES = 64 << 20


def damage(out: str | os.PathLike, stage: str, key: str, hash_file=sha256_file) -> str | None:
    """What is wrong with a stage folder that claims to be complete, or None when it is whole."""
    folder = stage_folder(out, stage, key)
    if not folder.exists():
        return None
    result = read_result(out, stage, key)
    if result is None:
        return f"its {RESULT} is missing or unreadable"
    for output in result["outputs"].values():
        path = folder / output["file"]
        if not path.exists():
            return f"its output {output['file']} is missing"
        size = output.get("bytes")
        if size is not None and _size(path) != size:
            return f"its output {output['file']} has {_size(path):,} bytes, not {size:,}"
        digest = output.get("sha256", "")
        if path.is_file() and len(digest) == 64 and (size or 0) <= VERIFY_BYTES and hash_file(path) != digest:
            return f"its output {output['file']} was changed after it was written"
    return None


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _jsonable(value):
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
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


@dataclass(frozen=True)
class View:
    """What presentation (`describe`, `report_section`, `tables`) reads of one stage's result."""

    out: Path
    result: dict
    context: dict = field(default_factory=dict)

    @property
    def stage(self) -> str:
        return self.result["stage"]

    @property
    def summary(self):
        return spec(self.stage).summary.model_validate(self.result["summary"])

    def path(self, output: str) -> Path:
        return output_path(self.out, self.result, output)

    def has(self, output: str) -> bool:
        return output in self.result["outputs"]
