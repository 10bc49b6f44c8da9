"""The cost of perception, measured: the README's performance table in one command (not a test file).

    python tests/benchmark.py                      # every row, on CUDA if present (CPU: about 20 minutes)
    python tests/benchmark.py --quick              # skip the 4K and 1024² memory rows
    python tests/benchmark.py --profile [--checkpoint CKPT | --backbone-config tiny]

Every row is measured in the same run on the same machine, so the ratios compare like with like.
The steps timed are train.py's own step functions (`l1_step`, `restore_step`), not copies of them,
and there is one timer, `milliseconds`, which synchronises the device around each call.
Random weights throughout: the costs do not depend on them.
"""

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import clip_prompts  # noqa: E402  (the repository root is on the path only from here on)
import data  # noqa: E402
import losses  # noqa: E402
import train  # noqa: E402
from backbone import count_parameters  # noqa: E402
from evaluate import Restorer  # noqa: E402
from guidance import build_backbone, build_sgm  # noqa: E402


# ---------------------------------------------------------------------------------------------
# Measuring: one timer, FLOPs with a corrected convolution formula, peak memory
# ---------------------------------------------------------------------------------------------

def milliseconds(function, repeats, device):
    """Median wall time of `repeats` calls after one warm-up call, the device synchronised around each."""
    function()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        function()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def convolution_backward_flops(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                               _output_padding, _groups, output_mask, out_shape=None, **kwargs):
    """Each gradient of a convolution (input, weight) costs one forward convolution: 2·B·prod(W)·prod(S)
    with S the spatial size of the output (of the input for a transposed conv). torch's own formula
    ignores `groups` for the weight gradient and over-counts depthwise convolutions by their channel
    count: 26× on a Restormer training step."""
    forward = 2 * x_shape[0] * math.prod(w_shape) * math.prod((x_shape if transposed else grad_out_shape)[2:])
    return forward * (int(output_mask[0]) + int(output_mask[1]))


def flops_of(function):
    mapping = {torch.ops.aten.convolution_backward: convolution_backward_flops}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        function()
    return counter.get_total_flops()


