"""Checkpoints and exact resume (Sec. IV-A.4 trains for 400K iterations: days, on clusters that preempt jobs).

A checkpoint is one plain dict of tensors and primitives (stage, args, step, epoch, avgPSNR of Eq. 10, model,
optimiser, every rank's RNG states, the git commit), loadable with `torch.load(path, weights_only=True)` and
written atomically. Resuming restores all of it, so a run stopped and resumed ends with the weights of a run
that never stopped (train.py's data order and augmentation are functions of (seed, epoch, index)).

What is in here:
- `rng_state`, `set_rng_state`: torch, numpy, Python and CUDA generators as tensors and numbers.
- `save_checkpoint` (temporary file, then rename), `load_checkpoint` (refuses anything else, naming the flag).
- `restore_progress`, `write_checkpoint`: what train.py's loop calls to continue and to save a stage.
- `one_pass`: the batches of one pass from any step on, a function of (seed, epoch), with loader workers that
  leave SIGINT/SIGTERM to train.py, which checkpoints and stops.
- `init_weights`: `--init`, a fine-tune that starts from a trained restore checkpoint's weights.
- `record_losses`, `check_finite`: the non-finite guard: no checkpoint ever holds weights that saw a NaN.
- `git_commit`: the code's commit, recorded in every checkpoint.
- `export_weights`: a trained model without its optimiser, to share (`python checkpoints.py export SRC DST`).
"""

import hashlib
import os
import sys
import random
import signal
import subprocess
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist


def git_commit():
    """The commit of this code, "-dirty" when tracked files were changed; stored in every checkpoint."""
    try:
        return subprocess.check_output(["git", "describe", "--always", "--dirty", "--abbrev=40"], text=True,
                                       cwd=Path(__file__).parent, stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def rng_state():
    kind, keys, position, has_gauss, gauss = np.random.get_state()     # numpy's state as tensors and numbers
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss],
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else torch.empty(0, dtype=torch.uint8)}


def set_rng_state(state):
    torch.set_rng_state(state["torch"])                                  # torch, numpy and Python generators, then CUDA
    kind, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    if torch.cuda.is_available() and state["cuda"].numel():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(path, checkpoint):
    """Temporary file, then rename: a crash mid-write never leaves a half-written checkpoint."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)                    # the folder may be new (a fold, a snapshot)
    torch.save(checkpoint, f"{path}.tmp")
    os.replace(f"{path}.tmp", path)


def output_folder(path, flag):
    """An output folder a flag names: refused, in one line, if it is an existing file (nothing is written yet)."""
    if path is not None and Path(path).exists() and not Path(path).is_dir():
        raise SystemExit(f"{flag} {path}: this is a file, not a folder; choose a folder (it is created if new)")
    return path


def load_checkpoint(path, flag="--resume"):
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)   # tensors and primitives only
    except Exception as error:
        raise SystemExit(f"{flag} {path}: not a readable checkpoint ({type(error).__name__}: {str(error)[:200]})")
    if not isinstance(checkpoint, dict) or not {"stage", "args", "model", "step"} <= set(checkpoint):
        raise SystemExit(f"{flag} {path}: not a Perceive-IR training checkpoint (no stage/args/model/step)")
    return checkpoint


def restore_progress(args, run, name, out_dir, given, model, optimizer, state):
    """Continue where this stage stopped, bit for bit: weights, optimiser, step, epoch, avgPSNR, every rank's RNG.
    `given` is the --resume PATH file main() read once; --resume auto reads last.pt here, once. True if resumed."""
    checkpoint = given if given is not None and given["stage"] == name else None
    last = out_dir / "last.pt"
    own = checkpoint is not None and last.is_file() and Path(args.resume).resolve() == last.resolve()
    if last.is_file() and args.resume != "auto" and not own:    # never overwrite a run by accident, whatever --resume
        raise SystemExit(f"{last} exists: continue it with --resume auto, or choose another --out"          # says
                         + (f" (--resume {args.resume} would overwrite that run)" if checkpoint else ""))
    if checkpoint is None and last.is_file():
        checkpoint = load_checkpoint(last)
    if checkpoint is None:
        return False
    if checkpoint["stage"] == "restore" and not isinstance(checkpoint.get("avg_psnr"), (dict, type(None))):
        # A single avgPSNR cannot say which of Eq. (10)'s weights each task's negatives had.
        raise SystemExit("restore: this checkpoint (an older version's) holds one avgPSNR for all tasks; Eq. (10) "
                         "now needs each task's, so it cannot resume exactly: start a new --out (evaluate.py reads it)")
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as error:                         # another backbone, config or Table X switch
        first = str(error).splitlines()[1].strip() if "\n" in str(error) else str(error)
        raise SystemExit(f"{name}: the checkpoint to resume holds another network than these settings build "
                         f"({first[:160]}); resume with the settings it was trained with (its args.json)") from None
    optimizer.load_state_dict(checkpoint["optimizer"])
    state.update({key: checkpoint[key] for key in ("step", "epoch", "avg_psnr", "centroids") if key in checkpoint})
    set_rng_state(checkpoint["rng"][run.rank % len(checkpoint["rng"])])
    return True


def write_checkpoint(args, run, name, out_dir, model, optimizer, state, snapshot=False):
    """Every rank's RNG state is gathered; rank 0 writes last.pt (and a kept snapshot), then all wait."""
    states = [rng_state()] * run.world                               # this rank's state fills every slot in one process
    if run.distributed:
        dist.all_gather_object(states, rng_state())
    checkpoint = {"stage": name, "args": vars(args), "git_commit": git_commit(), **state,
                  "model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": states}
    if run.master:
        save_checkpoint(out_dir / "last.pt", checkpoint)
        if snapshot:
            save_checkpoint(out_dir / f"step_{state['step']:08d}.pt", checkpoint)
            for old in sorted(out_dir.glob("step_*.pt"))[:-args.keep] if args.keep else []:   # 0 keeps all
                old.unlink()
    run.barrier()


