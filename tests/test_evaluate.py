"""Claims of Sec. IV-A.2 (PSNR/SSIM in three conventions, LPIPS), the layouts of Tables II-V and IX, and
the evaluation protocol: whole images, any method's outputs, your own images and what the model perceived."""

import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoints
import data
import guidance
import train
from evaluate import Restorer, get_args, main
from metrics import build_lpips, compute_metrics, compute_metrics_per_image, gaussian_window, rgb_to_y, ssim
from tables import AVERAGE_OF_IMAGES, AVERAGE_OF_SETS, ResultTable

REPO = Path(__file__).resolve().parents[1]


def read_rgb(path):
    """8-bit RGB file → (3, H, W) float32 in [0, 1], read with PIL (independent of data.py)."""
    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).float() / 255


def reference_pairs(shared_dir):
    pairs = json.loads((shared_dir / "reference" / "metrics_reference.json").read_text())["pairs"]
    for pair in pairs:
        yield pair, read_rgb(shared_dir / pair["input"]), read_rgb(shared_dir / pair["target"])


# ---------------------------------------------------------------------------------------------
# Metrics against third-party values and hand computations
# ---------------------------------------------------------------------------------------------

def test_both_conventions_match_skimage_and_basicsr_on_every_reference_pair(shared_dir):
    checks = {"rgb": ("psnr_rgb", "ssim_rgb_uniform7"), "rgb-gaussian": ("psnr_rgb", "ssim_rgb_gaussian"),
              "y": ("psnr_y", "ssim_y")}
    worst = {}
    for pair, degraded, clean in reference_pairs(shared_dir):
        for convention, (psnr_key, ssim_key) in checks.items():
            metrics = compute_metrics(degraded, clean, convention)
            worst[convention, psnr_key] = max(worst.get((convention, psnr_key), 0),
                                              abs(metrics["psnr"] - pair[psnr_key]))
            if ssim_key:
                worst[convention, ssim_key] = max(worst.get((convention, ssim_key), 0),
                                                  abs(metrics["ssim"] - pair[ssim_key]))
    assert len(worst) == 6
    for (convention, key), difference in worst.items():
        tolerance = 1e-3 if key.startswith("psnr") else 1e-4
        assert difference < tolerance, f"{convention} {key}: off by {difference:.2e}"


def test_basicsr_valid_window_y_ssim_differs_from_the_reference_by_the_border_alone(shared_dir):
    # BasicSR averages valid windows only; the reference (MATLAB's ssim()) replicates the borders.
    # Inside, the two maps are the same numbers; the border alone makes the means differ (by up to
    # ~0.005 on these pairs, more than the 1e-4 tolerance: the convention matters).
    worst = 0
    for pair, degraded, clean in reference_pairs(shared_dir):
        y_degraded, y_clean = (rgb_to_y(image.double()[None]) for image in (degraded, clean))
        valid = ssim(y_degraded, y_clean, gaussian_window(), 255.0, False, full_map=True)
        padded = ssim(y_degraded, y_clean, gaussian_window(), 255.0, False, replicate_border=True, full_map=True)
        H, W = y_clean.shape[-2:]
        assert padded.shape[-2:] == (H, W) and valid.shape[-2:] == (H - 10, W - 10)
        assert torch.allclose(padded[..., 5:-5, 5:-5], valid, rtol=0, atol=1e-12)          # interior: identical
        assert padded.mean().item() == pytest.approx(pair["ssim_y"], abs=1e-4)              # the reference
        worst = max(worst, abs(valid.mean().item() - pair["ssim_y"]))
    assert worst > 1e-3


@pytest.mark.parametrize("convention", ["rgb", "rgb-gaussian", "y"])
def test_identical_images_have_infinite_psnr_and_ssim_one(convention):
    image = torch.rand(2, 3, 16, 20)
    metrics = compute_metrics(image, image.clone(), convention)
    assert metrics["psnr"] == math.inf
    assert metrics["ssim"] == pytest.approx(1.0, abs=1e-12)


def test_constant_images_have_hand_computed_psnr_and_ssim():
    # RGB: MSE = 0.1² → PSNR = 10·log10(1 / 0.01) = 20 dB; zero variances → SSIM = C1 / (0.1² + C1).
    target = torch.zeros(3, 12, 12)
    metrics = compute_metrics(torch.full((3, 12, 12), 0.1), target, "rgb")
    assert metrics["psnr"] == pytest.approx(20.0, abs=1e-5)
    assert metrics["ssim"] == pytest.approx(1e-4 / (0.01 + 1e-4), abs=1e-6)
    # Y: 0.2 → 51/255 on all channels → Y = 16 + 219·0.2 = 59.8; black → Y = 16.
    metrics = compute_metrics(torch.full((3, 12, 12), 0.2), target, "y")
    c1 = (0.01 * 255) ** 2
    assert metrics["psnr"] == pytest.approx(20 * math.log10(255 / 43.8), abs=1e-5)
    assert metrics["ssim"] == pytest.approx((2 * 59.8 * 16 + c1) / (59.8 ** 2 + 16 ** 2 + c1), abs=1e-6)


def test_rgb_ssim_of_a_7x7_image_is_one_window_with_sample_covariance():
    # A 7×7 image holds exactly one valid 7×7 window: SSIM = the formula on the 49 pixels with
    # unbiased (N − 1) variances, averaged over the three channels.
    x, y = torch.rand(3, 7, 7, dtype=torch.float64), torch.rand(3, 7, 7, dtype=torch.float64)
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    expected = 0.0
    for a, b in zip(x.flatten(1), y.flatten(1)):
        cov = ((a - a.mean()) * (b - b.mean())).sum() / 48
        expected += ((2 * a.mean() * b.mean() + c1) * (2 * cov + c2)
                     / ((a.mean() ** 2 + b.mean() ** 2 + c1) * (a.var() + b.var() + c2))).item() / 3
    assert compute_metrics(x, y, "rgb")["ssim"] == pytest.approx(expected, abs=1e-12)


