"""What the model predicts and how far to trust it: the ages head (DLDL soft labels, decades by
summing years), temperature scaling, calibration error, metrics with bootstrap intervals."""

import numpy as np
import pytest
import torch
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
