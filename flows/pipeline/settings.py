"""The run's settings, declared once.

`RunSettings` is the flow's one parameter (Prefect's UI shows it as a form), the source of
the CLI options (`--per-class` for `per_class`, ...), the deployments' parameters, and what
each stage reads by name (`flows/pipeline/graph.py` declares which). A preset is a named set of
overrides; options given explicitly win over it.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from agelens.flows.pipeline.graph import STAGE_NAMES
from agelens.tasks.core.errors import ConfigError

PRESETS: dict[str, dict] = {
    # The reference's pipeline with ConvNeXt-Tiny's layout at 1/8 width at 64 px: minutes on a 2-core CPU.
    "demo": {"backbone": "convnext_narrow", "image_size": 64, "epochs": 12, "lr": 3e-4},
    # Real faces from scratch on a 2-core CPU in under 10 minutes of training for 5,000 images (6 on
    # a Xeon with AMX, 7 on an AMD EPYC, both bf16; 7-8 on a quiet Xeon in fp32): the best of
    # bench/quality.py's runs on FairFace (README, "Recipes measured on real faces").
    "cpu": {"backbone": "resnet10", "image_size": 80, "epochs": 24, "lr": 2e-3, "batch_size": 64, "recipe": "modern",
            "weights": "none"},
}
CamMethod = Literal["grad_cam", "hirescam", "grad_cam_plus_plus", "xgrad_cam", "layer_cam", "score_cam"]
StageName = Literal[STAGE_NAMES]  # type: ignore[valid-type]
DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def option(field: str) -> str:
    return "--" + field.replace("_", "-")


class RunSettings(BaseModel):
    """Every setting of a run. Defaults are the reference notebook's."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    preset: Literal["demo", "cpu"] | None = Field(None, description="named overrides: demo (a small model at 64 px, "
                                                                      "quick), cpu (ResNet-10 at 80 px, real faces from "
                                                                      "scratch on a CPU)")
    # data
    data: str | None = Field(None, description="metadata: CACD .mat (v5 or v7.3), a CSV with path,age[,identity], "
                                               "or a folder of label folders; default: the built-in demo")
    images: str | None = Field(None, description="image root (default: CACD2000/ beside a .mat, the CSV's folder)")
    out: str = Field("artifacts", description="where outputs, cache records and the run table go")
    until: StageName = Field("report", description="stop after this stage")
    # sampling and split
    per_class: Annotated[int, Field(ge=1, le=10**9)] | Literal["all"] = Field(200, description="images drawn per decade, or all")
    seed: int = Field(0, ge=0, lt=2**32, description="sampling, split, initialisation and augmentation")
    split_by: Literal["identity", "image"] = Field("identity", description="image reproduces the reference's leaky split")
    val_frac: float = Field(0.2, gt=0, lt=1, description="share of each class for validation")
    test_frac: float = Field(0.15, ge=0, lt=1, description="share of identities (or images) held out for test metrics, "
                                                           "by a seeded hash: stable as data grows; 0 for none")
    # training
    backbone: str = Field("convnext_tiny", description="a torchvision classifier, or convnext_narrow or resnet10")
    weights: str = Field("auto", description="auto (ImageNet for real data, none for the demo), imagenet, none, or a "
                                             ".pth/.safetensors state dict")
    epochs: int = Field(5, ge=1, le=10_000, description="training epochs; the one with the lowest val loss is kept")
    batch_size: int = Field(32, ge=1, le=65_536, description="training batch size")
    lr: float = Field(1e-4, gt=0, le=10, description="learning rate (the peak, after warm-up, for the adamw and modern recipes)")
    recipe: Literal["reference", "adamw", "modern", "mixup"] = Field(
        "reference", description="how to train: reference (the notebook's Adam at a constant rate), adamw (AdamW, "
                                 "warm-up and cosine decay, flip at test), modern (adamw plus label smoothing, strong "
                                 "augmentation, weight averaging) or mixup (modern plus mixup, for long trainings)")
    head: Literal["auto", "classes", "ages", "corn"] = Field(
        "classes", description="classes: one output per decade; ages: one per year of age (soft labels), decades by "
                               "summing years; corn: decades as ranks (CORN: one 'older than' output per decade "
                               "boundary); auto: ages where the data has ages")
    max_steps: int | None = Field(None, ge=1, le=10**9, description="at most this many batches per epoch, of training and "
                                                          "of validation (benchmarks and smoke runs)")
    image_size: int = Field(224, ge=16, le=1024, description="images are resized to this square size")
    start_size: int | None = Field(None, ge=16, le=1024, description="progressive resizing: training starts at this "
                                                                     "size and grows to --image-size by three "
                                                                     "quarters of the epochs (validation and test at "
                                                                     "--image-size); none: --image-size throughout")
    device: str = Field("auto", description="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto uses bf16 where it is faster: a GPU that has it, a CPU with native bf16 "
                            "whose bf16 matrix multiply measures 1.3x its fp32 one")
    channels_last: Literal["auto", "on", "off"] = Field("auto", description="auto uses it where it is faster")
    eval_batch_size: int = Field(64, ge=1, le=65_536, description="batch size of inference (does not change results)")
    # embedding, feature maps, explanations
    embed_images: int = Field(5000, ge=10, le=1_000_000, description="at most this many train+val images are projected "
                                                       "(a seeded, class-stratified draw)")
    tsne_perplexity: float = Field(30.0, gt=0, le=1000, description="t-SNE's perplexity (capped below the "
                                                                     "sample size)")
    feature_layers: list[str] = Field(["auto"], description="layers for feature maps (dotted, negative indices "
                                                            "from the end); auto: the backbone family's")
    feature_images: int = Field(9, ge=1, le=1000, description="val images per class for feature maps")
    feature_channels: int = Field(8, ge=1, le=256, description="channels per feature-map grid")
    cam_layer: str = Field("auto", description="layer for CAM methods; auto: the family's deepest stage whose map "
                                                "has at least 4x4 cells at this image size")
    cam_methods: list[CamMethod] = Field(["grad_cam", "hirescam", "grad_cam_plus_plus", "xgrad_cam", "layer_cam"],
                                         description="CAM methods to compute; score_cam costs one forward pass "
                                                     "per channel")
    explain_classes: list[str] = Field(["10s", "60s"], description="classes whose val images are explained")
    explain_images: int = Field(2, ge=1, le=1000, description="val images explained per class")
    sanity_check: bool = Field(True, description="cascading model randomisation and the random-logit test")
    faithfulness_steps: int = Field(3, ge=2, le=100, description="steps of the deletion and insertion curves (each step "
                                                         "costs a forward pass per image, method and curve)")
    attention_images: int = Field(100, ge=1, le=100_000, description="val images per class in the mean Grad-CAM per decade")

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, values):
        if isinstance(values, dict) and values.get("preset") is not None:
            if values["preset"] not in PRESETS:
                raise ValueError(f"preset must be one of {', '.join(PRESETS)}, not {values['preset']!r}")
            values = {**PRESETS[values["preset"]], **values}
        return values

    @field_validator("feature_layers", "explain_classes", "cam_methods", mode="before")
    @classmethod
    def _comma_list(cls, value):
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not value:
            raise ValueError("must name at least one item")
        return value

    @field_validator("data", "images", "out", "weights")
    @classmethod
    def _utf8_path(cls, value: str | None) -> str | None:
        """A path with bytes that are not UTF-8 cannot travel as a Prefect parameter (JSON)."""
        try:
            value is None or value.encode("utf-8")
        except UnicodeEncodeError:
            shown = value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            raise ValueError(f"{shown} holds bytes that are not UTF-8, which a Prefect run cannot carry; "
                             "rename it, or reach it through a link with a UTF-8 name") from None
        return value

    @field_validator("start_size")
    @classmethod
    def _start_below_full(cls, value: int | None, info: ValidationInfo) -> int | None:
        full = info.data.get("image_size")
        if value is not None and full is not None and value > full:
            raise ValueError(f"{value} must not exceed --image-size ({full})")
        return value

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not DEVICE.match(value):
            raise ValueError(f"must be auto, cpu, cuda, cuda:N or mps, not {value!r}")
        return value

    @model_validator(mode="after")
    def _fractions(self):
        if self.val_frac + self.test_frac >= 1:
            raise ValueError(f"val_frac + test_frac must leave images to train on, not {self.val_frac + self.test_frac}")
        return self

    @property
    def uses_demo(self) -> bool:
        return self.data is None

    @property
    def weights_choice(self) -> str:
        """'auto' means ImageNet for real data and none for the drawn demo faces."""
        if self.weights == "auto":
            return "none" if self.uses_demo else "imagenet"
        return self.weights

    def runs(self, stage: str) -> bool:
        """Whether `stage` comes no later than `until`."""
        return STAGE_NAMES.index(stage) <= STAGE_NAMES.index(self.until)

    def dump(self) -> dict:
        return self.model_dump(mode="json")


