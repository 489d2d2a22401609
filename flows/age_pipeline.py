"""The agelens pipeline: one Prefect flow wiring the stages, each cached by content."""

from __future__ import annotations

import sys
from dataclasses import fields
from pathlib import Path
from typing import Literal

from prefect import flow, get_run_logger

from flows.config import DEMO_ROOT, RunConfig, Stage
from flows.inputs import data_handles, images_handle, open_memo, weights_handle
from tasks.decode import decode_images
from tasks.demo import DemoSpec, demo_is_current, make_demo
from tasks.embed import embed_features
from tasks.evaluate import evaluate_model
from tasks.explain import explain_model
from tasks.extract import extract_metadata
from tasks.featuremaps import feature_maps
from tasks.hashing import HashMemo
from tasks.models import resolve_device
from tasks.report import make_report
from tasks.split import split_dataset
from tasks.train import TrainSettings, train_model


class StageRunner:
    """Submits stage tasks with results stored under `out` and records their state and outputs."""

    def __init__(self, out: str):
        self.out = out
        self.stages: dict[str, dict] = {}

    def start(self, name: str, stage_task, refresh: bool = False, **parameters):
        configured = stage_task.with_options(result_storage=Path(self.out), refresh_cache=refresh or None)
        return name, configured.submit(**parameters, out=self.out)

    def finish(self, started) -> dict:
        name, future = started
        future.wait()
        result = future.result()  # re-raises the stage's own error
        self.stages[name] = {"state": future.state.name, "summary": result.get("summary", {}),
                             "outputs": _paths(result.get("outputs", {}))}
        return result

    def __call__(self, name: str, stage_task, refresh: bool = False, **parameters) -> dict:
        return self.finish(self.start(name, stage_task, refresh, **parameters))


def _paths(outputs: dict) -> dict:
    return {k: (v["path"] if isinstance(v, dict) else v) for k, v in outputs.items()}


def extract_stage(config: RunConfig, run: StageRunner, memo: HashMemo) -> dict:
    """The demo data when no --data is given, then the extract stage; its handle."""
    data, images = config.data, config.images
    if config.uses_demo:
        spec = DemoSpec()
        root = Path(DEMO_ROOT).resolve()
        demo = run("demo", make_demo, refresh=not demo_is_current(root, spec),
                   root=str(root), identities=spec.identities, seed=spec.seed)
        data, images = demo["outputs"]["metadata"], demo["outputs"]["images"]
    source, image_root, fmt = data_handles(data, images, memo)
    return run("extract", extract_metadata, source=source, images=image_root, fmt=fmt)


@flow(name="age-pipeline", log_prints=True)
def age_pipeline(
    data: str | None = None,
    images: str | None = None,
    out: str = "artifacts",
    until: Stage = "report",
    per_class: int = 200,
    seed: int = 0,
    split_by: Literal["identity", "image"] = "identity",
    val_frac: float = 0.2,
    test_frac: float = 0.0,
    backbone: str = "convnext_tiny",
    weights: str = "auto",
    epochs: int = 5,
    batch_size: int = 32,
    lr: float = 1e-4,
    image_size: int = 224,
    device: str = "auto",
    precision: Literal["auto", "fp32", "bf16"] = "auto",
    channels_last: Literal["auto", "on", "off"] = "auto",
    eval_batch_size: int = 64,
    tsne_perplexity: float = 30.0,
    feature_layers: str = "features.0,features.5,features.-1",
    feature_images: int = 9,
    feature_channels: int = 8,
    cam_layer: str = "features.-1",
    explain_classes: str = "10s,60s",
    explain_images: int = 2,
    sanity_check: bool = True,
) -> dict:
    """Face-age study on CACD (or the built-in demo): extract -> split -> decode -> train -> evaluate
    -> embed | feature maps | explain -> report."""
    config = RunConfig(**{**locals(), "out": str(Path(out).resolve())})  # the parameters, one-to-one
    run = StageRunner(config.out)
    with open_memo(config.out) as memo:
        _run_stages(config, run, memo)
    get_run_logger().info("stages: %s", {k: v["state"] for k, v in run.stages.items()})
    return {"config": config.as_dict(), "stages": run.stages}


def _run_stages(config: RunConfig, run: StageRunner, memo: HashMemo) -> None:
    # Settle the device and the weights first: without them, stop before any work.
    weights_ref = None
    if config.runs("train"):
        resolve_device(config.device)
        weights_ref = weights_handle(config.weights_choice, config.backbone, memo)
    metadata = extract_stage(config, run, memo)
    if config.runs("split"):
        split = run("split", split_dataset, metadata=metadata, per_class=config.per_class, seed=config.seed,
                    split_by=config.split_by, val_frac=config.val_frac, test_frac=config.test_frac)
    if config.runs("decode"):
        sampled = images_handle(split["outputs"]["manifest"]["path"], split["image_root"], memo)
        decoded = run("decode", decode_images, split=split, images=sampled, image_size=config.image_size)
    if config.runs("train"):
        settings = TrainSettings(**{f.name: getattr(config, f.name) for f in fields(TrainSettings)
                                    if hasattr(config, f.name)})
        trained = run("train", train_model, decoded=decoded, weights=weights_ref, settings=settings,
                      device=config.device)
    if config.runs("evaluate"):
        evaluated = run("evaluate", evaluate_model, decoded=decoded, trained=trained,
                        eval_batch_size=config.eval_batch_size, device=config.device)
    # Embedding, feature maps and explanations only read the trained model: they run concurrently.
    started = []
    if config.runs("embed"):
        started.append(run.start("embed", embed_features, decoded=decoded, trained=trained,
                                 tsne_perplexity=config.tsne_perplexity, seed=config.seed, device=config.device))
    if config.runs("featuremaps"):
        started.append(run.start("featuremaps", feature_maps, decoded=decoded, trained=trained,
                                 layers=config.feature_layer_list, images_per_class=config.feature_images,
                                 channels=config.feature_channels, device=config.device))
    if config.runs("explain"):
        started.append(run.start("explain", explain_model, decoded=decoded, trained=trained,
                                 cam_layer=config.cam_layer, classes=config.explain_class_list,
                                 images_per_class=config.explain_images, sanity_check=config.sanity_check,
                                 seed=config.seed, device=config.device))
    finished = {stage[0]: run.finish(stage) for stage in started}
    if config.runs("report"):
        run("report", make_report, config=config.as_dict(),
            stages={"split": split, "train": trained, "evaluate": evaluated, **finished})


def with_task_runner(task_runner: str = "thread", dask_address: str | None = None):
    """The flow on Prefect's default thread pool, or on Dask: a LocalCluster, or the cluster at
    `dask_address` (then every machine must see `out` at the same path)."""
    if task_runner == "thread":
        return age_pipeline
    from prefect_dask import DaskTaskRunner

    runner = DaskTaskRunner(address=dask_address) if dask_address else DaskTaskRunner(
        cluster_kwargs={"n_workers": 2, "threads_per_worker": 1, "processes": True})
    return age_pipeline.with_options(task_runner=runner)


if __name__ == "__main__":
    from flows.cli import main

    sys.exit(main(["run", *sys.argv[1:]]))