def peak_memory_mb(device):
    """Peak memory of this process so far: CUDA allocations on a GPU, resident set size on a CPU.
    On Linux the peak comes from /proc/self/status (VmHWM): getrusage's ru_maxrss survives exec,
    so a fresh subprocess would report its parent's peak as its own."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    status = Path("/proc/self/status").read_text().splitlines()
    return next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) / 1024


# ---------------------------------------------------------------------------------------------
# What is measured
# ---------------------------------------------------------------------------------------------

def random_restorer(device, backbone="restormer", config="paper"):
    """The network of a config with random weights and its DINOv2 (the architecture, unloaded)."""
    dino = "base" if config == "paper" else "tiny"
    args = dict(backbone=backbone, backbone_config=config, dino=dino, no_guidance=False, no_dino=False,
                no_pgm=False, no_cfe=False)
    sgm = build_sgm(dino, random_weights=True) if dino == "base" else build_sgm(dino)
    return Restorer(train.build_model(args).to(device), sgm.to(device), args)


def prompt_step_times(device, repeats):
    """(naive, cached) ms per stage-1 step at the paper config: the cached step (bank lookup, the
    18-token text tower, Eq. 1, backward, AdamW) against the naive one (the image tower on all 96
    images of 32 triplets and the full 77-token text tower)."""
    clip_model = clip_prompts.load_clip("ViT-B-32", pretrained=None).to(device)
    learner = clip_prompts.PromptLearner(clip_model)
    optimizer = torch.optim.AdamW(learner.parameters(), lr=4e-5)                  # Sec. IV-A.4
    logit_scale = clip_model.logit_scale.exp()
    bank = torch.nn.functional.normalize(torch.randn(1000, 3, 512, device=device), dim=-1)   # 1000 crops × K
    images, labels = torch.rand(96, 3, 128, 128, device=device), torch.arange(3, device=device).repeat(32)

    def optimise(loss):
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def naive():
        with torch.no_grad():
            features = clip_model.encode_image(clip_prompts.clip_preprocess(images), normalize=True)
        optimise(clip_prompts.prompt_loss(learner, features, labels, logit_scale, truncate=False)[0])

    def cached():                                     # train.py's step on 32 cached triplets, as fit() runs it
        rows = torch.randint(len(bank), (32,), device=device)
        batch = {"features": bank[rows], "labels": torch.arange(3, device=device).expand(32, 3)}
        optimise(train.prompt_step(learner, batch, {}, logit_scale)[0])

    return milliseconds(naive, repeats, device), milliseconds(cached, 5 * repeats, device)


def restoration_step_costs(device, batch=2, patch=128, repeats=3):
    """(ms, FLOPs) of one full Perceive-IR training step (DINOv2, CFE, PGM/PGCA, the four losses, two
    non-easy negatives) and of one plain Restormer step with L1 only, paper configs, plus AdamW."""
    from torchvision.models import vgg16
    restorer = random_restorer(device)
    clip_model = clip_prompts.load_clip("ViT-B-32", pretrained=None).to(device)
    perceiver = clip_prompts.QualityPerceiver(clip_model, torch.randn(3, 512, device=device),
                                              ["excellent", "mediocre", "terrible"])
    criterion = losses.PerceiveIRLoss(losses.VGGFeatures(vgg16().features, "random VGG-16").to(device), perceiver)
    x = lambda *shape: torch.rand(*shape, 3, patch, patch, device=device)       # noqa: E731
    batch_ = dict(degraded=x(batch), positive=x(batch), target=x(batch), negatives=x(batch, 2),
                  negative_mask=torch.ones(batch, 2, dtype=torch.bool, device=device),
                  task=torch.arange(batch, device=device) % 3, stratum=torch.arange(batch, device=device) % 3)
    state = {"avg_psnr": {"a": 25.0, "b": 30.0, "c": 35.0}}

    def optimised(net, step_fn):                          # train.py's step, then what fit() adds
        optimizer = torch.optim.AdamW(net.parameters())

        def step():
            total, _ = step_fn(net, batch_, state)
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
        return step

    full = partial(train.restore_step, sgm=restorer.sgm, criterion=criterion, use_cl=True, uses_dino=True,
                   strata=["a", "b", "c"])
    steps = {"full": optimised(restorer.model.train(), full),
             "plain": optimised(build_backbone("restormer", "paper").to(device), train.l1_step)}
    return {name: (milliseconds(step, repeats, device), flops_of(step)) for name, step in steps.items()}


def memory_probe(height, width, tile, device):
    """Run in a fresh process: restore one random image of the paper config, print its peak memory."""
    restorer = random_restorer(device)
    restorer.tile = tile or None
    start = time.perf_counter()
    restorer(torch.rand(1, 3, height, width, device=device))
    print(json.dumps({"peak_mb": peak_memory_mb(device), "seconds": time.perf_counter() - start}))


def probe_in_subprocess(height, width, tile, device):
    command = [sys.executable, __file__, "--memory-probe", str(height), str(width), "--tile", str(tile),
               "--device", str(device)]                       # a fresh process: its own peak
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def loading_rate(seconds=4.0, patch_size=128):
    """Training patches per second in one process with one thread, i.e. per DataLoader worker."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        samples = data.scan_training_set(data.make_demo_data(Path(tmp) / "demo"), data.TASKS)[0]
        dataset = data.TrainDataset(samples, patch_size, resample={t: 1 for t in data.TASKS})
        order, count, start = np.random.default_rng(0).permutation(len(dataset)), 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            dataset[int(order[count % len(order)])]
            count += 1
        rate = count / (time.perf_counter() - start)
    torch.set_num_threads(threads)
    return rate


def profile(restorer, size, device, repeats=3):
    """Parameters (the Params column of Table II), FLOPs of one forward at 256², latency and peak memory."""
    frozen = count_parameters(restorer.sgm, trainable=False) if restorer.sgm is not None else 0
    flops = flops_of(lambda: restorer(torch.rand(1, 3, 256, 256, device=device)))
    image = torch.rand(1, 3, size, size, device=device)
    latency = milliseconds(lambda: restorer(image), repeats, device)
    report = {"trainable": count_parameters(restorer.model), "frozen": frozen, "flops_256": flops,
              "latency_ms": latency, "peak_mb": peak_memory_mb(device)}
    print(f"trainable parameters   {report['trainable'] / 1e6:8.2f} M   (Table II lists 42.02 M)")
    print(f"frozen parameters      {frozen / 1e6:8.2f} M   (DINOv2; CLIP and VGG-16 are used in training only)")
    print(f"FLOPs at 256×256       {flops / 1e9:8.1f} G   ({flops / 2e9:.1f} G multiply-adds)")
    print(f"latency at {size}×{size}   {latency:8.1f} ms  on {device} ({torch.get_num_threads()} CPU threads)")
    kind = "CUDA allocated" if device.type == "cuda" else "RSS"
    print(f"peak memory            {report['peak_mb']:8.0f} MB  ({kind})")
    return report


