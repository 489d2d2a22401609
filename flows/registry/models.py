"""The champion model of each configuration, and every decision about it, under `<out>/models/`.

A configuration is the data and the test split (data, image root, split_by, test_frac, seed): the
models of one configuration are scored on the same test images, and none of them trained on any
of them. Its champion is the model that `agelens predict` and the `predict` deployment use; a
newly trained model replaces it only when it is at least as good on the current test split, the
champion re-scored on the same images (the `compare` stage); `agelens promote RUN` overrides by
hand. The registry keeps its own copy of each champion (weights and what is needed to run them),
so `agelens gc` never takes a champion away.

Every read of a champion checks its weights against the digest it was installed with. A damaged
or missing champion is said in one warning line and never served: the best verified model left
in the registry (an earlier champion) stands in for it, in the compare stage and in predict, and
the next settled run makes the registry point at a verified model again.

    models/<config>/champion.json      the champion: run, model digest, metrics, promoted_at, why
    models/<config>/decisions.jsonl    every decision: promoted, kept (the challenger rejected), by hand
    models/<config>/<digest>/          model.safetensors and model.json (backbone, head, classes, ...)
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from agelens.flows.service.locks import locked
from agelens.tasks.core.errors import AgelensError
from agelens.tasks.core.hashing import sha256_file, sha256_json
from agelens.tasks.core.stage import atomic_write_bytes, output_path, write_json

CONFIG_SETTINGS = ("split_by", "test_frac", "seed")
MODEL_FACTS = ("backbone", "head", "classes", "image_size", "outputs", "tta", "temperature", "precision", "channels_last",
               "framing")


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


def _read_champion(out: str | Path, config: str) -> dict | None:
    try:
        found = json.loads((folder(out, config) / "champion.json").read_text())
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) and {"run_id", "model_digest", "folder", "facts"} <= set(found) else None


def weights_of(out: str | Path, config: str, record: dict) -> Path:
    return folder(out, config) / record["folder"] / "model.safetensors"


def verify(out: str | Path, config: str, record: dict, hash_file=sha256_file) -> str | None:
    """What is wrong with a stored model's weights, or None when they are the model `record` names."""
    path = weights_of(out, config, record)
    try:
        digest = hash_file(path)
    except FileNotFoundError:
        return f"its weights file {path} is missing"
    except OSError as error:
        return f"its weights file {path} cannot be read ({error.strerror or type(error).__name__})"
    if digest != record["model_digest"]:
        return f"its weights file {path} was changed after it was stored (sha256 {digest[:12]}, not {record['model_digest'][:12]})"
    return None


def stored(out: str | Path, config: str) -> list[dict]:
    """Every model the registry of `config` has held as champion, newest first, as champion records
    (from its decisions and each model's own model.json)."""
    found: dict[str, dict] = {}
    for decision in decisions(out, config):
        if decision.get("decision") not in ("promote", "promoted by hand") or "model_digest" not in decision:
            continue
        place = decision["model_digest"][:16]
        try:
            facts = json.loads((folder(out, config) / place / "model.json").read_text())
        except (OSError, ValueError):
            continue
        found[decision["model_digest"]] = {"run_id": decision["run_id"], "model_digest": decision["model_digest"],
                                           "folder": place, "facts": facts, "metrics": decision.get("challenger"),
                                           "promoted_at": decision.get("time"), "why": decision.get("why")}
    return list(reversed(found.values()))


@dataclass(frozen=True)
class Served:
    """The model a configuration serves now (None: none), and what was wrong on the way (one line)."""

    record: dict | None
    warning: str | None = None
    champion: dict | None = None  # the champion as recorded, damaged or not


def serving(out: str | Path, config: str, hash_file=sha256_file) -> Served:
    """The champion of `config` when its weights check out; otherwise the best verified model left
    in the registry (by its recorded accuracy), with a warning."""
    current = _read_champion(out, config)
    if current is not None:
        problem = verify(out, config, current, hash_file)
        if problem is None:
            return Served(current, None, current)
        warning = f"the champion of configuration {config} (run {current['run_id'][:8]}) is damaged: {problem}"
    elif (folder(out, config) / "champion.json").exists() or stored(out, config):
        warning = f"the champion record {folder(out, config) / 'champion.json'} is missing or unreadable"
    else:
        return Served(None)
    left = [r for r in stored(out, config) if (current is None or r["model_digest"] != current["model_digest"])
            and verify(out, config, r, hash_file) is None]
    if not left:
        return Served(None, f"{warning}; no verified model is left in the registry", current)
    best = max(left, key=lambda r: (r.get("metrics") or {}).get("accuracy") or 0.0)
    accuracy = (best.get("metrics") or {}).get("accuracy")
    return Served(best, f"{warning}; serving run {best['run_id'][:8]}'s model instead, the best verified model left"
                        + (f" (accuracy {accuracy:.3f})" if accuracy is not None else ""), current)


