"""The champion model of each configuration, and every decision about it, under `<out>/models/`.

A configuration is the data and the test split (data, image root, split_by, test_frac, seed): the
models of one configuration are scored on the same test images, and none of them trained on any
of them. Its champion is the model that `agelens predict` and the `predict` deployment use; a
newly trained model replaces it only when it is at least as good on the current test split, the
champion re-scored on the same images (the `compare` stage); `agelens promote RUN` overrides by
hand. The registry keeps its own copy of each champion (weights and what is needed to run them),
so `agelens gc` never takes a champion away.

    models/<config>/champion.json      the champion: run, model digest, metrics, promoted_at, why
    models/<config>/decisions.jsonl    every decision: promoted, kept (the challenger rejected), by hand
    models/<config>/<digest>/          model.safetensors and model.json (backbone, head, classes, ...)
"""

from __future__ import annotations

import json
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path

from agelens.flows.service.locks import locked
from agelens.tasks.core.errors import AgelensError
from agelens.tasks.core.hashing import sha256_json
from agelens.tasks.core.stage import atomic_write_bytes, output_path, write_json

CONFIG_SETTINGS = ("split_by", "test_frac", "seed")
MODEL_FACTS = ("backbone", "head", "classes", "image_size", "outputs", "tta", "temperature", "precision", "channels_last")


def config_of(settings) -> dict:
    """What defines a configuration: where the data is and how its test split is drawn."""
    values = settings.dump() if hasattr(settings, "dump") else settings

    def where(path):
        return str(Path(path).expanduser().resolve()) if path else None

    return {"data": where(values.get("data")) or "demo", "images": where(values.get("images")),
            **{name: values[name] for name in CONFIG_SETTINGS}}


def config_id(settings) -> str:
    return sha256_json(config_of(settings))[:12]


def folder(out: str | Path, config: str) -> Path:
    return Path(out) / "models" / config


def champion(out: str | Path, config: str) -> dict | None:
    try:
        found = json.loads((folder(out, config) / "champion.json").read_text())
    except (OSError, ValueError):
        return None
    if not (folder(out, config) / found.get("folder", "") / "model.safetensors").is_file():
        return None  # its copy is gone: as if there were none
    return found


def handle(out: str | Path, settings) -> dict:
    """The `champion` input of the compare stage: its model's digest (the key), where it is, its facts."""
    config = config_id(settings)
    found = champion(out, config)
    if found is None:
        return {"sha256": "none", "config": config}
    return {"sha256": sha256_json([found["model_digest"], found["facts"]["temperature"]]), "config": config,
            "model_digest": found["model_digest"],
            "path": str(folder(out, config) / found["folder"]), "run_id": found["run_id"], "facts": found["facts"],
            "metrics": found.get("metrics")}


def decisions(out: str | Path, config: str) -> list[dict]:
    try:
        lines = (folder(out, config) / "decisions.jsonl").read_text().splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        try:
            found.append(json.loads(line))
        except ValueError:
            continue
    return found


def configs(out: str | Path) -> list[str]:
    root = Path(out) / "models"
    return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def _record(out: Path, config: str, decision: dict) -> None:
    path = folder(out, config) / "decisions.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle_:
        handle_.write(json.dumps(decision, sort_keys=True) + "\n")
        handle_.flush()
        os.fsync(handle_.fileno())


def install(out: Path, config: str, run_id: str, results: dict, context: dict, metrics: dict | None, why: str,
            settings: dict) -> dict:
    """Make the model of `results` (train, calibrate) the champion of `config`."""
    model = results["train"]["outputs"]["model"]
    digest = model["sha256"]
    target = folder(out, config) / digest[:16]
    facts = {name: context[name] for name in MODEL_FACTS}
    if not (target / "model.safetensors").is_file():
        tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        shutil.copyfile(output_path(out, results["train"], "model"), tmp / "model.safetensors")
        write_json(tmp / "model.json", facts)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    record = {"run_id": run_id, "model_digest": digest, "folder": target.name, "facts": facts, "metrics": metrics,
              "promoted_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "why": why,
              "settings": {k: settings.get(k) for k in ("backbone", "image_size", "epochs", "lr", "recipe", "head",
                                                        "per_class")}}
    atomic_write_bytes(folder(out, config) / "champion.json", json.dumps(record, indent=2).encode())
    return record


