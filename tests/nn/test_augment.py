"""Batched augmentation and normalisation on the trial's device (``to_model_input``)."""

import pytest
import torch

from covid_tune.nn.augment import to_model_input
from covid_tune.core.space import Augment
from covid_tune.data.preprocess import MEAN, STD

LOW = (0 - max(MEAN)) / min(STD)
HIGH = (1 - min(MEAN)) / min(STD)
ONLY_FLIP = Augment(rotation=0.0, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=True)
ONLY_ROTATION = Augment(rotation=90.0, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=False)


def seeded(seed):
    return torch.Generator().manual_seed(seed)


def random_images(b=4, s=64, seed=0):
    return torch.randint(0, 256, (b, s, s), dtype=torch.uint8, generator=seeded(seed))


def by_hand(images):
    x = images.to(torch.float32)[:, None] / 255
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    return (x - mean) / std


@pytest.mark.parametrize("augment", [None, Augment()])
def test_shape_dtype_device_and_layout(augment):
    images = random_images()
    out = to_model_input(images, augment=augment, generator=seeded(0))
    assert out.shape == (4, 3, 64, 64) and out.dtype == torch.float32
    assert out.device == images.device
    half = to_model_input(images[:, None], augment=augment, dtype=torch.bfloat16)
    assert half.shape == (4, 3, 64, 64) and half.dtype == torch.bfloat16
    last = to_model_input(images, augment=augment, channels_last=True)
    assert last.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_input_stays_on_gpu_and_cpu_seed_repeats():
    images = random_images().cuda()
    out = to_model_input(images, augment=Augment(), generator=seeded(3))
    assert out.device == images.device
    on_cpu = to_model_input(images.cpu(), augment=Augment(), generator=seeded(3))
    torch.testing.assert_close(out.cpu(), on_cpu, atol=1e-4, rtol=0)


@pytest.mark.parametrize("augment", [None, Augment.off()])
@pytest.mark.parametrize("channels_last", [False, True])
def test_no_augmentation_is_the_normalisation_to_float_rounding(augment, channels_last):
    """One ``addcmul`` (x / 255 folded into the scale) gives ``(x / 255 - mean) / std``
    to within a float32 rounding step, in either memory layout, and the numpy
    normalisation that export and predict use agrees."""
    from covid_tune.data.preprocess import normalize

    images = random_images()
    out = to_model_input(images, augment=augment, channels_last=channels_last)
    assert out.is_contiguous(memory_format=torch.channels_last) == channels_last
    torch.testing.assert_close(out, by_hand(images), atol=2e-6, rtol=0)
    torch.testing.assert_close(out, torch.from_numpy(normalize(images.numpy())),
                               atol=2e-6, rtol=0)


@pytest.mark.parametrize("size", [1, 7, 224])
def test_the_broadcast_sampling_grid_is_affine_grid(size):
    import torch.nn.functional as F

    from covid_tune.nn.augment import _random_theta, _sampling_grid

    theta = _random_theta(Augment(rotation=30.0), 8, seeded(2))
    expected = F.affine_grid(theta, [8, 1, size, size], align_corners=False)
    torch.testing.assert_close(_sampling_grid(theta, size), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("augment", [None, Augment(rotation=30.0)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_one_pass_path_equals_the_old_three_pass_formula(augment, channels_last):
    """The old path: x / 255, ``affine_grid`` + ``grid_sample``, then
    ``(x - mean) / std`` over three channels. The new one warps 0..255 values on the
    broadcast grid and normalises in one ``addcmul``; sampling is linear, so they agree,
    with and without augmentation, in either memory layout. With the warp, a float
    rounding of a sampling position (1e-7) moves a value of this random-pixel image by
    a few 1e-5 (at most 3.1e-5 over 20 seeds); without it, to a rounding step."""
    import torch.nn.functional as F

    from covid_tune.nn.augment import _random_theta

    images = random_images(b=6)
    out = to_model_input(images, augment=augment, generator=seeded(4),
                         channels_last=channels_last)
    x = images.unsqueeze(1).float() / 255
    if augment is not None:
        theta = _random_theta(augment, 6, seeded(4))
        grid = F.affine_grid(theta, [6, 1, x.shape[-1], x.shape[-1]], align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros",
                          align_corners=False)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    assert out.is_contiguous(memory_format=torch.channels_last) == channels_last
    torch.testing.assert_close(out, (x - mean) / std, rtol=0,
                               atol=1e-4 if augment is not None else 1e-5)


def test_augmented_values_stay_in_normalised_range():
    images = random_images(b=16)
    out = to_model_input(images, augment=Augment(rotation=45.0), generator=seeded(0))
    assert out.min() >= LOW - 1e-5 and out.max() <= HIGH + 1e-5


def test_augmentation_keeps_batch_order():
    values = torch.arange(0, 256, 16, dtype=torch.uint8)
    images = values.view(-1, 1, 1).expand(-1, 32, 32).contiguous()
    augment = Augment(rotation=0.0, scale=(0.5, 1.0), flip=False)
    out = to_model_input(images, augment=augment, generator=seeded(0))
    assert torch.allclose(out[:, :, 16, 16], by_hand(images)[:, :, 16, 16], atol=1e-5)


def test_flip_gives_the_image_or_its_exact_mirror_and_both_occur():
    images = random_images(b=32, s=32)
    out = to_model_input(images, augment=ONLY_FLIP, generator=seeded(0))
    same = (out - by_hand(images)).abs().amax(dim=(1, 2, 3)) < 1e-5
    mirrored = (out - by_hand(images.flip(-1))).abs().amax(dim=(1, 2, 3)) < 1e-5
    assert torch.all(same | mirrored)
    assert same.any() and mirrored.any()


def test_rotation_moves_pixels_but_keeps_a_constant_image_constant_inside():
    s = 64
    ramp = torch.linspace(0, 255, s).round().to(torch.uint8)
    asymmetric = ramp.view(1, 1, s).expand(8, s, s).contiguous()
    out = to_model_input(asymmetric, augment=ONLY_ROTATION, generator=seeded(0))
    assert torch.all((out - by_hand(asymmetric)).abs().amax(dim=(1, 2, 3)) > 0.1)

    constant = torch.full((8, s, s), 100, dtype=torch.uint8)
    out = to_model_input(constant, augment=ONLY_ROTATION, generator=seeded(0))
    expected = by_hand(constant)
    inside = slice(s // 2 - 20, s // 2 + 20)  # inside the disc every rotation covers
    torch.testing.assert_close(out[..., inside, inside], expected[..., inside, inside],
                               atol=1e-5, rtol=0)
    assert (out[:, :, 0, 0] < expected[:, :, 0, 0]).any()  # corners are padded black


def test_same_seed_repeats_and_another_seed_differs():
    images = random_images()
    first, again, other = (
        to_model_input(images, augment=Augment(), generator=seeded(seed))
        for seed in (1, 1, 2)
    )
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)


@pytest.mark.parametrize("augment", [None, Augment()])
def test_smaller_output_size(augment):
    images = random_images(s=64)
    out = to_model_input(images, augment=augment, generator=seeded(0), out_size=32)
    assert out.shape == (4, 3, 32, 32)
    assert out.min() >= LOW - 1e-5 and out.max() <= HIGH + 1e-5