def parse_settings(values: dict) -> RunSettings:
    """RunSettings, or one ConfigError naming every bad option (a union's alternatives joined)."""
    try:
        return RunSettings(**values)
    except ValidationError as error:
        problems: dict[str, list[str]] = {}
        given: dict[str, object] = {}
        for item in error.errors():
            name = option(str(item["loc"][0])) if item["loc"] else "settings"
            message = item["msg"].removeprefix("Value error, ")
            if problems.get(name):
                message = message.removeprefix("Input should be ")
            problems.setdefault(name, []).append(message)
            if item["loc"] and not isinstance(item["input"], dict) and item["type"] != "value_error":
                given[name] = item["input"]  # a value error names what it got itself
        raise ConfigError("; ".join(f"{name}: {' or '.join(dict.fromkeys(messages))}"
                                    + (f" (got {given[name]!r})" if name in given else "")
                                    for name, messages in problems.items())) from None


def options_table() -> str:
    """The README's table of run options, from the fields above (the README must match it)."""
    rows = ["| option | default | meaning |", "|---|---|---|"]
    for name, field in RunSettings.model_fields.items():
        default = field.default if field.default_factory is None else field.default_factory()
        shown = ",".join(default) if isinstance(default, list) else default
        shown = {None: "none", True: "on", False: "off"}.get(shown, shown) if not isinstance(shown, (int, float)) or \
            isinstance(shown, bool) else shown
        flag = f"`{option(name)}`" if field.annotation is not bool else f"`{option(name)}` / `--no-{option(name)[2:]}`"
        rows.append(f"| {flag} | {shown} | {(field.description or '').replace('|', '/')} |")
    return "\n".join(rows)
