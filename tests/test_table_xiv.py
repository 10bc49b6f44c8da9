"""Table XIV: MPRNet, AirNet and PromptIR as stage 1's restoration model, each trained with its own loss or started
from released weights; PromptIR as the plain all-in-one baseline under train.py's protocol; the table itself."""

import json
import re

import pytest
import torch

import demo
import train
from evaluate import Restorer, get_args, main
from guidance import build_backbone
from networks.mprnet import MPRNet
from tables import ResultTable
from test_evaluate import markdown_cells
from test_train import TINY, final_weights, log_lines, run_main


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("xiv")
    return demo.make_demo_data(root / "data", seed=0, train_count=2, test_count=1, size_range=(48, 64))


def medium(data_root, out, restorer, *extra):
    run_main(*TINY, "--stage", "medium", "--data-root", data_root, "--out", out, "--medium-backbone", restorer,
             "--medium-iters", 10, *extra)
    return out / "medium"


@pytest.mark.parametrize("restorer, terms", [("mprnet", {"loss_rec", "loss_edge"}),   # torchvision's deformable
                                             pytest.param("airnet", {"loss_rec", "loss_contrast"},  # convolution:
                                                          marks=pytest.mark.slow),  # 10 s a step on a CPU
                                             ("promptir", {"loss_rec"})])
def test_each_restorer_of_table_xiv_makes_the_medium_images_trained_with_its_own_loss(tiny_data, tmp_path, restorer,
                                                                                    terms):
    folder = medium(tiny_data, tmp_path, restorer, "--log-every", 1, "--medium-iters", 2, "--stage1-images", 1)
    manifest = json.loads((folder / "images/manifest.json").read_text())
    assert manifest["restorer"]["restorer"] == restorer and len(manifest["entries"]) == 5    # every image, once
    assert all((folder / "images" / entry["path"]).is_file() for entry in manifest["entries"])
    network = type(build_backbone(restorer, "tiny")).__name__
    assert set(final_weights(folder, "fold_a")) == set(build_backbone(restorer, "tiny").state_dict()), network
    logged = log_lines(folder / "fold_a/log.jsonl")
    assert terms <= set(logged[-1]), logged[-1]                  # the official loss's terms, every step after warm-up
    if restorer == "airnet":                                     # the first 10% of the steps (1 of 2): the encoder
        assert "loss_rec" not in logged[0] and "loss_contrast" in logged[0]


def test_medium_weights_start_both_folds_from_a_released_checkpoint_and_a_foreign_one_is_one_line(tiny_data, tmp_path):
    released = MPRNet(**MPRNet.CONFIGS["tiny"])                  # MPRNet's release format: "module." under state_dict
    torch.save({"epoch": 250, "state_dict": {f"module.{k}": v for k, v in released.state_dict().items()}},
               tmp_path / "model_deraining.pth")
    # An LR of 1e-12 leaves the weights where they started: both folds must hold the released ones.
    folder = medium(tiny_data, tmp_path / "run", "mprnet", "--medium-config", "tiny", "--medium-weights",
                    tmp_path / "model_deraining.pth", "--medium-iters", 1, "--medium-lr", 1e-12, "--warmup", 0,
                    "--weight-decay", 0)
    for fold in ("fold_a", "fold_b"):
        weights = final_weights(folder, fold)
        assert max((weights[k] - v).abs().max().item() for k, v in released.state_dict().items()) < 1e-9
    assert json.loads((folder / "images/manifest.json").read_text())["restorer"]["weights"].endswith(".pth")
    with pytest.raises(SystemExit, match=r"--medium-weights .*model_deraining.pth: ") as refused:
        medium(tiny_data, tmp_path / "foreign", "airnet", "--medium-weights", tmp_path / "model_deraining.pth")
    assert "\n" not in str(refused.value)


