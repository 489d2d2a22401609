"""What the retraining loop remembers between runs, per configuration: the data fingerprint a
successful pipeline run trained on, and the last retraining the watcher asked for. Both are
Prefect Variables named by a digest of the settings, so configurations never interfere."""

from __future__ import annotations

from pathlib import Path

from agelens.tasks.core.hashing import sha256_json


def settings_digest(settings) -> str:
    return sha256_json(settings.dump())[:16]


def state_variable(settings) -> str:
    """The data fingerprint of the last successful run with exactly these settings."""
    return f"agelens-state-{settings_digest(settings)}"


def emitted_variable(settings) -> str:
    """The last retraining the watcher asked for, and how often it was asked for in vain."""
    return f"agelens-emitted-{settings_digest(settings)}"


def fingerprint(inputs, results: dict[str, dict], out: str | Path) -> str:
    """What the pipeline would train on: the metadata's content, the image listing, the drawn
    sample (the split manifest) and the content of every drawn image (`inputs`: flows.inputs.Inputs)."""
    handles = {name: inputs.get(name, results, str(out)) for name in ("source", "listing", "images")}
    return sha256_json({"source": handles["source"]["sha256"], "listing": handles["listing"]["sha256"],
                        "sample": results["split"]["outputs"]["manifest"]["sha256"],
                        "images": handles["images"]["sha256"]})[:32]


def get_variable(name: str):
    from prefect.variables import Variable

    return Variable.get(name, default=None)


def set_variable(name: str, value: dict) -> None:
    """Prefect's Variable.set(overwrite=True) reads, then creates or updates: two runs finishing at
    once can both try to create. The loser retries, and then updates."""
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.variables import Variable

    for attempt in range(3):
        try:
            Variable.set(name, value, overwrite=True)
            return
        except ObjectAlreadyExists:
            if attempt == 2:
                raise


def record_state(settings, state: dict) -> None:
    """What a successful run trained on, for the watcher; written only when the data changed
    (a read costs the server less than a write, and a cached rerun changes nothing)."""
    name = state_variable(settings)
    current = get_variable(name)
    if not current or current.get("fingerprint") != state["fingerprint"]:
        set_variable(name, state)
