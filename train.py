"""Training of both Perceive-IR stages (Sec. III-B, Sec. IV-A.4), one code path for python and torchrun.

    python train.py --preset demo                     # offline: generated data, tiny networks, ~2 min on 2 cores
    torchrun --standalone --nproc_per_node=8 train.py --data-root DATA --stage restore --batch-size 8

What is in here:
- `get_args()`: every knob next to its default and the paper source of that default; `--preset`.
- Stage 1a, `--stage medium` (Sec. III-B): a restorer per half of the data restores the other half (I_m).
- Stage 1b, `--stage prompt` (Eq. 1): the CLIP prompts, on cached features of the crops L_clip judges.
- Stage 2, `--stage restore` (Eq. 13): L_rec + λ1 L_cl + λ2 L_clip + λ3 L_dpl, avgPSNR per task (Eq. 10).
- `fit()`: the loop every stage shares: DDP (NCCL on CUDA, gloo on CPU), AdamW, warmup + cosine,
  `train_step` (bf16, torch.compile), checkpoints with exact resume (checkpoints.py), SIGINT/SIGTERM,
  a non-finite guard, logs; `--init` starts a fine-tune from a trained model (Table VI †). The demo: demo.py.
"""

import argparse
import gc
import json
import math
import os
import random
import signal
import time
import warnings
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import clip_prompts
import data
import demo
import losses
from backbone import count_parameters
from checkpoints import (STOP_SIGNALS, check_finite, git_commit, init_weights, load_checkpoint, one_pass,
                         output_folder, record_losses, restore_progress, write_checkpoint)
from guidance import (BACKBONES, CFE_NORMS, NETWORKS, architecture, build_backbone, build_model, build_sgm,
                      degradation_centroids, load_released, restore_image, size_multiple)
from networks import airnet, mprnet

CENTROID_IMAGES = 256                             # training images per task behind each centroid of Z
# DEVIATION: --preset laptop is an hour on 2 CPU cores, not Sec. IV-A.4's scale (README, "A real restorer"): H, B
# synthesized; random CLIP, DINOv2 without weight files: L_clip 10× lighter, L_dpl off; small crops, N and R 4×.
LAPTOP = dict(out="runs/laptop", tasks="N+H+R+B+L", synthesize="H+B", backbone_config="laptop", medium_config="tiny",
              dino="auto", clip_model="auto", vgg="auto", lambda_clip=0.005, lambda_dpl=0, patch_size=64, workers=0,
              cache_mb=1024, batch_size=4, iters=6000, lr=1e-3, min_lr=1e-5, warmup=100, probe_size=4, stage1_images=48,
              resample="denoise=4,dehaze=1,derain=48,deblur=1,lowlight=24", medium_lr=1e-3, medium_iters=200,
              prompt_iters=400, prompt_batch_size=16, prompt_lr=5e-3, log_every=50, save_every=100, snapshot_every=0)
PRESETS = {"paper": {}, "demo": demo.PRESET, "laptop": LAPTOP}     # the offline demo: demo.py
AUTO = {"dino": ("dino_weights", "base"), "clip_model": ("clip_weights", "ViT-B-32"), "vgg": ("vgg_weights", "vgg16")}


class StopTraining(Exception):
    """A signal or --stop-after ended the run after writing a checkpoint."""


# --- Configuration -------------------------------------------------------------------------------------------------

