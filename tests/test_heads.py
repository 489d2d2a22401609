"""What the model predicts and how far to trust it: the ages head (DLDL soft labels, decades by
summing years), the corn head (decades as ranks), temperature scaling, calibration error, metrics with bootstrap intervals."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import f1_score

from agelens.tasks.core.errors import DataError
from agelens.tasks.model.calibration import ece, fit_temperature, nll
from agelens.tasks.model.heads import AGES, Head, head_for
from agelens.tasks.model.metrics import split_metrics

DECADES = ("10s", "20s", "30s", "40s", "50s", "60s")


def test_soft_labels_and_decades_from_years():
    head = Head("ages", DECADES)
    soft = head.soft_labels(torch.tensor([37.0, 15.0]))
    assert soft.shape == (2, 101) and torch.allclose(soft.sum(1), torch.ones(2))
    assert int(soft[0].argmax()) == 37 and float((soft[0] * torch.as_tensor(AGES)).sum()) == pytest.approx(37, abs=1e-3)
    mapping = head.year_to_class()
    assert [DECADES[mapping[a]] for a in (14, 19, 20, 29, 62, 69)] == ["10s", "10s", "20s", "20s", "60s", "60s"]
    assert DECADES[mapping[3]] == "10s" and DECADES[mapping[95]] == "60s"  # outside the data's decades: the nearest
    one_hot = np.zeros((1, 101), np.float32)
    one_hot[0, 37] = 1
    assert head.class_probs(one_hot).tolist() == [[0, 0, 1, 0, 0, 0]]
    assert head.expected_age(one_hot)[0] == pytest.approx(37)
    assert Head("classes", DECADES).expected_age(np.eye(6, dtype=np.float32)[[2]])[0] == pytest.approx(35)


def test_the_ages_head_needs_ages_and_decades():
    assert head_for("auto", list(DECADES), True).kind == "ages"
    assert head_for("auto", list(DECADES), False).kind == "classes"
    assert head_for("auto", ["cat", "dog"], True).kind == "classes"
    with pytest.raises(DataError, match="--head ages needs ages in the data"):
        head_for("ages", list(DECADES), False)


def test_the_ages_loss_pulls_the_expected_age_to_the_truth():
    head = Head("ages", DECADES)
    logits = torch.zeros(4, 101, requires_grad=True)
    ages = torch.tensor([16.0, 33.0, 47.0, 61.0])
    optimizer = torch.optim.SGD([logits], lr=5.0)
    for _ in range(200):
        optimizer.zero_grad()
        head.loss(logits, ages).backward()
        optimizer.step()
    expected = head.expected_age(torch.softmax(logits.detach(), 1).numpy())
    np.testing.assert_allclose(expected, ages.numpy(), atol=0.5)


def test_temperature_scaling_recovers_an_overconfident_model():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 6, 4000)
    true_logits = rng.normal(0, 1, (4000, 6))
    true_logits[np.arange(4000), labels] += 1.5
    # Labels drawn from softmax(true_logits) make those logits calibrated; the model reports 3x them.
    probs = np.exp(true_logits) / np.exp(true_logits).sum(1, keepdims=True)
    drawn = np.array([rng.choice(6, p=p) for p in probs])
    head = Head("classes", DECADES)
    temperature = fit_temperature(3 * true_logits, drawn, head)
    assert temperature == pytest.approx(3, rel=0.1)
    assert nll(3 * true_logits, drawn, head, temperature) < nll(3 * true_logits, drawn, head, 1.0)
    sharp = np.exp(3 * true_logits) / np.exp(3 * true_logits).sum(1, keepdims=True)
    calibrated = np.exp(3 * true_logits / temperature)
    calibrated /= calibrated.sum(1, keepdims=True)
    assert ece(calibrated, drawn) < 0.03 < ece(sharp, drawn)


def test_metrics_come_with_intervals_that_narrow_with_more_images():
    rng = np.random.default_rng(1)

    def metrics(n):
        actual = rng.integers(0, 6, n)
        predicted = np.where(rng.random(n) < 0.6, actual, rng.integers(0, 6, n))
        ages = actual * 10 + 15.0 + rng.uniform(-5, 5, n)
        return actual, predicted, split_metrics(actual, np.eye(6)[predicted], list(DECADES), ages,
                                                predicted * 10 + 15.0)

    actual, predicted, small = metrics(200)
    assert small["macro_f1"] == pytest.approx(f1_score(actual, predicted, average="macro"))
    for name in ("accuracy", "macro_f1", "within_one", "mae_years", "cs5"):
        low, high = small[f"{name}_ci"]
        assert low < small[name] < high, name
    _, _, large = metrics(5000)
    assert np.diff(large["accuracy_ci"])[0] < np.diff(small["accuracy_ci"])[0] / 3
    assert split_metrics(actual, np.eye(6)[predicted], list(DECADES))["mae_years"] is None


def coral_corn_loss(logits, classes):
    """coral-pytorch's corn_loss as published (a loop over ranks), to check ours against."""
    losses, examples = 0.0, 0
    for k in range(logits.shape[1]):
        asked = classes > k - 1
        above = (classes[asked] > k).float()
        if len(above):
            examples += len(above)
            pred = logits[asked, k]
            losses = losses - torch.sum(F.logsigmoid(pred) * above + (F.logsigmoid(pred) - pred) * (1 - above))
    return losses / examples


