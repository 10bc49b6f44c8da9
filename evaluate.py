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

import csv
import io
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

TASKS = ("denoise", "dehaze", "derain", "deblur", "lowlight")   # the shared order of data.TASKS

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
            return [(result.heading(), result) for result in self.sets]
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


if __name__ == "__main__":
    shared = Path(__file__).resolve().parent.parent / "shared"
    reference_file = shared / "reference" / "metrics_reference.json"
    if reference_file.is_file():
        from torchvision.io import ImageReadMode, read_image
        pair = json.loads(reference_file.read_text())["pairs"][0]
        degraded, clean = (read_image(str(shared / pair[k]), ImageReadMode.RGB).float() / 255
                           for k in ("input", "target"))
        print(f"{pair['input']} vs its target; third-party reference in brackets")
        expected = {"rgb": (pair["psnr_rgb"], pair["ssim_rgb_uniform7"]), "y": (pair["psnr_y"], pair["ssim_y"]),
                    "rgb-gaussian": (pair["psnr_rgb"], pair["ssim_rgb_gaussian"])}
    else:
        clean = torch.rand(3, 64, 96)
        degraded = (clean + 0.1 * torch.randn_like(clean)).clamp(0, 1)
        print("shared folder not found: a synthetic pair (σ = 0.1 noise)")
        expected = {}
    for convention in CONVENTIONS:
        metrics = compute_metrics(degraded, clean, convention)
        reference = "  [{:.4f} dB / {:.6f}]".format(*expected[convention]) if convention in expected else ""
        print(f"{convention:12s} PSNR {metrics['psnr']:.4f} dB  SSIM {metrics['ssim']:.6f}{reference}")
    if expected:
        print("(the reference's Y-SSIM pads the borders; ours is BasicSR's valid-window mean: see UNSPECIFIED)")
