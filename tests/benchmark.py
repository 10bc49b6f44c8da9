"""The cost of perception, measured: the README's performance table in one command (not a test file).

    python tests/benchmark.py                      # every row, on CUDA if present (CPU: about 20 minutes)
    python tests/benchmark.py --quick              # skip the 4K and 1024² memory rows
    python tests/benchmark.py --profile [--checkpoint CKPT | --backbone-config tiny]
    python tests/benchmark.py --memory             # GPU memory of a paper training step and of a whole-image pass,
                                                   # counted on fake tensors: any CPU, no GPU needed (~1.5 min)
    python tests/benchmark.py --gpu [--json FILE]  # on a GPU (< 8 minutes): the demo in fp32, bf16, bf16 + compile;
                                                   # the paper step's time and memory; DDP on two GPUs if present
    python tests/benchmark.py --gpu --device cpu --quick   # the --gpu code end to end on a CPU: a smoke run only
    python tests/benchmark.py --loading DATA_ROOT  # the laptop preset's data loading, files vs --cache-mb (~1 min)

Every row is measured in the same run on the same machine, so the ratios compare like with like.
The steps timed are train.py's own (`train_step` around `l1_step` or `restore_step`), not copies of them,
the paper-config step is assembled in one place (`PaperStep`), and there is one timer, `milliseconds`,
which synchronises the device around each call. Memory without a GPU is counted by `MemoryCounter` on fake
tensors, which have shapes, dtypes and devices but no data. Random weights throughout: the costs do not depend on them.
"""

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import weakref
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import clip_prompts  # noqa: E402  (the repository root is on the path only from here on)
import data  # noqa: E402
import demo  # noqa: E402
import losses  # noqa: E402
import train  # noqa: E402
from backbone import count_parameters  # noqa: E402
from evaluate import Restorer  # noqa: E402
from guidance import build_backbone, build_model, build_sgm  # noqa: E402

GB = 2 ** 30                                       # "GB" below: GiB, as torch.cuda and nvidia-smi count
PRECISIONS = {"none": "fp32", "bf16": "bf16"}      # train.py's --amp values and their names here


# --- Measuring: one timer, FLOPs with a corrected convolution formula, peak memory ---------------------------------

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


class MemoryCounter(TorchDispatchMode):
    """Peak bytes of tensor storage while active: what the caching allocator would be asked for, on any device.

    Every output of every op is counted once per storage, and released when that storage dies: its Python object
    lives as long as the C++ storage does (PyTorch keeps it alive), so a storage autograd saved for backward stays
    counted after the last Python tensor on it is gone. Tensors made before (weights, optimiser state, the batch)
    are counted by `track`. It counts fake tensors, which hold no memory, so a paper-scale step is measured on any
    CPU; on real CPU tensors it gives the peak the CPU allocator records (tests/test_benchmark.py). Not counted:
    memory a kernel allocates without returning it (cuDNN and cuBLAS workspaces).
    """

    def __init__(self):
        super().__init__()
        self.live, self.current, self.peak = {}, 0, 0                    # {storage: bytes}, bytes now, most bytes

    def track(self, *tensors):
        for tensor in tensors:
            storage = tensor.untyped_storage()
            key, size = storage._cdata, storage.nbytes()                 # the address of the C++ storage
            if key not in self.live:
                self.live[key] = 0
                weakref.finalize(storage, self.release, key)
            if size > self.live[key]:                                     # new, or resized in place
                self.current += size - self.live[key]
                self.live[key] = size
                self.peak = max(self.peak, self.current)

    def release(self, key):
        self.current -= self.live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        outputs = func(*args, **(kwargs or {}))
        self.track(*(t for t in tree_leaves(outputs) if isinstance(t, torch.Tensor)))
        return outputs


def make_fake(mode, *modules):
    """Swap every weight of `modules` for a fake tensor of the same shape, in place. (timm's and open_clip's
    initialisers read values, so the networks are built for real on the CPU first.)"""
    for module in modules:
        module._apply(mode.from_tensor)


