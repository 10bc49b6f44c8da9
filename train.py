"""Training of both Perceive-IR stages (Sec. III-B, Sec. IV-A.4), one code path for python and torchrun.

    python train.py --preset demo                     # offline: generated data, tiny networks, minutes
    torchrun --standalone --nproc_per_node=8 train.py --data-root DATA --stage restore

What is in here:
- `get_args()`: every knob next to its default and the paper source of that default; `--preset`.
- Stage 1a, `--stage medium` (Sec. III-B): a Restormer per half of the data (2-fold cross-validation)
  restores the other half; those restorations are the medium-quality images I_m.
- Stage 1b, `--stage prompt` (Eq. 1): the learnable CLIP prompts, trained on cached image features.
- Stage 2, `--stage restore` (Eq. 13): Perceive-IR with L_rec + λ1 L_cl + λ2 L_clip + λ3 L_dpl, and
  avgPSNR measured on a fixed probe of training patches at each epoch start (Eq. 10).
- `fit()`: the one loop every stage shares: DDP (NCCL on CUDA, gloo on CPU), AdamW, warmup + cosine,
  bf16, EMA, atomic checkpoints with exact resume, SIGINT/SIGTERM, a non-finite guard, logs.
"""

import argparse
import gc
import json
import math
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torchvision.utils
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import clip_prompts
import data
import losses
from backbone import build_backbone, count_parameters
from guidance import PerceiveIR, build_sgm, restore_image

SEMANTIC_DIM = {"base": 768, "tiny": 64}          # width of DINOv2 ViT-B/14 and of the tiny stand-in
PRESETS = {
    "paper": {},
    # Offline demo: generated data, tiny networks with random weights (CLIP, DINOv2, VGG), ~3 minutes.
    # The demo tasks have equally many images, so they are not resampled (the paper's ratios balance
    # Table I's sizes: with them, 97% of the demo's steps would be low-light and rain). With random
    # CLIP and VGG weights L_clip and L_dpl carry no quality signal, so the demo weighs them 10×
    # less than the paper (they still run, and still cost what they cost).
    "demo": dict(out="runs/demo", tasks="N+H+R+B+L", patch_size=64, backbone_config="tiny", dino="tiny",
                 resample="denoise=1,dehaze=1,derain=1,deblur=1,lowlight=1", lambda_clip=0.005, lambda_dpl=0.01,
                 clip_model="tiny", vgg="tiny", workers=0, medium_config="tiny", medium_iters=150,
                 prompt_iters=400, prompt_batch_size=16, iters=800, batch_size=4,
                 lr=1e-3, medium_lr=1e-3, prompt_lr=5e-3, warmup=20, probe_size=16, epoch_iters=100, log_every=50,
                 save_every=100, snapshot_every=0, sample_every=200),
}


class StopTraining(Exception):
    """A signal or --stop-after ended the run after writing a checkpoint."""


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------