def get_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     usage="python train.py (--preset demo | --data-root ROOT) [options]")
    add = parser.add_argument
    # --- what to run ---
    add("--stage", choices=["all", "medium", "prompt", "restore"], default="all", help="Sec. III-B, III-C")
    add("--preset", choices=sorted(PRESETS), default="paper",
        help="'paper': Sec. IV-A.4; 'demo': offline, tiny; 'laptop': real data, an hour on 2 CPU cores")
    add("--out", default="runs/perceive-ir", help="output folder; each stage writes a subfolder")
    add("--resume", default=None, help="'auto' (each stage's last.pt) or a checkpoint of the stage to run")
    add("--seed", type=int, default=0, help="initial weights, data order, augmentation")
    # --- data (Sec. IV-A.1, Table I) ---
    add("--data-root", default=None, help="dataset root: PromptIR's, the authors' or the generic layout")
    add("--tasks", default="N+H+R", help="N+H+R or N+H+R+B+L (Sec. IV-A.1), any subset (Table XIII)")
    add("--patch-size", type=int, default=128, help="training crop (Sec. IV-A.4: 128)")
    add("--sigmas", type=float, nargs="+", default=[15, 25, 50], help="training noise σ (Sec. IV-A.1)")
    add("--resample", default=None, help="task=ratio,... (Sec. IV-A.4: denoise=3,derain=120,deblur=5,lowlight=200)")
    add("--workers", type=int, default=4, help="data-loader workers per process")
    add("--cache-mb", type=int, default=0, help="keep decoded training images in memory, up to this many MB")
    add("--synthesize", default="", help="tasks without pairs (H, B) made from the clean denoising images (README)")
    add("--train-sets", default=None, help="task=set+set,...: a task trains on these of its sets alone (README)")
    # --- stage 1a: medium-quality images I_m (Sec. III-B) ---
    add("--medium-dir", default=None, help="medium-quality images I_m (default OUT/medium/images)")
    add("--medium-backbone", choices=sorted(NETWORKS), default="restormer", help="stage-1a restorer (Sec. III-B: "
        "Restormer; Table XIV: mprnet, airnet, promptir), trained with its own loss; also makes proxy negatives")
    add("--medium-weights", default=None, help="a released checkpoint of --medium-backbone both folds start from")
    add("--medium-config", default=None, help="stage-1a restorer's config (default: --backbone-config's)")
    add("--medium-iters", type=int, default=100_000, help="steps per fold (Sec. IV-A.4: 100K)")
    add("--stage1-images", type=int, default=0, help="stage 1 on ≤ N images per task, evenly spread; 0 = all (paper)")
    add("--medium-lr", type=float, default=2e-4, help="Sec. IV-A.4: 2e-4")
    # --- stage 1b: prompts (Sec. III-B, Eq. 1, Table XII) ---
    add("--clip-model", choices=sorted(clip_prompts.CLIP_CONFIGS) + ["auto"], default="ViT-B-32",
        help="Sec. IV-A.4: ViT-B/32; 'auto': it if --clip-weights is given, else 'tiny'")
    add("--clip-weights", default=None, help="local CLIP state-dict file (else OpenAI's weights)")
    add("--prompt-words", nargs="+", default=["excellent", "mediocre", "terrible"], help="best first (Table XII (i))")
    add("--prompt-tokens", type=int, default=16, help="N embedded tokens per prompt (Sec. IV-A.4: 16)")
    add("--prompt-init", choices=clip_prompts.INITS, default="partial", help="Table XII: partial random")
    add("--prompt-iters", type=int, default=100_000, help="Sec. IV-A.4: 100K")
    add("--prompt-lr", type=float, default=4e-5, help="Sec. IV-A.4: 4e-5")
    add("--prompt-batch-size", type=int, default=32, help="views per step, 3 images each (Sec. IV-A.4: 32)")
    add("--prompt-view", choices=["crop", "whole"], default="crop", help="stage-1 view of CLIP (not given; README)")
    add("--prompt-crops", type=int, default=4, help="cached crops per image with --prompt-view crop (not given)")
    add("--prompts", default=None, help="stage-1 prompt checkpoint (default OUT/prompt/prompts.pt)")
    # --- stage 2: the network (Sec. III-C, Tables X, XV) ---
    add("--backbone", choices=sorted(BACKBONES) + ["promptir"], default="restormer",
        help="Sec. IV-A.4; Table XV; 'promptir' with --no-guidance: the all-in-one baseline of Tables II-III")
    add("--backbone-config", default="paper", help="'paper' (Sec. IV-A.4) or 'tiny'; stage 1a uses it too")
    add("--dino", choices=["base", "tiny", "auto"], default="base",
        help="Sec. IV-A.4: DINOv2 base; 'auto': base if --dino-weights is given, else 'tiny'")
    add("--dino-weights", default=None, help="local DINOv2 weight file (else timm's hub weights)")
    add("--no-guidance", action="store_true", help="plain backbone (Table X (a), (b))")
    add("--no-dino", action="store_true", help="learnable F_l (Table X 'w/o DINO-v2')")
    add("--no-pgm", action="store_true", help="projection of F_l only (Table X 'w/o PGM')")
    add("--no-cfe", action="store_true", help="learnable Z (Table X 'w/o CFE'); turns L_cl off")
    add("--cfe-norm", choices=CFE_NORMS, default="none", help="CFE's norm: L_cl trains at 4 crops (not given; README)")
    add("--init", default=None, help="fine-tune: start from this restore checkpoint's weights (Table VI †)")
    # --- stage 2: losses (Sec. III-D, III-E); a weight of 0 switches a term off (Table XI) ---
    add("--lambda-cl", type=float, default=0.1, help="λ1 (Sec. IV-A.4: 0.1)")
    add("--lambda-clip", type=float, default=0.05, help="λ2 (Sec. IV-A.4: 0.05)")
    add("--lambda-dpl", type=float, default=0.1, help="λ3 (Sec. IV-A.4: 0.1)")
    add("--tau", type=float, default=0.1, help="L_cl temperature τ (Sec. III-E: 0.1)")
    add("--dpl-lambda", type=float, default=2.0, help="easy-negative weight λ (Sec. III-D.2: 2)")
    add("--dpl-gamma", type=float, default=0.25, help="γ of Eq. (10) (Sec. III-D.2: 0.25)")
    add("--vgg", choices=["vgg16", "tiny", "auto"], default="vgg16",
        help="L_dpl features (Sec. III-D.2: VGG-16); 'auto': it if --vgg-weights is given, else 'tiny'")
    add("--vgg-weights", default=None, help="local VGG-16 state-dict file (else torchvision's)")
    add("--medium-negative", action=argparse.BooleanOptionalAction, default=True, help="I_m as an N_q (not given)")
    add("--negatives", nargs="*", default=[], help="folders of proxy restorations, more N_q (Eq. 11)")
    add("--epoch-iters", type=int, default=0, help="steps per epoch of Eq. (10); 0 = one pass over the data")
    add("--probe-size", type=int, default=16, help="training patches per task and σ for avgPSNR (Eq. 10; not given)")
    # --- stage 2: optimisation (Sec. IV-A.4) ---
    # UNSPECIFIED: the paper gives no weight decay, warmup, final LR, gradient clipping or stage-1a
    # batch size; the defaults below marked "not given" are Restormer's and PromptIR's usual values.
    add("--iters", type=int, default=400_000, help="Sec. IV-A.4: 400K")
    add("--batch-size", type=int, default=6, help="global batch of stages 1a and 2 (Sec. IV-A.4: 6)")
    add("--lr", type=float, default=2e-4, help="peak LR (Sec. IV-A.4: 2e-4)")
    add("--min-lr", type=float, default=1e-6, help="LR at the end of the cosine (not given)")
    add("--warmup", type=int, default=4000, help="linear warmup steps, at most 10%% of a stage (not given)")
    add("--betas", type=float, nargs=2, default=[0.9, 0.999], help="AdamW β1, β2 (Sec. IV-A.4: 0.9, 0.999)")
    add("--weight-decay", type=float, default=1e-4, help="AdamW weight decay (not given; Restormer's)")
    add("--grad-clip", type=float, default=0.0, help="max gradient norm, 0 = off (not given)")
    # --- system ---
    add("--amp", choices=["none", "bf16"], default="none", help="autocast dtype (GPUs)")
    add("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
        help="torch.compile the trainable network (GPUs; default backend inductor)")
    add("--log-every", type=int, default=100, help="steps between log lines (log.jsonl)")
    add("--save-every", type=int, default=2000, help="steps between writes of last.pt")
    add("--snapshot-every", type=int, default=50_000, help="steps between kept snapshots, 0 = none")
    add("--keep", type=int, default=3, help="snapshots to keep, 0 = all")
    add("--stop-after", type=int, default=0, help="end this run after N steps with a checkpoint (job time limits)")
    known, _ = parser.parse_known_args(argv)
    parser.set_defaults(**PRESETS[known.preset])           # a preset sets defaults; the command line wins
    return check_args(parser.parse_args(argv))


