"""The paper-scale GPU path, proven as far as a CPU can prove it: --amp bf16 keeps every loss term in float32,
--compile trains, resumes and writes plain checkpoints, every tensor of a training step and of evaluation lives on
the device it was asked for, and torchrun's restarts and several nodes give the weights of an uninterrupted run."""

import contextlib
import math
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from functools import partial

import pytest
import torch

import data
import evaluate
import guidance
import losses
import train
from test_train import REPO, final_weights, log_lines, restore_args, run_main, stage1, subprocess_env  # noqa: F401

TERMS = ("total", "loss_rec", "loss_cl", "loss_clip", "loss_dpl")


# ---------------------------------------------------------------------------------------------
# --amp bf16 and --compile
# ---------------------------------------------------------------------------------------------

def test_amp_bf16_keeps_every_loss_term_in_float32_close_to_fp32_and_l_cl_is_not_quantised(stage1, tmp_path):
    for amp in ("none", "bf16"):                  # the same initial weights and batches, on CPU autocast
        run_main(*restore_args(stage1, tmp_path / amp, "--iters", 3, "--amp", amp))
    fp32, bf16 = (log_lines(tmp_path / amp / "restore/log.jsonl") for amp in ("none", "bf16"))
    assert len(bf16) == 3 and all(math.isfinite(line[term]) for line in bf16 for term in TERMS)
    # The network runs in bf16 (8 significant bits, 0.4% per rounding) and its outputs feed the losses: the first
    # step's terms stay within 1% of fp32's (measured: 5e-4 at most).
    for term in TERMS:
        assert bf16[0][term] == pytest.approx(fp32[0][term], rel=0.01), term
    # Computed in bf16, L_cl ≈ 0.69 could only be a multiple of 1/64 (it read 44/64 = 0.6875 on this very step).
    assert abs(bf16[0]["loss_cl"] * 64 - round(bf16[0]["loss_cl"] * 64)) > 0.01, bf16[0]["loss_cl"]
    assert bf16[0]["avg_psnr"] == fp32[0]["avg_psnr"]        # Eq. (10)'s avgPSNR is measured outside autocast


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compile_trains_resumes_and_its_checkpoint_loads_strictly_into_a_plain_model(stage1, tmp_path, backend):
    run_main(*restore_args(stage1, tmp_path / "eager", "--iters", 4))
    compiled = restore_args(stage1, tmp_path / "compiled", "--iters", 4, "--compile", backend)
    run_main(*compiled, "--stop-after", 2)
    run_main(*compiled, "--resume", "auto")
    checkpoint = torch.load(tmp_path / "compiled/restore/last.pt", weights_only=True)
    assert checkpoint["step"] == 4 and checkpoint["args"]["compile"] == backend
    model = guidance.build_model(checkpoint["args"])
    model.load_state_dict(checkpoint["model"])               # strict: plain keys, no "_orig_mod." prefix
    eager = final_weights(tmp_path / "eager")
    # aot_eager runs the same kernels (equal here). Inductor fuses and reorders float arithmetic, and Adam turns a
    # near-zero gradient's rounding into a step of up to lr (2e-3 here): 1.1e-4 measured; a wrong graph is ~lr.
    tolerance = 1e-6 if backend == "aot_eager" else 5e-4
    assert max((eager[k] - checkpoint["model"][k]).abs().max().item() for k in eager) < tolerance


# ---------------------------------------------------------------------------------------------
# Device placement without a GPU: every tensor on the device asked for
# ---------------------------------------------------------------------------------------------

def device_context(device):
    """'meta' (public API, tensors without data) or 'cuda' as fake tensors (no GPU needed; private API)."""
    if device == "meta":
        return contextlib.nullcontext()
    from torch._subclasses.fake_tensor import FakeTensorMode
    return FakeTensorMode(allow_non_fake_inputs=True)


def planted_cpu_tensor(self, x, prior):
    """PGM with a classic bug: a tensor made without device=, left on the CPU."""
    gamma, beta = self.to_scale_shift(self.norm(prior)).chunk(2, dim=1)
    return x * (1 + gamma[:, :, None, None]) + beta[:, :, None, None] + torch.zeros(1, x.shape[1], 1, 1)


