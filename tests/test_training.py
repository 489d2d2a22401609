"""Training and evaluation: learning, resume, weights, model selection, metrics."""

from urllib.error import URLError

import numpy as np
import pytest
import torch
from sklearn.metrics import classification_report, confusion_matrix

from agelens.tasks.core.errors import DataError
from agelens.tasks.model.metrics import classification_metrics
from agelens.tasks.model.inference import Runtime
from agelens.tasks.model.backbones import build_model, last_linear_name, minimum_image_size
from agelens.tasks.model.heads import Head
from agelens.tasks.model.recipes import RECIPES
from agelens.tasks.model.training import augment, epoch_image_size, fit

SETTINGS = {"epochs": 3, "batch_size": 16, "lr": 1e-3, "seed": 4, "max_steps": None, "eval_batch_size": 64}


@pytest.mark.parametrize("backbone, head", [
    ("resnet18", "fc"), ("mobilenet_v3_small", "classifier.3"), ("efficientnet_b0", "classifier.1"),
    ("convnext_tiny", "classifier.2"), ("convnext_narrow", "classifier.2"), ("resnet10", "fc"),
])
def test_last_classifier_layer_is_resized_for_any_torchvision_head(backbone, head):
    model = build_model(backbone, 6).eval()
    assert last_linear_name(model) == head
    with torch.no_grad():
        assert model(torch.rand(2, 3, 64, 64)).shape == (2, 6)


