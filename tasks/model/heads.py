"""What the model's last layer predicts, and how that becomes decades and an age in years.

  * `classes`: one output per class (the decades), trained with cross-entropy (the reference's).
  * `ages`: one output per year of age 0..100, trained on Gaussian soft labels around the true age
    plus the error of the expected age (DLDL-v2, Gao et al. 2018); a decade's probability is the
    sum of its years' (years outside the data's decades go to the nearest one), and the estimate
    in years is the expected value. Needs ages in the data (CACD or a CSV with ages).
  * `corn`: the decades as ranks (CORN, Shi, Cao and Raschka 2021): K-1 outputs, output k the
    logit of P(decade > k | decade > k-1), each trained only on the images that reach it, so the
    probabilities of "older than" never rise with the rank. A decade's probability is the chance
    of passing every rank below it and stopping at its own. Needs decade classes (an order).

Probabilities come from the logits divided by a temperature fitted on validation
(tasks/model/calibration.py): softmax for `classes` and `ages`, the rank chain for `corn`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from agelens.tasks.data.labels import decade_values

AGES = np.arange(0, 101, dtype=np.float32)  # the ages head's outputs, in years
SIGMA = 2.0  # years: the soft label's spread (DLDL-v2's choice)


@dataclass(frozen=True)
class Head:
    kind: str  # "classes", "ages" or "corn"
    classes: tuple[str, ...]

    @property
    def outputs(self) -> int:
        """The model's last layer's width."""
        return {"ages": len(AGES), "corn": len(self.classes) - 1}.get(self.kind, len(self.classes))

    def log_probabilities(self, logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """log P of what the head predicts: the classes (`classes`, `corn`) or the years (`ages`)."""
        logits = logits.float() / temperature
        return corn_log_probs(logits) if self.kind == "corn" else F.log_softmax(logits, 1)

    def probabilities(self, logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        return self.log_probabilities(logits, temperature).exp()

    def scored(self, model: torch.nn.Module):
        """A context in which `model` returns one score per class or year (what explanations and
        probabilities are taken of): its logits, or for `corn` the classes' log-probabilities."""
        return _corn_scores(model) if self.kind == "corn" else contextlib.nullcontext(model)

    @property
    def scores(self) -> int:
        """How many scores `scored` gives: one per year (`ages`) or per class."""
        return len(AGES) if self.kind == "ages" else len(self.classes)

    @property
    def midpoints(self) -> np.ndarray | None:
        """Each class's age in years (a decade's middle), or None when the classes are not decades."""
        values = decade_values(list(self.classes))
        return None if values is None else np.array(values, dtype=np.float32) + 5

    def year_to_class(self) -> np.ndarray:
        """For the ages head: the class index of each year: its decade, or the nearest one for years
        outside the data's decades."""
        from agelens.tasks.data.labels import decade_label

        index = {c: i for i, c in enumerate(self.classes)}
        middles = self.midpoints
        return np.array([index.get(decade_label(int(a)), int(np.abs(a - middles).argmin())) for a in AGES])

    def class_of_output(self, outputs: np.ndarray) -> np.ndarray:
        """The class index of each output index (a year's decade, for the ages head)."""
        outputs = np.asarray(outputs)
        return self.year_to_class()[outputs] if self.kind == "ages" else outputs

    def targets(self, class_index: np.ndarray, ages: np.ndarray | None) -> np.ndarray:
        """What a batch is trained on: class indices, or ages in years."""
        return ages.astype(np.float32) if self.kind == "ages" else class_index

    def loss(self, logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
        logits = logits.float()
        if self.kind == "classes":
            return F.cross_entropy(logits, target, label_smoothing=label_smoothing)
        if self.kind == "corn":
            return corn_loss(logits, target, label_smoothing)
        return self.soft_loss(logits, self.soft_labels(target))

    def soft_labels(self, ages: torch.Tensor) -> torch.Tensor:
        years = torch.as_tensor(AGES, device=ages.device)
        weights = torch.exp(-0.5 * ((years[None, :] - ages.float()[:, None]) / SIGMA) ** 2)
        return weights / weights.sum(1, keepdim=True)

    def soft_loss(self, logits: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
        """Cross-entropy with the soft labels plus the L1 error of the expected age (DLDL-v2)."""
        log_probs = F.log_softmax(logits, 1)
        years = torch.as_tensor(AGES, device=logits.device)
        expected = (log_probs.exp() * years).sum(1)
        truth = (soft * years).sum(1)
        return -(soft * log_probs).sum(1).mean() + (expected - truth).abs().mean()

    def class_probs(self, probs: np.ndarray) -> np.ndarray:
        """Probabilities from `probabilities` -> (N, classes) probabilities."""
        if self.kind != "ages":
            return probs
        summed = np.zeros((len(probs), len(self.classes)), dtype=np.float64)
        np.add.at(summed.T, self.year_to_class(), probs.T)
        return summed.astype(np.float32)

    def expected_age(self, probs: np.ndarray) -> np.ndarray | None:
        """The estimate in years: the expected age (ages head), or the expectation over decade
        middles (classes head, a coarse one); None when the classes are not decades."""
        if self.kind == "ages":
            return probs @ AGES
        middles = self.midpoints
        return None if middles is None else probs @ middles


def corn_loss(logits: torch.Tensor, classes: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """CORN's loss: output k is a binary "above rank k" trained on the images of rank >= k only
    (coral-pytorch's corn_loss, without its loop over ranks); smoothing pulls its targets off 0 and 1."""
    ranks = torch.arange(logits.shape[1], device=logits.device)
    asked = classes[:, None] >= ranks[None, :]
    above = (classes[:, None] > ranks[None, :]).float() * (1 - label_smoothing) + label_smoothing / 2
    losses = F.binary_cross_entropy_with_logits(logits, above, reduction="none")
    return (losses * asked).sum() / asked.sum().clamp_min(1)


def corn_log_probs(logits: torch.Tensor) -> torch.Tensor:
    """(N, K-1) CORN logits -> (N, K) log P(class): log P(passing ranks 0..k-1) + log P(stopping at k),
    in log space so that explanations get gradients where a probability underflows."""
    passed = F.pad(torch.cumsum(F.logsigmoid(logits), 1), (1, 0))
    stopped = F.pad(F.logsigmoid(-logits), (0, 1))
    return passed + stopped


@contextlib.contextmanager
def _corn_scores(model: torch.nn.Module):
    handle = model.register_forward_hook(lambda module, inputs, output: corn_log_probs(output.float()))
    try:
        yield model
    finally:
        handle.remove()


def head_for(kind: str, classes: list[str], has_ages: bool) -> Head:
    """The head a run trains: `auto` means ages where the data has ages and the classes are decades."""
    from agelens.tasks.core.errors import DataError

    decades = decade_values(list(classes)) is not None
    if kind == "auto":
        kind = "ages" if has_ages and decades else "classes"
    if kind == "ages" and not (has_ages and decades):
        raise DataError("--head ages needs ages in the data (CACD, or a CSV with ages) and decade classes; "
                        "label folders have neither: use --head classes")
    if kind == "corn" and not decades:
        raise DataError(f"--head corn ranks decades, and these classes are not decades ({', '.join(classes[:4])}"
                        f"{', ...' if len(classes) > 4 else ''}): use --head classes")
    return Head(kind, tuple(classes))
