"""Evaluation of Perceive-IR: the metrics of Sec. IV-A.2 and the tables of Sec. IV-B..D (Tables II-V, IX).

The paper reports PSNR and SSIM per test set and noise level σ, plus their average, for the
All-in-One settings "N+H+R" (Table II) and "N+H+R+B+L" (Table III), for One-by-One training
(Tables IV-V) and for the unseen noise levels σ = 60, 100 (Table IX). It does not say how PSNR and
SSIM are computed, and the methods it compares with use two incompatible conventions:

1. "rgb" (PromptIR, AdaIR and the authors' evaluator): PSNR over the three channels of the float
   output clamped to [0, 1]; SSIM as skimage's `structural_similarity` defaults (7×7 uniform
   window, sample covariance N/(N−1), mean over channels).
2. "y" (BasicSR and MATLAB; the deraining papers): PSNR and SSIM on the BT.601 luma of the 8-bit
   images, SSIM with an 11×11 Gaussian window (σ = 1.5), borders replicated as MATLAB's ssim().

On Rain100L's own inputs the two differ by 1.4 dB (25.5 dB RGB against 26.9 dB Y), more than
most gaps in Tables II-V, so every table printed here names its convention in its header.
Both are written in torch (float64) and checked against third-party values in
`tests/test_evaluate.py` (`../shared/reference/metrics_reference.json`).

What is in here:
- `psnr`, `ssim`, `rgb_to_y`: the building blocks, one value per image.
- `compute_metrics(restored, target, convention)` (batch mean) and `compute_metrics_per_image`:
  the conventions "rgb" and "y", plus "rgb-gaussian" (skimage with the Gaussian window of
  Wang et al. 2004, `gaussian_weights=True`), which some baselines report.
- `SetResult`, `ResultTable`: per-set results laid out as Tables II, III, IV-V and IX
  (`LAYOUTS`), as markdown, CSV and JSON, with the column average and the image-weighted
  average, each labelled.
The inference half of Sec. IV (checkpoint loading, tiled restoration of any image, `--profile`)
follows these sections.
"""

import argparse
import csv
import io
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision.utils
from torch.utils.flop_counter import FlopCounterMode

import clip_prompts
import data
import losses
import train
from backbone import build_backbone, count_parameters
from data import TASKS
from guidance import build_sgm, restore_image


# UNSPECIFIED: Sec. IV-A.2 does not say how PSNR and SSIM are computed; we offer each convention
# and name the one used in every table header (see the module docstring).
CONVENTIONS = {
    "rgb": "PSNR/SSIM (RGB, skimage convention)",
    "rgb-gaussian": "PSNR/SSIM (RGB, Gaussian-window SSIM of Wang et al. 2004)",
    "y": "PSNR/SSIM (Y channel of 8-bit images, MATLAB ssim() convention)",
}


# ---------------------------------------------------------------------------------------------
# Metrics (Sec. IV-A.2)
# ---------------------------------------------------------------------------------------------

def uniform_window(size=7):
    """skimage's default SSIM window: a size × size box (as a 1-D factor)."""
    return torch.full((size,), 1.0 / size, dtype=torch.float64)