def test_y_ssim_of_an_11x11_gray_image_is_one_gaussian_window():
    # Gray 8-bit levels k: Y = 16 + 219·k/255. One valid 11×11 window, weights exp(−r²/(2·1.5²)),
    # biased (weighted) variances, C1 = (0.01·255)², C2 = (0.03·255)².
    k_x, k_y = torch.randint(0, 256, (2, 11, 11), dtype=torch.float64)
    i, j = torch.meshgrid(torch.arange(11.0, dtype=torch.float64), torch.arange(11.0, dtype=torch.float64),
                          indexing="ij")
    w = torch.exp(-((i - 5) ** 2 + (j - 5) ** 2) / 4.5)
    w = w / w.sum()
    a, b = 16 + 219 * k_x / 255, 16 + 219 * k_y / 255
    mu_a, mu_b = (w * a).sum(), (w * b).sum()
    var_a, var_b, cov = (w * (a - mu_a) ** 2).sum(), (w * (b - mu_b) ** 2).sum(), (w * (a - mu_a) * (b - mu_b)).sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    expected = ((2 * mu_a * mu_b + c1) * (2 * cov + c2) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))).item()
    y = lambda k: rgb_to_y((k / 255).expand(1, 3, 11, 11))
    assert ssim(y(k_x), y(k_y), gaussian_window(), 255.0, False).item() == pytest.approx(expected, abs=1e-10)


def test_a_batch_gives_each_images_own_metrics_and_their_mean():
    # Constant offsets: MSE 0.1² → 20 dB, 0.01² → 40 dB, (√0.1)² = 0.1 → 10 dB, independent of the content.
    target = torch.rand(3, 3, 20, 24) * 0.5
    restored = target + torch.tensor([0.1, 0.01, 0.1 ** 0.5]).view(3, 1, 1, 1)
    batch = compute_metrics_per_image(restored, target, "rgb")
    assert batch["psnr"] == pytest.approx([20.0, 40.0, 10.0], abs=1e-4)                # float32 offsets
    assert compute_metrics(restored, target, "rgb")["psnr"] == pytest.approx(70 / 3, abs=1e-4)
    # SSIM: image 0 alone, the same offset everywhere.
    single = compute_metrics_per_image(restored[:1], target[:1], "rgb")["ssim"][0]
    assert batch["ssim"][0] == pytest.approx(single, abs=1e-12)
    assert batch["ssim"][1] > batch["ssim"][0] > batch["ssim"][2]


def test_restored_values_outside_0_1_are_clamped_and_the_y_convention_rounds_to_8_bits():
    target = torch.full((3, 16, 16), 0.8)                   # 204 of 255
    overshoot = torch.full((3, 16, 16), 1.3)                # a network output beyond 1 counts as 1.0
    # RGB: error 0.2 → 20·log10(1 / 0.2) dB. Y: levels 255 and 204 differ by 219·51/255 = 43.8 in Y.
    assert compute_metrics(overshoot, target, "rgb")["psnr"] == pytest.approx(20 * math.log10(5), abs=1e-5)
    assert compute_metrics(overshoot, target, "y")["psnr"] == pytest.approx(20 * math.log10(255 / 43.8), abs=1e-5)
    # 8-bit rounding: 204.4/255 rounds to the target's level in Y, but not in RGB.
    nudged = target + 0.4 / 255
    assert compute_metrics(nudged, target, "y")["psnr"] == math.inf
    assert compute_metrics(nudged, target, "rgb")["psnr"] < 60


@pytest.mark.parametrize("restored, target, error, message", [
    (torch.rand(3, 16, 16), torch.rand(3, 16, 18), ValueError, "differ in shape"),
    (torch.rand(1, 16, 16), torch.rand(1, 16, 16), ValueError, r"\(3, H, W\)"),
    (torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8), torch.rand(3, 16, 16), TypeError, "/ 255"),
    (torch.rand(3, 16, 16), torch.rand(3, 16, 16) * 255, ValueError, "divide 8-bit images by 255"),
    (torch.full((3, 16, 16), float("nan")), torch.rand(3, 16, 16), ValueError, "NaN"),
    (torch.rand(3, 9, 16), torch.rand(3, 9, 16), ValueError, "at least 11"),
])
def test_bad_inputs_give_errors_that_say_what_to_fix(restored, target, error, message):
    with pytest.raises(error, match=message):
        compute_metrics(restored, target, "y")


def test_unknown_convention_is_rejected_with_the_choices():
    with pytest.raises(ValueError, match="'rgb'"):
        compute_metrics(torch.rand(3, 16, 16), torch.rand(3, 16, 16), "ycbcr")


# ---------------------------------------------------------------------------------------------
# Tables II-V, IX
# ---------------------------------------------------------------------------------------------

def hand_made_table(convention="rgb"):
    table = ResultTable(convention)
    table.add("CBSD68", "denoise", 15, {"psnr": [30.0, 32.0], "ssim": [0.80, 0.90]})
    table.add("CBSD68", "denoise", 25, {"psnr": [28.0], "ssim": [0.70]})
    table.add("SOTS-outdoor-mini", "dehaze", None, {"psnr": [20.0, 22.0], "ssim": [0.90, 0.92]})
    table.add("SOTS-outdoor-mini", "dehaze", None, {"psnr": [24.0], "ssim": [0.94]})   # a second batch of the same set
    return table


def markdown_cells(text):
    """Rows of the markdown table as {header: cell}."""
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("|")]
    header, body = rows[0], rows[2:]
    return header, {row[0]: dict(zip(header, row)) for row in body}


def test_table_ii_header_names_the_convention_and_missing_sets_show_a_dash():
    header, rows = markdown_cells(hand_made_table("rgb").markdown("N+H+R"))
    assert header[0] == "PSNR/SSIM (RGB, skimage convention)"
    assert header[1:6] == ["CBSD68 σ=15", "CBSD68 σ=25", "CBSD68 σ=50", "SOTS (SOTS-outdoor-mini)", "Rain100L"]
    ours = rows["Perceive-IR"]
    assert ours["CBSD68 σ=50"] == ours["Rain100L"] == "-"
    assert ours["CBSD68 σ=15"] == "31.00/0.8500"
    assert rows["images"]["SOTS (SOTS-outdoor-mini)"] == "3"
    y_header, _ = markdown_cells(hand_made_table("y").markdown("N+H+R"))
    assert y_header[0].startswith("PSNR/SSIM (Y channel")


