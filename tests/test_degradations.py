"""Training pairs made from clean images for tasks without pairs of their own (`--synthesize H+B`): the haze
follows the atmospheric scattering model, the blur is a convolution by a camera-shake kernel, and data.py's
training crops, stage-1 pairs and probe use them as they use real pairs."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import data
import degradations
from data import TASKS, TrainDataset, load_pair, scan_training_set


def psnr(a, b):
    mse = ((a - b) ** 2).mean().item()
    return math.inf if mse == 0 else -10 * math.log10(mse)


def test_haze_is_the_scattering_model_with_a_transmission_falling_towards_the_top():
    # Two flat images through the same draw: I_i = c_i·t + A(1 − t), so t = (I_1 − I_2)/(c_1 − c_2) and
    # A = (I_1 − c_1·t)/(1 − t), recovered from the outputs alone (8-bit rounding: ±1/510 each).
    c1, c2 = 0.9, 0.1
    hazy_1 = degradations.haze(torch.full((3, 64, 80), c1), np.random.default_rng(5))
    hazy_2 = degradations.haze(torch.full((3, 64, 80), c2), np.random.default_rng(5))
    transmission = (hazy_1 - hazy_2) / (c1 - c2)                           # (3, H, W), the same in every channel
    assert (transmission.std(0) < 0.01).all()
    t = transmission.mean(0)
    assert 0.03 < t.min() and t.max() <= 1.0                           # e^{−βd}: never opaque; β = 0 is clear
    assert t[:8].mean() < t[-8:].mean() - 0.05                          # far (top) is hazier than near (bottom)
    keep = t < 0.8                                                       # A is ill-conditioned where t → 1
    airlight = (hazy_1 - c1 * t) / (1 - t)
    per_channel = [airlight[c][keep] for c in range(3)]
    assert all(0.68 < a.median() < 1.02 and a.std() < 0.02 for a in per_channel)   # one A per channel


def test_camera_shake_is_the_dense_convolution_by_a_normalised_kernel(monkeypatch):
    image = torch.rand(3, 40, 52)
    kernel = degradations.motion_kernel(np.random.default_rng(1), 15, 0.7, 0.35)
    # Reference: PyTorch's dense convolution (cross-correlation by the flipped kernel), reflect-padded.
    flipped = torch.from_numpy(kernel).flip(0, 1)[None, None].expand(3, 1, -1, -1)
    expected = F.conv2d(F.pad(image[None], (7, 7, 7, 7), mode="reflect"), flipped, groups=3)[0]
    assert torch.allclose(degradations.convolve(image, kernel), expected, atol=1e-6)
    drawn = {}
    monkeypatch.setattr(degradations, "convolve", lambda im, k: drawn.setdefault("kernel", k) is not None and im)
    degradations.camera_shake(image, np.random.default_rng(2))
    assert 1 <= len(drawn["kernel"]) <= 11 and abs(drawn["kernel"].sum() - 1) < 1e-6


@pytest.fixture
def clean_set(tmp_path):
    """A generic-layout root with four clean photos-like images (smooth gradients with edges), and nothing else."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:120, 0:150] / 150.0
    for i in range(4):
        image = np.stack([np.sin(3 * x + i), np.cos(4 * y - i), (x > 0.3 + 0.1 * i) * 1.0], -1) * 0.4 + 0.5
        image += rng.normal(0, 0.02, image.shape)
        path = tmp_path / "train/denoise/photos" / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((image.clip(0, 1) * 255).round().astype(np.uint8)).save(path)
    return tmp_path


def test_synthesized_tasks_take_the_clean_denoising_images_and_degrade_them_on_the_fly(clean_set):
    samples, report = scan_training_set(clean_set, ("denoise", "dehaze", "deblur"), synthesize=("dehaze", "deblur"))
    assert {t: f["pairs"] for t, f in report["found"].items()} == {"denoise": 4, "dehaze": 4, "deblur": 4}
    assert report["found"]["dehaze"]["layout"].startswith("synthesized")
    assert all(s.input_path is None and s.target_path.parent.name == "photos" for s in samples)
    dataset = TrainDataset(samples, patch_size=48, resample={t: 1 for t in TASKS})
    # Eq. (10)'s strata: σ levels for noise only; a synthesized task is one stratum, like a paired one
    assert dataset.strata == ["denoise_sigma15", "denoise_sigma25", "denoise_sigma50", "dehaze", "deblur"]
    for index, sample in enumerate(dataset.samples):
        item = dataset[index]
        drop = psnr(item["degraded"], item["target"])
        assert item["sigma"].item() == (0 if sample.task != "denoise" else item["sigma"].item())
        assert drop < 40, (sample.task, drop)                               # degraded, not a copy of the target
        if sample.task == "dehaze":                                        # haze lifts the dark levels
            assert item["degraded"].mean() > item["target"].mean()
    # The whole-image pair of stage 1 is fixed by the key (its I_m is rendered from it, Sec. III-B) ...
    hazy = next(s for s in samples if s.task == "dehaze")
    first, second = load_pair(hazy)[0], load_pair(hazy)[0]
    assert torch.equal(first, second) and first.shape == (3, 120, 150)
    # ... while the training crops draw a new haze each epoch: infinitely many pairs from one image
    index = dataset.samples.index(hazy)
    dataset.set_epoch(0)
    epoch_0 = dataset[index]["degraded"]
    dataset.set_epoch(1)
    assert not torch.equal(epoch_0, dataset[index]["degraded"])


def test_only_haze_and_blur_can_be_synthesized_and_the_flag_is_named(clean_set):
    with pytest.raises(ValueError, match="--synthesize: cannot make derain"):
        scan_training_set(clean_set, ("derain",), synthesize=("derain",))


def test_spread_keeps_at_most_n_images_per_task_evenly_and_zero_keeps_all():
    samples = [data.Sample(task, f"{i}.png", None, None) for task in ("denoise", "derain") for i in range(10)]
    chosen = data.spread(samples, 3)
    assert [s.key for s in chosen if s.task == "denoise"] == ["0.png", "4.png", "8.png"]
    assert len([s for s in chosen if s.task == "derain"]) == 3
    assert data.spread(samples, 0) == samples


def test_synthesized_degradations_on_real_photos_span_none_to_sots_strength(shared_dir):
    """SOTS-outdoor's hazy inputs average 16.2 dB RGB (shared data README); ours, on CBSD432, within 3.6 dB, from
    thick haze to almost none. The blur leaves some photos sharp (the 1-px kernel), blurs the rest like GoPro."""
    folder = shared_dir / "data/train/denoise/CBSD432"
    paths = sorted(folder.iterdir())[:12]
    values = {task: [psnr(fn(data.read_image(p), np.random.default_rng(i)), data.read_image(p))
                     for i, p in enumerate(paths)] for task, fn in degradations.SYNTHESIS.items()}
    assert 13.2 < np.mean(values["dehaze"]) < 19.8, values["dehaze"]
    assert min(values["dehaze"]) < 14 and max(values["dehaze"]) > 24   # thick haze and light haze
    blurred = [v for v in values["deblur"] if math.isfinite(v)]
    assert 1 <= 12 - len(blurred) <= 4, values["deblur"]                # one draw in six is left sharp
    assert 18 < np.mean(blurred) < 32, values["deblur"]                  # GoPro-derived inputs: 28.1 dB