def get_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    # --- what to run ---
    add("--stage", choices=["all", "medium", "prompt", "restore"], default="all",
        help="medium → prompt → restore (Sec. III-B, III-C); 'all' runs them in turn")
    add("--preset", choices=sorted(PRESETS), default="paper",
        help="'paper': Sec. IV-A.4 settings; 'demo': offline tiny run on generated data")
    add("--out", default="runs/perceive-ir", help="output folder; each stage writes a subfolder")
    add("--resume", default=None, help="'auto' (each stage's last.pt) or a checkpoint of the stage to run")
    add("--seed", type=int, default=0)
    # --- data (Sec. IV-A.1, Table I) ---
    add("--data-root", default=None, help="dataset root: PromptIR's, the authors' or the generic layout")
    add("--tasks", default="N+H+R", help="N+H+R or N+H+R+B+L (Sec. IV-A.1), any subset (Table XIII)")
    add("--patch-size", type=int, default=128, help="training crop (Sec. IV-A.4: 128)")
    add("--sigmas", type=float, nargs="+", default=[15, 25, 50], help="training noise σ (Sec. IV-A.1)")
    add("--resample", default=None, help="task=ratio,...; default denoise=3,derain=120,deblur=5,"
        "lowlight=200,dehaze=1 (Sec. IV-A.4)")
    add("--medium-dir", default=None, help="medium-quality images I_m (default OUT/medium/images)")
    add("--negatives", nargs="*", default=[], help="more non-easy negatives N_q: proxy restorations (Eq. 11)")
    add("--workers", type=int, default=4, help="data-loader workers per process")
    # --- stage 1a: medium-quality images (Sec. III-B, Table XIV) ---
    add("--medium-backbone", choices=["restormer", "nafnet"], default="restormer", help="Sec. III-B: Restormer")
    add("--medium-config", default="paper", help="its named config (backbone.CONFIGS)")
    add("--medium-init", default=None, help="official Restormer checkpoint to start each fold from")
    add("--medium-iters", type=int, default=100_000, help="steps per fold (Sec. IV-A.4: 100K)")
    add("--medium-lr", type=float, default=2e-4, help="Sec. IV-A.4: 2e-4")
    # --- stage 1b: prompts (Sec. III-B, Eq. 1, Table XII) ---
    add("--clip-model", choices=sorted(clip_prompts.CLIP_CONFIGS), default="ViT-B-32", help="Sec. IV-A.4: ViT-B/32")
    add("--clip-weights", default=None, help="local CLIP state-dict file (else OpenAI's weights)")
    add("--prompt-words", nargs="+", default=["excellent", "mediocre", "terrible"],
        help="level words, best first (Table XII (i))")
    add("--prompt-tokens", type=int, default=16, help="N embedded tokens per prompt (Sec. IV-A.4: 16)")
    add("--prompt-init", choices=clip_prompts.INITS, default="partial", help="Table XII: partial random")
    add("--prompt-iters", type=int, default=100_000, help="Sec. IV-A.4: 100K")
    add("--prompt-lr", type=float, default=4e-5, help="Sec. IV-A.4: 4e-5")
    add("--prompt-batch-size", type=int, default=32, help="triplets per step (Sec. IV-A.4: 32)")
    add("--prompts", default=None, help="stage-1 prompt checkpoint (default OUT/prompt/prompts.pt)")
    # --- stage 2: the network (Sec. III-C, Tables X, XV) ---
    add("--backbone", choices=["restormer", "nafnet"], default="restormer", help="Sec. IV-A.4; Table XV")
    add("--backbone-config", default="paper", help="'paper' (Sec. IV-A.4) or 'tiny'")
    add("--dino", choices=sorted(SEMANTIC_DIM), default="base", help="Sec. IV-A.4: DINOv2 base")
    add("--dino-weights", default=None, help="local DINOv2 weight file (else timm's hub weights)")
    add("--no-guidance", action="store_true", help="plain backbone (Table X (a), (b))")
    add("--no-dino", action="store_true", help="learnable F_l (Table X 'w/o DINO-v2')")
    add("--no-pgm", action="store_true", help="projection of F_l only (Table X 'w/o PGM')")
    add("--no-cfe", action="store_true", help="learnable Z (Table X 'w/o CFE'); turns L_cl off")
    # --- stage 2: losses (Sec. III-D, III-E); a weight of 0 switches a term off (Table XI) ---
    add("--lambda-cl", type=float, default=0.1, help="λ1 (Sec. IV-A.4: 0.1)")
    add("--lambda-clip", type=float, default=0.05, help="λ2 (Sec. IV-A.4: 0.05)")
    add("--lambda-dpl", type=float, default=0.1, help="λ3 (Sec. IV-A.4: 0.1)")
    add("--tau", type=float, default=0.1, help="L_cl temperature τ (Sec. III-E: 0.1)")
    add("--dpl-lambda", type=float, default=2.0, help="easy-negative weight λ (Sec. III-D.2: 2)")
    add("--dpl-gamma", type=float, default=0.25, help="γ of Eq. (10) (Sec. III-D.2: 0.25)")
    add("--vgg", choices=["vgg16", "tiny"], default="vgg16", help="L_dpl features (Sec. III-D.2: VGG-16)")
    add("--vgg-weights", default=None, help="local VGG-16 state-dict file (else torchvision's)")
    add("--epoch-iters", type=int, default=0, help="steps per epoch of Eq. (10); 0 = one pass over the data")
    add("--probe-size", type=int, default=64, help="fixed training patches for avgPSNR (Eq. 10; not given)")
    # --- stage 2: optimisation (Sec. IV-A.4) ---
    # UNSPECIFIED: the paper gives no weight decay, warmup, final LR, gradient clipping or stage-1a
    # batch size; the defaults below marked "not given" are Restormer's and PromptIR's usual values.
    add("--iters", type=int, default=400_000, help="Sec. IV-A.4: 400K")
    add("--batch-size", type=int, default=6, help="global batch (Sec. IV-A.4: 6)")
    add("--lr", type=float, default=2e-4, help="peak LR (Sec. IV-A.4: 2e-4)")
    add("--min-lr", type=float, default=1e-6, help="LR at the end of the cosine (not given)")
    add("--warmup", type=int, default=4000, help="linear warmup steps, at most 10%% of a stage (not given)")
    add("--beta1", type=float, default=0.9, help="AdamW β1 (Sec. IV-A.4: 0.9)")
    add("--beta2", type=float, default=0.999, help="AdamW β2 (Sec. IV-A.4: 0.999)")
    add("--weight-decay", type=float, default=1e-4, help="AdamW weight decay (not given; Restormer's)")
    add("--grad-clip", type=float, default=0.0, help="max gradient norm, 0 = off (not given)")
    add("--ema", type=float, default=0.0, help="EMA decay of the weights, 0 = off")
    # --- system ---
    add("--amp", choices=["none", "bf16"], default="none", help="autocast dtype")
    add("--compile", action="store_true", help="torch.compile the trainable network")
    add("--channels-last", action="store_true", help="channels-last memory format")
    add("--log-every", type=int, default=100)
    add("--save-every", type=int, default=2000, help="steps between writes of last.pt")
    add("--snapshot-every", type=int, default=50_000, help="steps between kept snapshots, 0 = none")
    add("--keep", type=int, default=3, help="snapshots to keep")
    add("--sample-every", type=int, default=5000, help="steps between sample grids, 0 = none")
    add("--stop-after", type=int, default=0, help="end this run after N steps with a checkpoint (job time "
        "limits; continue with --resume auto)")
    known, _ = parser.parse_known_args(argv)
    parser.set_defaults(**PRESETS[known.preset])
    return parser.parse_args(argv)