def test_both_averages_are_labelled_and_correct_on_hand_made_numbers():
    # Set means: PSNR 31, 28, 22 → 27.00; SSIM 0.85, 0.70, 0.92 → 0.8233.
    # All six images pooled: PSNR 156/6 = 26.00; SSIM 5.16/6 = 0.8600.
    _, rows = markdown_cells(hand_made_table().markdown("N+H+R"))
    assert rows["Perceive-IR"][AVERAGE_OF_SETS] == "27.00/0.8233"
    assert rows["Perceive-IR"][AVERAGE_OF_IMAGES] == "26.00/0.8600"
    assert rows["images"][AVERAGE_OF_SETS] == "3 sets"
    assert rows["images"][AVERAGE_OF_IMAGES] == "6"


def test_table_iii_one_by_one_and_unseen_noise_layouts_have_the_papers_columns():
    table = hand_made_table()
    header, _ = markdown_cells(table.markdown("N+H+R+B+L"))
    assert header[1:6] == ["CBSD68 σ=25", "SOTS (SOTS-outdoor-mini)", "Rain100L", "GoPro", "LOL"]
    header, rows = markdown_cells(table.markdown("unseen-noise"))
    assert header[1:5] == ["CBSD68 σ=60", "CBSD68 σ=100", "Urban100 σ=60", "Urban100 σ=100"]
    assert set(rows["Perceive-IR"].values()) == {"Perceive-IR", "-"}      # nothing evaluated
    one_task = ResultTable("rgb")
    one_task.add("Rain100L", "derain", None, {"psnr": [38.0], "ssim": [0.98]})              # a One-by-One derain model
    header, _ = markdown_cells(one_task.markdown("one-by-one"))
    assert header[1:] == ["Rain100L", AVERAGE_OF_SETS, AVERAGE_OF_IMAGES]
    header, _ = markdown_cells(table.markdown(None))                       # every set, in order
    assert header[1:4] == ["CBSD68 σ=15 (denoise)", "CBSD68 σ=25 (denoise)", "SOTS-outdoor-mini (dehaze)"]


def test_csv_and_json_are_written_atomically_with_every_value(tmp_path):
    table = hand_made_table("y")
    paths = table.write(tmp_path, "N+H+R")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths)   # no .tmp left
    markdown, csv_path, json_path = paths
    assert markdown.read_text() == table.markdown("N+H+R")
    rows = {r["column"]: r for r in csv.DictReader(csv_path.open())}
    assert rows["CBSD68 σ=50"]["psnr"] == "-"
    assert float(rows["CBSD68 σ=15"]["psnr"]) == 31.0 and rows["CBSD68 σ=15"]["images"] == "2"
    assert float(rows[AVERAGE_OF_SETS]["psnr"]) == pytest.approx(27.0)
    assert float(rows[AVERAGE_OF_IMAGES]["ssim"]) == pytest.approx(0.86)
    assert all(r["convention"].startswith("PSNR/SSIM (Y channel") for r in rows.values())
    data = json.loads(json_path.read_text())
    assert data["averages"][AVERAGE_OF_IMAGES]["psnr"] == pytest.approx(26.0)
    assert data["sets"][2]["psnr"] == [20.0, 22.0, 24.0]                 # per-image values kept
    assert data["protocol"] == "whole images" and data["header"] == rows[AVERAGE_OF_SETS]["convention"]


@pytest.mark.parametrize("args, message", [
    (("SOTS", "dehaze", 25, {"psnr": [30.0], "ssim": [0.9]}), "only denoising adds noise"),
    (("SOTS", "dehaze", None, {"psnr": [30.0, 31.0], "ssim": [0.9]}), "one value per image of each"),
    (("SOTS", "dehaze", None, {"psnr": [30.0]}), "one value per image of each"),
    (("SOTS", "dehaze", None, {"psnr": [30.0], "ssim": [0.9], "uiqm": [2.0]}), "one value per image of each"),
])
def test_inconsistent_results_are_rejected_when_added(args, message):
    with pytest.raises(ValueError, match=message):
        ResultTable("rgb").add(*args)


def test_two_sets_for_one_column_are_an_error_not_a_silent_choice():
    table = hand_made_table()
    table.add("SOTS-indoor-mini", "dehaze", None, {"psnr": [15.0], "ssim": [0.8]})
    with pytest.raises(ValueError, match="layout=None"):
        table.markdown("N+H+R")
    with pytest.raises(ValueError, match="unknown table layout"):
        table.markdown("Table II")


# ---------------------------------------------------------------------------------------------
# LPIPS (Fig. 8, Tables VI-VIII) against the lpips package
# ---------------------------------------------------------------------------------------------

def seeded_lpips_files(reference, tmp_path):
    """The VGG-16 and calibration weights of tests/lpips_reference.json, re-created from its seeds."""
    from torchvision.models import vgg16
    with torch.random.fork_rng():
        torch.manual_seed(reference["vgg_seed"])
        vgg = vgg16(weights=None)
    generator = torch.Generator().manual_seed(reference["lin_seed"])
    calibration = {key: torch.rand(1, C, 1, 1, generator=generator) * (2.0 / C)
                   for key, C in zip(reference["lin_keys"], (64, 128, 256, 512, 512))}
    torch.save(vgg.state_dict(), tmp_path / "vgg16.pth")
    torch.save(calibration, tmp_path / "lpips_vgg_v0.1.pth")
    return tmp_path / "vgg16.pth", tmp_path / "lpips_vgg_v0.1.pth"


def test_lpips_equals_the_lpips_packages_on_real_pairs_with_the_same_weights(shared_dir, tmp_path):
    reference = json.loads((REPO / "tests" / "lpips_reference.json").read_text())
    assert reference["versions"]["lpips"] == "0.1.4" and len(reference["pairs"]) >= 5
    lpips = build_lpips(*seeded_lpips_files(reference, tmp_path))
    for pair in reference["pairs"]:
        restored, target = read_rgb(shared_dir / pair["input"])[None], read_rgb(shared_dir / pair["target"])[None]
        ours = lpips(restored, target).item()
        assert ours == pytest.approx(pair["lpips"], rel=1e-4, abs=1e-7), pair["input"]
    # The values are spread: a wrong tap, scaling or normalisation moves them far more than 1e-4.
    values = [p["lpips"] for p in reference["pairs"]]
    assert max(values) / min(values) > 10