def test_local_weights_files_load_exactly(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    source = build_model("resnet18", 1000)  # a backbone with ImageNet's head
    torch.save(source.state_dict(), tmp_path / "backbone.pth")
    save_file(source.state_dict(), tmp_path / "backbone.safetensors")
    for name in ("backbone.pth", "backbone.safetensors"):
        loaded = build_model("resnet18", 6, str(tmp_path / name))
        assert torch.equal(loaded.layer4[1].conv2.weight, source.layer4[1].conv2.weight)
        assert loaded.fc.out_features == 6
    trained = build_model("resnet18", 6)  # a model this pipeline trained: its head is kept
    torch.save(trained.state_dict(), tmp_path / "trained.pth")
    assert torch.equal(build_model("resnet18", 6, str(tmp_path / "trained.pth")).fc.weight, trained.fc.weight)


def test_weights_that_do_not_fit_name_the_keys(tmp_path):
    torch.save(build_model("resnet18", 6).state_dict(), tmp_path / "resnet.pth")
    with pytest.raises(DataError, match=r"does not fit convnext_narrow: \d+ missing keys \(e.g. features.0.0.weight"):
        build_model("convnext_narrow", 6, str(tmp_path / "resnet.pth"))
    with pytest.raises(DataError, match="weights file not found"):
        build_model("resnet18", 6, str(tmp_path / "absent.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match="is not a PyTorch state dict .* it looks like text"):
        build_model("resnet18", 6, str(tmp_path / "junk.pth"))
    (tmp_path / "cut.pth").write_bytes((tmp_path / "resnet.pth").read_bytes()[:5000])  # a download cut short
    with pytest.raises(DataError, match="cannot read weights file"):
        build_model("resnet18", 6, str(tmp_path / "cut.pth"))


def test_offline_imagenet_stops_before_any_work(prefect_backend, small_cacd, tmp_path, monkeypatch):
    from agelens.flows.pipeline.flow import age_pipeline
    from agelens.flows.pipeline.settings import RunSettings

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def offline(*args, **kwargs):
        raise URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    out = tmp_path / "artifacts"
    with pytest.raises(DataError) as error:
        age_pipeline(settings=RunSettings(data=str(small_cacd / "celebrity2000_meta.mat"), out=str(out), until="train",
                                          backbone="resnet18", weights="imagenet"))
    expected = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert str(expected) in str(error.value) and "--weights PATH" in str(error.value)
    assert not (out / "extract").exists()


def test_augment_draws_per_image_and_is_seeded():
    x = torch.rand(64, 3, 8, 8)
    a = augment(x.clone(), torch.Generator().manual_seed(0))
    b = augment(x.clone(), torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    def corr(p, q):
        return torch.corrcoef(torch.stack([p.flatten(), q.flatten()]))[0, 1]

    flipped = [bool(corr(a[i], x[i].flip(2)) > corr(a[i], x[i])) for i in range(64)]
    assert 0.25 < np.mean(flipped) < 0.75
    ratio = (a.mean(dim=(1, 2, 3)) / x.mean(dim=(1, 2, 3)))
    assert ratio.std() > 0.02  # brightness/contrast differ between images of one batch
    assert a.min() >= 0 and a.max() <= 1


def test_the_strong_policy_is_its_per_image_definition_in_torchvisions_ops():
    """Flip, crop (scale and shift), brightness, contrast, saturation and erasing, drawn per image
    from the same generator, against torchvision's functional ops applied image by image."""
    from torchvision.transforms import functional as TF

    from agelens.tasks.model.training import CONTRAST, ERASE, SATURATION, SCALE

    x = torch.rand(48, 3, 20, 20).contiguous(memory_format=torch.channels_last)
    got = augment(x.clone(), torch.Generator().manual_seed(3), "strong")
    generator = torch.Generator().manual_seed(3)
    draws = torch.rand(48, 10, generator=generator)
    erased = torch.rand(48, generator=generator) < ERASE
    assert 0 < int(erased.sum()) < 48 and 0 < int((draws[:, 0] < 0.5).sum()) < 48  # both branches are exercised
    for i, (image, d) in enumerate(zip(x, draws)):
        image = image.flip(2) if d[0] < 0.5 else image
        scale = SCALE[0] + (SCALE[1] - SCALE[0]) * d[3]
        theta = torch.tensor([[scale, 0, (1 - scale) * (2 * d[4] - 1)], [0, scale, (1 - scale) * (2 * d[5] - 1)]])
        grid = torch.nn.functional.affine_grid(theta[None], [1, 3, 20, 20], align_corners=False)
        image = torch.nn.functional.grid_sample(image[None], grid, padding_mode="reflection", align_corners=False)[0]
        image = TF.adjust_brightness(image, float(1 + 0.2 * (2 * d[1] - 1)))
        image = TF.adjust_contrast(image, float(1 + CONTRAST * (2 * d[2] - 1)))
        image = TF.adjust_saturation(image, float(1 + SATURATION * (2 * d[6] - 1)))
        if erased[i]:
            side = int((0.02 + 0.13 * d[7]).sqrt() * 20)
            image = TF.erase(image, int(d[8] * (20 - side)), int(d[9] * (20 - side)), side, side, torch.tensor(0.5))
        # torchvision's greyscale weighs red 0.2989 where ITU-R 601 (and ours) has 0.299
        assert (got[i] - image).abs().max() < 2e-3, (i, (got[i] - image).abs().max())


def test_progressive_sizes_grow_in_steps_of_8_to_the_full_size_by_three_quarters_of_the_epochs():
    sizes = [epoch_image_size(e, 24, 80, 56) for e in range(1, 25)]
    assert sizes[0] == 56 and sizes[17:] == [80] * 7 and sizes[16] == 72  # full from epoch 18 = 0.75 * 24
    assert sizes == sorted(sizes) and all(s % 8 == 0 for s in sizes) and set(sizes) == {56, 64, 72, 80}
    assert [epoch_image_size(e, 24, 80, 60) for e in (1, 24)] == [60, 80]  # a start off the 8-pixel grid is kept
    assert [epoch_image_size(e, 24, 80, None) for e in (1, 12, 24)] == [80, 80, 80]
    assert epoch_image_size(1, 1, 80, 56) == 80  # one epoch: nothing to ramp over


def test_augment_resizes_to_the_epochs_size_with_antialiasing():
    x = torch.zeros(4, 3, 16, 16)
    x[..., ::2] = 1.0  # stripes one pixel wide: sampled at 16/6 without antialiasing they would survive in part
    for policy in ("reference", "strong"):
        small = augment(x.clone(), torch.Generator().manual_seed(0), policy, size=6)
        assert small.shape == (4, 3, 6, 6)
        assert small.std(dim=(2, 3)).max() < 0.1  # averaged to grey, not aliased
    assert augment(x.clone(), torch.Generator().manual_seed(0), "reference", size=16).shape == x.shape


def test_mixup_mixes_each_image_with_another_by_one_drawn_share():
    from agelens.tasks.model.training import mixup

    x = torch.rand(16, 3, 8, 8)
    mixed, other, share = mixup(x, 0.2, torch.Generator().manual_seed(0))
    again, other_again, share_again = mixup(x, 0.2, torch.Generator().manual_seed(0))
    assert torch.equal(mixed, again) and torch.equal(other, other_again) and share == share_again  # seeded
    assert 0 <= share <= 1 and sorted(other.tolist()) == list(range(16))
    torch.testing.assert_close(mixed, share * x + (1 - share) * x[other])
    shares = [mixup(x, 0.2, torch.Generator().manual_seed(s))[2] for s in range(200)]
    assert np.mean([min(s, 1 - s) < 0.1 for s in shares]) > 0.5  # Beta(0.2, 0.2): mostly near one image


def _toy_data(seed=0, n=96, size=32):  # ConvNeXt needs at least 32 px
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    images = (rng.random((n, size, size, 3)) * 80 + labels[:, None, None, None] * 60).astype(np.uint8)
    return images, labels


def test_killed_training_resumes_to_the_same_weights(tmp_path, monkeypatch):
    import agelens.tasks.model.training as train

    images, labels = _toy_data()
    rows = np.arange(len(labels))
    runtime = Runtime.resolve("cpu", "auto", "auto")

    def run(checkpoint):
        torch.manual_seed(SETTINGS["seed"])
        model = build_model("convnext_narrow", 3)
        # The modern recipe: the optimiser, the rate schedule and the weights' average all resume.
        return model, fit(model, images, labels, labels, rows, rows, SETTINGS, runtime, checkpoint,
                          Head("classes", ("a", "b", "c")), RECIPES["modern"])

    whole_model, whole = run(tmp_path / "whole.pt")

    real_epoch, calls = train.train_one_epoch, []

    def dies_in_epoch_3(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(train, "train_one_epoch", dies_in_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "killed.pt")
    monkeypatch.setattr(train, "train_one_epoch", real_epoch)
    resumed_model, resumed = run(tmp_path / "killed.pt")

    assert resumed["resumed_from"] == 2 and whole["resumed_from"] == 0
    for key, value in whole_model.state_dict().items():
        assert torch.equal(value, resumed_model.state_dict()[key]), key
    assert [r["val_loss"] for r in resumed["history"]] == [r["val_loss"] for r in whole["history"]]


def test_kept_epoch_has_the_lowest_validation_loss_and_steps_are_capped(tmp_path):
    train_images, train_labels = _toy_data(1)
    val_images, val_labels = _toy_data(2)
    images, labels = np.concatenate([train_images, val_images]), np.concatenate([train_labels, val_labels])
    settings = {**SETTINGS, "epochs": 4, "lr": 3e-3, "seed": 0, "max_steps": 2}
    torch.manual_seed(0)
    result = fit(build_model("convnext_narrow", 3), images, labels, labels, np.arange(96), np.arange(96, 192),
                 settings, Runtime.resolve("cpu", "fp32", "off"), tmp_path / "c.pt", Head("classes", ("a", "b", "c")),
                 RECIPES["reference"])
    losses = [r["val_loss"] for r in result["history"]]
    assert result["best_epoch"] == int(np.argmin(losses)) + 1
    assert [r["kept"] for r in result["history"]] == [e == result["best_epoch"] for e in range(1, 5)]
    assert [t["images"] for t in result["timings"]] == [2 * 16] * 4  # --max-steps 2 of batch 16


def test_progressive_resizing_trains_each_epoch_at_its_size_and_validates_at_the_full_size(tmp_path):
    images, labels = _toy_data(3, n=64, size=48)
    seen: list[tuple[bool, int]] = []
    torch.manual_seed(0)
    model = build_model("convnext_narrow", 3)
    model.register_forward_pre_hook(lambda module, args: seen.append((module.training, args[0].shape[-1])))
    settings = {**SETTINGS, "epochs": 4, "start_size": 32}
    result = fit(model, images, labels, labels, np.arange(48), np.arange(48, 64), settings,
                 Runtime.resolve("cpu", "fp32", "auto"), tmp_path / "c.pt", Head("classes", ("a", "b", "c")),
                 RECIPES["modern"])
    trained = [size for training, size in seen if training]
    assert trained == [32] * 3 + [40] * 3 + [48] * 6  # 3 batches of 16 an epoch; full from epoch 3 = 0.75 * 4
    assert {size for training, size in seen if not training} == {48}
    assert [t["image_size"] for t in result["timings"]] == [32, 40, 48, 48]
    assert all(np.isfinite(r["val_loss"]) for r in result["history"])


def test_image_size_below_a_backbones_minimum_is_found():
    assert minimum_image_size("convnext_narrow", 64) is None
    assert minimum_image_size("convnext_narrow", 20) == 32


def test_metrics_equal_scikit_learn_on_a_hand_made_table():
    classes = ["10s", "20s", "30s", "60s"]
    actual = np.array([0, 0, 0, 1, 1, 2, 2, 2, 3, 3])
    predicted = np.array([0, 1, 0, 1, 2, 2, 2, 0, 3, 2])
    m = classification_metrics(actual, predicted, classes)
    report = classification_report(actual, predicted, labels=range(4), output_dict=True, zero_division=0)
    assert m["accuracy"] == pytest.approx(report["accuracy"]) == pytest.approx(0.6)
    assert m["macro_f1"] == pytest.approx(report["macro avg"]["f1-score"])
    for i, c in enumerate(classes):
        for key, theirs in (("precision", "precision"), ("recall", "recall"), ("support", "support")):
            assert m["per_class"][c][key] == pytest.approx(report[str(i)][theirs])
    np.testing.assert_allclose(m["confusion"], confusion_matrix(actual, predicted, normalize="true"))
    np.testing.assert_allclose(np.array(m["confusion"]).sum(1), 1)
    # |error| in decades: 20s->10s... by hand: 1 + 1 + 2 (30s->10s) + 3 (60s->30s) over 10 images
    assert m["mae_decades"] == pytest.approx((1 + 1 + 2 + 3) / 10)


def test_the_report_says_when_training_grew_from_a_smaller_size(tmp_path):
    from types import SimpleNamespace

    from PIL import Image

    from agelens.tasks.train import TrainSummary, report_section

    Image.new("RGB", (8, 8)).save(tmp_path / "curves.png")
    common = dict(best_epoch=3, best_val_loss=1.2, best_val_acc=0.4, epochs=4, resumed_from_epoch=0, train_images=48,
                  val_images=16, device="cpu", bf16=False, training_seconds=1.0, train_images_per_s=50.0)
    view = lambda summary: SimpleNamespace(summary=summary, context={"backbone": "resnet10", "image_size": 80},
                                           path=lambda name: tmp_path / f"{name}.png")
    grown = report_section(view(TrainSummary(**common, start_size=56)))[0]
    plain = report_section(view(TrainSummary(**common)))[0]
    assert grown.startswith("**resnet10** at 80 px (trained from 56 px up), ") and plain.startswith("**resnet10** at 80 px, ")
