"""Claims of Sec. IV-A.4 about training, and the promises of train.py: exact resume, one DDP code path,
a clean stop on SIGTERM, a non-finite guard, and an offline demo that restores."""

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import data
import losses
import train

REPO = Path(__file__).resolve().parents[1]
TINY = ["--preset", "demo", "--patch-size", "32", "--batch-size", "2", "--probe-size", "4", "--warmup", "2",
        "--log-every", "1", "--save-every", "100", "--sample-every", "0", "--epoch-iters", "2"]


def run_main(*argv):
    train.STOP["signal"] = None
    train.main(train.get_args([str(a) for a in argv]))


def subprocess_env():
    # One thread per process: two processes on two cores must not oversubscribe OpenMP.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    """A tiny dataset and the outputs of stage 1 (medium-quality images, prompts), made once."""
    root = tmp_path_factory.mktemp("pipeline")
    data.make_demo_data(root / "data", seed=0, train_count=2, test_count=1, size_range=(48, 64))
    run_main(*TINY, "--data-root", root / "data", "--out", root / "run", "--stage", "all",
             "--medium-iters", 2, "--prompt-iters", 2, "--prompt-batch-size", 4, "--iters", 2)
    return dict(data=root / "data", medium=root / "run" / "medium" / "images",
                prompts=root / "run" / "prompt" / "prompts.pt", out=root / "run")


def restore_args(stage1, out, *extra):
    return [*TINY, "--stage", "restore", "--data-root", stage1["data"], "--medium-dir", stage1["medium"],
            "--prompts", stage1["prompts"], "--out", out, *extra]


def final_weights(out):
    return torch.load(Path(out) / "restore" / "last.pt", weights_only=True)["model"]


def test_lr_schedule_warms_up_linearly_then_follows_a_cosine_to_the_floor():
    peak, iters, warmup, floor = 2e-4, 1000, 100, 1e-6
    assert train.get_lr(0, peak, iters, warmup, floor) == pytest.approx(peak / 100)
    assert train.get_lr(99, peak, iters, warmup, floor) == pytest.approx(peak)
    assert train.get_lr(100, peak, iters, warmup, floor) == pytest.approx(peak)               # cos(0) = 1
    assert train.get_lr(550, peak, iters, warmup, floor) == pytest.approx((peak + floor) / 2)  # cos(π/2) = 0
    assert train.get_lr(1000, peak, iters, warmup, floor) == pytest.approx(floor)             # cos(π) = −1
    assert train.get_lr(5000, peak, iters, warmup, floor) == pytest.approx(floor)


def test_paper_preset_defaults_come_from_sec_iv_a4_and_the_command_line_overrides_them():
    args = train.get_args(["--data-root", "x"])
    assert (args.lr, args.batch_size, args.iters, args.patch_size) == (2e-4, 6, 400_000, 128)
    assert (args.beta1, args.beta2) == (0.9, 0.999)
    assert (args.lambda_cl, args.lambda_clip, args.lambda_dpl, args.tau) == (0.1, 0.05, 0.1, 0.1)
    assert (args.prompt_lr, args.prompt_batch_size, args.prompt_iters, args.prompt_tokens) == (4e-5, 32, 100_000, 16)
    assert (args.medium_lr, args.medium_iters, args.dpl_lambda, args.dpl_gamma) == (2e-4, 100_000, 2.0, 0.25)
    assert train.get_args(["--preset", "demo", "--lr", "0.5"]).lr == 0.5


def test_stage1_restores_every_training_image_once_by_the_model_of_the_other_fold(stage1):
    import json
    manifest = json.loads((stage1["medium"] / "manifest.json").read_text())
    samples, _ = data.scan_training_set(stage1["data"], data.TASKS)
    assert sorted((e["task"], e["key"]) for e in manifest["entries"]) == sorted((s.task, s.key) for s in samples)
    assert all(e["fold"] != e["restored_by"] for e in manifest["entries"])
    assert all((stage1["medium"] / e["path"]).is_file() for e in manifest["entries"])
    assert stage1["prompts"].is_file()


def test_checkpoint_is_one_plain_dict_loadable_with_weights_only(stage1):
    checkpoint = torch.load(stage1["out"] / "restore" / "last.pt", weights_only=True)
    assert {"stage", "args", "step", "epoch", "avg_psnr", "model", "optimizer", "rng", "git_commit"} <= set(checkpoint)
    assert checkpoint["stage"] == "restore" and checkpoint["step"] == 2 and checkpoint["args"]["iters"] == 2
    assert isinstance(checkpoint["avg_psnr"], float)                      # Eq. (10) needs it to resume
    assert {"torch", "numpy", "python"} <= set(checkpoint["rng"][0])