def test_lpips_without_its_weights_stops_before_restoring_and_names_both_flags(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "lpips", None)                    # not installed
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    for flags in ([], ["--vgg-weights", str(tmp_path / "missing.pth")]):
        with pytest.raises(SystemExit, match="--vgg-weights.*--lpips-weights|--lpips-weights.*--vgg-weights") as error:
            main(get_args(["--pred", str(tmp_path), "--target", str(tmp_path), "--tasks", "R", "--lpips", *flags]))
        assert "\n" not in str(error.value)


# ---------------------------------------------------------------------------------------------
# Restoring the test sets with a checkpoint
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A restore-stage checkpoint of the demo's tiny network, as train.py writes it, with centroids of Z."""
    from guidance import degradation_centroids
    torch.manual_seed(0)
    args = vars(train.get_args(["--preset", "demo"]))
    model = guidance.build_model(args)
    with torch.no_grad():                                      # leave the identity start of PGM
        for name, p in model.named_parameters():
            if "to_scale_shift" in name:
                p.normal_(std=0.05)
    images = [(task, torch.rand(3, 32, 32) * scale) for task, scale in (("derain", 1.0), ("lowlight", 0.1))
              for _ in range(4)]
    path = tmp_path_factory.mktemp("checkpoint") / "last.pt"
    checkpoints.save_checkpoint(path, {"stage": "restore", "args": args, "model": model.state_dict(), "step": 1, "epoch": 0,
                                 "avg_psnr": {"derain": 20.0}, "optimizer": {}, "rng": [],
                                 "centroids": degradation_centroids(model.eval(), images)})
    return path


def small_benchmark(shared_dir, root):
    """Two CBSD68 images, three Rain100L pairs and the two SOTS-outdoor pairs (550×413) in the generic layout."""
    for name in ("101085.png", "101087.png"):
        (root / "test/denoise/CBSD68").mkdir(parents=True, exist_ok=True)
        shutil.copy(shared_dir / "data/test/denoise/CBSD68" / name, root / "test/denoise/CBSD68" / name)
    for folder in ("input", "target"):
        (root / "test/derain/Rain100L" / folder).mkdir(parents=True, exist_ok=True)
        for name in ("1.png", "2.png", "3.png"):
            source = shared_dir / "data/test/derain/Rain100L" / folder / name
            shutil.copy(source, root / "test/derain/Rain100L" / folder / name)
    shutil.copytree(shared_dir / "data/test/dehaze/SOTS-outdoor-mini", root / "test/dehaze/SOTS-outdoor-mini")
    return root


def test_tiled_restoration_matches_the_whole_image_within_a_stated_tolerance(tiny_checkpoint):
    restorer = Restorer.from_checkpoint(tiny_checkpoint)
    assert restorer.tile is None and restorer.protocol == "whole images"
    image = torch.rand(1, 3, 150, 200)
    whole = restorer(image)
    restorer.tile, restorer.overlap = 64, 16
    tiled = restorer(image)
    assert restorer.protocol == "tiled 64, overlap 16"
    # The priors F_l and Z come from the whole image either way; only the context of the channel
    # attention differs (global per tile). Stated tolerance: mean |difference| under 2% of the range,
    # for an untrained network on uniform noise with 64-px tiles (real use: 512-px tiles).
    assert 1e-4 < (tiled - whole).abs().mean().item() < 0.02             # tiled, and close


def test_benchmark_images_are_restored_whole_unless_tiles_are_asked_for(shared_dir, tiny_checkpoint, tmp_path, capsys):
    root = small_benchmark(shared_dir, tmp_path / "data")
    restorer = Restorer.from_checkpoint(tiny_checkpoint)
    degraded = read_rgb(root / "test/dehaze/SOTS-outdoor-mini/input/0001.png")[None]   # 550×413: above 512
    expected = data.quantize(restorer(degraded)[0])
    for tile, protocol in ((None, "whole images"), (256, "tiled 256, overlap 32")):
        out = tmp_path / f"out_{tile}"
        main(get_args(["--checkpoint", str(tiny_checkpoint), "--data-root", str(root), "--tasks", "H", "--results",
                       str(out), "--save-images", str(out)] + (["--tile", str(tile)] if tile else [])))
        saved = read_rgb(out / "dehaze_SOTS-outdoor-mini" / "0001.png")
        assert torch.equal(saved, expected) == (tile is None)                      # exactly the whole image
        table = json.loads((out / "results_one-by-one_rgb.json").read_text())
        assert table["protocol"] == protocol and protocol in (out / "results_one-by-one_y.md").read_text()
    assert "largest test image: SOTS-outdoor-mini/0001.png, 550×413" in capsys.readouterr().out


def test_end_to_end_evaluation_scores_each_restored_test_image(shared_dir, tiny_checkpoint, tmp_path):
    root = small_benchmark(shared_dir, tmp_path / "data")
    assert main(get_args(["--checkpoint", str(tiny_checkpoint), "--data-root", str(root), "--tasks", "N+R",
                          "--sigmas", "25", "--results", str(tmp_path / "results"), "--save-images",
                          str(tmp_path / "out")])) == 0
    table = json.loads((tmp_path / "results" / "results_all_rgb.json").read_text())
    sets = {(s["set_name"], s["sigma"]): s for s in table["sets"]}
    assert sets[("Rain100L", None)]["names"] == ["1.png", "2.png", "3.png"] and len(sets[("CBSD68", 25.0)]["psnr"]) == 2
    restorer = Restorer.from_checkpoint(tiny_checkpoint)
    for index, name in enumerate(["1.png", "2.png", "3.png"]):           # each value is its own image's
        degraded = read_rgb(root / "test/derain/Rain100L/input" / name)[None]
        target = read_rgb(root / "test/derain/Rain100L/target" / name)[None]
        expected = compute_metrics(restorer(degraded), target, "rgb")
        assert sets[("Rain100L", None)]["psnr"][index] == pytest.approx(expected["psnr"], abs=1e-9)
        assert sets[("Rain100L", None)]["ssim"][index] == pytest.approx(expected["ssim"], abs=1e-12)
        saved = read_rgb(tmp_path / "out" / "derain_Rain100L" / name)
        assert torch.equal(saved, data.quantize(restorer(degraded)[0]))