def stage_dir(args, stage):
    return Path(args.out) / stage


def medium_dir(args):
    return Path(args.medium_dir) if args.medium_dir else stage_dir(args, "medium") / "images"


def prompts_path(args):
    return Path(args.prompts) if args.prompts else stage_dir(args, "prompt") / "prompts.pt"


def parse_resample(spec):
    if spec is None:
        return None
    try:
        return {task: float(ratio) for task, ratio in (item.split("=") for item in spec.split(","))}
    except ValueError:
        raise SystemExit(f"--resample {spec!r}: expected task=ratio pairs, e.g. denoise=3,derain=120")


def build_model(config):
    """Perceive-IR from a dict of args (also a checkpoint's own "args": evaluate.py rebuilds with it)."""
    return PerceiveIR(config["backbone"], config["backbone_config"], semantic_dim=SEMANTIC_DIM[config["dino"]],
                      guided=not config["no_guidance"], use_dino=not config["no_dino"],
                      use_pgm=not config["no_pgm"], use_cfe=not config["no_cfe"])


# ---------------------------------------------------------------------------------------------
# One DDP code path (STYLE.md): python train.py, torchrun on one node or many
# ---------------------------------------------------------------------------------------------

class Run:
    """Rank, world size and device from torchrun's environment (absent under plain python)."""

    def __init__(self):
        self.distributed = "RANK" in os.environ
        if self.distributed:
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        self.rank = dist.get_rank() if self.distributed else 0
        self.world = dist.get_world_size() if self.distributed else 1
        self.master = self.rank == 0
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        cuda = torch.cuda.is_available()
        self.device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")

    def print0(self, *message):
        if self.master:
            print(*message, flush=True)

    def barrier(self):
        if self.distributed:
            dist.barrier()

    def all_sum(self, tensor):
        if self.distributed:
            dist.all_reduce(tensor)
        return tensor


def git_commit():
    """The commit of this code, "-dirty" when tracked files were changed; stored in every checkpoint."""
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=40"], cwd=Path(__file__).parent,
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# ---------------------------------------------------------------------------------------------
# Checkpoints: one plain dict, loadable with weights_only=True, written atomically
# ---------------------------------------------------------------------------------------------

