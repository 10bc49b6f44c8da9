"""The paper's figures from a run's own outputs: the comparison's insets are the saved images' crops, the charts
plot the numbers evaluate.py wrote, the PCA plot plots the codes Z that evaluate.py perceives with, and the curves
plot the logged values."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import checkpoints
import data
import figures
import guidance
import train
from evaluate import Restorer
from metrics import compute_metrics_per_image


def write(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


@pytest.fixture
def saved_methods(tmp_path):
    """A paired test set (task "derain", set "R") and two methods' restorations in the --pred layout."""
    rng = np.random.default_rng(0)
    target = (rng.random((40, 48, 3)) * 255).astype(np.uint8)
    for name in ("1.png", "2.png"):
        write(tmp_path / "data/test/derain/R/target" / name, target)
        write(tmp_path / "data/test/derain/R/input" / name, (target * 0.5).astype(np.uint8))
        good = target.copy()
        good[20:30, 30:40] = 0                                         # methods differ in this 10 × 10 region only
        write(tmp_path / "ours/derain_R" / name, good)
        write(tmp_path / "other/derain_R" / name, target)
    return tmp_path


def test_the_comparison_inset_is_the_enlarged_crop_of_each_saved_image_in_the_given_column_order(saved_methods):
    test_set = figures.find_test_set(saved_methods / "data", "derain_R")
    methods = [("Other", saved_methods / "other"), ("Ours", saved_methods / "ours")]
    rows = figures.comparison_panels(test_set, ["2.png"], methods, box=(8, 12, 10, 10))    # top, left, h, w
    name, box, columns = rows[0]
    assert name == "2.png" and [label for label, _, _ in columns] == ["Input", "Other", "Ours", "Target"]
    files = [saved_methods / "data/test/derain/R/input/2.png", saved_methods / "other/derain_R/2.png",
             saved_methods / "ours/derain_R/2.png", saved_methods / "data/test/derain/R/target/2.png"]
    for (label, panel, caption), path in zip(columns, files):
        image = np.asarray(Image.open(path), dtype=np.float32) / 255
        enlarged = np.repeat(np.repeat(image[8:18, 12:22], 4, 0), 4, 1)          # 48 px wide / 10 px → ×4
        zoom = panel[-40:, 4:44]                                                  # centred: (48 − 40) / 2 = 4
        assert np.array_equal(zoom, enlarged), label
        assert np.array_equal(panel[:40, :, :][20:30, 30:40], image[20:30, 30:40])    # outside the box: untouched
    target = torch.from_numpy(np.asarray(Image.open(files[-1]), dtype=np.float32) / 255).permute(2, 0, 1)[None]
    ours = torch.from_numpy(np.asarray(Image.open(files[2]), dtype=np.float32) / 255).permute(2, 0, 1)[None]
    metrics = compute_metrics_per_image(ours, target, "rgb")
    assert columns[2][2] == f"{metrics['psnr'][0]:.2f} dB / {metrics['ssim'][0]:.4f}" and columns[3][2] == ""


def test_the_automatic_inset_lands_where_the_methods_differ_and_the_command_writes_png_and_pdf(saved_methods):
    out = saved_methods / "fig.png"
    figures.main(["compare", "--data-root", str(saved_methods / "data"), "--set", "derain_R", "--images", "1.png",
                  "2.png", "--methods", f"Ours={saved_methods / 'ours'}", f"Other={saved_methods / 'other'}",
                  "--box-size", "10", "--out", str(out)])
    assert out.is_file() and out.with_suffix(".pdf").is_file() and Image.open(out).size[0] > 400
    test_set = figures.find_test_set(saved_methods / "data", "derain_R")
    rows = figures.comparison_panels(test_set, ["1.png"], [("Ours", saved_methods / "ours"),
                                                           ("Other", saved_methods / "other")], box_size=10)
    top, left, height, width = rows[0][1]
    assert abs(top - 20) <= 3 and abs(left - 30) <= 3 and (height, width) == (10, 10)


def test_a_missing_image_in_one_methods_folder_is_named_with_its_method(saved_methods):
    (saved_methods / "other/derain_R/2.png").unlink()
    with pytest.raises(SystemExit, match=r"method Other: no restored image .*other/derain_R/2.png"):
        figures.main(["compare", "--data-root", str(saved_methods / "data"), "--set", "derain_R", "--images",
                      "2.png", "--methods", f"Ours={saved_methods / 'ours'}", f"Other={saved_methods / 'other'}",
                      "--out", str(saved_methods / "fig.png")])


def results_json(path, method, sets):
    means = [np.mean(values) for _, _, values in sets]
    path.write_text(json.dumps({"method": method, "convention": "rgb", "averages": {
        figures.AVERAGE: {"psnr": float(np.mean(means)), "lpips": 0.1 * len(method)}},
        "sets": [{"set_name": name, "task": "denoise", "sigma": sigma, "psnr": values} for name, sigma, values
                 in sets]}))
    return path


