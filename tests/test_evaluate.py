"""Claims of Sec. IV-A.2 (PSNR/SSIM in two conventions) and the layouts of Tables II-V and IX."""

import csv
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import train
from evaluate import (AVERAGE_OF_IMAGES, AVERAGE_OF_SETS, Restorer, ResultTable, compute_metrics,
                      compute_metrics_per_image, gaussian_window, get_args, main, rgb_to_y, ssim)


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
    # The two differ by up to ~0.005 on these pairs, more than the 1e-4 tolerance: the convention
    # matters, which is why every table names it.
    differences = []
    for pair, degraded, clean in reference_pairs(shared_dir):
        y_degraded, y_clean = (rgb_to_y(image.double()[None]) for image in (degraded, clean))
        valid = ssim(y_degraded, y_clean, gaussian_window(), 255.0, sample_covariance=False).item()
        differences.append(abs(valid - pair["ssim_y"]))
    assert 1e-4 < max(differences) < 1e-2


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


@pytest.mark.parametrize("convention", ["rgb", "y"])
def test_a_batch_gives_each_images_own_metrics_and_their_mean(convention):
    restored, target = torch.rand(3, 3, 20, 24), torch.rand(3, 3, 20, 24)
    batch = compute_metrics_per_image(restored, target, convention)
    singles = [compute_metrics(r, t, convention) for r, t in zip(restored, target)]
    for name in ("psnr", "ssim"):
        assert batch[name] == pytest.approx([s[name] for s in singles], abs=1e-12)
        assert compute_metrics(restored, target, convention)[name] == pytest.approx(
            sum(s[name] for s in singles) / 3, abs=1e-12)


@pytest.mark.parametrize("convention", ["rgb", "y"])
def test_restored_values_outside_0_1_are_clamped_as_when_saving_the_image(convention):
    target = torch.rand(3, 16, 16)
    overshoot = target * 1.6 - 0.3                       # a network output beyond [0, 1]
    assert compute_metrics(overshoot, target, convention) == compute_metrics(overshoot.clamp(0, 1), target, convention)


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
    table.add("CBSD68", "denoise", 15, [30.0, 32.0], [0.80, 0.90])
    table.add("CBSD68", "denoise", 25, [28.0], [0.70])
    table.add("SOTS-outdoor-mini", "dehaze", None, [20.0, 22.0], [0.90, 0.92])
    table.add("SOTS-outdoor-mini", "dehaze", None, [24.0], [0.94])   # a second batch of the same set
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
    one_task.add("Rain100L", "derain", None, [38.0], [0.98])              # a One-by-One derain model
    header, _ = markdown_cells(one_task.markdown("one-by-one"))
    assert header[1:] == ["Rain100L", AVERAGE_OF_SETS, AVERAGE_OF_IMAGES]
    header, _ = markdown_cells(table.markdown(None))                       # every set, in order
    assert header[1:4] == ["CBSD68 σ=15 (denoise)", "CBSD68 σ=25 (denoise)", "SOTS-outdoor-mini (dehaze)"]


def test_csv_and_json_are_written_atomically_and_round_trip(tmp_path):
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
    assert ResultTable.from_json(data).markdown("N+H+R") == table.markdown("N+H+R")


@pytest.mark.parametrize("args, message", [
    (("CBSD68", "denoise", None, [30.0], [0.9]), "σ must be given"),
    (("SOTS", "dehaze", 25, [30.0], [0.9]), "σ must be given"),
    (("SOTS", "dehazing", None, [30.0], [0.9]), "unknown task"),
    (("SOTS", "dehaze", None, [30.0, 31.0], [0.9]), "as many PSNR as SSIM"),
])
def test_inconsistent_results_are_rejected_when_added(args, message):
    with pytest.raises(ValueError, match=message):
        ResultTable("rgb").add(*args)


def test_two_sets_for_one_column_are_an_error_not_a_silent_choice():
    table = hand_made_table()
    table.add("SOTS-indoor-mini", "dehaze", None, [15.0], [0.8])
    with pytest.raises(ValueError, match="layout=None"):
        table.markdown("N+H+R")
    with pytest.raises(ValueError, match="unknown table layout"):
        table.markdown("Table II")


# ---------------------------------------------------------------------------------------------
# Inference: checkpoints, tiles, your own images, torchrun sharding (issue 8)
# ---------------------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A restore-stage checkpoint of the demo's tiny network, as train.py writes it."""
    torch.manual_seed(0)
    args = vars(train.get_args(["--preset", "demo"]))
    model = train.build_model(args)
    with torch.no_grad():                                      # leave the identity start of PGM
        for name, p in model.named_parameters():
            if "to_scale_shift" in name:
                p.normal_(std=0.05)
    path = tmp_path_factory.mktemp("checkpoint") / "last.pt"
    train.save_checkpoint(path, {"stage": "restore", "args": args, "model": model.state_dict(), "ema": None,
                                 "step": 1, "epoch": 0, "avg_psnr": 20.0, "optimizer": {}, "rng": []})
    return path


def small_benchmark(shared_dir, root):
    """Two CBSD68 images and three Rain100L pairs in the generic layout."""
    for name in ("101085.png", "101087.png"):
        (root / "test/denoise/CBSD68").mkdir(parents=True, exist_ok=True)
        shutil.copy(shared_dir / "data/test/denoise/CBSD68" / name, root / "test/denoise/CBSD68" / name)
    for folder in ("input", "target"):
        (root / "test/derain/Rain100L" / folder).mkdir(parents=True, exist_ok=True)
        for name in ("1.png", "2.png", "3.png"):
            shutil.copy(shared_dir / "data/test/derain/Rain100L" / folder / name, root / "test/derain/Rain100L" / folder / name)
    return root