def rng_state():
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss],
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else torch.empty(0, dtype=torch.uint8)}


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    kind, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    if torch.cuda.is_available() and state["cuda"].numel():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(path, checkpoint):
    """Temporary file, then rename: a crash mid-write never leaves a half-written checkpoint."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, f"{path}.tmp")
    os.replace(f"{path}.tmp", path)


def load_checkpoint(path, flag="--resume"):
    if not Path(path).is_file():
        raise SystemExit(f"{flag} {path}: file not found")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise SystemExit(f"{flag} {path}: not a readable checkpoint ({type(error).__name__}: {str(error)[:200]})")
    if not isinstance(checkpoint, dict) or not {"stage", "args", "model", "step"} <= set(checkpoint):
        raise SystemExit(f"{flag} {path}: not a Perceive-IR training checkpoint (no stage/args/model/step)")
    return checkpoint


def get_lr(step, peak_lr, iters, warmup, min_lr):
    """Linear warmup over `warmup` steps, then a cosine from peak_lr down to min_lr at `iters`.

    # UNSPECIFIED: Sec. IV-A.4 gives the peak (2e-4) but no schedule; we use warmup + cosine, the
    # schedule of PromptIR, the Restormer-based All-in-One method this paper compares with most.
    """
    if step < warmup:
        return peak_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, iters - warmup))
    return min_lr + 0.5 * (peak_lr - min_lr) * (1 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------------------------
# The shared training loop
# ---------------------------------------------------------------------------------------------

STOP = {"signal": None}


def request_stop(signum, frame):
    STOP["signal"] = signal.Signals(signum).name


def to_device(batch, device):
    """Tensors of a batch (a dict, or a list of tensors) to the device; other values unchanged."""
    items = batch.items() if isinstance(batch, dict) else enumerate(batch)
    moved = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in items}
    return moved if isinstance(batch, dict) else list(moved.values())


def fit(args, run, name, model, step_fn, dataset, iters, lr, batch_size, out_dir, epoch_fn=None, sample_fn=None):
    """Train `model` for `iters` steps of `step_fn(net, batch, state) -> (total, parts)`; return it
    (its EMA when --ema is set). `state` holds step, epoch and avg_psnr; `epoch_fn(model)` runs at
    each epoch start and its value becomes state["avg_psnr"] (Eq. 10).

    Resume is exact: the data order is a function of (seed, epoch), augmentation of (seed, epoch,
    index), and the weights, optimiser, EMA, avgPSNR and RNG states come back from the checkpoint.
    """
    out_dir, per_rank = Path(out_dir), batch_size // run.world
    if batch_size % run.world:
        raise SystemExit(f"{name}: global batch {batch_size} is not divisible by {run.world} processes")
    model.to(run.device, memory_format=torch.channels_last if args.channels_last else torch.preserve_format)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(args.ema), use_buffers=True) if args.ema else None
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, betas=(args.beta1, args.beta2), weight_decay=args.weight_decay)
    state = {"step": 0, "epoch": 0, "avg_psnr": None}

    resume = args.resume if args.resume not in (None, "auto") else None
    if resume and load_checkpoint(resume)["stage"] != name:
        resume = None                                        # --stage all: the file is another stage's
    if resume is None and (out_dir / "last.pt").is_file():
        if args.resume != "auto":
            raise SystemExit(f"{out_dir / 'last.pt'} exists: continue it with --resume auto, or choose another --out")
        resume = out_dir / "last.pt"
    if resume:
        checkpoint = load_checkpoint(resume)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        if ema is not None and checkpoint["ema"] is not None:
            ema.load_state_dict(checkpoint["ema"])
        state.update(step=checkpoint["step"], epoch=checkpoint["epoch"], avg_psnr=checkpoint["avg_psnr"])
        set_rng_state(checkpoint["rng"][run.rank % len(checkpoint["rng"])])
        run.print0(f"{name}: resumed from {resume} at step {state['step']}")
    if state["step"] >= iters:
        run.print0(f"{name}: already trained for {iters} steps ({out_dir / 'last.pt'})")
        return ema.module if ema is not None else model

    net = torch.compile(model) if args.compile else model
    if run.distributed:                                       # only the trainable network is wrapped
        net = DDP(net, device_ids=[run.device.index] if run.device.type == "cuda" else None)
    sampler = torch.utils.data.distributed.DistributedSampler(
        dataset, num_replicas=run.world, rank=run.rank, shuffle=True, seed=args.seed, drop_last=True)
    steps_per_pass = len(sampler) // per_rank
    if steps_per_pass == 0:
        raise SystemExit(f"{name}: {len(dataset)} training samples are fewer than one global batch of {batch_size}")
    epoch_iters = args.epoch_iters or steps_per_pass

    def batches(data_epoch, skip):
        sampler.set_epoch(data_epoch)
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(data_epoch)
        indices = list(sampler)[skip * per_rank:]             # resuming mid-pass: skip what was seen
        return iter(torch.utils.data.DataLoader(dataset, batch_size=per_rank, sampler=indices, drop_last=True,
                                                num_workers=args.workers, pin_memory=run.device.type == "cuda"))

    def check_finite():
        """At log and save intervals only (a host sync): stop on the first non-finite loss."""
        if run.all_sum((first_bad >= 0).float()).item() > 0:
            terms = ", ".join(f"{k} {v.item():.4g}" for k, v in bad_parts.items())
            where = f"step {int(first_bad.item()) + 1}" if first_bad.item() >= 0 else "another rank"
            raise SystemExit(f"{name}: non-finite loss at {where} ({terms}); stopped without saving. The last "
                             f"good checkpoint {out_dir / 'last.pt'} is intact: lower --lr or set --grad-clip, "
                             "check the data, then --resume auto")

    def save(snapshot=False):
        check_finite()                                        # never write weights that saw a NaN
        states = [rng_state()] * run.world
        if run.distributed:                                   # RNG states of every rank
            dist.all_gather_object(states, rng_state())
        checkpoint = {"stage": name, "args": vars(args), "git_commit": git_commit(), "step": step,
                      "epoch": state["epoch"], "avg_psnr": state["avg_psnr"], "model": model.state_dict(),
                      "ema": ema.state_dict() if ema is not None else None, "optimizer": optimizer.state_dict(),
                      "rng": states}
        if run.master:
            save_checkpoint(out_dir / "last.pt", checkpoint)
            if snapshot:
                save_checkpoint(out_dir / f"step_{step:08d}.pt", checkpoint)
                for old in sorted(out_dir.glob("step_*.pt"))[:-args.keep or None]:
                    old.unlink()
        run.barrier()

    if run.master:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "args.json").write_text(json.dumps({**vars(args), "git_commit": git_commit()}, indent=1))
    run.print0(f"{name}: {count_parameters(model):,d} trainable parameters, {len(dataset)} samples, global batch "
               f"{batch_size} = {run.world} × {per_rank} per process, {iters} steps, epoch = {epoch_iters} steps")
    handlers = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    autocast = torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=args.amp == "bf16")
    stop_at = min(iters, state["step"] + args.stop_after) if args.stop_after else iters
    step, iterator, sums, bad_parts = state["step"], None, {}, {}
    first_bad, since = torch.full((), -1, device=run.device), (time.time(), state["step"])
    try:
        while step < stop_at:
            if step % epoch_iters == 0:
                state["epoch"] = step // epoch_iters
                if epoch_fn is not None:
                    state["avg_psnr"] = epoch_fn(ema.module if ema is not None else model)
                    run.print0(f"{name}: epoch {state['epoch']}: avgPSNR {state['avg_psnr']:.2f} dB on the probe")
            if iterator is None or step % steps_per_pass == 0:
                iterator = batches(step // steps_per_pass, step % steps_per_pass)
            batch = to_device(next(iterator), run.device)
            for group in optimizer.param_groups:
                group["lr"] = get_lr(step, lr, iters, min(args.warmup, iters // 10), args.min_lr)
            with autocast:
                total, parts = step_fn(net, batch, state)
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            if args.grad_clip:
                torch.nn.utils.clip_grad_norm_(trainable, args.grad_clip)
            optimizer.step()
            if ema is not None:
                ema.update_parameters(model)
            # Device-side bookkeeping only: the step never waits for the host.
            parts = {"total": total.detach(), **parts}
            bad_now = (first_bad < 0) & ~torch.isfinite(parts["total"])
            first_bad = torch.where(bad_now, step, first_bad)
            bad_parts = {k: torch.where(bad_now, v.float(), bad_parts.get(k, v.float())) for k, v in parts.items()}
            sums = {k: sums.get(k, 0) + v.float() for k, v in parts.items()}
            step += 1

            if step % args.log_every == 0 or step == stop_at:
                check_finite()
                logged = {k: (v / (step - since[1])).item() for k, v in sums.items()}
                rate = (step - since[1]) * batch_size / (time.time() - since[0])
                run.print0(f"{name} [{'#' * (20 * step // iters):<20s}] {step}/{iters} | "
                           + " ".join(f"{k} {v:.4f}" for k, v in logged.items())
                           + f" | lr {optimizer.param_groups[0]['lr']:.2e} | {rate:.1f} img/s"
                           + f" | ETA {(iters - step) * batch_size / rate / 3600:.1f} h")
                if run.master:
                    with open(out_dir / "log.jsonl", "a") as log:
                        log.write(json.dumps({"step": step, **logged, "lr": optimizer.param_groups[0]["lr"],
                                              "images_per_s": rate, "avg_psnr": state["avg_psnr"]}) + "\n")
                sums, since = {}, (time.time(), step)
            if sample_fn and args.sample_every and step % args.sample_every == 0 and run.master:
                sample_fn(model, batch, out_dir / "samples" / f"step_{step:08d}.png")
            stop = STOP["signal"] is not None
            if run.distributed:                               # agree every 10 steps: one small all-reduce
                flag = torch.tensor(float(stop), device=run.device)
                stop = (step % 10 == 0 or step == stop_at) and run.all_sum(flag).item() > 0
            if stop:
                save()
                run.print0(f"{name}: stopped by {STOP['signal'] or 'a signal to another rank'} at step {step}; "
                           f"checkpoint written to {out_dir / 'last.pt'}; continue with --resume auto")
                raise StopTraining
            if args.snapshot_every and step % args.snapshot_every == 0:
                save(snapshot=True)
            elif step % args.save_every == 0 or step == stop_at:
                save()
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
    if step < iters:
        run.print0(f"{name}: stopped after --stop-after {args.stop_after} steps; continue with --resume auto")
        raise StopTraining
    return ema.module if ema is not None else model


def save_grid(images, path):
    """A sample grid, rows degraded | restored | target (up to 4 samples)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torchvision.utils.save_image(torch.cat([x[:4].float().clamp(0, 1) for x in images]), path, nrow=len(images[0][:4]))