def weights(*modules):
    return [t for module in modules for t in (*module.parameters(), *module.buffers())]


# --- What is measured ----------------------------------------------------------------------------------------------

def random_restorer(device, backbone="restormer", config="paper"):
    """The network of a config with random weights and its DINOv2 (the architecture, unloaded)."""
    dino = "base" if config == "paper" else "tiny"
    args = dict(backbone=backbone, backbone_config=config, dino=dino, no_guidance=False, no_dino=False,
                no_pgm=False, no_cfe=False)
    sgm = build_sgm(dino, random_weights=True) if dino == "base" else build_sgm(dino)
    return Restorer(build_model(args).to(device), sgm.to(device), args)


class PaperStep:
    """The restoration step of Eq. (13) as train.py's run_restore assembles it, with random weights: Perceive-IR
    (Restormer, trainable) and, frozen beside it on the same device, DINOv2 ViT-B/14, CLIP ViT-B/32's image tower
    (L_clip) and VGG-16 (L_dpl); all four losses, Eq. (10)'s weights active. `batch(n)`: n crops of 128² with their
    L_cl positive crop and two non-easy negatives. config "tiny": the demo's networks (tests)."""

    STRATA = ["a", "b", "c"]                        # three tasks' avgPSNR strata (Eq. 10)

    def __init__(self, device, config="paper"):
        from torchvision.models import vgg16
        restorer = random_restorer(device, config=config)
        clip_model = clip_prompts.load_clip("ViT-B-32" if config == "paper" else "tiny", pretrained=None)
        prompts = torch.randn(3, clip_model.visual.output_dim)               # stand-ins for T_e, T_m, T_t
        perceiver = clip_prompts.QualityPerceiver(clip_model, prompts, ["excellent", "mediocre", "terrible"])
        vgg = losses.VGGFeatures(vgg16().features, "random VGG-16") if config == "paper" else losses.build_vgg(
            variant="tiny")
        # Stage 2 keeps CLIP's image tower only; the text tower stays on the GPU too when --stage all ran stage 1.
        self.text_tower_bytes = sum(p.nbytes for name, p in clip_model.named_parameters()
                                    if not name.startswith("visual."))
        self.model, self.device = restorer.model.train(), device
        self.frozen = [restorer.sgm, perceiver.to(device), vgg.to(device)]
        self.step_fn = partial(train.restore_step, sgm=restorer.sgm, criterion=losses.PerceiveIRLoss(vgg, perceiver),
                               use_cl=True, uses_dino=True, strata=self.STRATA)      # λ1-λ3 of Sec. IV-A.4
        self.state = {"avg_psnr": dict(zip(self.STRATA, (25.0, 30.0, 35.0)))}

    def batch(self, size, patch=128):
        crops = lambda *shape: torch.rand(*shape, 3, patch, patch, device=self.device)      # noqa: E731
        tasks = lambda: torch.arange(size, device=self.device) % 3                          # noqa: E731
        return dict(degraded=crops(size), positive=crops(size), target=crops(size), negatives=crops(size, 2),
                    negative_mask=torch.ones(size, 2, dtype=torch.bool, device=self.device),
                    task=tasks(), stratum=tasks())


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

    def naive():
        with torch.no_grad():
            features = clip_model.encode_image(clip_prompts.clip_preprocess(images), normalize=True)
        loss = clip_prompts.prompt_loss(learner, features, labels, logit_scale, truncate=False)[0]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def cached():                                     # train.py's step on 32 cached triplets, as fit() runs it
        rows = torch.randint(len(bank), (32,), device=device)
        batch = {"features": bank[rows], "labels": torch.arange(3, device=device).expand(32, 3)}
        train.train_step(learner, optimizer, partial(train.prompt_step, logit_scale=logit_scale), batch, {})

    return milliseconds(naive, repeats, device), milliseconds(cached, 5 * repeats, device)