def check_args(args):
    """Values argparse cannot check end the run at once, in one line: SystemExit prints its message alone."""
    for name, (weights, paper) in AUTO.items():          # 'auto': the paper's network when its weights are given
        if getattr(args, name) == "auto":
            setattr(args, name, paper if getattr(args, weights) else "tiny")
    args.medium_config = args.medium_config or args.backbone_config
    try:
        data.parse_tasks(args.tasks), data.parse_resample(args.resample), data.parse_sets(args.train_sets)
        data.parse_tasks(args.synthesize or "N")
        multiple = max(size_multiple(args.backbone, args.backbone_config),
                       size_multiple(args.medium_backbone, args.medium_config))
    except ValueError as error:
        raise SystemExit(f"train.py: {error}") from None
    positive = ("batch_size", "prompt_batch_size", "iters", "medium_iters", "prompt_iters", "probe_size",
                "prompt_crops", "log_every", "save_every", "lr", "medium_lr", "prompt_lr", "tau")
    problems = [f"--{n.replace('_', '-')} {getattr(args, n)}: must be {'> 0' if n in positive else '≥ 0'}"
                for n in positive + ("workers", "cache_mb", "stage1_images", "weight_decay", "keep", "snapshot_every",
                                     "warmup", "epoch_iters", "stop_after", "grad_clip", "lambda_cl", "lambda_clip",
                                     "lambda_dpl", "dpl_lambda")
                if getattr(args, n) < 0 or (n in positive and getattr(args, n) == 0)]
    if args.patch_size < multiple or args.patch_size % multiple:      # Restormer: 8, NAFNet: 16
        problems.append(f"--patch-size {args.patch_size}: the networks downsample by {multiple}; use a multiple")
    if not 0 <= args.dpl_gamma < 1:                       # 1 − γ must stay a positive weight
        problems.append(f"--dpl-gamma {args.dpl_gamma}: Eq. (10) needs 0 ≤ γ < 1 (paper: 0.25)")
    problems += [f"--sigmas {args.sigmas}: must be > 0"] * (min(args.sigmas) <= 0) + [
        f"--betas {args.betas}: AdamW needs 0 ≤ β < 1"] * (not all(0 <= b < 1 for b in args.betas)) + [
        "--resume continues a run, --init starts a fine-tune from weights: pass one"] * bool(args.resume and args.init)
    if args.backbone not in BACKBONES and not args.no_guidance:          # PromptIR: Tables II-III's plain baseline
        problems.append(f"--backbone {args.backbone} has no ETB hook for the guidance: add --no-guidance")
    if problems:
        raise SystemExit(f"train.py: {problems[0]}")
    output_folder(args.out, "--out")
    args.medium_dir = args.medium_dir or str(Path(args.out) / "medium" / "images")     # where stages chain:
    args.prompts = args.prompts or str(Path(args.out) / "prompt" / "prompts.pt")      # I_m, then the prompts
    return args


# --- One DDP code path: python train.py, torchrun on one node or many ----------------------------------------------

class Run:
    """Rank, world size and device from torchrun's environment (absent under plain python)."""

    def __init__(self, device=None):
        self.distributed = "RANK" in os.environ             # set by torchrun (and by srun-style launches)
        cuda = torch.cuda.is_available() and device != "cpu"                            # a GPU unless --device cpu
        if self.distributed:                              # env:// rendezvous, its keys kept per torchrun attempt:
            store, rank, world = next(dist.rendezvous("env://"))   # torch 2.14's agent reuses its store on a
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")   # restart, and workers of a new
            store = dist.PrefixStore(f"attempt_{attempt}", store)         # attempt read the dead ones' addresses
            dist.init_process_group("nccl" if cuda else "gloo", store=store, rank=rank, world_size=world)
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if self.distributed else (0, 1)
        self.master = self.rank == 0                       # rank 0 writes files and prints; the others wait
        self.print0 = partial(print, flush=True) if self.master else (lambda *message: None)
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        self.device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")

    def barrier(self):
        return dist.barrier() if self.distributed else None

    def all_sum(self, tensor):                         # in place on every rank; the identity in one process
        return (dist.all_reduce(tensor) or tensor) if self.distributed else tensor