# ---------------------------------------------------------------------------------------------
# Stage 1a: medium-quality images by 2-fold cross-validation (Sec. III-B)
# ---------------------------------------------------------------------------------------------

def l1_step(net, batch, state):
    loss_rec = losses.reconstruction_loss(net(batch["degraded"]), batch["target"])
    return loss_rec, {"loss_rec": loss_rec.detach()}


@torch.no_grad()
def backbone_samples(model, batch, path):
    save_grid([batch["degraded"], model(batch["degraded"]), batch["target"]], path)


def run_medium(args, run, samples):
    """Train a restorer on each half of the data; each restores the half it never saw."""
    images_dir = medium_dir(args)
    if args.resume and (images_dir / "manifest.json").is_file():
        return run.print0(f"medium: {images_dir} is complete (manifest.json), skipping")
    rounds, entries = clip_prompts.cross_validation_rounds(samples), []
    for cv, other in zip(rounds, rounds[::-1]):
        fold_dir = stage_dir(args, "medium") / f"fold_{cv['model']}"
        model = build_backbone(args.medium_backbone, args.medium_config)
        if args.medium_init and not (fold_dir / "last.pt").is_file():
            official = torch.load(args.medium_init, map_location="cpu", weights_only=True)
            model.load_state_dict(official.get("params", official))       # official files keep it in "params"
        dataset = data.TrainDataset(cv["train"], args.patch_size, resample=parse_resample(args.resample),
                                    sigmas=args.sigmas, seed=args.seed)
        model = fit(args, run, f"medium-{cv['model']}", model, l1_step, dataset, args.medium_iters,
                    args.medium_lr, args.batch_size, fold_dir, sample_fn=backbone_samples).eval()
        clip_prompts.render_medium_images(model, cv["restore"][run.rank::run.world], images_dir, args.sigmas,
                                          run.device)                     # ranks share the rendering
        entries += [dict(task=s.task, key=s.key, fold=other["model"], restored_by=cv["model"]) for s in cv["restore"]]
        run.barrier()
    if run.master:
        clip_prompts.write_medium_manifest(images_dir, entries, dict(
            restorer=args.medium_backbone, config=args.medium_config, iters=args.medium_iters,
            init=args.medium_init, git_commit=git_commit()))
    run.barrier()
    run.print0(f"medium: {len(entries)} medium-quality images I_m in {images_dir}")