def restoration_step_costs(device, batch=2, patch=128, repeats=3, config="paper"):
    """(ms, FLOPs) of one training step (train.train_step, AdamW as fit() makes it) of a config: the full
    Perceive-IR step, and a plain Restormer and PromptIR (the all-in-one baseline) with L1 only (l1_step, as
    `--no-guidance` with the λs at 0 trains them), on the same batch."""
    paper = PaperStep(device, config)
    nets = [("full", paper.model, paper.step_fn)] + [
        (name, build_backbone(name, config).to(device), train.l1_step) for name in ("restormer", "promptir")]
    steps = {name: partial(train.train_step, net, torch.optim.AdamW(net.parameters()), step_fn,
                           paper.batch(batch, patch), paper.state) for name, net, step_fn in nets}
    return {name: (milliseconds(step, repeats, device), flops_of(step)) for name, step in steps.items()}


def train_step_zeroing_late(net, optimizer, step_fn, batch, state, amp="none"):
    """train.train_step with zero_grad after the forward, the order it replaced: measured, never trained with."""
    with torch.autocast(next(net.parameters()).device.type, torch.bfloat16, enabled=amp == "bf16"):
        total, parts = step_fn(net, batch, state)
    optimizer.zero_grad(set_to_none=True)             # the last step's gradients lived through this forward
    total.backward()
    optimizer.step()
    return total, parts


def step_peak(paper, size, amp, step=train.train_step):
    """Peak bytes of the second of two training steps (under the fake mode of `paper`'s weights if they are fake):
    from then on AdamW's state exists, and each step starts with the last one's gradients, as in training.
    Weights (frozen ones too), optimiser state, gradients and the batch are all counted."""
    batch = paper.batch(size)
    optimizer = torch.optim.AdamW(paper.model.parameters(), foreach=True)     # CUDA's default; fake CPU tensors
    with MemoryCounter() as counter:                                          # would get the per-parameter loop
        counter.track(*weights(paper.model, *paper.frozen), *batch.values())
        for _ in range(2):
            counter.peak = counter.current
            step(paper.model, optimizer, paper.step_fn, batch, paper.state, amp)
    paper.model.zero_grad(set_to_none=True)           # the next measurement starts afresh
    return counter.peak


def fake_paper_step(config="paper"):
    """(mode, PaperStep) on fake CPU tensors: torch's FakeTensorMode (private API), under which tensors have no data
    and ops no arithmetic. Not fake "cuda": backward fails there (pytorch/pytorch#92627), and the bytes do not depend
    on the device, except that CPU autocast's op list stands in for CUDA's under bf16."""
    from torch._subclasses.fake_tensor import FakeTensorMode          # private: imported where it is used
    mode, paper = FakeTensorMode(), PaperStep("cpu", config)
    make_fake(mode, paper.model, *paper.frozen)
    return mode, paper


def whole_image_peak(restorer, side):
    """Peak bytes of evaluate.py's whole-image pass (no grad) on a side × side image, weights included; run under
    the fake mode of `restorer`'s weights."""
    image = torch.rand(1, 3, side, side)
    with MemoryCounter() as counter:
        counter.track(*weights(restorer.model, restorer.sgm), image)
        restorer(image)
    return counter.peak


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


