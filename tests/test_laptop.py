"""The laptop preset and the weights it made: `python train.py --preset laptop --data-root DATA` trains every stage on
the real shared images (haze and blur synthesized), and the shipped checkpoint restores a real test image on a fresh
machine with no --checkpoint."""

import hashlib
import json
import re
from pathlib import Path

import pytest
import torch

import data
import evaluate
import train
from metrics import compute_metrics_per_image

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def test_the_shipped_weights_are_small_weights_only_and_match_the_readmes_sha256():
    path = evaluate.SHIPPED_WEIGHTS
    assert path.is_file() and path.stat().st_size <= 20 * 2 ** 20
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)          # plain tensors and numbers
    assert checkpoint["stage"] == "restore" and "optimizer" not in checkpoint and "rng" not in checkpoint
    assert checkpoint["args"]["preset"] == "laptop" and checkpoint["step"] == checkpoint["args"]["iters"]
    assert checkpoint["centroids"]["tasks"] == list(data.TASKS)                    # what evaluate.py perceives with
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert f"sha256 {digest}" in README, "the README must give the shipped file's sha256"


def test_with_no_checkpoint_evaluate_restores_a_real_low_light_image_with_the_shipped_weights(shared_dir, tmp_path,
                                                                                             capsys):
    dark = shared_dir / "data/test/lowlight/LOL-eval15/input/22.png"
    target = data.read_image(shared_dir / "data/test/lowlight/LOL-eval15/target/22.png")[None]
    status = evaluate.main(evaluate.get_args(["--input", str(dark), "--output", str(tmp_path)]))
    out = capsys.readouterr().out
    assert status == 0
    assert "no --checkpoint: using the shipped laptop weights weights/laptop/perceive-ir-laptop.pt" in out
    restored = data.read_image(tmp_path / "22.png")[None]
    before, after = (compute_metrics_per_image(image, target, "rgb")["psnr"][0]
                     for image in (data.read_image(dark)[None], restored))
    assert after > before + 5, f"the shipped weights: {before:.2f} -> {after:.2f} dB on LOL-eval15 22.png"
    assert json.loads((tmp_path / "perception.json").read_text())["22.png"]["task"] == "lowlight"


def test_in_the_shipped_weights_z_switches_low_light_enhancement_on_and_off(shared_dir):
    """--as-task on a real LOL-eval15 image: told "denoise" the network leaves it dark, told "lowlight" it
    brightens it as it does when it perceives low light itself (README, "what Z steers")."""
    dark = data.read_image(shared_dir / "data/test/lowlight/LOL-eval15/input/22.png")[None]
    target = data.read_image(shared_dir / "data/test/lowlight/LOL-eval15/target/22.png")[None]
    restorer = evaluate.Restorer.from_checkpoint(evaluate.SHIPPED_WEIGHTS)
    psnr = {}
    for task in (None, "denoise", "lowlight"):
        restorer.steer(task)                                          # None: as perceived
        psnr[task] = compute_metrics_per_image(restorer(dark), target, "rgb")["psnr"][0]
    before = compute_metrics_per_image(dark, target, "rgb")["psnr"][0]
    assert psnr[None] > before + 5, psnr                                  # perceived as low light: enhanced
    assert abs(psnr["denoise"] - before) < 1, psnr                        # told "denoise": left dark, as it came
    assert psnr["lowlight"] > before + 5 and abs(psnr["lowlight"] - psnr[None]) < 2, psnr   # told "lowlight"


@pytest.mark.slow
def test_the_laptop_preset_runs_every_stage_on_the_shared_data(shared_dir, tmp_path, capsys):
    """The preset's wiring, a few steps of each stage (the README's hour-long run has the real figures)."""
    args = train.get_args(["--preset", "laptop", "--data-root", str(shared_dir / "data"), "--out", str(tmp_path),
                           "--medium-iters", "2", "--prompt-iters", "2", "--iters", "2", "--stage1-images", "2",
                           "--log-every", "1"])
    assert (args.dino, args.clip_model, args.vgg) == ("tiny", "tiny", "tiny")       # 'auto' without weight files
    assert args.medium_config == "tiny" and args.backbone_config == "laptop"
    train.STOP["signal"] = None
    train.main(args)
    out = capsys.readouterr().out
    found = dict(re.findall(r"data: (\w+): (\d+) images \(", out))
    assert found == {"denoise": "832", "dehaze": "832", "derain": "70", "deblur": "832", "lowlight": "36"}
    assert "synthesized from generic denoise layout" in out
    assert "medium: 10 medium-quality images I_m" in out                        # 2 per task in stage 1
    checkpoint = torch.load(tmp_path / "restore/last.pt", weights_only=True)
    assert checkpoint["step"] == 2 and checkpoint["args"]["lambda_dpl"] == 0      # a random VGG's L_dpl: off, so
    assert checkpoint["avg_psnr"] is None and "VGG" not in out                  # no VGG and no Eq. (10) probe
    assert re.search(r"done in \d+ s", out)


@pytest.mark.slow
def test_on_the_real_training_crops_l_cl_teaches_an_instance_normalised_cfe_the_five_tasks(shared_dir):
    """CFE of the laptop width trained by L_cl alone on the preset's own crops, 4 a step (README, "What Z learns"):
    with --cfe-norm instance its codes part within 500 steps, and held-out crops find their task's centroid."""
    from guidance import CFE_WIDTHS, CFE
    from losses import contrastive_loss
    torch.set_num_threads(1)                                        # the same figures with any number of cores
    args = train.get_args(["--preset", "laptop", "--data-root", str(shared_dir / "data")])
    samples, _ = data.scan_training_set(args.data_root, data.parse_tasks(args.tasks),
                                        synthesize=data.parse_tasks(args.synthesize))
    crops = data.TrainDataset(samples, args.patch_size, resample=data.parse_resample(args.resample), seed=0)
    held_out = data.TrainDataset(samples, args.patch_size, resample=data.parse_resample(args.resample), seed=1)
    picks = torch.randint(len(held_out), (300,), generator=torch.Generator().manual_seed(1)).tolist()
    items = [held_out[i] for i in picks]
    images, task = torch.stack([item["degraded"] for item in items]), torch.stack([item["task"] for item in items])
    cfe = CFE(CFE_WIDTHS["laptop"], norm="instance")
    optimizer = torch.optim.AdamW(cfe.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    order, seen = torch.randint(len(crops), (500, 4), generator=torch.Generator().manual_seed(0)), []
    for step in order.tolist():
        batch = [crops[i] for i in step]
        code, code_positive = cfe(torch.stack([b["degraded"] for b in batch] + [b["positive"] for b in batch])).chunk(2)
        loss, _ = contrastive_loss(code, code_positive, torch.stack([b["task"] for b in batch]), args.tau)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        seen.append(loss.item())
    with torch.no_grad():
        codes = torch.nn.functional.normalize(cfe.eval()(images), dim=1)
    half = len(codes) // 2                                          # centroids from one half, scored on the other
    centroids = torch.stack([codes[:half][task[:half] == t].mean(0) for t in range(len(data.TASKS))])
    right = ((codes[half:] @ centroids.T).argmax(1) == task[half:]).float().mean().item()
    first, last = sum(seen[:100]) / 100, sum(seen[-100:]) / 100
    # Measured (one thread): 0.72 → 0.21, 63% right (chance 20%); the same without a norm: 0.92 → 0.96, 23%.
    assert last < 0.6 * first and right >= 0.5, (first, last, right)