# ---------------------------------------------------------------------------------------------
# Stage 1b: prompt learning (Sec. III-B, Eq. 1)
# ---------------------------------------------------------------------------------------------

def run_prompt(args, run, samples, clip_model):
    """Eq. (1) on cached CLIP image features: a step costs only the (truncated) text tower."""
    if args.resume and prompts_path(args).is_file():
        return run.print0(f"prompt: {prompts_path(args)} exists, skipping")
    clip_prompts.read_medium_manifest(medium_dir(args))                     # a clear error if absent
    clip_model.to(run.device)
    levels = len(args.prompt_words)
    triplets = data.TripletDataset(samples, medium_dir(args), sigmas=args.sigmas)
    # Each rank encodes its share of the images once; the shares are then gathered everywhere.
    shard = torch.utils.data.Subset(triplets, range(run.rank, len(triplets), run.world))
    features, _ = clip_prompts.build_embedding_bank(clip_model, shard, num_levels=levels, num_workers=args.workers)
    local = features.view(-1, levels, features.shape[-1])                           # (N/W, K, D)
    shares = [local] * run.world
    if run.distributed:
        dist.all_gather_object(shares, local)
    bank = torch.utils.data.TensorDataset(torch.cat(shares), torch.arange(levels).repeat(len(triplets), 1))
    learner = clip_prompts.PromptLearner(clip_model, args.prompt_words, args.prompt_tokens, args.prompt_init)
    logit_scale = clip_model.logit_scale.exp().item()

    def prompt_step(net, batch, state):
        image_features, labels = batch                                              # (b, K, D), (b, K)
        loss_ce, accuracy = clip_prompts.prompt_loss(net, image_features.flatten(0, 1), labels.flatten(), logit_scale)
        return loss_ce, {"loss_ce": loss_ce.detach(), "accuracy": accuracy.detach()}

    if any(p.requires_grad for p in learner.parameters()):
        learner = fit(args, run, "prompt", learner, prompt_step, bank, args.prompt_iters, args.prompt_lr,
                      args.prompt_batch_size, stage_dir(args, "prompt"))
    else:
        run.print0("prompt: --prompt-init fixed has nothing to train (Table XII (a), (d), (j))")
    if run.master:
        clip_prompts.save_prompts(prompts_path(args), learner, clip_model.clip_info, vars(args), args.prompt_iters)
    run.barrier()
    run.print0(f"prompt: prompts for {args.prompt_words} written to {prompts_path(args)}")


