"""The one typed configuration of a run; the flow's parameters map onto it one-to-one."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Literal

Stage = Literal["demo", "extract", "split", "decode", "train", "evaluate", "embed", "featuremaps", "explain", "report"]
STAGES = typing.get_args(Stage)  # in pipeline order
DEMO_ROOT = "data/demo"


class ConfigError(ValueError):
    """A setting that cannot work; the message names the option."""


@dataclass(frozen=True)
class RunConfig:
    # data
    data: str | None = None
    images: str | None = None
    out: str = "artifacts"
    until: Stage = "report"
    # sampling and split
    per_class: int = 200
    seed: int = 0
    split_by: Literal["identity", "image"] = "identity"
    val_frac: float = 0.2
    test_frac: float = 0.0
    # training (the reference's settings)
    backbone: str = "convnext_tiny"
    weights: str = "auto"
    epochs: int = 5
    batch_size: int = 32
    lr: float = 1e-4
    image_size: int = 224
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    channels_last: Literal["auto", "on", "off"] = "auto"
    # evaluation, embedding, explanation
    eval_batch_size: int = 64
    tsne_perplexity: float = 30.0
    feature_layers: str = "features.0,features.5,features.-1"
    feature_images: int = 9
    feature_channels: int = 8
    cam_layer: str = "features.-1"
    explain_classes: str = "10s,60s"
    explain_images: int = 2
    sanity_check: bool = True

    def __post_init__(self):
        checks = [
            (self.until in STAGES, f"--until must be one of {', '.join(STAGES)}, not {self.until!r}"),
            (self.per_class >= 1, f"--per-class must be at least 1, not {self.per_class}"),
            (self.split_by in ("identity", "image"), f"--split-by must be identity or image, not {self.split_by!r}"),
            (0 < self.val_frac < 1, f"--val-frac must lie strictly between 0 and 1, not {self.val_frac}"),
            (0 <= self.test_frac < 1, f"--test-frac must lie in [0, 1), not {self.test_frac}"),
            (self.val_frac + self.test_frac < 1,
             f"--val-frac + --test-frac must leave images to train on, not {self.val_frac + self.test_frac}"),
            (self.epochs >= 1, f"--epochs must be at least 1, not {self.epochs}"),
            (self.batch_size >= 1, f"--batch-size must be at least 1, not {self.batch_size}"),
            (self.lr > 0, f"--lr must be positive, not {self.lr}"),
            (self.image_size >= 16, f"--image-size must be at least 16, not {self.image_size}"),
            (self.precision in ("auto", "fp32", "bf16"), f"--precision must be auto, fp32 or bf16, not {self.precision!r}"),
            (self.channels_last in ("auto", "on", "off"), f"--channels-last must be auto, on or off, not {self.channels_last!r}"),
            (self.eval_batch_size >= 1, f"--eval-batch-size must be at least 1, not {self.eval_batch_size}"),
            (self.tsne_perplexity > 0, f"--tsne-perplexity must be positive, not {self.tsne_perplexity}"),
            (self.feature_images >= 1 and self.feature_channels >= 1, "--feature-images and --feature-channels must be at least 1"),
            (self.explain_images >= 1, f"--explain-images must be at least 1, not {self.explain_images}"),
            (bool(self.feature_layer_list), "--feature-layers must name at least one layer, e.g. features.0"),
            (bool(self.explain_class_list), "--explain-classes must name at least one class, e.g. 10s,60s"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    @property
    def uses_demo(self) -> bool:
        return self.data is None

    @property
    def weights_choice(self) -> str:
        """'auto' means ImageNet for real data and none for the drawn demo faces."""
        if self.weights == "auto":
            return "none" if self.uses_demo else "imagenet"
        return self.weights

    @property
    def feature_layer_list(self) -> list[str]:
        return [part.strip() for part in self.feature_layers.split(",") if part.strip()]

    @property
    def explain_class_list(self) -> list[str]:
        return [part.strip() for part in self.explain_classes.split(",") if part.strip()]

    def runs(self, stage: str) -> bool:
        """Whether `stage` comes no later than `until`."""
        return STAGES.index(stage) <= STAGES.index(self.until)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}
