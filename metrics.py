"""The image-quality metrics of Sec. IV-A.2: PSNR and SSIM in three conventions, LPIPS, and the no-reference
metrics of Tables VI-VII.

The paper does not say how PSNR and SSIM are computed, and its peers do not agree:
1. "rgb" (PromptIR, AdaIR): skimage on the float RGB output clamped to [0, 1]; SSIM with its default
   7×7 uniform window and sample covariance N/(N−1), averaged over channels.
2. "rgb-gaussian" (MoCE-IR): the same with skimage's `gaussian_weights=True` (11×11 Gaussian, σ 1.5).
3. "y" (MATLAB-style, as the deraining papers report): the BT.601 luma of the 8-bit images, SSIM with
   an 11×11 Gaussian window and replicated borders (MATLAB's ssim(); BasicSR averages valid windows).
On Rain100L's own inputs "rgb" and "y" differ by 1.4 dB (25.5 against 26.9), more than most gaps in
Tables II-V: every table of evaluate.py names its convention.

What is in here:
- `psnr`, `ssim`, `rgb_to_y`, `compute_metrics(_per_image)`: the three conventions, in float64.
- `LPIPS`, `build_lpips`: LPIPS (VGG-16, v0.1 calibration), checked against the `lpips` package.
"""

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import losses

# UNSPECIFIED: Sec. IV-A.2 does not say how PSNR and SSIM are computed; we offer each convention
# and name the one used in every table header (see the module docstring).

CONVENTIONS = {
    "rgb": "PSNR/SSIM (RGB, skimage convention)",
    "rgb-gaussian": "PSNR/SSIM (RGB, Gaussian-window SSIM of Wang et al. 2004)",
    "y": "PSNR/SSIM (Y channel of 8-bit images, MATLAB ssim() convention)",
}


# --- Metrics (Sec. IV-A.2) -----------------------------------------------------------------------------------------

def uniform_window(size=7):
    """skimage's default SSIM window: a size × size box (as a 1-D factor)."""
    return torch.full((size,), 1.0 / size, dtype=torch.float64)                 # every pixel of the box weighs the same


