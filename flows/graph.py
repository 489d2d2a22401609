"""The stage graph, declared once as data: what each stage needs and reads.

The flow walks it, `--until` slices it, `agelens status` computes its keys without running
anything, and the report and the CLI summary iterate over it. A stage's key hashes
  * its code: its module `tasks.<name>` and every project module that imports, transitively;
  * the settings it `reads` (by name; `uses` are settings that do not change its results);
  * the content digests of the stages it `needs`, and of its external `inputs` (data files).
Never paths, timings, devices or the run id.
"""

from __future__ import annotations

from dataclasses import dataclass

from flows.codeversion import ROOT, code_version
from tasks.hashing import sha256_json


@dataclass(frozen=True)
class Stage:
    name: str
    needs: tuple[str, ...] = ()
    reads: tuple[str, ...] = ()
    uses: tuple[str, ...] = ()
    inputs: tuple[str, ...] = ()

    @property
    def module(self) -> str:
        return f"tasks.{self.name}"


_MODEL = ("device", "eval_batch_size")
STAGES: tuple[Stage, ...] = (
    Stage("extract", inputs=("source", "listing")),
    Stage("split", needs=("extract",), reads=("per_class", "seed", "split_by", "val_frac", "test_frac")),
    Stage("decode", needs=("split",), reads=("image_size",), inputs=("images",)),
    Stage("train", needs=("decode",), inputs=("weights",), uses=_MODEL,
          reads=("backbone", "epochs", "batch_size", "lr", "max_steps", "seed", "precision", "channels_last")),
    Stage("evaluate", needs=("decode", "train"), uses=_MODEL),
    Stage("embed", needs=("decode", "train"), reads=("embed_images", "tsne_perplexity", "seed"), uses=_MODEL),
    Stage("featuremaps", needs=("decode", "train"), reads=("feature_layers", "feature_images", "feature_channels"),
          uses=_MODEL),
    Stage("attention", needs=("decode", "train"), reads=("cam_layer", "attention_images"), uses=_MODEL),
    Stage("explain", needs=("decode", "train"), uses=_MODEL,
          reads=("cam_layer", "cam_methods", "explain_classes", "explain_images", "sanity_check",
                 "faithfulness_steps", "seed")),
    Stage("report", needs=("split", "train", "evaluate", "embed", "featuremaps", "attention", "explain")),
)
STAGE_NAMES = tuple(stage.name for stage in STAGES)
BY_NAME = {stage.name: stage for stage in STAGES}


def selected(until: str) -> list[Stage]:
    """The stages up to and including `until`, in order."""
    return list(STAGES[: STAGE_NAMES.index(until) + 1])


def levels(stages: list[Stage]) -> list[list[Stage]]:
    """Stages grouped so that each group needs only earlier groups (run concurrently within)."""
    depth: dict[str, int] = {}
    for stage in stages:
        depth[stage.name] = 1 + max((depth[n] for n in stage.needs), default=-1)
    return [[s for s in stages if depth[s.name] == d] for d in range(max(depth.values()) + 1)]


def content_digest(result: dict) -> str:
    """What downstream keys see of a stage's result: its keyed outputs' hashes and its meta."""
    keyed = {name: o["sha256"] for name, o in result["outputs"].items() if "sha256" in o}
    return sha256_json({"outputs": keyed, "meta": result.get("meta", {})})


def components(stage: Stage, settings, upstream: dict[str, dict], inputs: dict[str, dict], root=ROOT) -> dict:
    """Everything a stage's key is made from, readable (recorded as its parameters.json)."""
    values = settings.dump()
    return {
        "stage": stage.name,
        "code": code_version(stage.module, root),
        "settings": {name: values[name] for name in stage.reads},
        "upstream": {name: {"key": upstream[name]["key"], "content": content_digest(upstream[name])}
                     for name in stage.needs},
        "inputs": {name: inputs[name]["sha256"] for name in stage.inputs},
    }


def key_of(parts: dict) -> str:
    keyed = {**parts, "upstream": {name: u["content"] for name, u in parts["upstream"].items()}}
    return sha256_json(keyed)[:24]