def handle(out: str | Path, settings, hash_file=sha256_file, model_digest: str | None = None) -> dict:
    """The `champion` input of the compare stage for the model `model_digest`: the verified model it
    is compared with (its digest is the key), where it is, its facts, and what was wrong with the
    champion. Once that model is the champion, the key is again the one it was promoted with, so
    a rerun with nothing changed finds its compare stage cached."""
    config = config_id(settings)
    served = serving(out, config, hash_file)
    found = served.record
    if found is None:
        return {"sha256": "none", "config": config, "warning": served.warning}
    if found["model_digest"] == model_digest and found.get("judged_against") and not served.warning:
        return {"sha256": found["judged_against"], "config": config, "model_digest": found["model_digest"],
                "run_id": found["run_id"], "facts": found["facts"], "path": str(folder(out, config) / found["folder"])}
    return {"sha256": sha256_json([found["model_digest"], found["facts"]["temperature"]]), "config": config,
            "model_digest": found["model_digest"],
            "path": str(folder(out, config) / found["folder"]), "run_id": found["run_id"], "facts": found["facts"],
            "metrics": found.get("metrics"), "warning": served.warning}


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
            settings: dict, judged_against: str | None = None) -> dict:
    """Make the model of `results` (train, calibrate) the champion of `config` (`judged_against`:
    the champion input its compare stage was keyed by)."""
    model = results["train"]["outputs"]["model"]
    digest = model["sha256"]
    target = folder(out, config) / digest[:16]
    facts = {name: context.get(name) for name in MODEL_FACTS}
    if verify(out, config, {"folder": target.name, "model_digest": digest}) is not None:  # absent or damaged
        tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        shutil.copyfile(output_path(out, results["train"], "model"), tmp / "model.safetensors")
        write_json(tmp / "model.json", facts)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    record = {"run_id": run_id, "model_digest": digest, "folder": target.name, "facts": facts, "metrics": metrics,
              "promoted_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "why": why,
              "judged_against": judged_against,
              "settings": {k: settings.get(k) for k in ("backbone", "image_size", "epochs", "lr", "recipe", "head",
                                                        "per_class")}}
    atomic_write_bytes(folder(out, config) / "champion.json", json.dumps(record, indent=2).encode())
    return record


def _restore(out: Path, config: str, record: dict, served: Served) -> None:
    """Point the registry at `record` again, after its champion was found damaged."""
    why = f"restored: {served.warning}"
    atomic_write_bytes(folder(out, config) / "champion.json", json.dumps({**record, "why": why}, indent=2).encode())
    _record(out, config, {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "run_id": record["run_id"],
                          "model_digest": record["model_digest"], "decision": "restored", "why": why,
                          "challenger": record.get("metrics"), "champion": None, "champion_run": None})


def settle(out: Path, settings, run_id: str, results: dict, context: dict, hash_file=sha256_file) -> dict | None:
    """Apply the compare stage's decision for this run (a cached decision is applied again, which
    changes nothing). Returns the decision as recorded, or None when the run did not compare."""
    if "compare" not in results:
        return None
    summary = results["compare"]["summary"]
    config = config_id(settings)
    with locked(folder(out, config) / ".lock"):
        served = serving(out, config, hash_file)
        current = served.record
        digest = results["train"]["outputs"]["model"]["sha256"]
        if current is not None and current["model_digest"] == digest:
            if served.warning:
                _restore(out, config, current, served)
            elif current["facts"] != (facts := {name: context.get(name) for name in MODEL_FACTS}):
                # Facts measured again (the framing, once a detector came): the champion serves with them.
                write_json(folder(out, config) / current["folder"] / "model.json", facts)
                atomic_write_bytes(folder(out, config) / "champion.json",
                                   json.dumps({**current, "facts": facts}, indent=2).encode())
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
            install(out, config, run_id, results, context, summary["challenger"], summary["why"], settings.dump(),
                    summary.get("against"))
        elif served.warning and current is not None:
            _restore(out, config, current, served)
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
    for stage in ("train", "calibrate", "evaluate", "decode", "framing", "split", "extract"):
        key = row["stages"].get(stage)
        result = read_result(out, stage, key) if key else None
        if result is None and stage == "framing":  # runs from before framing was measured
            continue
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