def gaussian_window(size=11, sigma=1.5):
    """Wang et al.'s 11×11 Gaussian, σ = 1.5 (as a 1-D factor). Equals cv2.getGaussianKernel(11, 1.5)
    (BasicSR) and skimage's `gaussian(sigma=1.5, truncate=3.5)`, whose radius is int(3.5·1.5 + 0.5) = 5."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2                        # pixel offsets from the centre
    window = torch.exp(-x ** 2 / (2 * sigma ** 2))                                      # exp(−x²/2σ²)
    return window / window.sum()


def rgb_to_y(image):
    """BT.601 luma of the 8-bit version of an image: (B, 3, H, W) in [0, 1] → (B, 1, H, W) in [16, 235]."""
    r, g, b = (torch.round(image * 255) / 255).unbind(1)       # quantised as saved (BasicSR's tensor2img)
    return (16 + 65.481 * r + 128.553 * g + 24.966 * b).unsqueeze(1)   # Y, not rounded again


def psnr(restored, target, data_range):
    """PSNR = 10·log10(R² / MSE) per image, (B, C, H, W) → (B,). Identical images give inf."""
    mse = (restored - target).pow(2).flatten(1).mean(1)                                 # over channels and pixels
    return 10 * torch.log10(data_range ** 2 / mse)                                      # inf for identical images


def ssim(restored, target, window, data_range, sample_covariance, replicate_border=False, full_map=False):
    """Mean SSIM per image (Wang et al. 2004), (B, C, H, W) → (B,), averaged over channels (or the map).
    Local statistics use the separable `window` where it lies wholly inside the image (skimage's crop,
    BasicSR's [5:-5, 5:-5]); `replicate_border` first pads by edge replication (MATLAB's ssim())."""
    if replicate_border:
        radius = window.numel() // 2                                                    # 5 for the 11×11 window
        restored = F.pad(restored, (radius,) * 4, mode="replicate")
        target = F.pad(target, (radius,) * 4, mode="replicate")
    B, C, H, W = restored.shape                                                         # (after any padding)
    k = window.numel()
    stats = torch.stack([restored, target, restored * restored, target * target, restored * target], 2)
    stats = stats.reshape(B * C * 5, 1, H, W)                                    # (B·C·5, 1, H, W)
    window = window.to(stats)                                                           # float64, on the images' device
    stats = F.conv2d(F.conv2d(stats, window.view(1, 1, 1, k)), window.view(1, 1, k, 1))
    mu_x, mu_y, xx, yy, xy = stats.reshape(B, C, 5, H - k + 1, W - k + 1).unbind(2)
    cov_norm = k * k / (k * k - 1) if sample_covariance else 1.0                 # skimage: N/(N−1)
    var_x, var_y = cov_norm * (xx - mu_x * mu_x), cov_norm * (yy - mu_y * mu_y)         # σ_x², σ_y²
    cov_xy = cov_norm * (xy - mu_x * mu_y)                                              # σ_xy
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2                 # K1 = 0.01, K2 = 0.03
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)
                / ((mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2)))    # (B, C, H−k+1, W−k+1)
    return ssim_map if full_map else ssim_map.flatten(1).mean(1)                     # the mean over channels and pixels


def check_pair(restored, target, convention):
    """Validate a (restored, target) pair and return both as float64 (B, 3, H, W). `restored` is clamped to
    [0, 1] (a network may overshoot: PromptIR and BasicSR clamp too); a `target` outside it is a mistake."""
    if convention not in CONVENTIONS:                                                   # names the three choices
        raise ValueError(f"unknown metric convention {convention!r}; choose one of {list(CONVENTIONS)}")
    for name, image in (("restored", restored), ("target", target)):
        if not torch.is_tensor(image) or not image.is_floating_point():             # an 8-bit image is a common mistake
            raise TypeError(f"{name} must be a float tensor in [0, 1], got "
                            f"{getattr(image, 'dtype', type(image))}; convert 8-bit images with `x.float() / 255`")
        if image.dim() not in (3, 4) or image.shape[-3] != 3:                           # RGB only
            raise ValueError(f"{name} must be RGB of shape (3, H, W) or (B, 3, H, W), got {tuple(image.shape)}")
        if not torch.isfinite(image).all():                                          # a diverged network, or a bad file
            raise ValueError(f"{name} contains NaN or inf values")
    if restored.shape != target.shape:                                            # restore crops back to the input size
        raise ValueError(f"restored {tuple(restored.shape)} and target {tuple(target.shape)} differ in shape; "
                         "crop the restored image back to the target size")
    size = 7 if convention == "rgb" else 11                                        # the SSIM window
    if min(target.shape[-2:]) < size:
        raise ValueError(f"images must be at least {size}×{size} for the {convention!r} SSIM window")
    if target.min() < 0 or target.max() > 1:                                       # an 8-bit image, not / 255
        raise ValueError(f"target must lie in [0, 1], got [{target.min():g}, {target.max():g}]; "
                         "divide 8-bit images by 255")
    restored, target = restored.cpu().double().clamp(0, 1), target.cpu().double()          # float64, on the CPU
    return (restored[None], target[None]) if restored.dim() == 3 else (restored, target)


def compute_metrics_per_image(restored, target, convention="rgb"):
    """{"psnr": [...], "ssim": [...]}, one value per image, of (3, H, W) or (B, 3, H, W) in [0, 1]."""
    restored, target = check_pair(restored, target, convention)                         # float64, restored clamped
    replicate_border = False
    if convention == "y":                                                              # the BT.601 luma of 8-bit images
        # UNSPECIFIED: the paper does not say which Y-channel SSIM it uses. We match the project's
        # reference values (metrics_reference.json), which are MATLAB's built-in ssim(): unrounded
        # Y, borders padded by edge replication, the whole map averaged. BasicSR and Wang's
        # SSIM_index.m average valid windows only (`ssim(..., replicate_border=False)`), up to
        # 0.005 apart on the shared pairs; the deraining MATLAB scripts also round Y to uint8 first.
        restored, target, data_range = rgb_to_y(restored), rgb_to_y(target), 255.0
        window, sample_covariance, replicate_border = gaussian_window(), False, True
    elif convention == "rgb":                                                           # skimage's defaults
        data_range, window, sample_covariance = 1.0, uniform_window(), True
    else:                                     # "rgb-gaussian": skimage's gaussian_weights=True
        data_range, window, sample_covariance = 1.0, gaussian_window(), False
    return {"psnr": psnr(restored, target, data_range).tolist(),
            "ssim": ssim(restored, target, window, data_range, sample_covariance, replicate_border).tolist()}


def compute_metrics(restored, target, convention="rgb"):
    """{"psnr": float, "ssim": float}: the mean over the images of a batch (PSNR in dB)."""
    per_image = compute_metrics_per_image(restored, target, convention)                 # per image first, then the mean
    return {name: sum(values) / len(values) for name, values in per_image.items()}


# --- LPIPS (Sec. IV-A.2, Fig. 8, Tables VI-VIII) -------------------------------------------------------------------

LPIPS_NAME = "LPIPS (VGG, v0.1)"
LPIPS_TAPS = (3, 8, 15, 22, 29)                 # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 of vgg16().features


class LPIPS(nn.Module):
    """LPIPS of Zhang et al. (CVPR 2018), VGG-16 variant, v0.1 calibration: one distance per image pair.

        d(x, y) = Σ_l mean_{h,w} Σ_c w_{l,c} (x̂_l − ŷ_l)²,  x̂_l = V_l(x) / ‖V_l(x)‖ over the channels
    with V_l the five VGG-16 taps above, computed after LPIPS's own input scaling. These are not
    L_dpl's taps, and only the real VGG-16 serves here (never the tiny stand-in).
    # UNSPECIFIED: the paper does not say which LPIPS network it used; peers split between AlexNet
    # and VGG. We use VGG and name it in every table header.
    """

    def __init__(self, features, calibration):
        super().__init__()                                                             # frozen: nothing here is trained
        self.layers = features[:max(LPIPS_TAPS) + 1]        # in-place ReLUs are harmless: taps are ReLU outputs
        self.calibration = nn.ParameterList([nn.Parameter(w.float().reshape(1, -1, 1, 1)) for w in calibration])
        # LPIPS v0.1 maps [0, 1] to [-1, 1], then shifts and scales each channel (its ScalingLayer).
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        self.requires_grad_(False).eval()                                       # eval: no dropout (the package has one)

    @torch.no_grad()
    def forward(self, restored, target):
        x = ((2 * torch.cat([restored, target]).float() - 1) - self.shift) / self.scale     # (2B, 3, H, W)
        distance, weights = 0, iter(self.calibration)                                   # one 1×1 weight vector per tap
        for index, layer in enumerate(self.layers):
            x = layer(x)                                                                # the VGG-16 layers, in order
            if index in LPIPS_TAPS:
                unit = x / (x.square().sum(1, keepdim=True).sqrt() + 1e-10)      # x̂_l, unit length per pixel
                a, b = unit.chunk(2)                                              # restored, target
                distance = distance + ((a - b).square() * next(weights)).sum(1).mean((1, 2))   # (B,)
        return distance


def build_lpips(vgg_weights=None, lpips_weights=None):
    """LPIPS from VGG-16 (torchvision's loader or --vgg-weights, as L_dpl loads it) and the v0.1 calibration
    (the `lpips` package, or --lpips-weights FILE with its lin0..4 keys); missing either stops at once."""
    needs = "LPIPS needs VGG-16 (torchvision's cache or --vgg-weights) and its calibration (lpips or --lpips-weights)"
    try:
        features, _ = losses.load_vgg16_features(vgg_weights)
        if lpips_weights is None:
            try:
                import lpips                                   # an optional extra: only --lpips needs it
            except ImportError:
                raise FileNotFoundError("the lpips package is not installed and --lpips-weights was not given")
            lpips_weights = Path(lpips.__file__).parent / "weights" / "v0.1" / "vgg.pth"
        state = torch.load(lpips_weights, map_location="cpu", weights_only=True)
        calibration = [state[f"lin{i}.model.1.weight"] for i in range(len(LPIPS_TAPS))]
    except (OSError, RuntimeError, ValueError, KeyError) as error:
        raise SystemExit(f"evaluate.py --lpips: {error}. {needs}") from None
    return LPIPS(features, calibration)                                                 # in eval mode, frozen