def items_per_second(dataset, seconds):
    """Items of `dataset` per second, in a fixed random order, in this process with one thread (one worker)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    order, count, start = np.random.default_rng(0).permutation(len(dataset)), 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        dataset[int(order[count % len(order)])]
        count += 1
    torch.set_num_threads(threads)
    return count / (time.perf_counter() - start)


def loading_rate(seconds=4.0, patch_size=128):
    """Training patches per second in one process with one thread, i.e. per DataLoader worker."""
    with tempfile.TemporaryDirectory() as tmp:
        samples = data.scan_training_set(demo.make_demo_data(Path(tmp) / "demo"), data.TASKS)[0]
        return items_per_second(data.TrainDataset(samples, patch_size, resample={t: 1 for t in data.TASKS}), seconds)


def laptop_loading(root, seconds=20.0):
    """The laptop preset's training items on real data (train.LAPTOP: tasks, synthesis, crops, resampling),
    read from the files and from `--cache-mb` filled beforehand (as after a run's first sightings)."""
    preset = train.LAPTOP
    samples = data.scan_training_set(root, data.parse_tasks(preset["tasks"]),
                                     synthesize=data.parse_tasks(preset["synthesize"]))[0]
    rates = {}
    for cache_mb in (0, preset["cache_mb"]):
        dataset = data.TrainDataset(samples, preset["patch_size"], resample=data.parse_resample(preset["resample"]),
                                    cache_mb=cache_mb)
        for path in {p for s in samples for p in (s.target_path, s.input_path) if p} if cache_mb else ():
            dataset.read(path)                            # every file once: the cache as a run's first pass leaves it
        rates[cache_mb] = items_per_second(dataset, seconds)
    files, cached = rates.values()
    print(f"laptop preset's training items ({root}; {preset['patch_size']}² crops, one thread): from the files "
          f"{files:.0f}/s, from the cache {cached:.0f}/s ({cached / files:.1f}x; the cache holds "
          f"{dataset.cache_bytes / 2 ** 20:.0f} MB of --cache-mb {preset['cache_mb']}); a step of batch "
          f"{preset['batch_size']} spends {preset['batch_size'] / files * 1000:.0f} ms vs "
          f"{preset['batch_size'] / cached * 1000:.0f} ms reading its crops")
    return rates


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


def table(rows):
    print("\n".join("| " + " | ".join(map(str, row)) + " |" for row in [rows[0], ("---",) * len(rows[0]), *rows[1:]]))


# --- --memory: what a GPU needs, counted on fake tensors -----------------------------------------------------------

def memory_report(batches=(1, 2, 6), small=256, large=512, check=1024):
    start = time.perf_counter()
    mode, paper = fake_paper_step()
    restorer = random_restorer("cpu")
    make_fake(mode, restorer.model, restorer.sgm)
    with mode:
        peaks = {(n, amp): step_peak(paper, n, amp) for n in batches for amp in PRECISIONS}
        late = step_peak(paper, max(batches), "none", step=train_step_zeroing_late)
        whole = {side: whole_image_peak(restorer, side) for side in (small, large, check)}
    grads = sum(p.nbytes for p in paper.model.parameters())
    print("\nGPU memory of one paper-config training step per GPU (one DDP rank), counted on fake tensors: Perceive-IR "
          "(Restormer) and the frozen DINOv2 ViT-B/14, CLIP ViT-B/32 image tower and VGG-16; 128² crops, the L_cl "
          "positive, two non-easy negatives, all four losses; AdamW (foreach); the second of two steps.\n")
    table([("per-GPU batch", "fp32 GB", "bf16 GB"),
           *((n, *(f"{peaks[n, amp] / GB:.2f}" for amp in PRECISIONS)) for n in batches)])
    print("\nGB = 2^30 bytes. bf16: CPU autocast's op list stands in for CUDA's (fake CUDA tensors fail in backward); "
          "CUDA's also keeps layer_norm, softmax, exp and interpolation in fp32, so expect a higher bf16 peak there. "
          "Left out: the CUDA context (~0.5 GB), cuDNN/cuBLAS workspaces, the allocator's fragmentation and cache "
          "(reserved > allocated), DDP's gradient buckets (about one more copy of the trainable gradients, "
          f"{grads / GB:.2f} GB), NCCL buffers, and CLIP's text tower ({paper.text_tower_bytes / GB:.2f} GB) where "
          "--stage all ran stage 1 in the same process.")
    print(f"\nZeroing the gradients (batch {max(batches)}, fp32): before the forward (train.train_step) "
          f"{peaks[max(batches), 'none'] / GB:.2f} GB, after the forward {late / GB:.2f} GB "
          f"({(late - peaks[max(batches), 'none']) / GB:+.2f} GB; the gradients are {grads / GB:.2f} GB).")
    per_mp = (whole[large] - whole[small]) / GB / ((large ** 2 - small ** 2) / 1e6)
    base = whole[small] / GB - per_mp * small ** 2 / 1e6
    predicted = base + per_mp * check ** 2 / 1e6
    print(f"\nWhole-image restore (evaluate.Restorer, paper config with DINOv2, no grad, fp32, weights included), a "
          f"line through {small}² and {large}²: {base:.3f} GB + {per_mp:.3f} GB per megapixel; at {check}²: "
          f"{predicted:.3f} GB predicted, {whole[check] / GB:.3f} GB counted ({small}²: {whole[small] / GB:.3f} GB, "
          f"{large}²: {whole[large] / GB:.3f} GB).")
    print(f"\n--memory took {time.perf_counter() - start:.0f} s on {torch.get_num_threads()} CPU threads")


# --- --gpu: the demo on the device, the paper step's time and memory, and DDP, in one command ----------------------

DEMO_LINE = re.compile(r"^ {2}(\w+) \(.*\)\s+(\S+) ->\s+(\S+)\s+\d+/\d+ right$")    # demo.report's lines


def demo_gains(output):
    """{task: gain in dB} from the demo report: "  denoise (demo, σ=25)   20.55 ->  22.30   3/10 right" gives 1.75."""
    return {m[1]: float(m[3]) - float(m[2]) for m in map(DEMO_LINE.match, output.splitlines()) if m}


def run_command(command, env, timeout=600):
    """Run a command from the repository root: ({seconds, returncode, and the output's end on failure}, output)."""
    start = time.perf_counter()
    try:
        result = subprocess.run([str(c) for c in command], cwd=REPO, env=env, capture_output=True, text=True,
                                timeout=timeout)
        code, output = result.returncode, result.stdout + result.stderr
    except subprocess.TimeoutExpired as error:
        code, output = f"timed out after {timeout} s", ((error.stdout or b"") + (error.stderr or b"")).decode()
    run = {"seconds": round(time.perf_counter() - start, 1), "returncode": code}
    if code != 0:
        run["output_tail"] = output[-3000:]
        print(f"FAILED ({code}): {' '.join(map(str, command))}\n{output[-3000:]}", flush=True)
    return run, output


def reuse(first):
    """train.py's restore stage on the data, I_m and prompts of the demo run in `first`."""
    return ["--stage", "restore", "--data-root", first / "data", "--medium-dir", first / "medium" / "images",
            "--prompts", first / "prompt" / "prompts.pt"]


def demo_runs(tmp, env, quick):
    """a. `train.py --preset demo` in fp32 (all stages), then its restore stage with --amp bf16 and with --amp bf16
    --compile, on the first run's data, I_m and prompts: each run's wall time, restore images/s and per-task gains."""
    first, short = tmp / "fp32", (["--medium-iters", 4, "--prompt-iters", 4, "--iters", 4] if quick else [])
    modes = {"fp32": [], "bf16": [*reuse(first), "--amp", "bf16"],
             "bf16 + compile": [*reuse(first), "--amp", "bf16", "--compile"]}
    runs = {}
    for name, extra in modes.items():
        if name != "fp32" and runs["fp32"]["returncode"] != 0:
            runs[name] = {"skipped": "the fp32 run failed: no data, I_m or prompts to reuse"}
            continue
        out = first if name == "fp32" else tmp / name.replace(" + ", "-")
        runs[name], output = run_command([sys.executable, "train.py", "--preset", "demo", "--out", out, *extra, *short],
                                         env)
        runs[name]["gains_db"] = demo_gains(output)
        if runs[name]["returncode"] == 0 and not runs[name]["gains_db"]:
            runs[name]["returncode"] = "no demo report lines found: has the report's format changed? (DEMO_LINE)"
            print(f"demo {name}: {runs[name]['returncode']}\n{output[-2000:]}")
        log = out / "restore" / "log.jsonl"           # the first interval of a compiled run includes compiling
        speeds = [json.loads(line)["images_per_s"] for line in log.read_text().splitlines()] if log.is_file() else []
        runs[name]["restore_images_per_s"] = statistics.median(speeds) if speeds else None
        print(f"demo {name}: {runs[name]['seconds']:.0f} s", flush=True)
    return runs


def ddp_run(tmp, env, device, first, quick):
    """d. The demo's restore stage in 2 processes (torchrun; NCCL on GPUs, gloo on a CPU) and in 1, the same global
    batch of 4: both wall times and the largest difference between their final weights."""
    if device.type == "cuda" and torch.cuda.device_count() < 2:
        return {"skipped": f"{torch.cuda.device_count()} GPU here: the 2-process NCCL run needs 2"}
    if not (first / "prompt" / "prompts.pt").is_file():
        return {"skipped": "the fp32 demo run failed: no data, I_m or prompts to reuse"}
    iters = 4 if quick else 100
    common = ["train.py", "--preset", "demo", *reuse(first), "--iters", iters, "--batch-size", 4]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    result = {"backend": "nccl" if device.type == "cuda" else "gloo", "iters": iters}
    env = {**env, "OMP_NUM_THREADS": "1"}                    # torchrun's setting for its workers, for both runs
    for name, command in (("two_processes", [*launcher, *common]), ("one_process", [sys.executable, *common])):
        result[name], _ = run_command([*command, "--out", tmp / f"ddp-{name}"], env)
        print(f"DDP, {name.replace('_', ' ')}: {result[name]['seconds']:.0f} s", flush=True)
        if result[name]["returncode"] != 0:
            return result
    final = [torch.load(tmp / f"ddp-{name}" / "restore" / "last.pt", weights_only=True)["model"]
             for name in ("two_processes", "one_process")]
    result["max_abs_weight_difference"] = max((final[0][k].float() - final[1][k].float()).abs().max().item()
                                              for k in final[0])
    return result


def paper_step_on_device(device, settings, repeats, estimates):
    """b. Median time and peak allocated memory of the paper step (train.train_step) on the device, at each (batch,
    amp), beside the fake-tensor count of the same setting."""
    paper, rows = PaperStep(device), []
    for size, amp in settings:
        optimizer = torch.optim.AdamW(paper.model.parameters())                    # fit()'s (foreach on CUDA)
        step = partial(train.train_step, paper.model, optimizer, paper.step_fn, paper.batch(size), paper.state, amp)
        step()                                                    # AdamW's state exists from here on
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        ms = milliseconds(step, repeats, device)
        peak = peak_memory_mb(device) * 2**20                     # CUDA: allocated; CPU: the process's RSS
        rows.append(dict(batch=size, precision=PRECISIONS[amp], step_ms=ms, peak_gb=peak / GB,
                         estimate_gb=estimates[size, amp] / GB, ratio=peak / estimates[size, amp]))
        del step, optimizer
        paper.model.zero_grad(set_to_none=True)
        print(f"paper step, batch {size}, {PRECISIONS[amp]}: {ms:.0f} ms", flush=True)
    return rows


def gpu_report(args, device):
    start, name = time.perf_counter(), torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    results = {"device": name, "torch": torch.__version__, "smoke_run": device.type != "cuda" or args.quick}
    save = lambda: Path(args.json).write_text(json.dumps(results, indent=1))            # noqa: E731  after each part
    # The children use the device asked for: --device cpu hides the GPUs from them too.
    env = {**os.environ, **({"CUDA_VISIBLE_DEVICES": ""} if device.type == "cpu" else {})}
    batches, repeats = ((1,), 1) if args.quick else ((1, 6), max(args.repeats, 10))
    settings = [(n, amp) for n in batches for amp in PRECISIONS]
    with tempfile.TemporaryDirectory() as tmp:             # subprocesses first, before this process holds the GPU
        tmp = Path(tmp)
        results["demo"] = demo_runs(tmp, env, args.quick)
        save()
        results["ddp"] = ddp_run(tmp, env, device, tmp / "fp32", args.quick)
        save()
    print("counting the paper step's memory on fake tensors", flush=True)
    mode, fake = fake_paper_step()
    with mode:
        estimates = {(n, amp): step_peak(fake, n, amp) for n, amp in settings}
    del mode, fake
    results["paper_step"] = paper_step_on_device(device, settings, repeats, estimates)
    save()
    costs = restoration_step_costs(device, max(batches), 128, repeats)
    (full_ms, full_flops), (plain_ms, plain_flops), (promptir_ms, _) = costs.values()   # full, restormer, promptir
    results["step_ratio"] = dict(batch=max(batches), perceive_ir_ms=full_ms, restormer_l1_ms=plain_ms,
                                 time_ratio=full_ms / plain_ms, flop_ratio=full_flops / plain_flops,
                                 promptir_l1_ms=promptir_ms, promptir_ratio=full_ms / promptir_ms)
    results["seconds"] = round(time.perf_counter() - start)
    save()
    print_gpu_report(results, args.json)
    failed = [part for part in ("demo", "ddp") for run in results[part].values()
              if isinstance(run, dict) and run.get("returncode", 0) != 0]
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)} (see {args.json})")


