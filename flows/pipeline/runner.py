"""Walking the stage graph: each stage a Prefect task cached by its key, under a file lock.

A stage's Prefect cache record lives inside its own folder (`<out>/<stage>/<key>/.prefect-result`),
so deleting the folder forces a rerun. Before a stage runs, the Runner takes a file lock on its
key, so two runs into one `--out` compute each stage once and the second reads what the first
wrote. Stage modules are imported only by the stages that run, so a fully cached run never
imports torch.
"""

from __future__ import annotations

import importlib
import os
import shutil
import uuid
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path

from prefect import task

from agelens.flows.pipeline.graph import components, context, key_of, levels
from agelens.flows.pipeline.inputs import Inputs
from agelens.flows.service.locks import locked, stage_lock
from agelens.tasks.core.errors import full_disk
from agelens.tasks.core.stage import Job, damage, read_result


def record_key(context, parameters: dict) -> str:
    """Where Prefect keeps a stage's cache record: inside the stage's own folder."""
    job = parameters["job"]
    return f"{job['stage']}/{job['key']}/.prefect-result"


def run_stage(job: dict) -> dict:
    """Run one stage (its module's `run(job)`), unless its folder is already complete."""
    work = Job(**job)
    done = read_result(work.out, work.stage, work.key)  # complete, but Prefect's record was lost
    if done is not None:
        return done
    try:
        return importlib.import_module(f"agelens.tasks.{work.stage}").run(work)
    except Exception as error:
        full = full_disk(error, work.out)
        if full is None:
            raise
        raise full from None


def stage_task(name: str, out: Path):
    return task(run_stage, name=name, cache_key_fn=record_key, persist_result=True, result_serializer="json",
                result_storage=out)


class Runner:
    """Walks the graph: keys from this run's inputs and upstream results, one lock per key."""

    def __init__(self, settings, out: Path, inputs: Inputs, log=None):
        self.settings, self.out, self.inputs, self.log = settings, out, inputs, log
        self.results: dict[str, dict] = {}
        self.states: dict[str, str] = {}
        self.error: str | None = None  # why this run stopped, in a sweep that keeps going

    def job(self, stage) -> Job:
        handles = {name: self.inputs.get(name, self.results, str(self.out)) for name in stage.inputs}
        parts = components(stage, self.settings, self.results, handles)
        values = self.settings.dump()
        return Job(stage=stage.name, key=key_of(parts), out=str(self.out),
                   settings={name: values[name] for name in (*stage.reads, *stage.uses)},
                   upstream={name: self.results[name] for name in stage.needs},
                   context=context(stage, self.results), inputs=handles, components=parts)

    def discard_if_damaged(self, job: Job) -> None:
        """A stage folder with missing or changed outputs is removed (Prefect's record of it
        with it), so the stage is computed again instead of served."""
        problem = damage(self.out, job.stage, job.key, self.inputs.memo.file)
        if problem:
            if self.log:
                self.log.warning("%s: the stored result is damaged (%s); computing it again", job.stage, problem)
            doomed = job.folder.with_name(f"{job.key}.tmp-damaged-{uuid.uuid4().hex[:8]}")
            os.replace(job.folder, doomed)
            shutil.rmtree(doomed, ignore_errors=True)

    def run(self, stages, after_level=None) -> None:
        run_many([self], stages, after_level and (lambda runner: after_level(runner.results)))


def run_many(runners: list[Runner], stages, after_level=None, keep_going: bool = False) -> None:
    """Walk the graph for several runs at once (a sweep): level by level, every distinct stage
    key submitted once, so what the runs share (extract, split, decode) is computed once and
    their trainings run concurrently on the task runner. With `keep_going`, a run whose stage
    fails stops there (its `error` says why) and the others go on; otherwise the error is raised."""
    for level in levels(stages):
        with ExitStack() as held:
            jobs = {}  # (stage, key) -> job, submitted once
            wanted = []  # (runner, stage name, (stage, key))
            for runner in runners:
                if runner.error is not None:
                    continue
                for stage in level:
                    job = runner.job(stage)
                    jobs.setdefault((stage.name, job.key), (runner, job))
                    wanted.append((runner, stage.name, (stage.name, job.key)))
            futures = {}
            for name_key in sorted(jobs):  # one lock order for every run
                runner, job = jobs[name_key]
                held.enter_context(locked(stage_lock(runner.out, job.stage, job.key)))
                for leftover in (runner.out / job.stage).glob(f"{job.key}.tmp-*"):  # a killed run's
                    shutil.rmtree(leftover, ignore_errors=True)
                runner.discard_if_damaged(job)
                futures[name_key] = stage_task(job.stage, runner.out).submit(job=asdict(job))
            for runner, name, name_key in wanted:
                future = futures[name_key]
                future.wait()
                try:
                    runner.results[name] = future.result()  # re-raises the stage's own error
                except Exception as error:
                    if not keep_going:
                        raise
                    runner.error = runner.error or f"{name}: {error}"
                    continue
                runner.states[name] = future.state.name
        if after_level:
            for runner in runners:
                if runner.error is None:
                    after_level(runner)