# ---------------------------------------------------------------------------------------------
# Stage 2: restoration with the quality-aware losses (Sec. III-C..E, Eq. 13)
# ---------------------------------------------------------------------------------------------

def build_probe(dataset, size, seed):
    """A fixed set of training patches (never test images) on which avgPSNR of Eq. (10) is measured.

    # UNSPECIFIED: the paper measures "the average PSNR" of the network at each epoch start without
    # saying on what; we use a fixed probe of 64 training patches, and an epoch is one pass over the
    # resampled training set (--epoch-iters); at step 0 the initial network Θ_0 is measured.
    """
    indices = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed + 1))[:size].tolist()
    items = [dataset[i] for i in indices]
    return torch.stack([x["degraded"] for x in items]), torch.stack([x["target"] for x in items])


def make_restore_step(sgm, criterion, use_cl, uses_dino):
    """The step of Eq. (13) for `fit`: DINOv2 once per batch, the network, the four losses.
    `evaluate.py --bench` times this same function."""
    def restore_step(net, batch, state):
        semantic = sgm(batch["degraded"]) if uses_dino else None                 # DINOv2 once per batch
        if use_cl:                                                               # Z, Z⁺ in one CFE pass
            restored, code, code_positive = net(batch["degraded"], semantic, batch["positive"])
        else:
            (restored, code), code_positive = net(batch["degraded"], semantic), None
        return criterion(restored, batch, code, code_positive, state["avg_psnr"])
    return restore_step


def run_restore(args, run, samples, frozen):
    sgm = frozen["sgm"]
    negative_dirs = ([medium_dir(args)] if medium_dir(args).is_dir() else []) + list(args.negatives)
    if args.lambda_dpl and not negative_dirs:
        run.print0("restore: no medium-quality or proxy folders: L_dpl has the easy negative I_d only")
    model = build_model(vars(args))
    use_cl = args.lambda_cl > 0 and model.guided and model.use_cfe
    if args.lambda_cl > 0 and not use_cl:
        run.print0("restore: L_cl needs the CFE codes; it is off in this ablation")
    criterion = losses.PerceiveIRLoss(frozen["vgg"], frozen["perceiver"], args.lambda_cl, args.lambda_clip,
                                      args.lambda_dpl, use_cl=use_cl, use_clip=args.lambda_clip > 0,
                                      use_dpl=args.lambda_dpl > 0, tau=args.tau, lam=args.dpl_lambda,
                                      gamma=args.dpl_gamma)
    dataset = data.TrainDataset(samples, args.patch_size, negative_dirs, parse_resample(args.resample),
                                args.sigmas, seed=args.seed)
    probe = build_probe(dataset, args.probe_size, args.seed)
    restore_step = make_restore_step(sgm, criterion, use_cl, uses_dino=model.guided and model.use_dino)

    def average_psnr(model):
        """avgPSNR(I_r, Θ_{k−1}) of Eq. (10): this rank's share of the probe, summed over ranks."""
        model.eval()
        total = torch.zeros(2, device=run.device)
        with torch.no_grad():
            for degraded, target in zip(probe[0][run.rank::run.world].split(8), probe[1][run.rank::run.world].split(8)):
                restored = restore_image(model, sgm, degraded.to(run.device))
                total += torch.stack([losses.batch_psnr(restored, target.to(run.device)).sum(),
                                      torch.tensor(float(len(target)), device=run.device)])
        model.train()
        total = run.all_sum(total)
        return (total[0] / total[1]).item()

    def sample_fn(model, batch, path):
        save_grid([batch["degraded"], restore_image(model, sgm, batch["degraded"]), batch["target"]], path)

    return fit(args, run, "restore", model, restore_step, dataset, args.iters, args.lr, args.batch_size,
               stage_dir(args, "restore"), epoch_fn=average_psnr if criterion.use_dpl else None, sample_fn=sample_fn)