def test_resuming_gives_the_same_weights_as_training_straight_through(stage1, tmp_path):
    # 6 steps straight vs 3 + resume + 3; the epoch boundary (every 2 steps: avgPSNR) falls inside.
    run_main(*restore_args(stage1, tmp_path / "straight", "--iters", 6))
    run_main(*restore_args(stage1, tmp_path / "split", "--iters", 6, "--stop-after", 3))
    assert torch.load(tmp_path / "split" / "restore" / "last.pt", weights_only=True)["step"] == 3
    run_main(*restore_args(stage1, tmp_path / "split", "--iters", 6, "--resume", "auto"))
    straight, resumed = final_weights(tmp_path / "straight"), final_weights(tmp_path / "split")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_an_existing_run_is_never_overwritten_without_resume(stage1, tmp_path):
    run_main(*restore_args(stage1, tmp_path, "--iters", 1))
    with pytest.raises(SystemExit, match="--resume auto"):
        run_main(*restore_args(stage1, tmp_path, "--iters", 2))


def test_resume_rejects_a_checkpoint_of_another_stage(stage1, tmp_path):
    other = stage1["out"] / "medium" / "fold_a" / "last.pt"
    with pytest.raises(SystemExit, match="another stage"):
        run_main(*restore_args(stage1, tmp_path, "--resume", other))


def test_a_non_finite_loss_stops_the_run_naming_the_step_and_keeps_the_last_good_checkpoint(stage1, tmp_path,
                                                                                           monkeypatch):
    calls, original = [], losses.PerceiveIRLoss.__call__

    def poisoned(self, restored, batch, *rest):
        calls.append(1)
        total, parts = original(self, restored, batch, *rest)
        if len(calls) == 4:                                  # step 4 goes wrong
            parts["loss_dpl"] = parts["loss_dpl"] * float("nan")
            total = total * float("nan")
        return total, parts

    monkeypatch.setattr(losses.PerceiveIRLoss, "__call__", poisoned)
    with pytest.raises(SystemExit, match=r"non-finite loss at step 4 \(total nan.*loss_dpl nan"):
        run_main(*restore_args(stage1, tmp_path, "--iters", 8, "--save-every", 2, "--log-every", 100))
    assert torch.load(tmp_path / "restore" / "last.pt", weights_only=True)["step"] == 2


def test_sigterm_finishes_the_step_writes_a_checkpoint_and_exits_cleanly(stage1, tmp_path):
    command = [sys.executable, str(REPO / "train.py"), *map(str, restore_args(stage1, tmp_path, "--iters", 100_000))]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=subprocess_env())
    output = []
    for line in process.stdout:                               # wait until training is under way
        output.append(line)
        if line.startswith("restore [") and "2/100000" in line:
            process.send_signal(signal.SIGTERM)
            break
    output += process.stdout.readlines()
    assert process.wait(timeout=120) == 0, "".join(output)
    assert "stopped by SIGTERM" in "".join(output)
    step = torch.load(tmp_path / "restore" / "last.pt", weights_only=True)["step"]
    assert 2 <= step < 100_000


def test_two_gloo_processes_match_one_process_at_the_same_global_batch(stage1, tmp_path):
    common = [*map(str, restore_args(stage1, tmp_path, "--iters", 3, "--batch-size", 4))]
    single = [c if c != str(tmp_path) else str(tmp_path / "one") for c in common]
    double = [c if c != str(tmp_path) else str(tmp_path / "two") for c in common]
    env = subprocess_env()
    for command in ([sys.executable, str(REPO / "train.py"), *single],
                    [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                     str(REPO / "train.py"), *double]):
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "global batch 4 = 2 × 2 per process" in result.stdout
    one, two = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    # Adam moves every weight by about lr = 1e-3 per step, so a wrong split of the batch, of L_cl's
    # negatives or of avgPSNR shows as differences of ~1e-3; the order of the gradient all-reduce
    # alone leaves ~1e-5 (Adam normalises the tiny gradients of the zero-initialised PGM maps too).
    assert max((one[k] - two[k]).abs().max().item() for k in one) < 1e-4


def test_the_offline_demo_restores_better_than_its_inputs(tmp_path, capsys):
    run_main("--preset", "demo", "--out", tmp_path, "--medium-iters", 40, "--prompt-iters", 50, "--iters", 150,
             "--log-every", 50)
    report = capsys.readouterr().out
    gain = float(re.search(r"mean gain over the inputs: ([+-][\d.]+) dB", report).group(1))
    assert gain > 0, report[-2000:]