def print_gpu_report(results, path):
    print(f"\n## --gpu on {results['device']}, torch {results['torch']}, {results['seconds']} s"
          + (" — SMOKE RUN: the code path is checked, the figures mean nothing" if results["smoke_run"] else ""))
    runs = results["demo"]
    print("\na. offline demo (`train.py --preset demo`): gain over the inputs per task (dB); fp32 runs every stage, "
          "the others its restore stage on its data, I_m and prompts\n")
    tasks = list(dict.fromkeys(task for run in runs.values() for task in run.get("gains_db", {})))

    def cells(form, value):                           # one cell per run; "—" where a run has no such value
        return [form.format(value(run)) if value(run) is not None else "—" for run in runs.values()]
    table([("", *runs), *((task, *cells("{:+.2f}", lambda run: run.get("gains_db", {}).get(task))) for task in tasks),
           ("wall time (s)", *cells("{:.0f}", lambda run: run.get("seconds"))),
           ("restore images/s (median of logs)", *cells("{:.1f}", lambda run: run.get("restore_images_per_s")))])
    for name, run in runs.items():
        if "skipped" in run or run.get("returncode", 0) != 0:
            print(f"{name}: {run.get('skipped') or 'failed: ' + str(run['returncode'])}")
    print("\nb. paper-config restore step (train.train_step) per GPU: median time, peak allocated memory "
          "(torch.cuda.max_memory_allocated; on a CPU the process's RSS) and the fake-tensor count (--memory)\n")
    table([("per-GPU batch", "precision", "step ms", "peak GB", "fake-tensor GB", "measured / counted"),
           *((r["batch"], r["precision"], f"{r['step_ms']:.0f}", f"{r['peak_gb']:.2f}", f"{r['estimate_gb']:.2f}",
              f"{r['ratio']:.2f}") for r in results["paper_step"])])
    ratio = results["step_ratio"]
    print(f"\nc. Perceive-IR vs Restormer + L1 step, batch {ratio['batch']}: {ratio['perceive_ir_ms']:.0f} ms vs "
          f"{ratio['restormer_l1_ms']:.0f} ms = {ratio['time_ratio']:.2f}x time for {ratio['flop_ratio']:.2f}x FLOPs; "
          f"vs PromptIR + L1 {ratio['promptir_l1_ms']:.0f} ms = {ratio['promptir_ratio']:.2f}x (target <= 1.0x)")
    ddp = results["ddp"]
    if "max_abs_weight_difference" in ddp:
        print(f"\nd. DDP ({ddp['backend']}), demo restore stage, {ddp['iters']} steps, global batch 4: 2 processes "
              f"{ddp['two_processes']['seconds']:.0f} s, 1 process {ddp['one_process']['seconds']:.0f} s; final "
              f"weights differ by at most {ddp['max_abs_weight_difference']:.2e}")
    else:
        print(f"\nd. DDP: {('skipped: ' + ddp['skipped']) if 'skipped' in ddp else 'a run failed (output above)'}")
    print(f"\nresults written to {path}")


