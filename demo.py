"""The offline demo: a small data set of the five degradations made on the spot, and the report on its test images.

Not part of the paper. `python train.py --preset demo` runs every stage of Perceive-IR on this data with tiny
networks whose CLIP, DINOv2 and VGG have random weights (nothing is downloaded): it shows that the pipeline works
end to end, and its numbers are not the paper's results (the README says what it trades for speed).

What is in here:
- `synthetic_clean_image`, `synthetic_haze`, `_rain`, `_motion_blur`, `_low_light`: procedural clean images and
  the four paired degradations (noise, the fifth, is added on the fly as for real data).
- `make_demo_data`: the data set in data.py's generic layout; `python demo.py DIR` writes it.
- `PRESET`: the settings of train.py's `--preset demo`; `report`: the held-out images' PSNR before and after
  restoration, and the degradation type the model perceived in each.
"""

import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import data
import losses
from degradations import motion_kernel
from guidance import perceive, restore_image

# Offline demo: generated data, tiny networks with random weights (CLIP, DINOv2, VGG). Its tasks have equally many
# images: no resampling (the paper's ratios would make 97% of it low light and rain). Random CLIP and VGG carry no
# quality signal: L_clip and L_dpl weigh 10× less (and still run).
PRESET = dict(out="runs/demo", tasks="N+H+R+B+L", patch_size=64, backbone_config="tiny", dino="tiny",
              resample="denoise=1,dehaze=1,derain=1,deblur=1,lowlight=1", lambda_clip=0.005, lambda_dpl=0.01,
              clip_model="tiny", vgg="tiny", workers=0, medium_iters=150, prompt_iters=400, prompt_batch_size=16,
              iters=800, batch_size=4, lr=2e-3, medium_lr=1e-3, prompt_lr=5e-3, warmup=20, probe_size=4,
              epoch_iters=100, log_every=50, save_every=100, snapshot_every=0)


# --- Procedural clean images and synthetic degradations (no downloads) -----------------------------------------