def test_two_ranks_shard_the_test_images_and_give_the_one_process_table(shared_dir, tiny_checkpoint, tmp_path):
    root = small_benchmark(shared_dir, tmp_path / "data")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    common = ["--checkpoint", str(tiny_checkpoint), "--data-root", str(root), "--tasks", "R", "--conventions", "rgb"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    for name, launcher in (("one", [sys.executable]), ("two", torchrun)):
        result = subprocess.run([*launcher, str(REPO / "evaluate.py"), *common, "--results", str(tmp_path / name)],
                                capture_output=True, text=True, env=env, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(re.findall(r"rank (\d): restored (\d) of 3 test images", result.stdout)) == [("0", "2"), ("1", "1")]
    one, two = (json.loads((tmp_path / n / "results_one-by-one_rgb.json").read_text()) for n in ("one", "two"))
    by_name = lambda table: dict(zip(table["sets"][0]["names"], table["sets"][0]["psnr"]))   # noqa: E731
    assert by_name(one) == pytest.approx(by_name(two), abs=1e-4) and len(by_name(two)) == 3


def test_bad_checkpoints_give_clear_errors(tiny_checkpoint, tmp_path):
    corrupt, foreign, other_stage, mismatched = (tmp_path / f"{n}.pt"
                                                 for n in ("corrupt", "foreign", "stage", "mismatch"))
    corrupt.write_bytes(b"not a checkpoint at all")
    torch.save({"weights": torch.zeros(1)}, foreign)
    checkpoint = torch.load(tiny_checkpoint, weights_only=True)
    torch.save({**checkpoint, "stage": "medium-a"}, other_stage)
    torch.save({**checkpoint, "args": {**checkpoint["args"], "backbone": "nafnet"}}, mismatched)
    for path, message in ((corrupt, "not a readable checkpoint"), (foreign, "not a Perceive-IR training checkpoint"),
                          (other_stage, "'medium-a' checkpoint"), (mismatched, "does not match the model"),
                          (tmp_path / "missing.pt", "No such file")):
        with pytest.raises(SystemExit, match=message):
            Restorer.from_checkpoint(path)


def test_the_device_flag_is_honoured(tiny_checkpoint, tmp_path):
    args = get_args(["--checkpoint", str(tiny_checkpoint), "--device", "cpu"])
    assert train.Run(args.device).device == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="--device cuda"):
            main(get_args(["--checkpoint", str(tiny_checkpoint), "--device", "cuda", "--input", str(tmp_path)]))


# ---------------------------------------------------------------------------------------------
# Scoring any method's outputs (--pred)
# ---------------------------------------------------------------------------------------------

def test_scoring_rain100l_inputs_as_predictions_reproduces_the_published_input_psnr(shared_dir, tmp_path):
    rain = shared_dir / "data/test/derain/Rain100L"
    assert main(get_args(["--pred", str(rain / "input"), "--target", str(rain / "target"), "--tasks", "R",
                          "--results", str(tmp_path), "--method", "rainy input"])) == 0
    rgb = json.loads((tmp_path / "results_one-by-one_rgb.json").read_text())
    y = json.loads((tmp_path / "results_one-by-one_y.json").read_text())
    assert rgb["method"] == "rainy input" and rgb["sets"][0]["set_name"] == "Rain100L"
    assert rgb["averages"]["Average (all images pooled)"]["count"] == 100
    # The shared data's README: Y 26.90 dB (the published Rain100L input PSNR), RGB mean 25.52 dB.
    assert y["averages"]["Average (all images pooled)"]["psnr"] == pytest.approx(26.90, abs=0.005)
    assert rgb["averages"]["Average (all images pooled)"]["psnr"] == pytest.approx(25.52, abs=0.005)


def test_predictions_are_matched_by_name_rules_and_every_problem_is_named(shared_dir, tmp_path, capsys):
    root = small_benchmark(shared_dir, tmp_path / "data")
    pred = tmp_path / "pred"
    (pred / "derain_Rain100L").mkdir(parents=True)
    (pred / "dehaze_SOTS-outdoor-mini").mkdir(parents=True)
    for name in ("1.png", "2.png"):                                    # 3.png missing
        shutil.copy(root / "test/derain/Rain100L/target" / name, pred / "derain_Rain100L" / name)
    shutil.copy(root / "test/derain/Rain100L/target/1.png", pred / "derain_Rain100L" / "extra.png")
    # RESIDE names: a prediction 0001_0.8_0.2.png scores against 0001.png.
    shutil.copy(root / "test/dehaze/SOTS-outdoor-mini/target/0001.png",
                pred / "dehaze_SOTS-outdoor-mini/0001_0.8_0.2.png")
    Image.new("RGB", (40, 30)).save(pred / "dehaze_SOTS-outdoor-mini/0002.png")          # wrong size
    status = main(get_args(["--pred", str(pred), "--data-root", str(root), "--tasks", "H+R", "--results",
                            str(tmp_path / "results")]))
    out = capsys.readouterr().out
    assert status == 1
    assert "no prediction for 3.png" in out and "extra.png: no test image of this name" in out
    assert "0002.png is 40x30, its target 550x413" in out and "3 problem(s)" in out
    table = json.loads((tmp_path / "results" / "results_all_rgb.json").read_text())
    sets = {s["set_name"]: s for s in table["sets"]}
    assert sets["Rain100L"]["names"] == ["1.png", "2.png"] and sets["Rain100L"]["psnr"] == [math.inf, math.inf]
    assert sets["SOTS-outdoor-mini"]["names"] == ["0001_0.8_0.2.png"]
    with pytest.raises(SystemExit, match="pass one of them"):
        get_args(["--pred", str(pred), "--checkpoint", "x.pt"])


# ---------------------------------------------------------------------------------------------
# Your own images: one bad file costs nothing else; what the model perceived
# ---------------------------------------------------------------------------------------------

def test_your_own_images_in_any_format_come_back_as_png_and_colliding_names_keep_their_suffix(tiny_checkpoint,
                                                                                             tmp_path, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    pixels = (np.random.default_rng(0).random((37, 53, 3)) * 255).astype(np.uint8)
    for name in ("a.png", "b.jpg", "c.bmp", "d.tiff", "e.webp", "img.bmp", "img.tif"):
        Image.fromarray(pixels).save(folder / name)
    (folder / "notes.txt").write_text("not an image")
    assert main(get_args(["--checkpoint", str(tiny_checkpoint), "--input", str(folder), "--output",
                          str(tmp_path / "out"), "--grid"])) == 0
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    outputs = ["a.png", "b.png", "c.png", "d.png", "e.png", "img_bmp.png", "img_tif.png"]
    assert written == sorted(outputs + [f"{Path(o).stem}_grid.png" for o in outputs] + ["perception.json"])
    assert read_rgb(tmp_path / "out" / "d.png").shape == (3, 37, 53)
    assert "restored 7 image(s)" in capsys.readouterr().out


def test_an_unreadable_file_is_named_and_skipped_and_the_others_are_restored(tiny_checkpoint, tmp_path, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(folder / "good.png")
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(folder / "cut.png")
    (folder / "cut.png").write_bytes((folder / "cut.png").read_bytes()[:40])        # truncated
    (folder / "text.png").write_text("not a png at all")
    status = main(get_args(["--checkpoint", str(tiny_checkpoint), "--input", str(folder), "--output",
                            str(tmp_path / "out")]))
    out = capsys.readouterr().out
    assert status == 1                                                              # something was skipped
    assert "SKIPPED cut.png: cannot read image" in out and "SKIPPED text.png: cannot read image" in out
    assert "restored 1 image(s)" in out and "skipped 2: cut.png, text.png" in out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["good.png", "perception.json"]


def test_perception_json_names_the_nearest_task_and_p_excellent_with_prompts(tiny_checkpoint, tmp_path):
    import clip_prompts
    from guidance import perceive
    clip_model = clip_prompts.load_clip("tiny")
    learner = clip_prompts.PromptLearner(clip_model)
    clip_prompts.save_prompts(tmp_path / "prompts.pt", learner, clip_model.clip_info, {}, 1)
    folder = tmp_path / "mine"
    folder.mkdir()
    Image.fromarray((np.random.default_rng(1).random((30, 40, 3)) * 25).astype(np.uint8)).save(folder / "dark.png")
    main(get_args(["--checkpoint", str(tiny_checkpoint), "--input", str(folder), "--output", str(tmp_path / "out"),
                   "--prompts", str(tmp_path / "prompts.pt")]))
    report = json.loads((tmp_path / "out" / "perception.json").read_text())["dark.png"]
    restorer = Restorer.from_checkpoint(tiny_checkpoint)
    degraded = read_rgb(folder / "dark.png")[None]
    expected = perceive(restorer.model, restorer.centroids, degraded)[0]
    assert report["task"] == expected["task"] and report["similarity"] == pytest.approx(expected["similarity"])
    assert set(report["similarity"]) == {"derain", "lowlight"} and report["unfamiliar"] == expected["unfamiliar"]
    perceiver = clip_prompts.QualityPerceiver(clip_model, learner().detach(), learner.words)
    with torch.no_grad():
        p_in = perceiver(degraded)[0, 0].item()
        p_out = perceiver(restorer(degraded))[0, 0].item()
    assert report["p_excellent"] == pytest.approx({"input": p_in, "output": p_out}, abs=1e-6)


def test_as_task_restores_as_if_perceived_as_that_task_and_says_so(tiny_checkpoint, tmp_path, capsys):
    from guidance import perceive, restore_image
    folder = tmp_path / "mine"
    folder.mkdir()
    Image.fromarray((np.random.default_rng(2).random((30, 40, 3)) * 255).astype(np.uint8)).save(folder / "x.png")
    for task in (None, "lowlight"):
        flags = ["--as-task", task] if task else []
        main(get_args(["--checkpoint", str(tiny_checkpoint), "--input", str(folder), "--output",
                       str(tmp_path / f"out_{task}"), *flags]))
    report = json.loads((tmp_path / "out_lowlight" / "perception.json").read_text())["x.png"]
    assert report["restored_as"] == "lowlight" and "restored as lowlight" in capsys.readouterr().out
    restorer = Restorer.from_checkpoint(tiny_checkpoint)
    degraded = read_rgb(folder / "x.png")[None]
    assert report["task"] == perceive(restorer.model, restorer.centroids, degraded)[0]["task"]   # still what it saw
    restorer.steer("lowlight")
    centroid = restorer.centroids["centroids"][restorer.centroids["tasks"].index("lowlight")]
    expected = restore_image(restorer.model, restorer.sgm, degraded, 512, steer=centroid)
    steered, plain = (read_rgb(tmp_path / f"out_{task}" / "x.png") for task in ("lowlight", None))
    assert torch.equal(steered, (expected[0] * 255).round() / 255) and not torch.equal(steered, plain)
    with pytest.raises(SystemExit, match="centroids are of derain, lowlight only"):
        restorer.steer("deblur")
    checkpoint = torch.load(tiny_checkpoint, weights_only=True)
    del checkpoint["centroids"]
    torch.save(checkpoint, tmp_path / "old.pt")
    with pytest.raises(SystemExit, match="--as-task dehaze: this checkpoint has no degradation code Z to steer"):
        main(get_args(["--checkpoint", str(tmp_path / "old.pt"), "--input", str(folder), "--output",
                       str(tmp_path / "out_old"), "--as-task", "dehaze"]))


def test_a_checkpoint_without_centroids_still_restores_with_a_message(tiny_checkpoint, tmp_path, capsys):
    checkpoint = torch.load(tiny_checkpoint, weights_only=True)
    del checkpoint["centroids"]                                        # --no-cfe runs, or older versions
    torch.save(checkpoint, tmp_path / "old.pt")
    (tmp_path / "mine").mkdir()
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "mine" / "x.png")
    assert main(get_args(["--checkpoint", str(tmp_path / "old.pt"), "--input", str(tmp_path / "mine"),
                          "--output", str(tmp_path / "out")])) == 0
    assert "holds no centroids of Z" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "perception.json").read_text()) == {"x.png": {"output": "x.png"}}