def test_promptir_trains_as_the_plain_baseline_and_evaluate_rebuilds_it(tiny_data, tmp_path):
    plain = ["--stage", "restore", "--data-root", tiny_data, "--backbone", "promptir", "--lambda-cl", 0,
             "--lambda-clip", 0, "--lambda-dpl", 0, "--iters", 2]
    with pytest.raises(SystemExit, match="--backbone promptir has no ETB hook for the guidance: add --no-guidance"):
        run_main(*TINY, *plain, "--out", tmp_path / "refused")
    run_main(*TINY, *plain, "--no-guidance", "--out", tmp_path)
    restorer = Restorer.from_checkpoint(tmp_path / "restore/last.pt")      # strict: the checkpoint's own network
    assert type(restorer.model.backbone).__name__ == "PromptIR" and not restorer.model.guided
    assert restorer(torch.rand(1, 3, 37, 45)).shape == (1, 3, 37, 45)      # any size: reflect-padded to 8


def test_the_restorer_behind_the_prompts_is_recorded_through_to_the_restore_checkpoint(tiny_data, tmp_path):
    medium(tiny_data, tmp_path, "mprnet", "--medium-iters", 2)
    run_main(*TINY, "--stage", "prompt", "--data-root", tiny_data, "--out", tmp_path, "--prompt-iters", 2,
             "--prompt-batch-size", 4)
    # The restore stage runs with the default --medium-backbone; the prompts say MPRNet made their I_m.
    run_main(*TINY, "--stage", "restore", "--data-root", tiny_data, "--out", tmp_path, "--iters", 1)
    checkpoint = torch.load(tmp_path / "restore/last.pt", weights_only=True)
    assert checkpoint["args"]["medium_backbone"] == "mprnet"
    assert Restorer.from_checkpoint(tmp_path / "restore/last.pt").config["medium_backbone"] == "mprnet"


def test_table_xiv_has_a_row_per_stage_1_restorer_with_its_rain100l_scores(tmp_path, capsys):
    files = []
    for restorer, psnr in (("mprnet", 37.0), ("airnet", 36.5), ("promptir", 36.0), ("restormer", 38.0)):
        table = ResultTable("y", about=dict(backbone="restormer", patch_size=128, parameters=1,
                                            medium_backbone=restorer))
        table.add("CBSD68", "denoise", 25, {"psnr": [30.0], "ssim": [0.8]})
        table.add("Rain100L", "derain", None, {"psnr": [psnr, psnr + 1], "ssim": [0.97, 0.98]})
        files.append(table.write(tmp_path / restorer, "N+H+R")[2])
    assert main(get_args(["--table-xiv", *map(str, files), "--results", str(tmp_path / "xiv")])) == 0
    text = capsys.readouterr().out
    assert "Rain100L, PSNR/SSIM (Y" in text
    header, rows = markdown_cells(text)
    assert header == ["method", "PSNR", "SSIM"]
    assert rows["Perceive-IR (mprnet)"]["PSNR"] == "37.50" and rows["Perceive-IR (restormer)"]["SSIM"] == "0.975"
    assert list(rows) == ["Perceive-IR (mprnet)", "Perceive-IR (airnet)", "Perceive-IR (promptir)",
                          "Perceive-IR (restormer)"]                        # the order the files were given in
    assert (tmp_path / "xiv/table_xiv.md").read_text() == text.rstrip("\n") + "\n"
    with pytest.raises(SystemExit, match=re.escape("a second file for Perceive-IR (mprnet)")):
        main(get_args(["--table-xiv", str(files[0]), str(files[0])]))
    no_rain = ResultTable("y", about=dict(medium_backbone="mprnet"))
    no_rain.add("CBSD68", "denoise", 25, {"psnr": [30.0], "ssim": [0.8]})
    with pytest.raises(SystemExit, match=re.escape("needs Rain100L")):
        main(get_args(["--table-xiv", str(no_rain.write(tmp_path / "n", "N+H+R")[2])]))
    rgb = ResultTable("rgb", about=dict(medium_backbone="airnet"))
    rgb.add("Rain100L", "derain", None, {"psnr": [30.0], "ssim": [0.9]})
    with pytest.raises(SystemExit, match="mix metric conventions"):
        main(get_args(["--table-xiv", str(files[0]), str(rgb.write(tmp_path / "r", "N+H+R")[2])]))


def test_check_args_knows_every_network_of_table_xiv():
    for restorer in ("mprnet", "airnet", "promptir"):
        args = train.get_args(["--data-root", "x", "--medium-backbone", restorer])
        assert args.medium_backbone == restorer
