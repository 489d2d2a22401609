"""Everything that can be checked before work starts, checked there, with every bad item named.

The CLI runs these before it starts (or connects to) a Prefect server, so a bad option or a
missing file costs a second, not the server's start-up; the flow runs them again (deployments
and the UI's form reach it directly). Checks that need torch run only when a stage that needs
them will actually run, so a fully cached run never imports torch.
"""

from __future__ import annotations

import uuid
from pathlib import Path

from agelens.flows.pipeline.graph import BY_NAME
from agelens.tasks.core.errors import ConfigError, DataError


def writable_out(out: str) -> Path:
    """The output folder, created if needed; one clear error when it cannot be written."""
    path = Path(out).expanduser().resolve()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--out {path} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise ConfigError(f"--out {path} cannot be written: {error.strerror or error}") from None
    return path


def model_stages(will_run: set[str]) -> set[str]:
    return {name for name in will_run if BY_NAME[name].reads_model}


def check_model_settings(settings, will_run: set[str]) -> list[str]:
    """Device, backbone, image size, weights and layers, for the stages in `will_run`; one
    ConfigError naming every problem. Returns notes worth logging (which CAM layer is used)."""
    if not model_stages(will_run):
        return []
    from agelens.tasks.attribution.layers import MIN_CAM_SIDE, cam_layer_of, check_layers, feature_layers_of, map_sides
    from agelens.tasks.model.backbones import build_model, size_problem
    from agelens.tasks.model.inference import resolve_device

    problems, notes = [], []
    try:
        resolve_device(settings.device)
    except DataError as error:
        problems.append(str(error))
    try:
        model = build_model(settings.backbone, 2)
    except DataError as error:
        raise ConfigError("; ".join([*problems, f"--backbone: {error}"])) from None
    problem = size_problem(settings.backbone, settings.image_size)
    if problem is not None:
        raise ConfigError("; ".join([*problems, f"--image-size {problem}"]))
    problem = None if settings.start_size is None else size_problem(settings.backbone, settings.start_size)
    if problem is not None:
        raise ConfigError("; ".join([*problems, f"--start-size {problem}"]))
    model = build_model(settings.backbone, 2, image_size=settings.image_size)
    wanted = []
    if "featuremaps" in will_run:
        wanted.append(("--feature-layers", lambda: feature_layers_of(model, settings.feature_layers)))
    if will_run & {"explain", "attention"}:
        wanted.append(("--cam-layer", lambda: [cam_layer_of(model, settings.cam_layer, settings.image_size)]))
    for option, specs in wanted:
        try:
            found = problems + [f"{option}: {problem}" for problem in check_layers(model, specs(), settings.image_size)]
        except DataError as error:
            found = [*problems, f"{option}: {error}"]
        if len(found) == len(problems) and option == "--cam-layer":
            layer = specs()[0]
            side = map_sides(model, [layer], settings.image_size)[layer]
            how = "chosen for" if settings.cam_layer == "auto" else "given by --cam-layer; at"
            notes.append(f"CAM layer {layer} ({how} {settings.image_size} px): a {side}x{side} map"
                         + (f", coarser than {MIN_CAM_SIDE}x{MIN_CAM_SIDE}: explanations will hardly tell methods "
                            "apart (use larger images or an earlier layer)" if side < MIN_CAM_SIDE else ""))
        problems = found
    if problems:
        raise ConfigError("; ".join(problems))
    return notes


def check_weights(settings, weights: dict) -> None:
    """A weights file is readable and fits the backbone, before any work."""
    if weights.get("kind") != "file":
        return
    from agelens.tasks.model.backbones import check_weights as fits

    try:
        fits(settings.backbone, Path(weights["path"]), settings.image_size)
    except DataError as error:
        raise ConfigError(f"--weights: {error}") from None


def check_classes(settings, classes: list[str], will_run: set[str]) -> None:
    """Settings that name classes, against the classes the data has."""
    if "explain" in will_run:
        unknown = [c for c in settings.explain_classes if c not in classes]
        if unknown:
            raise ConfigError(f"--explain-classes: {', '.join(unknown)} not among the data's classes "
                              f"({', '.join(classes)})")


def check_run(settings, out: Path, inputs) -> tuple[list[dict], list[str]]:
    """What a run would do (`agelens status`'s rows) and every check that can be made before it
    starts: the data is there, the model settings and the weights work for the stages that will
    run. Returns (rows, notes to log)."""
    from agelens.flows.service.status import plan

    rows = plan(settings, str(out), inputs, hash_file=inputs.memo.file)
    for row in rows:
        if "error" in row:
            raise DataError(row["error"])
    will_run = {row["stage"] for row in rows if not row["cached"]}
    notes = check_model_settings(settings, will_run)
    if "train" in will_run:
        check_weights(settings, inputs.weights)  # missing weights stop the run before any work
    return rows, notes