def gaussian_window(size=11, sigma=1.5):
    """Wang et al.'s 11×11 Gaussian, σ = 1.5 (as a 1-D factor). Equals cv2.getGaussianKernel(11, 1.5)
    (BasicSR) and skimage's `gaussian(sigma=1.5, truncate=3.5)`, whose radius is int(3.5·1.5 + 0.5) = 5."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    window = torch.exp(-x ** 2 / (2 * sigma ** 2))
    return window / window.sum()


def rgb_to_y(image):
    """BT.601 luma of the 8-bit version of an image: (B, 3, H, W) in [0, 1] → (B, 1, H, W) in [16, 235].

    The image is first quantised as it would be saved (BasicSR's tensor2img: round(x·255)); Y is
    then Y = 16 + 65.481·R + 128.553·G + 24.966·B with R, G, B in [0, 1], not rounded again.
    """
    r, g, b = (torch.round(image * 255) / 255).unbind(1)
    return (16 + 65.481 * r + 128.553 * g + 24.966 * b).unsqueeze(1)


def psnr(restored, target, data_range):
    """PSNR = 10·log10(R² / MSE) per image, (B, C, H, W) → (B,). Identical images give inf."""
    mse = (restored - target).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(data_range ** 2 / mse)


def ssim(restored, target, window, data_range, sample_covariance, replicate_border=False):
    """Mean SSIM per image (Wang et al. 2004), (B, C, H, W) → (B,), averaged over channels.

    Local statistics use the separable `window`, only where it lies wholly inside the image (this
    is skimage's `crop(S, (win_size − 1) // 2)` and BasicSR's [5:-5, 5:-5]), unless
    `replicate_border`: then the images are first padded by edge replication so every pixel has a
    window (MATLAB's built-in ssim()). `sample_covariance` multiplies (co)variances by N/(N−1).
    """
    if replicate_border:
        radius = window.numel() // 2
        restored = F.pad(restored, (radius,) * 4, mode="replicate")
        target = F.pad(target, (radius,) * 4, mode="replicate")
    B, C, H, W = restored.shape
    k = window.numel()
    stats = torch.stack([restored, target, restored * restored, target * target, restored * target], 2)
    stats = stats.reshape(B * C * 5, 1, H, W)                                    # (B·C·5, 1, H, W)
    window = window.to(stats)
    stats = F.conv2d(F.conv2d(stats, window.view(1, 1, 1, k)), window.view(1, 1, k, 1))
    mu_x, mu_y, xx, yy, xy = stats.reshape(B, C, 5, H - k + 1, W - k + 1).unbind(2)
    cov_norm = k * k / (k * k - 1) if sample_covariance else 1.0
    var_x, var_y = cov_norm * (xx - mu_x * mu_x), cov_norm * (yy - mu_y * mu_y)
    cov_xy = cov_norm * (xy - mu_x * mu_y)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2                 # K1 = 0.01, K2 = 0.03
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)
                / ((mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2)))    # (B, C, H−k+1, W−k+1)
    return ssim_map.flatten(1).mean(1)


def check_pair(restored, target, convention):
    """Validate a (restored, target) pair and return both as float64 (B, 3, H, W).

    `restored` is clamped to [0, 1], as PromptIR does before its metrics and BasicSR's tensor2img
    does before quantising: a network may overshoot. `target` must already lie in [0, 1]; one that
    does not is a scaling mistake (an 8-bit image not divided by 255) and is rejected.
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown metric convention {convention!r}; choose one of {list(CONVENTIONS)}")
    for name, image in (("restored", restored), ("target", target)):
        if not torch.is_tensor(image) or not image.is_floating_point():
            raise TypeError(f"{name} must be a float tensor in [0, 1], got "
                            f"{getattr(image, 'dtype', type(image))}; convert 8-bit images with `x.float() / 255`")
        if image.dim() not in (3, 4) or image.shape[-3] != 3:
            raise ValueError(f"{name} must be RGB of shape (3, H, W) or (B, 3, H, W), got {tuple(image.shape)}")
        if not torch.isfinite(image).all():
            raise ValueError(f"{name} contains NaN or inf values")
    if restored.shape != target.shape:
        raise ValueError(f"restored {tuple(restored.shape)} and target {tuple(target.shape)} differ in shape; "
                         "crop the restored image back to the target size")
    size = 7 if convention == "rgb" else 11
    if min(target.shape[-2:]) < size:
        raise ValueError(f"images must be at least {size}×{size} for the {convention!r} SSIM window, "
                         f"got {tuple(target.shape[-2:])}")
    low, high = target.min().item(), target.max().item()
    if low < 0 or high > 1:
        raise ValueError(f"target must lie in [0, 1], got values in [{low:g}, {high:g}]; "
                         "divide 8-bit images by 255")
    restored, target = restored.double().clamp(0, 1), target.double()
    if restored.dim() == 3:
        restored, target = restored[None], target[None]
    return restored, target


def compute_metrics_per_image(restored, target, convention="rgb"):
    """{"psnr": [...], "ssim": [...]}, one value per image, of (3, H, W) or (B, 3, H, W) in [0, 1]."""
    restored, target = check_pair(restored, target, convention)
    replicate_border = False
    if convention == "y":
        # UNSPECIFIED: the paper does not say which Y-channel SSIM it uses. We match the project's
        # reference values (metrics_reference.json), which are MATLAB's built-in ssim(): unrounded
        # Y, borders padded by edge replication, the whole map averaged. BasicSR and Wang's
        # SSIM_index.m average valid windows only (`ssim(..., replicate_border=False)`), up to
        # 0.005 apart on the shared pairs; the deraining MATLAB scripts also round Y to uint8 first.
        restored, target, data_range = rgb_to_y(restored), rgb_to_y(target), 255.0
        window, sample_covariance, replicate_border = gaussian_window(), False, True
    elif convention == "rgb":
        data_range, window, sample_covariance = 1.0, uniform_window(), True
    else:                                     # "rgb-gaussian": skimage's gaussian_weights=True
        data_range, window, sample_covariance = 1.0, gaussian_window(), False
    return {"psnr": psnr(restored, target, data_range).tolist(),
            "ssim": ssim(restored, target, window, data_range, sample_covariance, replicate_border).tolist()}


def compute_metrics(restored, target, convention="rgb"):
    """{"psnr": float, "ssim": float}: the mean over the images of a batch (PSNR in dB)."""
    per_image = compute_metrics_per_image(restored, target, convention)
    return {name: sum(values) / len(values) for name, values in per_image.items()}


# ---------------------------------------------------------------------------------------------
# Result tables (Tables II, III, IV-V, IX)
# ---------------------------------------------------------------------------------------------

def _denoise(benchmark, sigmas):
    return [(benchmark, "denoise", sigma) for sigma in sigmas]


# layout → (paper table, columns as (benchmark, task, σ)).
LAYOUTS = {
    "N+H+R": ("Table II", _denoise("CBSD68", (15, 25, 50))
              + [("SOTS", "dehaze", None), ("Rain100L", "derain", None)]),
    "N+H+R+B+L": ("Table III", _denoise("CBSD68", (25,))
                  + [("SOTS", "dehaze", None), ("Rain100L", "derain", None),
                     ("GoPro", "deblur", None), ("LOL", "lowlight", None)]),
    "one-by-one": ("Tables IV-V", _denoise("CBSD68", (15, 25, 50)) + _denoise("Urban100", (15, 25, 50))
                   + _denoise("Kodak24", (15, 25, 50))
                   + [("SOTS", "dehaze", None), ("Rain100L", "derain", None),
                      ("GoPro", "deblur", None), ("LOL", "lowlight", None)]),
    "unseen-noise": ("Table IX", _denoise("CBSD68", (60, 100)) + _denoise("Urban100", (60, 100))),
}
AVERAGE_OF_SETS = "Average (mean of set means)"
AVERAGE_OF_IMAGES = "Average (all images pooled)"


@dataclass
class SetResult:
    """One test set at one noise level σ (None unless denoising): one column of a table."""
    set_name: str
    task: str
    sigma: float | None = None
    psnr: list = field(default_factory=list)      # per image, dB
    ssim: list = field(default_factory=list)      # per image

    num_images = property(lambda self: len(self.psnr))
    mean_psnr = property(lambda self: sum(self.psnr) / len(self.psnr))
    mean_ssim = property(lambda self: sum(self.ssim) / len(self.ssim))

    def heading(self, benchmark=None):
        name = self.set_name if benchmark in (None, self.set_name) else f"{benchmark} ({self.set_name})"
        return name if self.sigma is None else f"{name} σ={self.sigma:g}"


def _cell(psnr_value, ssim_value):
    return f"{psnr_value:.2f}/{ssim_value:.4f}"


def _write_atomic(path, text):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


class ResultTable:
    """Per-set PSNR/SSIM of one method in one metric convention, printable in the paper's layouts.

    `add(set_name, task, sigma, psnr_list, ssim_list)` may be called once per set or once per batch
    (values for the same set and σ are appended). A layout column (benchmark, task, σ) takes the
    result of that task and σ whose set name, up to its first "-", is the benchmark name
    (case-insensitive): "SOTS-outdoor-mini" fills the SOTS column and is named in its heading.
    `layout=None` gives one column per set added, in order (any subset, e.g. Table XIII's "N+H").
    """

    def __init__(self, convention, method="Perceive-IR"):
        if convention not in CONVENTIONS:
            raise ValueError(f"unknown metric convention {convention!r}; choose one of {list(CONVENTIONS)}")
        self.convention, self.method, self.sets = convention, method, []

    def add(self, set_name, task, sigma, psnr_list, ssim_list):
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r} for {set_name}; choose one of {TASKS}")
        if (sigma is None) != (task != "denoise"):
            raise ValueError(f"{set_name}: σ must be given for denoising and only for denoising, got {sigma}")
        psnr_list, ssim_list = [float(v) for v in psnr_list], [float(v) for v in ssim_list]
        if len(psnr_list) != len(ssim_list) or not psnr_list:
            raise ValueError(f"{set_name}: need as many PSNR as SSIM values, at least one, "
                             f"got {len(psnr_list)} and {len(ssim_list)}")
        sigma = None if sigma is None else float(sigma)
        for result in self.sets:
            if (result.set_name, result.task, result.sigma) == (set_name, task, sigma):
                result.psnr += psnr_list
                result.ssim += ssim_list
                return result
        self.sets.append(SetResult(set_name, task, sigma, psnr_list, ssim_list))
        return self.sets[-1]

    def columns(self, layout=None):
        """[(heading, SetResult or None)] in the layout's order; None marks a set not evaluated."""
        if layout is None:
            return [(f"{result.heading()} ({result.task})", result) for result in self.sets]
        if layout not in LAYOUTS:
            raise ValueError(f"unknown table layout {layout!r}; choose one of {list(LAYOUTS)} or None")
        columns = LAYOUTS[layout][1]
        if layout == "one-by-one":   # a One-by-One model covers one task: keep the tasks evaluated
            columns = [c for c in columns if any(r.task == c[1] for r in self.sets)]
        out = []
        for benchmark, task, sigma in columns:
            found = [r for r in self.sets if r.task == task and r.sigma == sigma
                     and r.set_name.split("-")[0].lower() == benchmark.lower()]
            if len(found) > 1:
                raise ValueError(f"layout {layout!r} has one {benchmark} column but results for "
                                 f"{[r.set_name for r in found]}; use layout=None to list them all")
            if found:
                out.append((found[0].heading(benchmark), found[0]))
            else:
                out.append((SetResult(benchmark, task, sigma).heading(), None))
        return out

    def averages(self, layout=None):
        """Both averages over the evaluated columns: {label: (psnr, ssim, count)}, or {} if none."""
        evaluated = [r for _, r in self.columns(layout) if r is not None]
        if not evaluated:
            return {}
        pooled_psnr = [v for r in evaluated for v in r.psnr]
        pooled_ssim = [v for r in evaluated for v in r.ssim]
        return {AVERAGE_OF_SETS: (sum(r.mean_psnr for r in evaluated) / len(evaluated),
                                  sum(r.mean_ssim for r in evaluated) / len(evaluated), len(evaluated)),
                AVERAGE_OF_IMAGES: (sum(pooled_psnr) / len(pooled_psnr),
                                    sum(pooled_ssim) / len(pooled_ssim), len(pooled_psnr))}

    def markdown(self, layout=None):
        columns, averages = self.columns(layout), self.averages(layout)
        header = [CONVENTIONS[self.convention]] + [h for h, _ in columns] + list(averages)
        scores = [self.method] + [_cell(r.mean_psnr, r.mean_ssim) if r else "-" for _, r in columns]
        counts = ["images"] + [str(r.num_images) if r else "-" for _, r in columns]
        for label, (p, s, n) in averages.items():
            scores.append(_cell(p, s))
            counts.append(f"{n} sets" if label == AVERAGE_OF_SETS else str(n))
        source = "every set evaluated" if layout is None else f"{layout}, layout of {LAYOUTS[layout][0]}"
        lines = [f"**{self.method}: {source}**", ""]
        lines += ["| " + " | ".join(row) + " |" for row in (header, ["---"] * len(header), scores, counts)]
        missing = sum(r is None for _, r in columns)
        if missing:
            lines += ["", f"'-': not evaluated; the averages cover the {len(columns) - missing} "
                          f"evaluated columns of {len(columns)}."]
        return "\n".join(lines) + "\n"

    def csv(self, layout=None):
        """One row per column, then the two averages; '-' where a set was not evaluated."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["column", "set", "task", "sigma", "images", "psnr", "ssim", "convention"])
        for heading, r in self.columns(layout):
            values = [r.num_images, r.mean_psnr, r.mean_ssim] if r else ["-"] * 3
            writer.writerow([heading, r.set_name if r else "-", r.task if r else "-",
                             "" if r is None or r.sigma is None else f"{r.sigma:g}", *values,
                             CONVENTIONS[self.convention]])
        for label, (p, s, n) in self.averages(layout).items():
            writer.writerow([label, "", "", "", n, p, s, CONVENTIONS[self.convention]])
        return buffer.getvalue()

    def to_json(self, layout=None):
        """Everything, per-image values included; `from_json` rebuilds the table."""
        return {"method": self.method, "convention": self.convention, "header": CONVENTIONS[self.convention],
                "layout": layout, "averages": {label: {"psnr": p, "ssim": s, "count": n}
                             for label, (p, s, n) in self.averages(layout).items()},
                "sets": [asdict(r) for r in self.sets]}

    @classmethod
    def from_json(cls, data):
        table = cls(data["convention"], data["method"])
        for r in data["sets"]:
            table.add(r["set_name"], r["task"], r["sigma"], r["psnr"], r["ssim"])
        return table

    def write(self, directory, layout=None, stem=None):
        """Write <stem>.md, .csv and .json (per-image values included) atomically; return the paths."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        stem = stem or f"results_{layout or 'all'}_{self.convention}"
        paths = [directory / f"{stem}.{suffix}" for suffix in ("md", "csv", "json")]
        texts = [self.markdown(layout), self.csv(layout), json.dumps(self.to_json(layout), indent=1) + "\n"]
        for path, text in zip(paths, texts):
            _write_atomic(path, text)
        return paths


# ---------------------------------------------------------------------------------------------
# Restoring images with a trained checkpoint: whole images or tiles
# ---------------------------------------------------------------------------------------------

class Restorer:
    """A trained Perceive-IR rebuilt from its checkpoint's own args, with its frozen DINOv2;
    `restorer(degraded)` restores a (B, 3, H, W) batch in [0, 1] (guidance.restore_image)."""

    def __init__(self, model, sgm, config, tile=512, overlap=32, prior_size=1024):
        self.model, self.sgm, self.config = model.eval(), sgm, config
        self.tile, self.overlap, self.prior_size = tile or None, overlap, prior_size

    @classmethod
    def from_checkpoint(cls, path, device="cpu", dino_weights=None, use_ema=True, **options):
        checkpoint = train.load_checkpoint(path, flag="--checkpoint")
        if checkpoint["stage"] != "restore":
            raise SystemExit(f"--checkpoint {path} is a {checkpoint['stage']!r} checkpoint; pass one of "
                             "`train.py --stage restore` (its restore/last.pt)")
        config = checkpoint["args"]
        model = train.build_model(config)
        weights = checkpoint["ema"] if use_ema and checkpoint.get("ema") else checkpoint["model"]
        weights = {k.removeprefix("module."): v for k, v in weights.items() if k != "n_averaged"}
        missing, unexpected = model.load_state_dict(weights, strict=False)
        if missing or unexpected:
            raise SystemExit(f"--checkpoint {path} does not match the model its own args describe "
                             f"(missing {missing[:3]}, unexpected {unexpected[:3]}): it was written by "
                             f"another version of this code; check out its commit ({checkpoint.get('git_commit')})")
        sgm = None
        if model.guided and model.use_dino:
            sgm = build_sgm(config["dino"], dino_weights or config.get("dino_weights")).to(device)
        return cls(model.to(device), sgm, config, **options)

    def __call__(self, degraded):
        return restore_image(self.model, self.sgm, degraded, self.tile, self.overlap, self.prior_size)


def auto_layout(tasks, sigmas):
    if set(sigmas) <= {60, 100}:
        return "unseen-noise"
    layouts = {("denoise", "dehaze", "derain"): "N+H+R", tuple(TASKS): "N+H+R+B+L"}
    return layouts.get(tuple(tasks), "one-by-one" if len(tasks) == 1 else None)


def evaluate_benchmarks(restorer, test_sets, conventions, run, save_dir=None):
    """Every test set (and σ) → {convention: ResultTable}; torchrun shards the images over ranks."""
    tables = {convention: ResultTable(convention) for convention in conventions}
    for test_set in test_sets:
        scores = {convention: ([], []) for convention in conventions}
        for index in range(run.rank, len(test_set), run.world):
            item = test_set[index]
            degraded, target = item["degraded"][None].to(run.device), item["target"][None].to(run.device)
            restored = restorer(degraded)
            for convention, (psnr_list, ssim_list) in scores.items():
                metrics = compute_metrics_per_image(restored.cpu(), target.cpu(), convention)
                psnr_list += metrics["psnr"]
                ssim_list += metrics["ssim"]
            if save_dir:
                sigma = f"_sigma{test_set.sigma:g}" if test_set.sigma else ""
                folder = Path(save_dir) / f"{test_set.task}_{test_set.name}{sigma}"
                data.write_image(folder / f"{Path(item['name']).stem}.png", restored[0])
        for convention, lists in scores.items():
            if run.distributed:                                  # every rank's images, on every rank
                gathered = [None] * run.world
                dist.all_gather_object(gathered, lists)
                lists = ([v for g in gathered for v in g[0]], [v for g in gathered for v in g[1]])
            tables[convention].add(test_set.name, test_set.task, test_set.sigma, *lists)
    return tables


def restore_files(restorer, inputs, output_dir, grid=False, perceiver=None, device="cpu"):
    """Restore a file or every image of a folder into `output_dir` as PNG, names kept."""
    inputs = Path(inputs)
    if not inputs.exists():
        raise SystemExit(f"--input {inputs}: no such file or folder")
    paths = [inputs] if inputs.is_file() else sorted(p for p in inputs.iterdir()
                                                     if p.suffix.lower() in data.IMAGE_SUFFIXES)
    if not paths:
        raise SystemExit(f"--input {inputs}: no PNG, JPEG, WebP, BMP or TIFF images in it")
    for path in paths:
        degraded = data.read_image(path)[None].to(device)
        start = time.perf_counter()
        restored = restorer(degraded)
        line = f"{path.name}: {degraded.shape[-1]}x{degraded.shape[-2]} restored in {time.perf_counter() - start:.1f} s"
        data.write_image(Path(output_dir) / f"{path.stem}.png", restored[0])
        if grid:
            side_by_side = torch.cat([degraded, restored], dim=-1)          # input | output
            torchvision.utils.save_image(side_by_side, Path(output_dir) / f"{path.stem}_grid.png")
        if perceiver is not None:                                # the stage-1 quality perceiver
            with torch.no_grad():
                before, after = (perceiver(x)[0, perceiver.excellent_index].item() for x in (degraded, restored))
            line += f" | P(excellent) {before:.3f} -> {after:.3f}"
        print(line, flush=True)


# ---------------------------------------------------------------------------------------------
# Model profile (the Params column of Table II) and the cost of perception
# ---------------------------------------------------------------------------------------------

def peak_memory_mb(device):
    """Peak memory of this process so far: CUDA allocations on a GPU, resident set size on a CPU.

    On Linux the peak comes from /proc/self/status (VmHWM): getrusage's ru_maxrss survives exec,
    so a fresh subprocess would report its parent's peak as its own.
    """
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    status = Path("/proc/self/status")
    if status.is_file():
        return next(int(line.split()[1]) for line in status.read_text().splitlines() if line.startswith("VmHWM")) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024                   # KiB on Linux


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


def milliseconds(function, repeats, device):
    """Median wall time of `repeats` calls after one warm-up call."""
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


def profile(restorer, size, device, repeats=3):
    """Trainable and frozen parameters, FLOPs of one forward at 256×256, latency and peak memory at size²."""
    frozen = count_parameters(restorer.sgm, trainable=False) if restorer.sgm is not None else 0
    flops = flops_of(lambda: restorer(torch.rand(1, 3, 256, 256, device=device)))
    image = torch.rand(1, 3, size, size, device=device)
    latency = milliseconds(lambda: restorer(image), repeats, device)
    print(f"trainable parameters   {count_parameters(restorer.model) / 1e6:8.2f} M   (Table II lists 42.02 M)")
    print(f"frozen parameters      {frozen / 1e6:8.2f} M   (DINOv2; CLIP and VGG-16 are used in training only)")
    print(f"FLOPs at 256×256       {flops / 1e9:8.1f} G   ({flops / 2e9:.1f} G multiply-adds)")
    print(f"latency at {size}×{size}   {latency:8.1f} ms  on {device} ({torch.get_num_threads()} CPU threads)")
    kind = "CUDA allocated" if device.type == "cuda" else "process RSS"
    print(f"peak memory            {peak_memory_mb(device):8.0f} MB  ({kind})")


def random_restorer(device, backbone="restormer", config="paper", dino="base"):
    """The paper-config network with random weights: costs do not depend on the weights."""
    args = dict(backbone=backbone, backbone_config=config, dino=dino, no_guidance=False, no_dino=False,
                no_pgm=False, no_cfe=False)
    sgm = build_sgm(dino, random_weights=True) if dino == "base" else build_sgm(dino)
    return Restorer(train.build_model(args).to(device), sgm.to(device), args, tile=None)


def restoration_step_costs(device, batch=2, patch=128, repeats=3):
    """(time ms, FLOPs) of one full Perceive-IR training step (DINOv2, CFE, PGM/PGCA, the four losses,
    two non-easy negatives) and of one plain Restormer step with L1 only, paper configs."""
    from torchvision.models import vgg16
    restorer = random_restorer(device)
    model, sgm = restorer.model.train(), restorer.sgm
    clip_model = clip_prompts.load_clip("ViT-B-32", pretrained=None).to(device)
    perceiver = clip_prompts.QualityPerceiver(clip_model, torch.randn(3, 512, device=device),
                                              ["excellent", "mediocre", "terrible"])
    vgg = losses.VGGFeatures(vgg16().features, "random VGG-16").to(device)
    criterion = losses.PerceiveIRLoss(vgg, perceiver)
    x = lambda *shape: torch.rand(*shape, 3, patch, patch, device=device)
    batch_ = dict(degraded=x(batch), positive=x(batch), target=x(batch), negatives=x(batch, 2),
                  negative_mask=torch.ones(batch, 2, dtype=torch.bool, device=device),
                  task=torch.arange(batch, device=device) % 3)

    def optimised(net, step_fn):                         # the training steps of train.py, plus AdamW
        optimizer = torch.optim.AdamW(net.parameters())

        def step():
            total, _ = step_fn(net, batch_, {"avg_psnr": 25.0})
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
        return step

    steps = {"full": optimised(model, train.make_restore_step(sgm, criterion, use_cl=True, uses_dino=True)),
             "plain": optimised(build_backbone("restormer", "paper").to(device), train.l1_step)}
    return {name: (milliseconds(step, repeats, device), flops_of(step)) for name, step in steps.items()}


def memory_probe(height, width, tile, device):
    """Run in a fresh process by `bench`: restore one random height×width image, print peak memory."""
    restorer = random_restorer(device)
    restorer.tile = tile or None
    start = time.perf_counter()
    restorer(torch.rand(1, 3, height, width, device=device))
    print(json.dumps({"peak_mb": peak_memory_mb(device), "seconds": time.perf_counter() - start}))


def bench(args, device):
    """One table, every row measured in this run on this machine (issue 9)."""
    rows = [("what", "measured", "ratio / target")]
    naive_ms, cached_ms = clip_prompts.time_prompt_steps(str(device), args.repeats)
    rows.append(("stage-1 prompt step, ViT-B-32, 32 triplets: naive vs cached",
                 f"{naive_ms:.0f} ms vs {cached_ms:.0f} ms", f"{naive_ms / cached_ms:.1f}x (target >= 30x)"))
    costs = restoration_step_costs(device, args.bench_batch, 128, args.repeats)
    (full_ms, full_flops), (plain_ms, plain_flops) = costs["full"], costs["plain"]
    time_ratio, flop_ratio = full_ms / plain_ms, full_flops / plain_flops
    rows.append((f"restoration step, batch {args.bench_batch}, 128²: Perceive-IR vs Restormer+L1 (time)",
                 f"{full_ms / 1000:.2f} s vs {plain_ms / 1000:.2f} s", f"{time_ratio:.2f}x (target <= 1.6x)"))
    rows.append(("  same steps, FLOPs (torch.utils.flop_counter)",
                 f"{full_flops / 1e12:.2f} vs {plain_flops / 1e12:.2f} TFLOP",
                 f"{flop_ratio:.2f}x; time/FLOP ratio {time_ratio / flop_ratio:.2f} (target <= 1.1)"))
    for (height, width), tile in (((2160, 3840), args.tile), ((1024, 1024), 0)):
        command = [sys.executable, __file__, "--memory-probe", str(height), str(width), "--tile", str(tile),
                   "--device", str(device)]                      # a fresh process: its own peak
        result = subprocess.run(command, capture_output=True, text=True, check=True)
        probe = json.loads(result.stdout.strip().splitlines()[-1])
        rows.append((f"inference peak memory, {width}x{height}, " + (f"tiles of {tile}" if tile else "whole image"),
                     f"{probe['peak_mb'] / 1024:.2f} GB in {probe['seconds']:.0f} s",
                     "target <= 8 GB" if tile else "(reported)"))
    rate, tasks = data.bench(args.data_root)
    rows.append((f"data loading, PNG, 128² crops, {'+'.join(tasks)}", f"{rate:.0f} patches/s per worker",
                 "target >= 100"))
    rows.append(("GPU step times (fp32/bf16, --compile)", "not measured here", "needs the device tool's GPU"))
    print(f"\nbenchmark on {device} ({torch.get_num_threads()} CPU threads, torch {torch.__version__})\n")
    for row in [rows[0], ("---",) * 3, *rows[1:]]:
        print("| " + " | ".join(row) + " |")


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def get_args(argv=None):
    parser = argparse.ArgumentParser(description="Evaluate Perceive-IR on the paper's test sets, restore your "
                                     "own images, profile a model, or measure the cost of perception.")
    add = parser.add_argument
    add("--checkpoint", help="a restore-stage checkpoint (train.py --stage restore: restore/last.pt)")
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    # --- test sets (Sec. IV-A.1-2, Tables II-V, IX, XIII) ---
    add("--data-root", help="root holding test/<task>/<set>/... (generic layout; data.py)")
    add("--tasks", default="N+H+R", help="test sets to run: N+H+R (Table II), N+H+R+B+L (Table III), one task")
    add("--sigmas", type=float, nargs="+", default=[15, 25, 50], help="denoising σ; 60 100 for Table IX")
    add("--conventions", nargs="+", choices=sorted(CONVENTIONS), default=["rgb", "y"], help="metric conventions")
    add("--layout", choices=sorted(LAYOUTS), default=None, help="table layout (default: from --tasks)")
    add("--crop-multiple", type=int, default=0, help="centre-crop test images to a multiple (PromptIR: 16)")
    add("--results", default="results", help="folder for the tables (md, csv, json)")
    add("--save-images", default=None, help="also write the restored test images here")
    # --- your own images ---
    add("--input", help="an image or a folder of images (PNG, JPEG, WebP, BMP, TIFF)")
    add("--output", default="restored", help="folder for the restored PNGs (names kept)")
    add("--grid", action="store_true", help="also write input | output side by side")
    add("--prompts", help="stage-1 prompts: print the quality perceiver's P(excellent) of input and output")
    add("--clip-weights", help="local CLIP weights for --prompts")
    # --- inference ---
    add("--tile", type=int, default=512, help="tile size for the backbone, 0 = whole image")
    add("--tile-overlap", type=int, default=32, help="overlap between tiles, blended linearly")
    add("--prior-size", type=int, default=1024, help="CFE sees the whole image, resized above this long side")
    add("--dino-weights", help="local DINOv2 weights (default: those the checkpoint was trained with)")
    add("--no-ema", action="store_true", help="use the raw weights even if the checkpoint has an EMA")
    # --- profile and benchmark (issue 9) ---
    add("--profile", action="store_true", help="parameters, FLOPs at 256², latency and memory at --size")
    add("--size", type=int, default=256, help="image side for --profile latency and memory")
    add("--backbone", default="restormer", help="--profile without --checkpoint: the backbone (Table XV)")
    add("--backbone-config", default="paper", help="--profile without --checkpoint: its named config")
    add("--bench", action="store_true", help="the cost-of-perception table (README, performance section)")
    add("--bench-batch", type=int, default=2, help="per-process batch of the restoration-step row")
    add("--repeats", type=int, default=3, help="timed repeats per measurement (median)")
    add("--memory-probe", type=int, nargs=2, metavar=("H", "W"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(args):
    run = train.Run()
    device = run.device if args.device != "cpu" else torch.device("cpu")
    if args.memory_probe:
        return memory_probe(*args.memory_probe, args.tile, device)
    if args.bench:
        return bench(args, device)
    if args.checkpoint:
        restorer = Restorer.from_checkpoint(args.checkpoint, device, args.dino_weights, not args.no_ema,
                                            tile=args.tile, overlap=args.tile_overlap, prior_size=args.prior_size)
    elif args.profile:
        restorer = random_restorer(device, args.backbone, args.backbone_config,
                                   dino="tiny" if args.backbone_config == "tiny" else "base")
    else:
        raise SystemExit("--checkpoint is required (a restore-stage checkpoint), except with --profile or --bench")
    if args.profile:
        return profile(restorer, args.size, device, args.repeats)
    if args.input:
        perceiver = (clip_prompts.QualityPerceiver.from_checkpoint(args.prompts, args.clip_weights, device)
                     if args.prompts else None)
        return restore_files(restorer, args.input, args.output, args.grid, perceiver, device)
    if not args.data_root:
        raise SystemExit("pass --data-root with test sets, or --input with your own images")
    tasks = data.parse_tasks(args.tasks)
    test_sets = data.build_test_sets(args.data_root, tasks, args.sigmas, crop_multiple=args.crop_multiple or None)
    tables = evaluate_benchmarks(restorer, test_sets, args.conventions, run, args.save_images)
    layout = args.layout or auto_layout(tasks, args.sigmas)
    if run.master:
        for table in tables.values():
            try:                                     # sets that are not the paper's: one column each
                if layout and not any(result for _, result in table.columns(layout)):
                    layout = None
            except ValueError:
                layout = None
            print(table.markdown(layout))
            table.write(args.results, layout)
        print(f"tables written to {args.results}/ (tiles {args.tile or 'none'}, checkpoint {args.checkpoint})")
    if run.distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(get_args())