@pytest.mark.parametrize("device", ["meta", pytest.param("cuda", marks=pytest.mark.slow)])
@pytest.mark.parametrize("planted", [False, True])
def test_the_restore_step_and_evaluation_keep_every_tensor_on_the_device(stage1, monkeypatch, device, planted):
    args = train.get_args([str(a) for a in restore_args(stage1, stage1["out"] / "unused")])
    run = train.Run("cpu")
    frozen = train.build_frozen(args, run, ["restore"])
    frozen["perceiver"] = train.clip_prompts.QualityPerceiver.from_checkpoint(args.prompts)
    samples, _ = data.scan_training_set(args.data_root, data.TASKS)
    dataset = data.TrainDataset(samples, args.patch_size, [stage1["medium"]], sigmas=args.sigmas, seed=0)
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=2)))
    model = guidance.build_model(vars(args))
    if planted:
        monkeypatch.setattr(guidance.PGM, "forward", planted_cpu_tensor)
    mismatch = pytest.raises(Exception, match="cpu.*device|device.*cpu") if planted else contextlib.nullcontext()
    with device_context(device), mismatch:
        for network in (model, frozen["sgm"], frozen["vgg"], frozen["perceiver"]):
            network.to(device)
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        criterion = losses.PerceiveIRLoss(frozen["vgg"], frozen["perceiver"])              # all four terms
        step = partial(train.restore_step, sgm=frozen["sgm"], criterion=criterion, use_cl=True, uses_dino=True,
                       strata=dataset.strata)
        state = {"avg_psnr": {name: 20.0 + i for i, name in enumerate(dataset.strata)}}   # Eq. (10)'s weights too
        total, parts = step(model, batch, state)
        assert total.device.type == device and all(v.device.type == device for v in parts.values())
        restorer = evaluate.Restorer(model, frozen["sgm"], vars(args), overlap=8)
        image = torch.rand(1, 3, 45, 61, device=device)
        for tile in (None, 40):                                                             # whole, then tiled
            restorer.tile = tile
            assert restorer(image).device.type == device


# ---------------------------------------------------------------------------------------------
# Failure as clusters have it: a worker killed under torchrun's restarts, and two nodes
# ---------------------------------------------------------------------------------------------

def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def torchrun(stage1, out, *launcher, extra=()):
    """The README's torchrun command (with --resume auto) on the tiny config: 12 steps, last.pt every 4."""
    return [sys.executable, "-m", "torch.distributed.run", *launcher, str(REPO / "train.py"),
            *map(str, restore_args(stage1, out, "--iters", 12, "--batch-size", 4, "--save-every", 4, "--resume",
                                   "auto", *extra))]


def workers(pid):
    """The train.py processes whose parent is `pid` (torchrun's workers), read from /proc."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as stat, open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                if int(stat.read().rsplit(")", 1)[1].split()[1]) == pid and b"train.py" in cmdline.read():
                    found.append(int(entry))
        except OSError:                                 # a process that just ended
            continue
    return found


@pytest.fixture(scope="module")
def uninterrupted(stage1, tmp_path_factory):
    """One node, two processes, nothing goes wrong: the weights the other runs must reproduce."""
    out = tmp_path_factory.mktemp("uninterrupted")
    result = subprocess.run(torchrun(stage1, out, "--standalone", "--nproc_per_node=2"), capture_output=True,
                            text=True, env=subprocess_env(), timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return final_weights(out)


@pytest.mark.slow
def test_a_worker_killed_mid_run_restarts_under_torchrun_and_ends_with_the_uninterrupted_weights(
        stage1, uninterrupted, tmp_path):
    command = torchrun(stage1, tmp_path, "--standalone", "--nproc_per_node=2", "--max-restarts", "1")
    agent = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env=subprocess_env())
    lines = queue.Queue()                              # read in a thread: a hung restart fails the test, not CI
    threading.Thread(target=lambda: [lines.put(line) for line in agent.stdout] + [lines.put(None)], daemon=True).start()
    output, killed, deadline = [], False, time.monotonic() + 300
    try:
        while (line := lines.get(timeout=max(1.0, deadline - time.monotonic()))) is not None:
            output.append(line)
            if not killed and line.startswith("restore [") and " 6/12 " in line:   # past last.pt of step 4
                os.kill(max(workers(agent.pid)), signal.SIGKILL)   # one worker (the one started last): an OOM kill
                killed = True
    except queue.Empty:                                # a hung job fails the test and is not left behind
        for pid in [*workers(agent.pid), agent.pid]:
            os.kill(pid, signal.SIGKILL)
        raise AssertionError("the torchrun job hung:\n" + "".join(output)[-4000:]) from None
    assert killed and agent.wait(timeout=60) == 0, "".join(output)[-4000:]
    text = "".join(output)
    # The restarted workers continued from last.pt (step 4, or 8 if the ranks got there before the kill).
    assert re.search(r"resumed at step [48]\b", text), text[-4000:]
    resumed = final_weights(tmp_path)
    assert all(torch.equal(uninterrupted[k], resumed[k]) for k in uninterrupted)


@pytest.mark.slow
def test_two_torchrun_agents_as_two_nodes_give_the_one_node_weights(stage1, uninterrupted, tmp_path):
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [subprocess.Popen(torchrun(stage1, tmp_path, "--nnodes", "2", "--nproc_per_node", "1", "--rdzv-backend",
                                       "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "two-nodes"),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=subprocess_env())
             for _ in range(2)]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    assert any("global batch 4 = 2 × 2 per process" in o for o in outputs)
    two_nodes = final_weights(tmp_path)
    assert all(torch.equal(uninterrupted[k], two_nodes[k]) for k in uninterrupted)
