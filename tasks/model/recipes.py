"""Training recipes by name. `reference` is the classroom notebook's (Adam at a constant rate,
flips and a colour jitter) and stays the default, so that the study reproduces; on FairFace it
is also the best for the demo's narrow ConvNeXt, which underfits. `adamw`: AdamW with weight
decay, warm-up then cosine decay, flips averaged at test time. `modern`: that, plus label
smoothing, stronger augmentation on tensors and an exponential moving average of the weights,
for a ResNet-10 that would otherwise overfit. `mixup`: that, plus mixup (each batch mixed with a
shuffled copy of itself), for longer trainings, where `modern` still overfits (README, "Recipes
measured on real faces"). The learning rate, epochs and batch size stay settings of their own."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Recipe:
    name: str
    optimizer: str  # "adam" or "adamw"
    weight_decay: float
    warmup: float  # share of the steps with a linearly rising rate
    schedule: str  # "constant" or "cosine" (to zero at the last step)
    label_smoothing: float
    augment: str  # "reference": flip + jitter; "strong": also scale/translate, random erasing
    mixup: float  # Beta(alpha, alpha) of mixup; 0: none
    ema: float  # horizon of the weights' moving average, as a share of the training steps; 0: none
    tta: bool  # average the predictions of the image and its mirror image

    def describe(self) -> dict:
        return asdict(self)


RECIPES = {
    "reference": Recipe("reference", "adam", 0.0, 0.0, "constant", 0.0, "reference", 0.0, 0.0, False),
    "modern": Recipe("modern", "adamw", 0.05, 0.05, "cosine", 0.1, "strong", 0.0, 0.1, True),
    "adamw": Recipe("adamw", "adamw", 0.05, 0.05, "cosine", 0.0, "reference", 0.0, 0.0, True),
    "mixup": Recipe("mixup", "adamw", 0.05, 0.05, "cosine", 0.1, "strong", 0.2, 0.1, True),
}