def settle(out: Path, settings, run_id: str, results: dict, context: dict) -> dict | None:
    """Apply the compare stage's decision for this run (a cached decision is applied again, which
    changes nothing). Returns the decision as recorded, or None when the run did not compare."""
    if "compare" not in results:
        return None
    summary = results["compare"]["summary"]
    config = config_id(settings)
    with locked(folder(out, config) / ".lock"):
        current = champion(out, config)
        digest = results["train"]["outputs"]["model"]["sha256"]
        if current is not None and current["model_digest"] == digest:
            return {**summary, "config": config, "applied": "already the champion"}
        decision = {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "run_id": run_id,
                    "model_digest": digest, "decision": summary["decision"], "why": summary["why"],
                    "challenger": summary["challenger"], "champion": summary.get("champion"),
                    "champion_run": summary.get("champion_run")}
        judged = summary.get("champion_run")
        if summary["decision"] == "promote" and current is not None and current["run_id"] != judged:
            # Another model became champion after this one was compared (a sweep's runs settle one
            # by one): it is replaced only by a model at least as accurate on the same split.
            theirs, ours = (current.get("metrics") or {}).get("accuracy"), summary["challenger"]["accuracy"]
            if theirs is not None and ours < theirs:
                decision.update(decision="keep", champion={"accuracy": theirs}, champion_run=current["run_id"],
                                why=f"{summary['split']} accuracy {ours:.3f} < {theirs:.3f} of run "
                                    f"{current['run_id'][:8]}, which became the champion while this run compared")
                summary = {**summary, "decision": "keep", "why": decision["why"]}
            elif theirs is not None:
                decision["why"] = (f"{summary['split']} accuracy {ours:.3f} ≥ {theirs:.3f} of run {current['run_id'][:8]}, "
                                   "which became the champion while this run compared")
                summary = {**summary, "why": decision["why"]}
        if summary["decision"] == "promote":
            install(out, config, run_id, results, context, summary["challenger"], summary["why"], settings.dump())
        _record(out, config, decision)
    return {**summary, "config": config}


def promote_by_hand(out: Path, run: str) -> dict:
    """`agelens promote RUN`: the model of a recorded run becomes its configuration's champion."""
    from agelens.flows.pipeline.runs import read_runs
    from agelens.tasks.core.stage import read_result

    rows = [r for r in read_runs(out) if r["run_id"].startswith(run)]
    if not rows:
        raise AgelensError(f"no run {run!r} recorded in {out} (see agelens runs --out {out})")
    if len({r["run_id"] for r in rows}) > 1:
        raise AgelensError(f"{run!r} names several runs: {', '.join(sorted({r['run_id'][:12] for r in rows}))}")
    row = rows[-1]
    results = {}
    for stage in ("train", "calibrate", "evaluate", "decode", "split", "extract"):
        key = row["stages"].get(stage)
        result = read_result(out, stage, key) if key else None
        if result is None:
            raise AgelensError(f"run {row['run_id'][:8]} has no {stage} stage in {out} (not run that far, or removed by "
                               "agelens gc): it cannot be promoted")
        results[stage] = result
    context = {k: v for r in results.values() for k, v in r.get("meta", {}).items()}
    evaluate = results["evaluate"]["summary"]
    metrics = evaluate.get("test") or evaluate.get("val")
    config = config_id(row["settings"])
    why = "promoted by hand (agelens promote)"
    with locked(folder(out, config) / ".lock"):
        record = install(out, config, row["run_id"], results, context, metrics, why, row["settings"])
        _record(out, config, {"time": record["promoted_at"], "run_id": row["run_id"],
                              "model_digest": record["model_digest"], "decision": "promoted by hand", "why": why,
                              "challenger": metrics, "champion": None, "champion_run": None})
    return {"config": config, **record}