def test_the_charts_plot_the_numbers_of_the_results_jsons(tmp_path):
    a = results_json(tmp_path / "a.json", "A", [("CBSD68", 25, [30.0, 32.0]), ("Rain100L", None, [35.0])])
    b = results_json(tmp_path / "b.json", "Bee", [("CBSD68", 25, [29.0, 29.0]), ("Rain100L", None, [36.0])])
    figure, labels, values = figures.chart_tasks(figures.read_results([a, b]))
    assert labels == ["CBSD68 σ25", "Rain100L"] and values == {"A": [31.0, 35.0], "Bee": [29.0, 36.0]}
    heights = [bar.get_height() for bar in figure.axes[0].patches]
    assert heights == [31.0, 35.0, 29.0, 36.0]
    _, lpips = figures.chart_methods(figures.read_results([a, b]), "lpips")
    assert lpips == pytest.approx({"A": 0.1, "Bee": 0.3})
    figure, averages = figures.chart_sweep(figures.read_results([a, b]), [0.0, 0.05], "λ2")
    assert averages == [33.0, 32.5] and list(figure.axes[0].lines[0].get_ydata()) == [33.0, 32.5]
    with pytest.raises(SystemExit, match="no 'ssim_x'"):
        figures.chart_methods(figures.read_results([a]), "ssim_x")


def test_the_pca_points_are_the_codes_z_that_evaluate_perceives_with(tmp_path):
    torch.manual_seed(0)
    args = vars(train.get_args(["--preset", "demo"]))
    model = guidance.build_model(args)
    images = [(task, torch.rand(3, 32, 32) * scale) for task, scale in (("derain", 1.0), ("lowlight", 0.1))
              for _ in range(3)]
    checkpoints.save_checkpoint(tmp_path / "ckpt.pt", {"stage": "restore", "args": args, "model": model.state_dict(),
                                                       "step": 1, "centroids": guidance.degradation_centroids(
                                                           model.eval(), images)})
    for task, scale in (("derain", 1.0), ("lowlight", 0.15)):
        for i in range(3):
            image = (np.random.default_rng(i).random((24, 32, 3)) * 255 * scale).astype(np.uint8)
            write(tmp_path / f"data/test/{task}/S/input/{i}.png", image)
            write(tmp_path / f"data/test/{task}/S/target/{i}.png", image)
    restorer = Restorer.from_checkpoint(tmp_path / "ckpt.pt")
    test_sets = data.build_test_sets(tmp_path / "data", ("derain", "lowlight"))
    rows = figures.perceived_codes(restorer, test_sets)
    right = {"derain": 0, "lowlight": 0}
    for row, (test_set, index) in zip(rows, [(s, i) for s in test_sets for i in range(len(s))]):
        degraded = test_set[index]["degraded"][None]
        perceived = guidance.perceive(restorer.model, restorer.centroids, degraded)[0]          # evaluate.py's view
        similarity = row["code"] @ restorer.centroids["centroids"].T
        assert similarity.tolist() == pytest.approx(list(perceived["similarity"].values()), abs=1e-5)
        right[row["task"]] += perceived["task"] == row["task"]
    report = figures.perception_report(rows, restorer.centroids)
    assert f"derain    {right['derain']:3d}/3" in report and f"lowlight  {right['lowlight']:3d}/3" in report
    figure, points = figures.perceived(rows, restorer.centroids)
    codes = torch.stack([r["code"] for r in rows]).double().numpy()
    centred = codes - codes.mean(0)
    _, _, axes = np.linalg.svd(centred, full_matrices=False)
    expected = centred @ axes[:2].T
    assert np.allclose(np.abs(points), np.abs(expected), atol=1e-4)                     # PCA up to the sign of an axis
    plotted = np.concatenate([c.get_offsets() for c in figure.axes[0].collections[:2]])   # the two tasks' points
    assert np.allclose(plotted, points, atol=1e-6)


def test_the_curves_plot_the_logged_values(tmp_path):
    log = tmp_path / "log.jsonl"
    lines = [{"step": s, "total": 1.0 / s, "loss_rec": 0.5 / s, "lr": 1e-3 * s,
              "avg_psnr": {"derain": 20.0 + s, "denoise_sigma25": 1.0}, "very_hard_fraction": {"all": 0.1 * s}}
             for s in (1, 2, 3)]
    log.write_text("".join(json.dumps(line) + "\n" for line in lines))
    figure, series = figures.curves(log)
    assert series["loss_rec"] == ([1, 2, 3], [0.5, 0.25, 0.5 / 3]) and series["avgPSNR derain"][1] == [21, 22, 23]
    assert "avgPSNR denoise_sigma25" not in series                                 # σ strata stay in the log
    losses, psnr, share, lr = figure.axes
    assert [list(line.get_ydata()) for line in losses.lines] == [[1.0, 0.5, 1 / 3], [0.5, 0.25, 0.5 / 3]]
    assert list(psnr.lines[0].get_ydata()) == [21, 22, 23] and list(share.lines[0].get_ydata()) == [0.1, 0.2,
                                                                                                    0.30000000000000004]
    assert list(lr.lines[0].get_ydata()) == [1e-3, 2e-3, 3e-3]
    figures.main(["curves", str(log), "--out", str(tmp_path / "curves.png")])
    assert (tmp_path / "curves.png").is_file() and (tmp_path / "curves.pdf").is_file()