# ---------------------------------------------------------------------------------------------
# The measurement script (tests/benchmark.py): its profile and its FLOP counter
# ---------------------------------------------------------------------------------------------

def test_profile_reports_the_parameter_counts_of_the_model_and_its_frozen_dinov2(capsys):
    import benchmark
    from guidance import build_sgm
    report = benchmark.profile(benchmark.random_restorer(torch.device("cpu"), config="tiny"), 64,
                               torch.device("cpu"), repeats=1)
    assert report["trainable"] == 348_697                                # the demo's tiny Perceive-IR
    assert report["frozen"] == sum(p.numel() for p in build_sgm("tiny").parameters())
    assert report["flops_256"] > 0 and report["latency_ms"] > 0 and report["peak_mb"] > 0
    assert "trainable parameters       0.35 M" in capsys.readouterr().out


def test_flop_count_of_a_depthwise_convolution_backward_is_two_forwards():
    # Forward of a 3×3 depthwise conv on (2, 16, 10, 10): 2·B·C·(C/groups)·9·H·W = 2·2·16·1·9·100.
    from benchmark import flops_of
    conv = torch.nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)
    x = torch.rand(2, 16, 10, 10, requires_grad=True)
    forward = 2 * 2 * 16 * 1 * 9 * 100
    assert flops_of(lambda: conv(x)) == forward
    assert flops_of(lambda: conv(x).sum().backward()) == 3 * forward     # + grad of input and of weight