def test_tiled_restoration_matches_the_whole_image_within_a_stated_tolerance(tiny_checkpoint):
    restorer = Restorer.from_checkpoint(tiny_checkpoint, tile=None)
    image = torch.rand(1, 3, 150, 200)
    whole = restorer(image)
    restorer.tile, restorer.overlap = 64, 16
    tiled = restorer(image)
    # The priors F_l and Z come from the whole image either way; only the context of the channel
    # attention differs (global per tile). Stated tolerance: mean |difference| under 2% of the range,
    # for an untrained network on uniform noise with 64-px tiles (real use: 512-px tiles).
    assert (tiled - whole).abs().mean().item() < 0.02


def test_end_to_end_evaluation_of_a_tiny_checkpoint_on_shared_test_images(shared_dir, tiny_checkpoint, tmp_path):
    root = small_benchmark(shared_dir, tmp_path / "data")
    main(get_args(["--checkpoint", str(tiny_checkpoint), "--data-root", str(root), "--tasks", "N+R",
                   "--sigmas", "25", "--results", str(tmp_path / "results"), "--save-images", str(tmp_path / "out")]))
    table = json.loads((tmp_path / "results" / "results_all_rgb.json").read_text())
    sets = {(s["set_name"], s["sigma"]): s for s in table["sets"]}
    assert len(sets[("CBSD68", 25.0)]["psnr"]) == 2 and len(sets[("Rain100L", None)]["psnr"]) == 3
    assert all(5 < p < 60 for s in sets.values() for p in s["psnr"])
    restored = read_rgb(tmp_path / "out" / "derain_Rain100L" / "1.png")
    target = read_rgb(root / "test/derain/Rain100L/target/1.png")
    assert compute_metrics(restored, target)["psnr"] == pytest.approx(sets[("Rain100L", None)]["psnr"][0], abs=0.05)


def test_two_ranks_shard_the_test_images_and_give_the_one_process_table(shared_dir, tiny_checkpoint, tmp_path):
    root = small_benchmark(shared_dir, tmp_path / "data")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    common = ["--checkpoint", str(tiny_checkpoint), "--data-root", str(root), "--tasks", "R", "--conventions", "rgb"]
    for name, launcher in (("one", [sys.executable]),
                           ("two", [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"])):
        result = subprocess.run([*launcher, str(REPO / "evaluate.py"), *common, "--results", str(tmp_path / name)],
                                capture_output=True, text=True, env=env, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
    one, two = (json.loads((tmp_path / n / "results_one-by-one_rgb.json").read_text()) for n in ("one", "two"))
    assert sorted(one["sets"][0]["psnr"]) == pytest.approx(sorted(two["sets"][0]["psnr"]), abs=1e-4)


def test_your_own_images_in_any_format_come_back_as_png_with_their_names(tiny_checkpoint, tmp_path, capsys):
    from PIL import Image
    folder = tmp_path / "mine"
    folder.mkdir()
    pixels = (np.random.default_rng(0).random((37, 53, 3)) * 255).astype(np.uint8)
    for name in ("a.png", "b.jpg", "c.bmp", "d.tiff", "e.webp"):
        Image.fromarray(pixels).save(folder / name)
    (folder / "notes.txt").write_text("not an image")
    main(get_args(["--checkpoint", str(tiny_checkpoint), "--input", str(folder), "--output", str(tmp_path / "out"),
                   "--grid"]))
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == sorted([f"{s}.png" for s in "abcde"] + [f"{s}_grid.png" for s in "abcde"])
    assert read_rgb(tmp_path / "out" / "d.png").shape == (3, 37, 53)
    assert capsys.readouterr().out.count("restored in") == 5


def test_bad_checkpoints_give_clear_errors(tiny_checkpoint, tmp_path):
    corrupt, foreign, other_stage, mismatched = (tmp_path / f"{n}.pt" for n in ("corrupt", "foreign", "stage", "mismatch"))
    corrupt.write_bytes(b"not a checkpoint at all")
    torch.save({"weights": torch.zeros(1)}, foreign)
    checkpoint = torch.load(tiny_checkpoint, weights_only=True)
    torch.save({**checkpoint, "stage": "medium-a"}, other_stage)
    torch.save({**checkpoint, "args": {**checkpoint["args"], "backbone": "nafnet"}}, mismatched)
    for path, message in ((corrupt, "not a readable checkpoint"), (foreign, "not a Perceive-IR training checkpoint"),
                          (other_stage, "'medium-a' checkpoint"), (mismatched, "does not match the model"),
                          (tmp_path / "missing.pt", "file not found")):
        with pytest.raises(SystemExit, match=message):
            Restorer.from_checkpoint(path)


def test_profile_prints_parameters_flops_latency_and_memory(capsys):
    main(get_args(["--profile", "--backbone-config", "tiny", "--size", "64", "--repeats", "1"]))
    report = capsys.readouterr().out
    for field_name in ("trainable parameters", "frozen parameters", "FLOPs at 256×256", "latency at 64×64", "peak memory"):
        assert field_name in report


def test_flop_count_of_a_depthwise_convolution_backward_is_two_forwards():
    # Forward of a 3×3 depthwise conv on (2, 16, 10, 10): 2·B·C·(C/groups)·9·H·W = 2·2·16·1·9·100.
    from evaluate import flops_of
    conv = torch.nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)
    x = torch.rand(2, 16, 10, 10, requires_grad=True)
    forward = 2 * 2 * 16 * 1 * 9 * 100
    assert flops_of(lambda: conv(x)) == forward
    assert flops_of(lambda: conv(x).sum().backward()) == 3 * forward     # + grad of input and of weight
