"""Degradations made from clean images: noise (Sec. IV-A.1), and haze and blur for tasks without training pairs.

Perceive-IR's denoising data is clean images with Gaussian noise added (Sec. IV-A.1). Its hazy and blurred training
sets are synthetic too: RESIDE (Table I) applies the atmospheric scattering model to clean photos and their
estimated depth, GoPro averages consecutive frames of a moving camera. Where no such pairs can be had, data.py
makes them on the fly from clean images with the two recipes below (`train.py --synthesize H+B`).

What is in here:
- `quantize`, `add_gaussian_noise`: I_d = Q(clip(I_g + σ n)), the denoising task's degradation.
- `motion_kernel`, `convolve`: camera-shake kernels (a random walk of the camera) and their blur.
- `haze`: I = J·t + A(1 − t), t = e^{−βd}, with a smooth depth proxy d; `camera_shake`: I = J ⊛ k.
- `SYNTHESIS`: task → degradation, for data.py's synthesized training pairs.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F


def quantize(image):
    """Round to the nearest 8-bit level, as saving to PNG does."""
    return (image * 255).round() / 255


def add_gaussian_noise(clean, sigma, rng):
    """I_d = Q(clip(I_g + σ/255 · n)), n ~ N(0, 1) i.i.d., Q = 8-bit rounding (Sec. IV-A.1)."""
    # UNSPECIFIED: the paper does not say how noise is stored; PromptIR truncates to uint8 (−½ level), we round.
    noise = torch.from_numpy(rng.standard_normal(tuple(clean.shape), dtype=np.float32))
    return quantize((clean + noise * (sigma / 255)).clamp(0, 1))


def motion_kernel(rng, size, direction, turning):
    """A size × size kernel summing to 1: 48 unit steps from `direction` (radians, 90° = down), each turned
    by N(0, turning²); turning = 0 draws a straight line."""
    velocity, points = np.array([math.sin(direction), math.cos(direction)]), [np.zeros(2)]
    for _ in range(48):
        velocity = velocity + rng.normal(0, turning, 2)
        velocity /= np.linalg.norm(velocity)
        points.append(points[-1] + velocity)
    points = np.array(points) - np.mean(points, axis=0)                         # (49, 2) row, column
    rows, cols = np.round(points * (size // 2) / np.abs(points).max() + size // 2).astype(int).T
    kernel = np.zeros((size, size), np.float32)
    np.add.at(kernel, (rows, cols), 1.0)                                          # each step deposits light
    return kernel / kernel.sum()


def convolve(image, kernel):
    """(3, H, W) ⊛ (k, k) kernel (k odd), reflect-padded, same size.

    A motion kernel has at most 49 non-zero taps of k² (up to 625): the sum of that many shifted copies of the
    padded image is the same convolution, several times cheaper on a CPU than a dense 25 × 25 one."""
    kernel = torch.as_tensor(kernel, dtype=torch.float32)
    (H, W), pad = image.shape[-2:], len(kernel) // 2
    padded = F.pad(image[None], (pad, pad, pad, pad), mode="reflect" if pad < min(H, W) else "replicate")[0]
    blurred = torch.zeros_like(image)
    for i, j in kernel.nonzero().tolist():          # (J ⊛ k)(y, x) = Σ k(i, j) J(y + pad − i, x + pad − j)
        blurred += kernel[i, j] * padded[:, 2 * pad - i:2 * pad - i + H, 2 * pad - j:2 * pad - j + W]
    return blurred


def smooth_field(rng, height, width, cells=3):
    """A smooth random field in [0, 1]: a (cells + 1)² grid of uniform values, bicubically upsampled."""
    grid = torch.from_numpy(rng.uniform(0, 1, (1, 1, cells + 1, cells + 1)).astype(np.float32))
    return F.interpolate(grid, size=(height, width), mode="bicubic", align_corners=True)[0, 0].clamp(0, 1)


def haze(clean, rng):
    """Atmospheric scattering, as RESIDE makes its hazy images: I = J·t + A(1 − t), t = e^{−βd}.

    # DEVIATION: RESIDE uses each photo's estimated depth; we have none, so the depth proxy d rises from the
    # bottom of the frame to its top (the ground is near, the sky far, as in most outdoor photos), plus a smooth
    # random field, from 0.15 to 1.5. A near-white airlight A ∈ [0.7, 1.0] with a slight tint.
    # UNSPECIFIED: the haze's severity. β ∈ [0, 1.0] gives transmissions from 0.22 to 1: every severity from none
    # to thick, so the network learns to judge how much haze there is and to leave a clear photo as it is. On 24
    # CBSD432 photos the hazy images' PSNR is 20.0 dB on average (11.2 to 58.3; SOTS-outdoor's hazy inputs: 16.2,
    # from 10.0 to 22.5). With β ∈ [0.3, 1.0] (15.9 dB on average) the laptop preset darkened bright photos that
    # were not hazy at all (README, "A real restorer in an hour").
    """
    H, W = clean.shape[-2:]
    height = torch.linspace(1, 0, H)[:, None].expand(H, W)                       # 1 at the top row, 0 at the bottom
    depth = 0.15 + 0.9 * height * rng.uniform(0.4, 1.0) + 0.45 * smooth_field(rng, H, W)   # d
    transmission = torch.exp(-rng.uniform(0.0, 1.0) * depth)                         # t
    airlight = torch.from_numpy(rng.uniform(0.7, 1.0) + rng.uniform(-0.03, 0.03, (3, 1, 1))).float()   # A
    return quantize((clean * transmission + airlight * (1 - transmission)).clamp(0, 1))


def camera_shake(clean, rng):
    """Motion blur by a random camera-shake kernel of 1 to 11 pixels (a random walk of 48 steps): one draw in six is
    the 1-pixel kernel, the photo left sharp, so the network also learns what needs no deblurring; the blurred
    others average 25.7 dB on CBSD432 (GoPro-derived test inputs: 28.1 dB; 7-21 px kernels gave 23.2 dB).

    # UNSPECIFIED: the blur's severity, from none (1 px) to 11 px; with 3-11 px the laptop preset sharpened the
    # mildly blurred GoPro-derived inputs below their own PSNR (README, "A real restorer in an hour").

    # DEVIATION: GoPro averages 7-13 consecutive frames of real video, which blurs moving objects and the camera
    # alike; without such video we blur whole images by one camera path, the usual synthetic-blur recipe.
    """
    kernel = motion_kernel(rng, int(rng.integers(0, 6)) * 2 + 1, rng.uniform(0, 2 * math.pi), 0.35)
    return quantize(convolve(clean, kernel).clamp(0, 1))


SYNTHESIS = {"dehaze": haze, "deblur": camera_shake}     # tasks whose pairs data.py can make from clean images


if __name__ == "__main__":
    generator, image = np.random.default_rng(0), torch.rand(3, 96, 128)
    for task, synthesize in SYNTHESIS.items():
        degraded = synthesize(image, generator)
        print(f"{task}: {tuple(degraded.shape)}, PSNR of the degraded image "
              f"{float(-10 * torch.log10(((degraded - image) ** 2).mean())):.2f} dB")
    print("noise σ=25:", tuple(add_gaussian_noise(image, 25, generator).shape))