def bench(args, device):
    rows = [("what", "measured", "ratio / target")]
    naive_ms, cached_ms = prompt_step_times(device, args.repeats)
    rows.append(("stage-1 prompt step, ViT-B-32, 32 triplets of 128² crops: naive vs cached",
                 f"{naive_ms:.0f} ms vs {cached_ms:.0f} ms", f"{naive_ms / cached_ms:.1f}x (target >= 30x)"))
    costs = restoration_step_costs(device, args.batch, 128, args.repeats)
    (full_ms, full_flops), (plain_ms, plain_flops) = costs["full"], costs["plain"]
    time_ratio, flop_ratio = full_ms / plain_ms, full_flops / plain_flops
    rows.append((f"restoration step, batch {args.batch}, 128²: Perceive-IR vs Restormer+L1 (time)",
                 f"{full_ms / 1000:.2f} s vs {plain_ms / 1000:.2f} s", f"{time_ratio:.2f}x (target <= 1.6x)"))
    rows.append(("  same steps, FLOPs (torch.utils.flop_counter, grouped-conv backward corrected)",
                 f"{full_flops / 1e12:.2f} vs {plain_flops / 1e12:.2f} TFLOP",
                 f"{flop_ratio:.2f}x; time/FLOP ratio {time_ratio / flop_ratio:.2f} (target <= 1.1)"))
    small, large = (probe_in_subprocess(s, s, 0, device) for s in (256, 512))
    per_mp = (large["peak_mb"] - small["peak_mb"]) / 1024 / ((512 ** 2 - 256 ** 2) / 1e6)
    base = small["peak_mb"] / 1024 - per_mp * 256 ** 2 / 1e6
    rows.append(("whole-image inference memory, paper config (256² and 512²: a line)",
                 f"{base:.2f} GB + {per_mp:.2f} GB per megapixel", "evaluate.py's WHOLE_IMAGE_GB"))
    if not args.quick:
        for (height, width), tile in (((2160, 3840), 512), ((1024, 1024), 0)):
            probe = probe_in_subprocess(height, width, tile, device)
            rows.append((f"inference peak memory, {width}x{height}, " + (f"tiles of {tile}" if tile else "whole image"),
                         f"{probe['peak_mb'] / 1024:.2f} GB in {probe['seconds']:.0f} s",
                         "target <= 8 GB" if tile else "(reported)"))
    rows.append(("data loading, PNG, 128² crops, all five tasks", f"{loading_rate():.0f} patches/s per worker",
                 "target >= 100"))
    print(f"\nbenchmark on {device} ({torch.get_num_threads()} CPU threads, torch {torch.__version__})\n")
    for row in [rows[0], ("---",) * 3, *rows[1:]]:
        print("| " + " | ".join(row) + " |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="skip the 4K and 1024² memory rows")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per measurement (median)")
    parser.add_argument("--batch", type=int, default=2, help="per-process batch of the restoration-step row")
    parser.add_argument("--profile", action="store_true", help="parameters, FLOPs, latency and memory of one model")
    parser.add_argument("--checkpoint", help="--profile: a restore-stage checkpoint (else random weights)")
    parser.add_argument("--backbone-config", default="paper", help="--profile without --checkpoint: paper or tiny")
    parser.add_argument("--size", type=int, default=256, help="--profile: image side for latency and memory")
    parser.add_argument("--memory-probe", type=int, nargs=2, metavar=("H", "W"), help=argparse.SUPPRESS)
    parser.add_argument("--tile", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.memory_probe:
        return memory_probe(*args.memory_probe, args.tile, device)
    if args.profile:
        restorer = (Restorer.from_checkpoint(args.checkpoint, device) if args.checkpoint
                    else random_restorer(device, config=args.backbone_config))
        return profile(restorer, args.size, device, args.repeats)
    bench(args, device)


if __name__ == "__main__":
    main()
