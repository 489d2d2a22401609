"""Everything that can be checked before work starts, checked there, with every bad item named.

Checks that need torch run only when a stage that needs them will actually run, so a fully
cached run never imports torch.
"""

from __future__ import annotations

import uuid
from pathlib import Path

from tasks.errors import ConfigError, DataError

MODEL_STAGES = ("train", "evaluate", "embed", "featuremaps", "attention", "explain")


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


def check_model_settings(settings, will_run: set[str]) -> None:
    """Device, backbone, image size and layers, for the stages in `will_run`; one ConfigError
    naming every problem."""
    if not will_run & set(MODEL_STAGES):
        return
    from tasks.attribution import cam_layer_of, check_layers, feature_layers_of
    from tasks.inference import resolve_device
    from tasks.models import build_model, minimum_image_size

    problems = []
    try:
        resolve_device(settings.device)
    except DataError as error:
        problems.append(str(error))
    try:
        model = build_model(settings.backbone, 2, image_size=settings.image_size)
    except DataError as error:
        raise ConfigError("; ".join([*problems, f"--backbone: {error}"])) from None
    smallest = minimum_image_size(settings.backbone, settings.image_size)
    if smallest is not None:
        raise ConfigError("; ".join([*problems, f"--image-size {settings.image_size} is too small for "
                                                f"{settings.backbone}: it needs at least {smallest}"]))
    wanted = []
    if "featuremaps" in will_run:
        wanted.append(("--feature-layers", lambda: feature_layers_of(model, settings.feature_layers)))
    if will_run & {"explain", "attention"}:
        wanted.append(("--cam-layer", lambda: [cam_layer_of(model, settings.cam_layer)]))
    for option, specs in wanted:
        try:
            problems += [f"{option}: {problem}" for problem in check_layers(model, specs(), settings.image_size)]
        except DataError as error:
            problems.append(f"{option}: {error}")
    if problems:
        raise ConfigError("; ".join(problems))


def check_classes(settings, classes: list[str], will_run: set[str]) -> None:
    """Settings that name classes, against the classes the data has."""
    if "explain" in will_run:
        unknown = [c for c in settings.explain_classes if c not in classes]
        if unknown:
            raise ConfigError(f"--explain-classes: {', '.join(unknown)} not among the data's classes "
                              f"({', '.join(classes)})")