def test_the_corn_loss_is_coral_pytorchs_and_smoothing_moves_its_targets():
    torch.manual_seed(0)
    logits, classes = torch.randn(50, 5), torch.randint(0, 6, (50,))
    head = Head("corn", DECADES)
    assert head.outputs == 5
    assert float(head.loss(logits, classes)) == pytest.approx(float(coral_corn_loss(logits, classes)), rel=1e-6)
    # Only images at rank >= k answer output k: an image of the first decade trains output 0 alone.
    first = torch.zeros(1, 5, requires_grad=True)
    head.loss(first, torch.tensor([0])).backward()
    assert first.grad[0, 0] > 0 and torch.all(first.grad[0, 1:] == 0)
    # With smoothing the loss of a confident right answer is larger than without.
    confident = torch.tensor([[8.0, 8.0, -8.0, -8.0, -8.0]])
    assert float(head.loss(confident, torch.tensor([2]), 0.1)) > float(head.loss(confident, torch.tensor([2]))) * 10


def test_corn_probabilities_are_the_rank_chain():
    torch.manual_seed(1)
    logits = torch.randn(20, 5) * 3
    head = Head("corn", DECADES)
    probs = head.probabilities(logits)
    assert probs.shape == (20, 6) and torch.all(probs >= 0)
    torch.testing.assert_close(probs.sum(1), torch.ones(20))
    # P(decade > k) is the product of the first k+1 conditional probabilities and never rises with k.
    above = torch.cumprod(torch.sigmoid(logits), 1)
    torch.testing.assert_close(1 - probs.cumsum(1)[:, :-1], above, atol=1e-6, rtol=1e-5)
    assert torch.all(above[:, 1:] <= above[:, :-1])
    # Log space keeps a gradient where a probability underflows in float32.
    far = torch.tensor([[-200.0, 0.0, 0.0, 0.0, 0.0]], requires_grad=True)
    head.log_probabilities(far)[0, 5].backward()
    assert torch.isfinite(far.grad).all() and far.grad[0, 0] > 0
    assert np.allclose(head.class_probs(probs.numpy()), probs.numpy())
    assert head.expected_age(np.eye(6, dtype=np.float32)[[3]])[0] == pytest.approx(45)


def test_the_corn_head_learns_ranks_and_needs_decades():
    head = Head("corn", DECADES)
    logits = torch.zeros(6, 5, requires_grad=True)
    classes = torch.arange(6)
    optimizer = torch.optim.SGD([logits], lr=5.0)
    for _ in range(200):
        optimizer.zero_grad()
        head.loss(logits, classes).backward()
        optimizer.step()
    assert head.probabilities(logits.detach()).argmax(1).tolist() == list(range(6))
    assert head_for("corn", list(DECADES), False).kind == "corn"  # ranks need no ages
    with pytest.raises(DataError, match="--head corn ranks decades.*cat, dog"):
        head_for("corn", ["cat", "dog"], True)


def test_corn_temperature_and_explanations_score_classes():
    rng = np.random.default_rng(2)
    head = Head("corn", DECADES)
    true_logits = rng.normal(0, 2, (3000, 5))
    probs = head.probabilities(torch.from_numpy(true_logits)).double().numpy()
    drawn = np.array([rng.choice(6, p=p / p.sum()) for p in probs])
    temperature = fit_temperature(3 * true_logits, drawn, head)
    assert temperature == pytest.approx(3, rel=0.1)
    assert nll(3 * true_logits, drawn, head, temperature) < nll(3 * true_logits, drawn, head, 1.0)
    model = torch.nn.Linear(4, 5)
    x = torch.randn(3, 4)
    with head.scored(model) as scored:
        torch.testing.assert_close(torch.softmax(scored(x), 1), head.probabilities(model.forward(x)))
        assert scored(x).shape == (3, head.scores)
    assert model(x).shape == (3, 5)  # the raw logits again outside