# ---------------------------------------------------------------------------------------------
# Tables VI-VIII: any folder as a test set, the no-reference metrics; Table XV
# ---------------------------------------------------------------------------------------------

def test_any_folder_is_a_test_set_and_one_without_targets_gets_the_no_reference_metrics(shared_dir, tiny_checkpoint,
                                                                                         tmp_path):
    from metrics import uciqe, uiqm
    root, rain = tmp_path / "data", shared_dir / "data/test/derain/Rain100L"
    for folder, names in (("UIEB/input", "123"), ("UIEB/target", "123"), ("C60/input", "12")):   # C60: no targets
        (root / "test/underwater" / folder).mkdir(parents=True)
        for n in names:
            shutil.copy(rain / folder.split("/")[1] / f"{n}.png", root / "test/underwater" / folder / f"{n}.png")
    sets = ["--sets", "test/underwater/UIEB", "test/underwater/C60", "--nr-metrics", "uciqe", "uiqm"]
    assert main(get_args(["--checkpoint", str(tiny_checkpoint), "--data-root", str(root), *sets, "--results",
                          str(tmp_path / "results"), "--save-images", str(tmp_path / "images")])) == 0
    rgb = json.loads((tmp_path / "results/results_all_rgb.json").read_text())
    assert [(s["set_name"], s["task"], len(s["psnr"])) for s in rgb["sets"]] == [("UIEB", "underwater", 3)]
    assert rgb["backbone"] == "restormer" and rgb["parameters"] == 348_697             # what Table XV compares
    no_reference = json.loads((tmp_path / "results/results_all_no-reference.json").read_text())
    scored = {s["set_name"]: s for s in no_reference["sets"]}
    assert set(scored) == {"UIEB", "C60"} and scored["C60"]["names"] == ["1.png", "2.png"]
    restored = Restorer.from_checkpoint(tiny_checkpoint)(read_rgb(root / "test/underwater/C60/input/2.png")[None])
    assert scored["C60"]["uciqe"][1] == pytest.approx(uciqe(restored)[0], abs=1e-12)    # the restored image's own
    assert scored["C60"]["uiqm"][1] == pytest.approx(uiqm(restored)[0], abs=1e-12)
    assert "C60 (underwater)" in (tmp_path / "results/results_all_no-reference.md").read_text()
    # The saved restorations, scored as another method's (--pred), give the same numbers (8-bit either way).
    assert main(get_args(["--pred", str(tmp_path / "images"), "--data-root", str(root), *sets, "--results",
                          str(tmp_path / "pred")])) == 0
    again = {s["set_name"]: s for s in json.loads((tmp_path / "pred/results_all_no-reference.json").read_text())["sets"]}
    assert again["C60"]["uiqm"] == pytest.approx(scored["C60"]["uiqm"], abs=1e-6)
    with pytest.raises(SystemExit, match="C60 has no target/ folder: score it with --nr-metrics"):
        main(get_args(["--checkpoint", str(tiny_checkpoint), "--data-root", str(root), "--sets", "test/underwater/C60",
                       "--results", str(tmp_path / "refused")]))


def test_table_xv_compares_backbones_from_the_json_of_each_evaluation(tmp_path, capsys):
    files = []
    for backbone, parameters, psnr in (("restormer", 36_792_116, (32.0, 29.5)), ("grl", 28_920_719, (32.5, 30.0))):
        for layout, value in zip(("N+H+R", "N+H+R+B+L"), psnr):
            table = ResultTable("rgb", about=dict(backbone=backbone, patch_size=128, parameters=parameters))
            table.add("Rain100L", "derain", None, {"psnr": [value, value + 1], "ssim": [0.9, 0.95]})
            files.append(table.write(tmp_path / backbone, layout, stem=layout)[2])       # the .json
    assert main(get_args(["--table-xv", *map(str, files), "--results", str(tmp_path / "xv")])) == 0
    header, rows = markdown_cells(capsys.readouterr().out)
    assert header == ["method", "N+H+R PSNR", "N+H+R SSIM", "N+H+R+B+L PSNR", "N+H+R+B+L SSIM", "Params (M)"]
    assert list(rows["Perceive-IR grl-128"].values())[1:] == ["33.00", "0.925", "30.50", "0.925", "28.92"]
    assert rows["Perceive-IR restormer-128"]["Params (M)"] == "36.79"
    assert (tmp_path / "xv/table_xv.md").is_file()
    other = ResultTable("y", about=dict(backbone="nafnet", patch_size=128, parameters=1))
    other.add("Rain100L", "derain", None, {"psnr": [30.0], "ssim": [0.9]})
    with pytest.raises(SystemExit, match="mix metric conventions"):
        main(get_args(["--table-xv", str(files[0]), str(other.write(tmp_path / "y", "N+H+R")[2])]))


# ---------------------------------------------------------------------------------------------
# Bad input: nothing lost, one clear line, one bad image never stops the rest
# ---------------------------------------------------------------------------------------------

def photos(folder, *names):
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        Image.fromarray((np.random.default_rng(i).random((24, 28, 3)) * 255).astype(np.uint8)).save(folder / name)
    return {name: (folder / name).read_bytes() for name in names}


