"""`agelens serve`: both deployments of prefect.yaml, served from this process (no worker needed)."""

from __future__ import annotations

import importlib
from pathlib import Path

import yaml
from prefect import serve
from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger
from prefect.schedules import Cron, Interval

PREFECT_YAML = Path(__file__).resolve().parents[1] / "prefect.yaml"


def load_flow(entrypoint: str):
    path, name = entrypoint.split(":")
    return getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), name)


def served_deployments(spec_path: Path = PREFECT_YAML) -> list:
    """prefect.yaml's deployments as RunnerDeployments: one definition for both ways of running."""
    spec = yaml.safe_load(spec_path.read_text())
    deployments = []
    for entry in spec["deployments"]:
        schedules = [Cron(s["cron"], timezone=s.get("timezone")) if "cron" in s else Interval(s["interval"])
                     for s in entry.get("schedules", [])]
        deployments.append(load_flow(entry["entrypoint"]).to_deployment(
            name=entry["name"], description=entry.get("description"), parameters=entry.get("parameters", {}),
            schedules=schedules,
            triggers=[DeploymentEventTrigger(**{k: v for k, v in t.items() if k != "type"})
                      for t in entry.get("triggers", [])]))
    return deployments


def serve_all() -> None:
    serve(*served_deployments())