def bench(args, device):
    rows = [("what", "measured", "ratio / target")]
    naive_ms, cached_ms = prompt_step_times(device, args.repeats)
    rows.append(("stage-1 prompt step, ViT-B-32, 32 triplets of 128² crops: naive vs cached",
                 f"{naive_ms:.0f} ms vs {cached_ms:.0f} ms", f"{naive_ms / cached_ms:.1f}x (target >= 30x)"))
    costs = restoration_step_costs(device, args.batch, 128, args.repeats)
    (full_ms, full_flops), (plain_ms, plain_flops), (promptir_ms, _) = costs.values()   # full, restormer, promptir
    time_ratio, flop_ratio = full_ms / plain_ms, full_flops / plain_flops
    rows.append((f"restoration step, batch {args.batch}, 128²: Perceive-IR vs Restormer+L1 (time)",
                 f"{full_ms / 1000:.2f} s vs {plain_ms / 1000:.2f} s", f"{time_ratio:.2f}x (target <= 1.6x)"))
    rows.append(("  same steps, FLOPs (torch.utils.flop_counter, grouped-conv backward corrected)",
                 f"{full_flops / 1e12:.2f} vs {plain_flops / 1e12:.2f} TFLOP",
                 f"{flop_ratio:.2f}x; time/FLOP ratio {time_ratio / flop_ratio:.2f} (target <= 1.1)"))
    rows.append((f"restoration step, batch {args.batch}, 128²: Perceive-IR vs PromptIR+L1 (time)",
                 f"{full_ms / 1000:.2f} s vs {promptir_ms / 1000:.2f} s", f"{full_ms / promptir_ms:.2f}x (<= 1.0x)"))
    small, large = (probe_in_subprocess(s, s, 0, device) for s in (256, 512))
    per_mp = (large["peak_mb"] - small["peak_mb"]) / 1024 / ((512 ** 2 - 256 ** 2) / 1e6)
    base = small["peak_mb"] / 1024 - per_mp * 256 ** 2 / 1e6
    rows.append(("whole-image inference memory, paper config (256² and 512²: a line)",
                 f"{base:.2f} GB + {per_mp:.2f} GB per megapixel", "process peak (tensors alone: --memory)"))
    if not args.quick:
        for (height, width), tile in (((2160, 3840), 512), ((1024, 1024), 0)):
            probe = probe_in_subprocess(height, width, tile, device)
            rows.append((f"inference peak memory, {width}x{height}, " + (f"tiles of {tile}" if tile else "whole image"),
                         f"{probe['peak_mb'] / 1024:.2f} GB in {probe['seconds']:.0f} s",
                         "target <= 8 GB" if tile else "(reported)"))
    rows.append(("data loading, PNG, 128² crops, all five tasks", f"{loading_rate():.0f} patches/s per worker",
                 "target >= 100"))
    print(f"\nbenchmark on {device} ({torch.get_num_threads()} CPU threads, torch {torch.__version__})\n")
    table(rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="skip the 4K and 1024² memory rows; --gpu: a smoke run "
                        "(4 demo steps per stage, batch 1, one timed repeat)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per measurement (median; --gpu: >= 10)")
    parser.add_argument("--batch", type=int, default=2, help="per-process batch of the restoration-step row")
    parser.add_argument("--profile", action="store_true", help="parameters, FLOPs, latency and memory of one model")
    parser.add_argument("--checkpoint", help="--profile: a restore-stage checkpoint (else random weights)")
    parser.add_argument("--backbone-config", default="paper", help="--profile without --checkpoint: paper or tiny")
    parser.add_argument("--size", type=int, default=256, help="--profile: image side for latency and memory")
    parser.add_argument("--memory", action="store_true", help="GPU memory counted on fake tensors (no GPU needed)")
    parser.add_argument("--gpu", action="store_true", help="the GPU measurements: demo, paper step, DDP")
    parser.add_argument("--loading", metavar="DATA_ROOT", help="the laptop preset's data loading on real data: "
                        "files vs --cache-mb")
    parser.add_argument("--json", default="benchmark_gpu.json", help="--gpu: where the results are written")
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
    if args.memory:
        return memory_report()
    if args.gpu:
        return gpu_report(args, device)
    if args.loading:
        return laptop_loading(args.loading)
    bench(args, device)


if __name__ == "__main__":
    main()