def demo_report(args, run, model, sgm):
    """PSNR of the degraded inputs and of the restorations on the held-out demo test images."""
    model.eval()
    run.print0("\ndemo: held-out test images, PSNR (RGB, dB)      input -> restored")
    gains = []
    for test_set in data.build_test_sets(args.data_root, data.parse_tasks(args.tasks), sigmas=(25,)):
        psnr_in, psnr_out = [], []
        for item in test_set:
            degraded, target = item["degraded"][None].to(run.device), item["target"][None].to(run.device)
            with torch.no_grad():
                restored = restore_image(model, sgm, degraded)
            psnr_in.append(losses.batch_psnr(degraded, target).item())
            psnr_out.append(losses.batch_psnr(restored, target).item())
        label = f"{test_set.task} ({test_set.name}{f', σ={test_set.sigma:g}' if test_set.sigma else ''})"
        run.print0(f"  {label:42s} {np.mean(psnr_in):6.2f} -> {np.mean(psnr_out):6.2f}")
        gains.append(np.mean(psnr_out) - np.mean(psnr_in))
    run.print0(f"  mean gain over the inputs: {np.mean(gains):+.2f} dB (tiny random-weight networks, minutes of CPU)")
    return gains


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------

def build_frozen(args, run, stages):
    """Load every frozen network the chosen stages need before any training, so that missing weights
    fail at start-up naming their flag, not hours into a run. None of them ever enters DDP."""
    frozen = {"clip": None, "sgm": None, "vgg": None, "perceiver": None}
    if "prompt" in stages:
        frozen["clip"] = clip_prompts.load_clip(args.clip_model, weights=args.clip_weights, seed=args.seed)
        run.print0(f"frozen: CLIP {frozen['clip'].clip_info}")
    if "restore" in stages:
        if not (args.no_guidance or args.no_dino):
            frozen["sgm"] = build_sgm(args.dino, args.dino_weights).to(run.device)
            run.print0(f"frozen: {frozen['sgm'].description}")
        if args.lambda_dpl > 0:
            frozen["vgg"] = losses.build_vgg(args.vgg_weights, variant=args.vgg).to(run.device)
            run.print0(f"frozen: {frozen['vgg'].description}")
        if args.lambda_clip > 0 and "prompt" not in stages:               # prompts of an earlier run
            frozen["perceiver"] = clip_prompts.QualityPerceiver.from_checkpoint(
                prompts_path(args), args.clip_weights, device=run.device)
    return frozen


def main(args):
    run = Run()
    for seed_fn in (torch.manual_seed, np.random.seed, random.seed):
        seed_fn(args.seed)                        # the same on every rank: identical initial weights
    stages = ["medium", "prompt", "restore"] if args.stage == "all" else [args.stage]
    if args.resume not in (None, "auto") and load_checkpoint(args.resume)["stage"].split("-")[0] not in stages:
        raise SystemExit(f"--resume {args.resume} belongs to another stage than --stage {args.stage}")
    try:
        if args.preset == "demo" and args.data_root is None:
            args.data_root = str(Path(args.out) / "data")
            if run.master and not (Path(args.data_root) / "train").is_dir():
                data.make_demo_data(args.data_root, seed=args.seed)
            run.print0(f"demo: generated data in {args.data_root}; tiny CLIP, DINOv2 and VGG with RANDOM weights "
                       "(no downloads): the numbers show that the pipeline works, not the paper's results")
            run.barrier()
        if args.data_root is None:
            raise SystemExit("--data-root is required (check a dataset with `python data.py --check ROOT`), "
                             "or run the offline demo with --preset demo")
        frozen = build_frozen(args, run, stages)
        samples, report = data.scan_training_set(args.data_root, data.parse_tasks(args.tasks))
        for task, found in report["found"].items():
            run.print0(f"data: {task}: {found['pairs']} images ({found['layout']} layout, {found['folder']})")
        started = time.time()
        if "medium" in stages:
            run_medium(args, run, samples)
        if "prompt" in stages:
            run_prompt(args, run, samples, frozen["clip"])
            if "restore" in stages and args.lambda_clip > 0:                # the perceiver shares CLIP
                frozen["perceiver"] = clip_prompts.QualityPerceiver.from_checkpoint(
                    prompts_path(args), args.clip_weights, device=run.device)
        if "restore" in stages:
            model = run_restore(args, run, samples, frozen)
            if args.preset == "demo":
                demo_report(args, run, model, frozen["sgm"])
        run.print0(f"done in {time.time() - started:.0f} s; outputs in {args.out}")
    except StopTraining:
        pass
    finally:
        gc.collect()                              # FACTS.md: avoids a SIGABRT at exit after DDP
        if run.distributed:
            dist.destroy_process_group()


if __name__ == "__main__":
    main(get_args())