# --- Pieces of the training loop -----------------------------------------------------------------------------------

def get_lr(step, peak_lr, iters, warmup, min_lr):
    """Linear warmup over `warmup` steps, then a cosine from peak_lr down to min_lr at `iters`.
    # UNSPECIFIED: Sec. IV-A.4 gives the peak (2e-4) but no schedule; we use warmup + cosine, the
    # schedule of PromptIR, the Restormer-based All-in-One method this paper compares with most.
    """
    if step < warmup:                                                                   # linear warmup
        return peak_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, iters - warmup))                       # 0 → 1 over the cosine
    return min_lr + 0.5 * (peak_lr - min_lr) * (1 + math.cos(math.pi * progress))


STOP = {"signal": None}                               # set by SIGINT/SIGTERM, acted on after the current step


def stop_requested(run, step, stop_at):
    """A signal reached this process or another rank; ranks agree every 10 steps (one small all-reduce)."""
    stop = STOP["signal"] is not None                                         # set by this process's own signal handler
    if run.distributed:                                # every rank takes the same branch at the same step
        stop = (step % 10 == 0 or step == stop_at) and run.all_sum(torch.tensor(float(stop), device=run.device)) > 0
    return bool(stop)


def log_progress(run, name, out_dir, sums, state, steps, iters, lr, images_per_s, eta_hours):
    """One console line (rank 0) and one line of log.jsonl: the loss terms averaged over the interval's
    `steps` and over every rank (not rank 0's share alone), avgPSNR per task (Eq. 10), and the share of
    non-easy negatives weighted 1 − γ, overall and per task."""
    totals = run.all_sum(torch.cat([v.reshape(-1) for v in sums.values()])).split([v.numel() for v in sums.values()])
    values = dict(zip(sums, totals))                  # one all-reduce for every term
    logged = {k: (v / (steps * run.world)).item() for k, v in values.items() if sums[k].dim() == 0}
    if "non_easy_count" in values:                    # per-task counts (len(TASKS),), summed, not averaged
        count, very_hard = values["non_easy_count"], values["very_hard_count"]
        per_task = {t: (very_hard[i] / count[i]).item() for i, t in enumerate(data.TASKS) if count[i] > 0}
        logged["very_hard_fraction"] = {"all": (very_hard.sum() / count.sum().clamp_min(1)).item(), **per_task}
    shown = " ".join(f"{k} {v:.4f}" for k, v in logged.items() if isinstance(v, float))
    if "very_hard_fraction" in logged:                # Eq. (10)'s split, visible as training goes
        shown += f" very_hard {logged['very_hard_fraction']['all']:.2f}"
    step = state["step"]
    run.print0(f"{name} [{'#' * (20 * step // iters):<20s}] {step}/{iters} | {shown} | lr {lr:.2e} | "
               f"{images_per_s:.1f} img/s | ETA {eta_hours:.1f} h")
    if run.master:
        with open(out_dir / "log.jsonl", "a") as log:
            log.write(json.dumps({"step": step, **logged, "lr": lr, "images_per_s": images_per_s,
                                  "avg_psnr": state["avg_psnr"]}) + "\n")


def train_step(net, optimizer, step_fn, batch, state, amp="none", grad_clip=0.0):
    """One optimisation step, as fit() runs it (tests/benchmark.py times and measures this very function)."""
    trainable = [p for group in optimizer.param_groups for p in group["params"]]
    optimizer.zero_grad(set_to_none=True)             # before the forward: its activations never meet old grads
    with torch.autocast(trainable[0].device.type, torch.bfloat16, enabled=amp == "bf16"):    # --amp bf16
        total, parts = step_fn(net, batch, state)     # (the losses themselves are float32: losses.py)
    total.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(trainable, grad_clip)
    optimizer.step()
    return total, parts


# --- The shared training loop --------------------------------------------------------------------------------------