def synthetic_clean_image(rng, height, width):
    """A colour gradient with flat, striped and checkered shapes and a fine texture, 8-bit levels."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32) / max(height, width)
    start, end, angle = *rng.uniform(0.1, 0.9, (2, 3)), rng.uniform(0, 2 * math.pi)
    ramp = x * math.cos(angle) + y * math.sin(angle)
    image = start + (end - start) * ((ramp - ramp.min()) / (ramp.max() - ramp.min()))[..., None]   # (H, W, 3)
    for _ in range(rng.integers(4, 8)):                 # rectangles and discs: flat, striped, checkered
        cy, cx, radius, frequency, aspect = *rng.uniform(0, 1, 2), *rng.uniform([0.06, 8, 0.4], [0.25, 30, 1.5])
        colour, kind = rng.uniform(0, 1, 3), int(rng.integers(6))
        inside = (np.hypot(x - cx, y - cy) < radius) if kind % 2 else \
            (abs(x - cx) < radius) & (abs(y - cy) < radius * aspect)
        pattern = (np.ones_like(x), 0.5 + 0.5 * np.sin(frequency * (x + y)),
                   (np.floor(x * frequency) + np.floor(y * frequency)) % 2)[kind // 2]
        image[inside] = pattern[inside][:, None] * colour
    image += 0.03 * np.sin(rng.uniform(60, 120) * x + rng.uniform(0, 6))[..., None]
    return data.quantize(torch.from_numpy(image.clip(0, 1).astype(np.float32)).permute(2, 0, 1))


def _convolve(image, kernel):
    """(3, H, W) ⊛ (k, k) kernel (k odd), reflect-padded, same size."""
    kernel, pad = torch.as_tensor(kernel, dtype=torch.float32).flip(0, 1), len(kernel) // 2
    padded = F.pad(image[None], (pad, pad, pad, pad), mode="reflect")
    return F.conv2d(padded, kernel[None, None].expand(3, 1, -1, -1), groups=3)[0]


def synthetic_haze(clean, rng):
    """Atmospheric scattering (as RESIDE): I = J·t + A(1 − t), t = e^{−βd}, depth d rising to the top."""
    H, W = clean.shape[-2:]
    y, x = np.mgrid[0:H, 0:W].astype(np.float32) / [[[H]], [[W]]]
    waves, phases = rng.uniform(2, 6, 2), rng.uniform(0, 6, 2)
    depth = 0.3 + 1.5 * (1 - y) + 0.3 * np.sin(waves[0] * x + phases[0]) * np.sin(waves[1] * y + phases[1])   # d
    transmission = torch.from_numpy(np.exp(-rng.uniform(0.4, 1.0) * depth).astype(np.float32))   # t
    airlight = torch.from_numpy(rng.uniform(0.75, 0.95) + rng.uniform(-0.03, 0.03, (3, 1, 1))).float()   # A
    return data.quantize((clean * transmission + airlight * (1 - transmission)).clamp(0, 1))


def synthetic_rain(clean, rng):
    """Rain streaks: sparse drops smeared along one direction (±20° from vertical), added on top."""
    H, W = clean.shape[-2:]
    drops = (rng.random((H, W)) < rng.uniform(0.002, 0.006)) * rng.uniform(0.5, 1.0, (H, W))
    kernel = motion_kernel(rng, int(rng.integers(4, 9)) * 2 + 1, math.radians(90 + rng.uniform(-20, 20)), 0.0)
    streaks = _convolve(torch.from_numpy(drops.astype(np.float32)).expand(3, -1, -1), kernel / kernel.max())
    return data.quantize((clean + rng.uniform(0.6, 0.9) * streaks.clamp(0, 1)).clamp(0, 1))


def synthetic_motion_blur(clean, rng):
    """Motion blur with a random camera-shake kernel of 9 to 17 pixels."""
    kernel = motion_kernel(rng, int(rng.integers(4, 9)) * 2 + 1, rng.uniform(0, 2 * math.pi), 0.35)
    return data.quantize(_convolve(clean, kernel).clamp(0, 1))


def synthetic_low_light(clean, rng):
    """Low light (LOL-like): I = s·J^γ + n, γ ∈ [1.5, 2.5], exposure s ∈ [0.1, 0.3], noise σ 0.005-0.02."""
    noise = torch.from_numpy(rng.standard_normal(tuple(clean.shape), dtype=np.float32))
    dark = rng.uniform(0.1, 0.3) * clean ** rng.uniform(1.5, 2.5)
    return data.quantize((dark + rng.uniform(0.005, 0.02) * noise).clamp(0, 1))


SYNTHESIS = {"dehaze": synthetic_haze, "derain": synthetic_rain, "deblur": synthetic_motion_blur,
             "lowlight": synthetic_low_light}              # denoising: noise is added on the fly


def make_demo_data(root, seed=0, train_count=24, test_count=10, size_range=(128, 160)):
    """Write a small generic-layout data set of all five tasks (set "demo") to `root`; returns root."""
    root, threads = Path(root), torch.get_num_threads()
    torch.set_num_threads(1)              # tiny tensors: extra threads only contend (5x slower here)
    for split, count in (("train", train_count), ("test", test_count)):
        for task in data.TASKS:
            for i in range(count):
                rng = data._rng(seed, split, task, i)
                clean = synthetic_clean_image(rng, *rng.integers(size_range[0], size_range[1] + 1, 2))
                folder, name = root / split / task / "demo", f"{i:04d}.png"
                data.write_image(folder / name if task == "denoise" else folder / "target" / name, clean)
                if task != "denoise":
                    data.write_image(folder / "input" / name, SYNTHESIS[task](clean, rng))
    torch.set_num_threads(threads)
    return root


# --- The report at the end of the demo ------------------------------------------------------------------------------

def report(args, run, model, sgm, centroids):
    """PSNR of inputs and restorations of the held-out demo images, and the type perceived (nearest centroid of Z)."""
    model.eval()                                                                       # restore_image is a no-grad pass
    run.print0("\ndemo: held-out test images, PSNR (RGB, dB)      input -> restored   type perceived")
    gains = {}                                          # (no test split: nothing to report)
    for test_set in data.build_test_sets(args.data_root, data.parse_tasks(args.tasks), sigmas=(25,), problems=[]):
        psnr_in, psnr_out, right = [], [], 0
        for item in test_set:
            degraded, target = item["degraded"][None].to(run.device), item["target"][None].to(run.device)
            psnr_in.append(losses.batch_psnr(degraded, target).item())                  # the input's own PSNR, to beat
            psnr_out.append(losses.batch_psnr(restore_image(model, sgm, degraded), target).item())
            right += bool(centroids) and perceive(model, centroids, degraded)[0]["task"] == test_set.task
        label = f"{test_set.task} ({test_set.name}{f', σ={test_set.sigma:g}' if test_set.sigma else ''})"
        run.print0(f"  {label:42s} {np.mean(psnr_in):6.2f} -> {np.mean(psnr_out):6.2f}   {right}/{len(test_set)} right")
        gains[test_set.task] = np.mean(psnr_out) - np.mean(psnr_in)
    run.print0(f"  mean gain over the inputs: {np.mean(list(gains.values()) or [0]):+.2f} dB (tiny random networks)")
    return gains


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1].startswith("-"):
        raise SystemExit("usage: python demo.py DIR   (writes the demo data set to DIR)")
    print(f"demo data written to {make_demo_data(Path(sys.argv[1]))}")
