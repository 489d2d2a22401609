"""The model registry serves only what it can verify: a damaged or missing champion is one warning,
`agelens models` marks it, the best verified model left stands in for it, and the next settled
run points the registry at a verified model again."""

import hashlib
import json
from pathlib import Path

import pytest

from agelens.flows.pipeline.settings import RunSettings
from agelens.flows.registry import models

FACTS = {"backbone": "convnext_narrow", "head": "classes", "classes": ["10s", "20s"], "image_size": 32, "outputs": 2,
         "tta": False, "temperature": 1.0, "precision": "fp32", "channels_last": False, "framing": None}


def trained(out: Path, name: str) -> dict:
    """A train stage result holding a 'model' (bytes standing for weights)."""
    data = f"weights of {name}".encode() * 100
    folder = out / "train" / name
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(data)
    return {"stage": "train", "key": name, "outputs": {"model": {"file": "model.safetensors",
                                                                 "sha256": hashlib.sha256(data).hexdigest()}}}


def settle(out: Path, name: str, accuracy: float, decision: str = "promote", against: str = "none") -> dict:
    results = {"train": trained(out, name), "compare": {"summary": {
        "decision": decision, "why": f"{name} judged", "split": "test", "challenger": {"accuracy": accuracy},
        "champion_run": None, "against": against}}}
    return models.settle(out, RunSettings(), f"run-{name}", results, FACTS)


def champion_weights(out: Path) -> Path:
    [config] = models.configs(out)
    record = json.loads((models.folder(out, config) / "champion.json").read_text())
    return models.weights_of(out, config, record)


def test_a_damaged_champion_is_never_served_and_the_best_verified_model_stands_in(tmp_path):
    out = tmp_path / "o"
    settle(out, "first", 0.40)
    settle(out, "second", 0.50)
    settle(out, "third", 0.45, decision="keep")  # rejected: never stored
    config = models.config_id(RunSettings())
    served = models.serving(out, config)
    assert served.record["run_id"] == "run-second" and served.warning is None
    assert [r["run_id"] for r in models.stored(out, config)] == ["run-second", "run-first"]

    weights = champion_weights(out)
    weights.write_bytes(b"random bytes" + weights.read_bytes()[12:])  # same size, other bytes
    served = models.serving(out, config)
    assert served.record["run_id"] == "run-first" and served.champion["run_id"] == "run-second"
    assert "\n" not in served.warning and "(run run-seco) is damaged" in served.warning
    assert "was changed after it was stored" in served.warning and "serving run run-firs's model instead" in served.warning
    handle = models.handle(out, RunSettings())
    assert handle["run_id"] == "run-first" and handle["warning"] == served.warning

    # The next run is compared with run-first and rejected: the registry points at run-first again.
    settle(out, "fourth", 0.30, decision="keep")
    after = models.serving(out, config)
    assert after.record["run_id"] == "run-first" and after.warning is None
    assert models.decisions(out, config)[-2]["decision"] == "restored"


def test_a_missing_champion_with_nothing_left_is_said_and_the_next_model_promoted(tmp_path):
    out = tmp_path / "o"
    settle(out, "only", 0.60)
    champion_weights(out).unlink()
    config = models.config_id(RunSettings())
    served = models.serving(out, config)
    assert served.record is None and "is missing" in served.warning and "no verified model is left" in served.warning
    handle = models.handle(out, RunSettings())
    assert handle["sha256"] == "none" and handle["warning"] == served.warning
    settle(out, "next", 0.10)
    assert models.serving(out, config).record["run_id"] == "run-next"


def test_models_marks_a_damaged_champion_and_verify_checks_every_stored_model(tmp_path, capsys):
    from agelens.flows.cli.main import main

    out = tmp_path / "o"
    settle(out, "first", 0.40)
    settle(out, "second", 0.50)
    assert main(["models", "--out", str(out), "--verify"]) == 0
    assert capsys.readouterr().out.count("verified") == 2
    champion_weights(out).write_bytes(b"damaged")
    assert main(["models", "--out", str(out)]) == 0
    listing = capsys.readouterr().out
    assert "champion  run run-seco" in listing and "DAMAGED" in listing
    assert "serving   run run-firs" in listing
    assert main(["models", "--out", str(out), "--verify", "--json"]) == 1
    [entry] = json.loads(capsys.readouterr().out)
    assert [r["problem"] is None for r in entry["stored"]] == [False, True]


def test_a_promoted_model_keeps_the_key_it_was_judged_with(tmp_path):
    """Once this model is the champion, the compare stage's input is what it was compared with,
    so a rerun with nothing changed finds compare cached."""
    out = tmp_path / "o"
    settle(out, "first", 0.40, against="none")
    digest = models.serving(out, models.config_id(RunSettings())).record["model_digest"]
    assert models.handle(out, RunSettings(), model_digest=digest)["sha256"] == "none"
    other = models.handle(out, RunSettings(), model_digest="f" * 64)
    assert other["sha256"] not in ("none", digest) and other["run_id"] == "run-first"


@pytest.mark.parametrize("damage", ["unlink", "garbage"])
def test_a_damaged_champion_record_is_a_warning_not_a_crash(tmp_path, damage):
    out = tmp_path / "o"
    settle(out, "first", 0.40)
    [config] = models.configs(out)
    record = models.folder(out, config) / "champion.json"
    record.unlink() if damage == "unlink" else record.write_text("{not json")
    served = models.serving(out, config)
    assert served.record["run_id"] == "run-first" and "champion record" in served.warning