# What a trained model needs to restore and to report what it perceived: no optimiser, no RNG states.
EXPORTED = ("stage", "args", "git_commit", "step", "epoch", "avg_psnr", "centroids", "model")


def init_weights(model, args, architecture):
    """--init: a trained restore checkpoint's weights, strictly, for a fine-tune on new data (Table VI †). The
    optimiser, schedule, avgPSNR and centroids start afresh, and the frozen networks are this run's own.
    `architecture`: settings dict → the settings that decide the shapes of the weights (guidance.architecture),
    equal in both."""
    checkpoint = load_checkpoint(args.init, "--init")
    if checkpoint["stage"] != "restore":
        raise SystemExit(f"--init {args.init}: a {checkpoint['stage']} checkpoint; fine-tunes start from a restore one")
    theirs, ours = architecture(checkpoint["args"]), architecture(vars(args))
    other = [f"--{key.replace('_', '-')} {theirs[key]} there, {ours[key]} here"
             for key in ours if theirs[key] != ours[key]]
    if other:
        raise SystemExit(f"--init {args.init}: another network ({'; '.join(other)}); pass the same settings")
    model.load_state_dict(checkpoint["model"])


# --- One pass of the loader: the batches train.py's loop draws, from where a resumed run left off ------------

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)       # train.py checkpoints and stops on these


def ignore_stop_signals(_worker_id):
    """Loader workers leave SIGINT/SIGTERM to the main process, which checkpoints and stops them: a scheduler
    signals the whole process group, and a worker killed mid-batch would crash the run."""
    # (Forked workers inherit the main handler; spawned or forkserver ones would die: the default action.)
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def one_pass(dataset, sampler, per_rank, data_epoch, skip, workers, seed, pin_memory=False):
    """The batches of one pass over the data from batch `skip` on; the order is a function of (seed, epoch)."""
    sampler.set_epoch(data_epoch)                                     # the shuffle of this pass, the same on every rank
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(data_epoch)                  # augmentation depends on (seed, epoch, index)
    indices = list(sampler)[skip * per_rank:]             # resuming mid-pass: skip what was seen
    # Its own generator: the global RNG must not depend on where a run was resumed (the next fold's
    # initial weights come from it), and a loader draws a seed from its generator when it starts.
    loader = torch.utils.data.DataLoader(dataset, batch_size=per_rank, sampler=indices, drop_last=True,
                                         num_workers=workers, pin_memory=pin_memory,
                                         worker_init_fn=ignore_stop_signals if workers else None,
                                         generator=torch.Generator().manual_seed(seed + data_epoch))
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)    # blocked while workers start (children inherit
    try:                                                    # the mask): none reaches one before it ignores
        return iter(loader)                                 # them, and the main process gets it afterwards
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


# --- The non-finite guard: never a checkpoint of weights that saw a NaN -----------------------------------------

def record_losses(guard, step, parts):
    """The non-finite guard, on the device (no host sync): the first step whose loss was not finite, its terms."""
    bad_now = (guard["first_bad"] < 0) & ~torch.isfinite(parts["total"])
    guard["first_bad"] = torch.where(bad_now, step, guard["first_bad"])
    guard["parts"] = {k: torch.where(bad_now, v, guard["parts"].get(k, v)) for k, v in parts.items() if v.dim() == 0}


def check_finite(guard, run, name, out_dir):
    """At log and save intervals (one host sync): stop before any checkpoint holds weights that saw a NaN."""
    if run.all_sum((guard["first_bad"] >= 0).float()).item() > 0:
        terms = ", ".join(f"{k} {v.item():.4g}" for k, v in guard["parts"].items())
        where = f"step {int(guard['first_bad'].item()) + 1}" if guard["first_bad"].item() >= 0 else "another rank"
        raise SystemExit(f"{name}: non-finite loss at {where} ({terms}); stopped without saving. The last good "
                         f"checkpoint {out_dir / 'last.pt'} is intact: lower --lr or set --grad-clip, check the "
                         "data, then --resume auto")


def export_weights(source, destination):
    """A checkpoint's weights, the args that rebuild its network and its centroids of Z (about a third of its size:
    AdamW keeps two moments per weight), written atomically; it restores images but cannot resume. → sha256."""
    checkpoint = load_checkpoint(source, flag="export")
    save_checkpoint(destination, {key: checkpoint[key] for key in EXPORTED if key in checkpoint})
    return hashlib.sha256(Path(destination).read_bytes()).hexdigest()


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "export":
        raise SystemExit("usage: python checkpoints.py export CHECKPOINT OUT.pt   (weights, args and centroids "
                         "of a trained checkpoint, without its optimiser)")
    digest = export_weights(sys.argv[2], sys.argv[3])
    print(f"{sys.argv[3]}: {Path(sys.argv[3]).stat().st_size / 1e6:.1f} MB, sha256 {digest}")