@pytest.mark.parametrize("output", [".", "sub"])
def test_restoring_into_the_input_folder_or_below_it_is_refused_and_the_originals_stay(tiny_checkpoint, tmp_path,
                                                                                        output):
    originals = photos(tmp_path / "mine", "a.png", "b.png")
    with pytest.raises(SystemExit, match="the originals would be overwritten") as refused:
        main(get_args(["--checkpoint", str(tiny_checkpoint), "--input", str(tmp_path / "mine"), "--output",
                       str(tmp_path / "mine" / output)]))
    assert "\n" not in str(refused.value)
    assert {p.name: p.read_bytes() for p in (tmp_path / "mine").iterdir()} == originals


def test_a_second_run_into_the_same_output_keeps_the_first_runs_perception_entries(tiny_checkpoint, tmp_path):
    photos(tmp_path / "first", "a.png")
    photos(tmp_path / "second", "b.png")
    for folder in ("first", "second"):
        assert main(get_args(["--checkpoint", str(tiny_checkpoint), "--input", str(tmp_path / folder), "--output",
                              str(tmp_path / "out")])) == 0
    report = json.loads((tmp_path / "out" / "perception.json").read_text())
    assert sorted(report) == ["a.png", "b.png"] and report["a.png"]["output"] == "a.png"
    (tmp_path / "out" / "perception.json").write_text("{broken")              # unreadable: refused, not replaced
    with pytest.raises(SystemExit, match="perception.json cannot be read"):
        main(get_args(["--checkpoint", str(tiny_checkpoint), "--input", str(tmp_path / "first"), "--output",
                       str(tmp_path / "out")]))
    assert (tmp_path / "out" / "perception.json").read_text() == "{broken"


def test_a_decompression_bomb_is_named_and_skipped_and_the_others_are_restored(tiny_checkpoint, tmp_path, capsys,
                                                                              monkeypatch):
    photos(tmp_path / "mine", "small.png")
    Image.fromarray(np.zeros((60, 60, 3), np.uint8)).save(tmp_path / "mine" / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)     # PIL refuses images over twice this: 60² is a "bomb"
    status = main(get_args(["--checkpoint", str(tiny_checkpoint), "--input", str(tmp_path / "mine"), "--output",
                            str(tmp_path / "out")]))
    out = capsys.readouterr().out
    assert status == 1 and "SKIPPED bomb.png: cannot read image" in out and "restored 1 image(s)" in out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["perception.json", "small.png"]


def test_a_corrupt_prediction_is_named_and_the_other_predictions_are_still_scored(tmp_path, capsys):
    photos(tmp_path / "data/test/derain/R/input", "1.png", "2.png")
    photos(tmp_path / "data/test/derain/R/target", "1.png", "2.png")
    pred = tmp_path / "pred" / "derain_R"                                   # the layout --save-images writes
    photos(pred, "1.png")
    (pred / "2.png").write_bytes(b"truncated")
    status = main(get_args(["--pred", str(tmp_path / "pred"), "--data-root", str(tmp_path / "data"), "--tasks", "R",
                            "--results", str(tmp_path / "results")]))
    out = capsys.readouterr().out
    assert status == 1 and re.search(r"PROBLEM: cannot read image .*2\.png", out)
    table = json.loads((tmp_path / "results" / "results_all_rgb.json").read_text())
    assert [row["names"] for row in table["sets"]] == [["1.png"]]


@pytest.mark.parametrize("flags, message", [
    (["--pred", "p"], "--pred needs targets: --data-root (its test sets) or --target FOLDER"),
    (["--pred", "no_such_folder", "--data-root", "."], "--pred no_such_folder: no such folder"),
    (["--pred", ".", "--data-root", ".", "--input", "x.png"], "--pred scores restored images, --input restores"),
    (["--input", "x.png", "--data-root", "."], "--input restores your own images, --data-root the test sets"),
    (["--device", "foo"], "--device foo: use cpu, cuda or cuda:N"),
    (["--tile", "-8"], "--tile must be ≥ 0"),
    (["--tile", "64", "--tile-overlap", "64"], "--tile-overlap must be ≥ 0 and below --tile"),
    (["--tile-overlap", "-1"], "--tile-overlap must be ≥ 0"),
    (["--prior-size", "0"], "--prior-size must be > 0"),
    (["--code-crop", "-1"], "--code-crop must be ≥ 0"),
    (["--crop-multiple", "-16"], "--crop-multiple must be ≥ 0"),
    (["--sigmas", "25", "0"], "--sigmas must be > 0"),
    (["--score-inputs", "--data-root", ".", "--as-task", "dehaze"], "--as-task steers a checkpoint's restoration"),
])
def test_bad_flags_end_in_one_line_before_any_model_is_built(flags, message):
    with pytest.raises(SystemExit, match=re.escape(message)) as refused:
        get_args(flags)
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("flag", ["--output", "--save-images", "--results"])
def test_an_output_folder_that_is_a_file_is_refused_and_the_file_stays(tmp_path, flag):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match=f"{flag} .*notes.txt: this is a file, not a folder"):
        get_args(["--input", "x.png", flag, str(tmp_path / "notes.txt")])
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_every_test_set_problem_ends_in_one_line_naming_the_data_root(tiny_checkpoint, tmp_path):
    photos(tmp_path / "data/test/derain/R/input", "1.png")
    (tmp_path / "data/test/derain/R/target").mkdir()
    Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(tmp_path / "data/test/derain/R/target/1.png")
    for root, message in ((tmp_path / "missing", "no test folder for 'derain'"), (tmp_path / "data", "size mismatch")):
        with pytest.raises(SystemExit, match=re.escape(message)) as refused:
            main(get_args(["--checkpoint", str(tiny_checkpoint), "--data-root", str(root), "--tasks", "R",
                           "--results", str(tmp_path / "results")]))
        assert str(refused.value).startswith(f"evaluate.py: --data-root {root}")


def test_a_foreign_prompts_file_ends_in_one_line(tiny_checkpoint, tmp_path):
    photos(tmp_path / "mine", "a.png")
    with pytest.raises(SystemExit, match="is not a Perceive-IR prompt checkpoint") as refused:
        main(get_args(["--checkpoint", str(tiny_checkpoint), "--input", str(tmp_path / "mine"), "--output",
                       str(tmp_path / "out"), "--prompts", str(tiny_checkpoint)]))
    assert "\n" not in str(refused.value)
