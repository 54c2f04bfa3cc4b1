"""From an image file to model input without torch: decoding, bombs, normalisation,
the recipe ``model.json`` records, and the logistic function predict uses."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from covid_tune.nn.augment import to_model_input
from covid_tune.data.preprocess import MEAN, STD, describe, normalize, read_gray, try_read
from covid_tune.core.numeric import logit, sigmoid
from helpers import encoded, image_like_bytes, save

FUZZ = settings(max_examples=150, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])


# --- decoding ---------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["L", "I;16", "RGB", "RGBA", "P", "CMYK", "1", "LA"])
def test_every_image_mode_becomes_8_bit_gray(tmp_path, mode):
    suffix = ".jpg" if mode == "CMYK" else ".png"
    path = save(tmp_path / f"x{suffix}", mode=mode, size=(60, 40))
    pixels, original = read_gray(path, 32)
    assert pixels.shape == (32, 32) and pixels.dtype == np.uint8 and original == (60, 40)
    if mode == "I;16":
        assert pixels.max() > 200  # 12-bit data stretched to the full 8-bit range


def test_resize_is_shorter_side_then_centre_crop(tmp_path):
    pixels = np.zeros((40, 80), dtype=np.uint8)
    pixels[:, 20:60] = 255  # a bright centre band, half the width
    path = tmp_path / "wide.png"
    Image.fromarray(pixels).save(path)
    out, _ = read_gray(path, 20)
    assert out.shape == (20, 20) and out[:, 2:18].min() == 255


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_images_past_the_pixel_limit_are_refused_where_pil_only_warns(tmp_path, monkeypatch):
    """PIL raises past twice MAX_IMAGE_PIXELS and only warns below; both are refused."""
    path = tmp_path / "x.png"
    Image.new("L", (40, 30)).save(path)  # 1200 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    pixels, _, why = try_read(path, 16)
    assert pixels is None
    assert why == "decompression bomb: 40x30 pixels is more than the limit of 1000"


# --- fuzzing: image files ---------------------------------------------------------------

SEED_IMAGES = [encoded("PNG", m) for m in ("L", "I;16", "P", "RGBA")] + [
    encoded("JPEG", m) for m in ("L", "RGB", "CMYK")] + [encoded("TIFF", "L"), encoded("GIF", "P")]


@pytest.fixture(scope="module")
def fuzz_folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz-images")


@FUZZ
@given(data=image_like_bytes(SEED_IMAGES), suffix=st.sampled_from([".png", ".jpg", ".JPEG"]))
def test_random_bytes_named_as_images_decode_or_are_skipped(fuzz_folder, data, suffix):
    path = fuzz_folder / f"fuzz{suffix}"
    path.write_bytes(data)
    pixels, size, why = try_read(path, 16)
    if pixels is None:
        assert size is None and isinstance(why, str) and why
    else:
        assert pixels.shape == (16, 16) and pixels.dtype == np.uint8 and why == ""


def test_other_formats_behind_an_image_name_are_not_decoded(tmp_path):
    """Only PIL's PNG and JPEG decoders run, whatever the suffix; a JPEG named .png is read."""
    for name, data in (("tiff.png", encoded("TIFF", "L")), ("gif.jpg", encoded("GIF", "P"))):
        (tmp_path / name).write_bytes(data)
        pixels, _, why = try_read(tmp_path / name, 16)
        assert pixels is None and "cannot identify image file" in why
    (tmp_path / "jpeg.png").write_bytes(encoded("JPEG", "L"))
    pixels, original, why = try_read(tmp_path / "jpeg.png", 16)
    assert pixels is not None and original == (16, 12) and why == ""


# --- normalisation and what model.json records ------------------------------------------

@pytest.mark.parametrize("size", [32, 57])
def test_normalize_equals_the_trial_transform_without_augmentation(size):
    """Export and predict (numpy) feed the model what training's evaluation (torch) did."""
    images = torch.randint(0, 256, (4, size, size), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    expected = to_model_input(images, augment=None).numpy()
    out = normalize(images.numpy())
    assert out.shape == (4, 3, size, size) and out.dtype == np.float32
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-6)


def test_normalize_refuses_what_is_not_a_uint8_batch():
    with pytest.raises(ValueError, match="expected uint8"):
        normalize(np.zeros((2, 8, 8), dtype=np.float32))
    with pytest.raises(ValueError, match="expected uint8"):
        normalize(np.zeros((8, 8), dtype=np.uint8))


def test_describe_holds_what_model_json_and_predict_need():
    recipe = json.loads(json.dumps(describe(96)))  # as model.json stores it
    assert recipe["size"] == 96 and "96x96" in recipe["steps"]
    assert recipe["mean"] == list(MEAN) and recipe["std"] == list(STD)
    assert recipe["grayscale_to_channels"] == 3 and recipe["scale"] == pytest.approx(1 / 255)
    pixels = np.random.default_rng(0).integers(0, 256, (2, 96, 96), dtype=np.uint8)
    np.testing.assert_array_equal(normalize(pixels, recipe["mean"], recipe["std"]),
                                  normalize(pixels))


def test_sigmoid_is_overflow_free_and_exact_at_the_ends():
    logits = np.array([-1000.0, -30.0, 0.0, 30.0, 1000.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with np.errstate(all="raise"):
            probs = sigmoid(logits)
    assert probs.dtype == np.float64 and np.all(np.isfinite(probs))
    assert probs[0] == 0.0 and probs[2] == 0.5 and probs[-1] == 1.0
    np.testing.assert_allclose(probs[1:4], 1 / (1 + np.exp(-logits[1:4])), rtol=0, atol=1e-14)
    assert np.all(np.diff(probs) >= 0)


def test_sigmoid_keeps_negative_logits_apart_down_to_float64s_limit():
    """Below -37 the old tanh form gave exactly 0; down to -745 float64 can hold the
    probability, about exp(x), and different logits keep different probabilities."""
    logits = np.concatenate([-np.arange(744.0, 30.0, -0.5), [-40.0, -383.0, -135.0]])
    with np.errstate(all="raise"):
        probs = sigmoid(logits)
    assert np.all(probs > 0)
    assert np.all(np.diff(probs[:-3]) > 0)  # strictly increasing: no two tie
    np.testing.assert_allclose(probs[-3:], np.exp(logits[-3:]), rtol=1e-12)
    assert sigmoid(np.float32(-100.0)) == pytest.approx(np.exp(-100.0), rel=1e-12)


def test_logit_undoes_sigmoid_without_saturating():
    logits = np.array([-700.0, -383.0, -40.0, -2.5, 0.0, 2.5, 10.0])
    with np.errstate(all="raise"):
        back = logit(sigmoid(logits))
        ends = logit(np.array([0.0, 0.5, 1.0]))
    np.testing.assert_allclose(back, logits, rtol=1e-9, atol=1e-12)
    assert list(ends) == [-np.inf, 0.0, np.inf]