def fit(args, run, name, model, step_fn, dataset, iters, lr, batch_size, out_dir, given=None,
        epoch_fn=None, final_fn=None):
    """Train `model` for `iters` steps of `step_fn(net, batch, state) -> (total, parts)`; return (model, state).
    `epoch_fn(model)` runs as each epoch starts: state["avg_psnr"] (Eq. 10). `final_fn(model)` runs after the
    last step and its dict joins the final checkpoint (the centroids of Z). Resume is exact: data order and
    augmentation are functions of (seed, epoch, index); weights, optimiser, avgPSNR and RNG are restored."""
    out_dir, per_rank = Path(out_dir), batch_size // run.world                # the global batch is split over the ranks
    model.to(run.device)
    trainable = [p for p in model.parameters() if p.requires_grad]                      # the prompts alone in stage 1b
    optimizer = torch.optim.AdamW(trainable, lr=lr, betas=tuple(args.betas), weight_decay=args.weight_decay)
    state = {"step": 0, "epoch": 0, "avg_psnr": None}                                   # saved with every checkpoint
    if restore_progress(args, run, name, out_dir, given, model, optimizer, state):
        run.print0(f"{name}: resumed at step {state['step']}")
    if state["step"] >= iters:
        run.print0(f"{name}: already trained for {iters} steps ({out_dir / 'last.pt'})")
        return model, state
    net = model                                           # only the trainable network is wrapped and compiled
    if run.distributed:                                   # the depthwise convolutions' grads: a KB copy
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        net = DDP(net, device_ids=[run.device.index] if run.device.type == "cuda" else None,   # AirNet's warm-up
                  find_unused_parameters=getattr(model, "SKIPS_PARAMETERS", False))          # trains its encoder only
    if args.compile:                                      # DDP first: compile then splits the graph at its buckets
        net = torch.compile(net, backend=args.compile)    # (checkpoints still hold `model`'s plain keys)
    sampler = torch.utils.data.distributed.DistributedSampler(
        dataset, num_replicas=run.world, rank=run.rank, shuffle=True, seed=args.seed, drop_last=True)
    steps_per_pass = len(sampler) // per_rank                               # drop_last: every rank takes the same steps
    if steps_per_pass == 0:
        raise SystemExit(f"{name}: {len(dataset)} training samples are fewer than one global batch of {batch_size}")
    epoch_iters = args.epoch_iters or steps_per_pass                          # Eq. (10)'s epoch: one pass, unless given
    if run.master:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "args.json").write_text(json.dumps({**vars(args), "git_commit": git_commit()}, indent=1))
    run.print0(f"{name}: {count_parameters(model):,d} trainable parameters, {len(dataset)} samples, global batch "
               f"{batch_size} = {run.world} × {per_rank} per process, {iters} steps, epoch = {epoch_iters} steps")
    handlers = {s: signal.signal(s, lambda signum, _: STOP.update(signal=signal.Signals(signum).name))
                for s in STOP_SIGNALS}
    stop_at = min(iters, state["step"] + args.stop_after) if args.stop_after else iters
    step, iterator, sums = state["step"], None, {}                                  # `iterator` is rebuilt at each pass
    guard, since = {"first_bad": torch.full((), -1, device=run.device), "parts": {}}, (time.time(), step)
    try:
        while step < stop_at:
            if step % epoch_iters == 0:                   # Eq. (10): Θ_{k−1} is measured as epoch k starts
                state["epoch"] = step // epoch_iters
                if epoch_fn is not None:
                    state["avg_psnr"] = epoch_fn(model.eval())
                    model.train()
                    shown = " ".join(f"{k} {v:.2f}" for k, v in state["avg_psnr"].items() if "_sigma" not in k)
                    run.print0(f"{name}: epoch {state['epoch']}: avgPSNR (dB) {shown}")
            if iterator is None or step % steps_per_pass == 0:                  # a new pass: reshuffled by (seed, pass)
                iterator = one_pass(dataset, sampler, per_rank, step // steps_per_pass, step % steps_per_pass,
                                     args.workers, args.seed, pin_memory=run.device.type == "cuda")
            batch = {k: v.to(run.device, non_blocking=True) if torch.is_tensor(v) else v    # keys (strings) stay
                     for k, v in next(iterator).items()}
            for group in optimizer.param_groups:                                # warmup + cosine, set before every step
                group["lr"] = get_lr(step, lr, iters, min(args.warmup, iters // 10), args.min_lr)
            total, parts = train_step(net, optimizer, step_fn, batch, state, args.amp, args.grad_clip)
            parts = {"total": total.detach(), **{k: v.float() for k, v in parts.items()}}
            record_losses(guard, step, parts)             # on the device: no host sync in the step
            sums = {k: sums.get(k, 0) + v for k, v in parts.items()}            # summed on the device, read at log time
            step = state["step"] = step + 1
            if step == iters and final_fn is not None:    # after the last step, before its checkpoint
                state.update(final_fn(model.eval()))
                model.train()
            if step % args.log_every == 0 or step == stop_at:
                check_finite(guard, run, name, out_dir)
                images_per_s = (step - since[1]) * batch_size / (time.time() - since[0])
                log_progress(run, name, out_dir, sums, state, step - since[1], iters, optimizer.param_groups[0]["lr"],
                             images_per_s, eta_hours=(iters - step) * batch_size / images_per_s / 3600)
                sums, since = {}, (time.time(), step)
            if stop_requested(run, step, stop_at):
                check_finite(guard, run, name, out_dir)
                write_checkpoint(args, run, name, out_dir, model, optimizer, state)
                run.print0(f"{name}: stopped by {STOP['signal'] or 'a signal to another rank'} at step {step}; "
                           f"checkpoint written to {out_dir / 'last.pt'}; continue with --resume auto")
                raise StopTraining
            snapshot = bool(args.snapshot_every) and step % args.snapshot_every == 0
            if snapshot or step % args.save_every == 0 or step == stop_at:  # last.pt, and a kept snapshot every N steps
                check_finite(guard, run, name, out_dir)   # never write weights that saw a NaN
                write_checkpoint(args, run, name, out_dir, model, optimizer, state, snapshot)
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
    if step < iters:
        run.print0(f"{name}: stopped after --stop-after {args.stop_after} steps; continue with --resume auto")
        raise StopTraining
    return model, state


# --- Stage 1a: medium-quality images by 2-fold cross-validation (Sec. III-B) ---------------------------------------

def l1_step(net, batch, state):
    """Stage 1a's step: the restorer learns with L_rec alone (tests/benchmark.py times it too)."""
    loss_rec = losses.reconstruction_loss(net(batch["degraded"]), batch["target"])
    return loss_rec, {"loss_rec": loss_rec.detach()}


def medium_step(name, iters):
    """Stage 1a's step: each restorer of Table XIV learns with its authors' loss (`networks/`)."""
    # UNSPECIFIED: Table XIV gives no schedule; each restorer trains with stage 1a's AdamW, LR, batch, crops, steps.
    if name == "mprnet":                          # Charbonnier + 0.05 × edge loss, over its three stages
        return mprnet.medium_step
    if name == "airnet":  # L1 + 0.1 × contrastive, after the encoder alone (officially 100 of 1,000 epochs) for
        return partial(airnet.medium_step, warmup_steps=-(-iters // 10))  # UNSPECIFIED: the first 10% of the steps
    return l1_step                                # Restormer, PromptIR and the other backbones: L1


def medium_network(args):
    """Stage 1a's restorer, from --medium-weights (a released checkpoint) when given."""
    network = build_backbone(args.medium_backbone, args.medium_config)
    try:
        return load_released(args.medium_backbone, network, args.medium_weights) if args.medium_weights else network
    except (OSError, ValueError) as error:
        raise SystemExit(f"train.py: --medium-weights {error}") from None


def run_medium(args, run, samples, resume):
    """Train a restorer on each half of the data; each restores the half it never saw (Sec. III-B)."""
    images_dir = Path(args.medium_dir)                                                  # where I_m goes (Sec. III-B)
    if args.resume and (images_dir / "manifest.json").is_file():
        return run.print0(f"medium: {images_dir} is complete (manifest.json), skipping")
    rounds, entries = clip_prompts.cross_validation_rounds(samples), []              # 2 folds, each trained on one half
    for cv, other in zip(rounds, rounds[::-1]):           # model a restores fold b, model b fold a
        dataset = data.TrainDataset(cv["train"], args.patch_size, resample=data.parse_resample(args.resample),
                                    sigmas=args.sigmas, seed=args.seed, cache_mb=args.cache_mb)   # folds beside I_m:
        model, _ = fit(args, run, f"medium-{cv['model']}", medium_network(args),
                       medium_step(args.medium_backbone, args.medium_iters), dataset, args.medium_iters,
                       args.medium_lr, args.batch_size, images_dir.parent / f"fold_{cv['model']}", resume)
        clip_prompts.render_medium_images(getattr(model.eval(), "restore", model), cv["restore"][run.rank::run.world],
                                          images_dir, args.sigmas, run.device)   # restore(): one image (MPRNet)
        entries += [dict(task=s.task, key=s.key, fold=other["model"], restored_by=cv["model"]) for s in cv["restore"]]
        run.barrier()
    if run.master:                                        # the manifest says which model restored what
        clip_prompts.write_medium_manifest(images_dir, entries, dict(
            restorer=args.medium_backbone, config=args.medium_config, iters=args.medium_iters,
            weights=args.medium_weights, git_commit=git_commit()))
    run.barrier()
    run.print0(f"medium: {len(entries)} medium-quality images I_m in {images_dir}")


# --- Stage 1b: prompt learning (Sec. III-B, Eq. 1) -----------------------------------------------------------------

def prompt_step(net, batch, state, logit_scale):
    """Eq. (1) on a batch of cached image features: a step costs only the (truncated) text tower."""
    features, labels = batch["features"].flatten(0, 1), batch["labels"].flatten()   # (b·K, D), (b·K,)
    loss_ce, accuracy = clip_prompts.prompt_loss(net, features, labels, logit_scale)
    return loss_ce, {"loss_ce": loss_ce.detach(), "accuracy": accuracy.detach()}


def run_prompt(args, run, samples, clip_model, resume):
    """Eq. (1) on cached CLIP features of the crops L_clip will judge; 10% of the triplets held out."""
    if args.resume and Path(args.prompts).is_file():
        return run.print0(f"prompt: {args.prompts} exists, skipping")
    manifest = clip_prompts.read_medium_manifest(Path(args.medium_dir))          # a clear error if absent
    clip_model.to(run.device)                                                      # frozen: only the prompts will train
    held_out, levels = clip_prompts.held_out_split(samples), len(args.prompt_words)
    split = {kept: [s for s in samples if ((s.task, s.key) in held_out) != kept] for kept in (True, False)}
    bank = partial(clip_prompts.triplet_bank, clip_model, medium_dir=args.medium_dir, num_levels=levels,
                   crops=args.prompt_crops, patch_size=args.patch_size, seed=args.seed, sigmas=args.sigmas,
                   workers=args.workers)                     # cached CLIP features of every view of the triplets
    learner = clip_prompts.PromptLearner(clip_model, args.prompt_words, args.prompt_tokens, args.prompt_init)
    logit_scale = clip_model.logit_scale.exp().item()                        # 100 for OpenAI's weights
    if any(p.requires_grad for p in learner.parameters()):                   # "fixed" prompts (Table XII) train nothing
        learner, _ = fit(args, run, "prompt", learner, partial(prompt_step, logit_scale=logit_scale),
                         bank(split[True], view=args.prompt_view), args.prompt_iters, args.prompt_lr,
                         args.prompt_batch_size, Path(args.out) / "prompt", resume)
    else:
        run.print0("prompt: --prompt-init fixed has nothing to train (Table XII (a), (d), (j))")
    result = {}
    if held_out:                # the perceiver judges training crops (Eq. 9): test it on crops it never saw
        accuracy, crops = clip_prompts.held_out_accuracy(learner, bank(split[False], view="crop"), logit_scale)
        result = dict(triplets=len(held_out), crops=crops, accuracy=accuracy, trained_on=args.prompt_view)
        run.print0(f"prompt: held-out triplets ({len(held_out)}, {crops} crops): {accuracy:.1%} of their "
                   f"images in the right tier (chance {1 / levels:.0%})")
    if run.master:                                    # the prompts, their CLIP and the held-out accuracy
        config = {**vars(args), "medium_backbone": manifest["restorer"].get("restorer", args.medium_backbone)}
        clip_prompts.save_prompts(args.prompts, learner, clip_model.clip_info, config, args.prompt_iters, result)
    run.barrier()
    run.print0(f"prompt: prompts for {args.prompt_words} written to {args.prompts}")


# --- Stage 2: restoration with the quality-aware losses (Sec. III-C..E, Eq. 13) ------------------------------------

def restore_step(net, batch, state, sgm, criterion, use_cl, uses_dino, strata):
    """The step of Eq. (13): DINOv2 once per batch, the network, the four losses (tests/benchmark.py times it)."""
    semantic = sgm(batch["degraded"]) if uses_dino else None                   # F_1..F_4, frozen
    if use_cl:                                                               # Z, Z⁺ in one CFE pass
        restored, code, code_positive = net(batch["degraded"], semantic, batch["positive"])
    else:
        (restored, code), code_positive = net(batch["degraded"], semantic), None
    avg_psnr = None                               # Eq. (10): each image's negatives against its own stratum
    if state["avg_psnr"] is not None:             # (B, 1), broadcast over q
        table = torch.tensor([state["avg_psnr"][name] for name in strata], device=restored.device)
        avg_psnr = table[batch["stratum"], None]
    total, parts = criterion(restored, batch, code, code_positive, avg_psnr)            # Eq. (13)
    for key in {"non_easy_count", "very_hard_count"} & set(parts):        # per image → per task, for the log
        parts[key] = restored.new_zeros(len(data.TASKS)).index_add_(0, batch["task"], parts[key])
    return total, parts


def run_restore(args, run, samples, frozen, resume):
    sgm, model = frozen["sgm"], build_model(vars(args))                         # DINOv2 stays outside the trained model
    if args.init:                             # a fine-tune; --resume auto then continues the fine-tune itself
        init_weights(model, args, architecture)
    use_cl = args.lambda_cl > 0 and model.guided and model.use_cfe          # Z exists only with CFE
    if args.lambda_cl > 0 and not use_cl:
        run.print0("restore: L_cl needs the CFE codes; it is off in this ablation")
    criterion = losses.PerceiveIRLoss(frozen["vgg"], frozen["perceiver"], args.lambda_cl, args.lambda_clip,  # Eq. 13
                                      args.lambda_dpl, use_cl, args.lambda_clip > 0, args.lambda_dpl > 0, args.tau,
                                      lam=args.dpl_lambda, gamma=args.dpl_gamma)
    # UNSPECIFIED: the paper's non-easy negatives N_q are restorations by proxy models (InstructIR,
    # PromptIR, FSNet, MambaIR) it does not release; by default ours are the stage-1 medium images
    # I_m, restorations we can make, plus any --negatives folders (--no-medium-negative drops I_m).
    folders = ([Path(args.medium_dir)] * args.medium_negative + list(args.negatives)) if criterion.use_dpl else []
    if args.medium_negative and criterion.use_dpl and not Path(args.medium_dir).is_dir():
        raise SystemExit(f"train.py: --medium-negative: no medium-quality images in {Path(args.medium_dir)}; run "
                         "--stage medium first, pass --medium-dir, or --no-medium-negative")
    try:                                                   # a negatives folder that covers no image: one line
        dataset = data.TrainDataset(samples, args.patch_size, folders, data.parse_resample(args.resample), args.sigmas,
                                    seed=args.seed, cache_mb=args.cache_mb)
    except ValueError as error:
        raise SystemExit(f"train.py: {error}") from None
    names = ["I_m"] * args.medium_negative + [f"{len(args.negatives)} proxy folder(s)"] * bool(args.negatives)
    if criterion.use_dpl:
        run.print0(f"restore: L_dpl negatives: I_d easy; {' + '.join(names) or 'none'} non-easy")
    for folder, covered in dataset.coverage():                             # how many training images each folder covers
        run.print0(f"  {folder}: negatives for {covered} of {len(samples)} training images"
                   + ("" if covered == len(samples) else " (the others are masked out of Eq. 11)"))
    step_fn = partial(restore_step, sgm=sgm, criterion=criterion, use_cl=use_cl, strata=dataset.strata,
                      uses_dino=model.guided and model.use_dino)
    probe = dataset.probe(args.probe_size, args.seed) if criterion.use_dpl else None   # Eq. (10): L_dpl only
    # At the end: per-task centroids of Z on whole training images (at most CENTROID_IMAGES per task, evenly spread),
    # for evaluate.py's perception report; one line says how many Z names right. With an instance-normalised CFE,
    # Z is the mean over training-size tiles (guidance.image_code), as evaluate.py will then see it.
    chosen, tile = data.spread(samples, CENTROID_IMAGES), args.patch_size if args.cfe_norm == "instance" else 0
    centroids = (lambda net: {"centroids": degradation_centroids(
        net, ((s.task, data.load_pair(s, args.sigmas)[0]) for s in chosen), report=run.print0, code_crop=tile)})
    return fit(args, run, "restore", model, step_fn, dataset, args.iters, args.lr, args.batch_size,
               Path(args.out) / "restore", resume,
               epoch_fn=(lambda net: losses.average_psnr(partial(restore_image, net, sgm), probe, run.device))
               if probe else None, final_fn=centroids if model.guided and model.use_cfe else None)


# --- main ----------------------------------------------------------------------------------------------------------

def build_frozen(args, run, stages):
    """Every frozen network the stages need, loaded before training: missing weights fail at start-up, naming
    their flag. None of them ever enters DDP."""
    frozen = {"clip": None, "sgm": None, "vgg": None, "perceiver": None}
    if "prompt" in stages:
        frozen["clip"] = clip_prompts.load_clip(args.clip_model, weights=args.clip_weights, seed=args.seed)
        run.print0(f"frozen: CLIP {frozen['clip'].clip_info}")
    if "restore" in stages and not (args.no_guidance or args.no_dino):
        frozen["sgm"] = build_sgm(args.dino, args.dino_weights).to(run.device)
        run.print0(f"frozen: {frozen['sgm'].description}")
    if "restore" in stages and args.lambda_dpl > 0:
        frozen["vgg"] = losses.build_vgg(args.vgg_weights, variant=args.vgg).to(run.device)
        run.print0(f"frozen: {frozen['vgg'].description}")
    if "restore" in stages and args.lambda_clip > 0 and "prompt" not in stages:   # prompts of an earlier run
        frozen["perceiver"] = clip_prompts.QualityPerceiver.from_checkpoint(args.prompts, args.clip_weights, run.device)
    return frozen


def main(args):
    run = Run()
    for seed_fn in (torch.manual_seed, np.random.seed, random.seed):     # numpy and Python drive augmentation and folds
        seed_fn(args.seed)                        # the same on every rank: identical initial weights
    stages = ["medium", "prompt", "restore"] if args.stage == "all" else [args.stage]
    resume = load_checkpoint(args.resume) if args.resume not in (None, "auto") else None   # read once
    if resume and resume["stage"].split("-")[0] not in stages:
        raise SystemExit(f"--resume {args.resume} belongs to another stage than --stage {args.stage}")
    if args.batch_size % run.world or args.prompt_batch_size % run.world:
        raise SystemExit(f"train.py: the global batches ({args.batch_size}, {args.prompt_batch_size}) must "
                         f"divide by the {run.world} processes: choose --batch-size / --prompt-batch-size")
    try:
        if args.preset == "demo" and args.data_root is None:             # the offline demo makes its data
            args.data_root = str(Path(args.out) / "data")
            if run.master and not (Path(args.data_root) / "train").is_dir():
                demo.make_demo_data(args.data_root, seed=args.seed)
            run.print0(f"demo: generated data in {args.data_root}; tiny CLIP, DINOv2 and VGG with RANDOM weights "
                       "(no downloads): the numbers show that the pipeline works, not the paper's results")
            run.barrier()
        elif args.data_root is None:
            raise SystemExit("train.py: --data-root is required (check a dataset with `python data.py --check "
                             "ROOT`), or run the offline demo with --preset demo")
        try:                                      # expected failures (weights, data): one line, no traceback
            frozen = build_frozen(args, run, stages)
            samples, report = data.scan_training_set(args.data_root, data.parse_tasks(args.tasks), sets=data.parse_sets(
                args.train_sets), synthesize=args.synthesize and data.parse_tasks(args.synthesize))
        except (OSError, RuntimeError, ValueError) as error:
            raise SystemExit(f"train.py: {error}") from None
        for task, found in report["found"].items():
            run.print0(f"data: {task}: {found['pairs']} images ({found['layout']} layout, {found['folder']})")
        started = time.time()                                                           # the stages themselves, timed
        stage1 = data.spread(samples, args.stage1_images)            # I_m and the prompts: all, or a laptop's share
        if "medium" in stages:
            run_medium(args, run, stage1, resume)
        if "prompt" in stages:
            run_prompt(args, run, stage1, frozen["clip"], resume)
        if "restore" in stages:
            if args.lambda_clip > 0 and frozen["perceiver"] is None:   # prompts just learnt: a perceiver (Eq. 9)
                frozen["perceiver"] = clip_prompts.QualityPerceiver.from_checkpoint(args.prompts, args.clip_weights,
                                                                                     run.device)
            if frozen["perceiver"] is not None:           # Table XIV: the restorer behind the prompts, recorded
                args.medium_backbone = frozen["perceiver"].stage1_restorer
            model, state = run_restore(args, run, samples, frozen, resume)
            if args.preset == "demo":
                demo.report(args, run, model, frozen["sgm"], state.get("centroids"))
        run.print0(f"done in {time.time() - started:.0f} s; outputs in {args.out}")
    except StopTraining:
        pass
    finally:
        gc.collect()                              # avoids a rare SIGABRT at exit after DDP
        if run.distributed:
            dist.destroy_process_group()


if __name__ == "__main__":
    main(get_args())
