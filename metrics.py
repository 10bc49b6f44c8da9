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
- `uciqe` (conventions "matlab", "lab"), `uiqm` (with `uicm`, `uism`, `uiconm`): the no-reference underwater
  metrics of Table VII from their published constants, checked against public implementations.
"""

import math
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


def local_mean(images, window):
    """The separable filter `window` ⊗ `window` over the last two axes, where it lies wholly inside: (..., H, W) →
    (..., H−k+1, W−k+1). The same sums as two 1-D float64 convolutions, written as k shifted multiply-adds per axis,
    because PyTorch's CPU convolution has no fast float64 path (measured 8× slower on a 481×321 image)."""
    k, (H, W) = window.numel(), images.shape[-2:]
    weights = window.tolist()
    rows = images[..., :, 0:W - k + 1] * weights[0]                                     # along the width ...
    for i in range(1, k):
        rows.add_(images[..., :, i:W - k + 1 + i], alpha=weights[i])
    out = rows[..., 0:H - k + 1, :] * weights[0]                                        # ... then the height
    for i in range(1, k):
        out.add_(rows[..., i:H - k + 1 + i, :], alpha=weights[i])
    return out


def ssim(restored, target, window, data_range, sample_covariance, replicate_border=False, full_map=False):
    """Mean SSIM per image (Wang et al. 2004), (B, C, H, W) → (B,), averaged over channels (or the map).
    Local statistics use the separable `window` where it lies wholly inside the image (skimage's crop,
    BasicSR's [5:-5, 5:-5]); `replicate_border` first pads by edge replication (MATLAB's ssim())."""
    if replicate_border:
        radius = window.numel() // 2                                                    # 5 for the 11×11 window
        restored = F.pad(restored, (radius,) * 4, mode="replicate")
        target = F.pad(target, (radius,) * 4, mode="replicate")
    k = window.numel()
    stats = torch.stack([restored, target, restored * restored, target * target, restored * target], 2)
    stats = local_mean(stats, window)                           # (B, C, 5, H−k+1, W−k+1), windowed means inside
    mu_x, mu_y, xx, yy, xy = stats.unbind(2)
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


# --- No-reference underwater metrics: UCIQE and UIQM (Sec. IV-A.2, Table VII) --------------------------------------
#
# Table VII scores the C60 underwater set, which has no targets, with UCIQE [55] and UIQM [56]. Both are fixed
# formulas with published constants, but every public implementation fills the papers' gaps its own way, and the
# gaps move the numbers (UCIQE is ~0.5 in one convention and ~30 in another). Each gap is tagged below.

UCIQE_CONVENTIONS = {
    "matlab": "UCIQE (UCIQE.m convention: 8-bit Lab / 255)",
    "lab": "UCIQE (CIELab units, as the formula reads)",
}
UIQM_BLOCK = 10        # UNSPECIFIED: [56] does not give the k1×k2 block size; FUnIE-GAN's uqim_utils.py uses 10×10
PLIP_GAMMA = 1026.0    # PLIP constants γ = k = 1026 for 8-bit images (Panetta et al. 2011), as every public UIQM uses


def check_image(image, minimum_size=UIQM_BLOCK):
    """Validate an image (3, H, W) or batch (B, 3, H, W) in [0, 1] for a no-reference metric; return it as the
    float64 (B, 3, H, W) 0-255 values of the 8-bit image it saves to."""
    if not torch.is_tensor(image) or not image.is_floating_point():                 # an 8-bit image is a common mistake
        raise TypeError(f"image must be a float tensor in [0, 1], got {getattr(image, 'dtype', type(image))}; "
                        "convert 8-bit images with `x.float() / 255`")
    if image.dim() not in (3, 4) or image.shape[-3] != 3:                               # RGB only
        raise ValueError(f"image must be RGB of shape (3, H, W) or (B, 3, H, W), got {tuple(image.shape)}")
    if not torch.isfinite(image).all():                                              # a diverged network, or a bad file
        raise ValueError("image contains NaN or inf values")
    if image.min() < 0 or image.max() > 1:                                # a network's overshoot, or 8-bit not / 255
        raise ValueError(f"image must lie in [0, 1], got [{image.min():g}, {image.max():g}]; clamp a network's "
                         "output (`x.clamp(0, 1)`) and divide 8-bit images by 255")
    if min(image.shape[-2:]) < minimum_size:                                          # at least one block
        raise ValueError(f"images must be at least {minimum_size}×{minimum_size}, got {tuple(image.shape[-2:])}")
    # UNSPECIFIED: neither paper says whether the float output or the saved 8-bit image is scored; every public
    # implementation reads the saved PNG, so we round to 8 bits as the file would (rgb_to_y does the same).
    # 0-255 in float64, rounded from float32 exactly as data.write_image saves it (a float64 product rounds a
    # few pixels on the other side of .5, and the saved image's scores would differ from the restored one's)
    image = torch.round(image.detach().cpu().float() * 255).double()
    return image[None] if image.dim() == 3 else image


def srgb_to_lab(rgb):
    """CIELab of sRGB values in [0, 1], (B, 3, H, W) → (B, 3, H, W): L ∈ [0, 100], a and b ∈ about [−110, 100].
    sRGB → linear (IEC 61966-2-1) → XYZ (D65) → Lab (CIE 1976), as skimage's rgb2lab and OpenCV compute it."""
    linear = torch.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)      # undo the sRGB gamma
    rgb_to_xyz = torch.tensor([[0.412453, 0.357580, 0.180423],                          # sRGB primaries, D65 white
                               [0.212671, 0.715160, 0.072169],
                               [0.019334, 0.119193, 0.950227]], dtype=rgb.dtype)
    # RGB white (1, 1, 1) is D65 by sRGB's definition, so its XYZ is the white point (X_n, Y_n, Z_n) and greys get
    # a = b = 0 exactly. (skimage and OpenCV round it to (0.95047, 1, 1.08883): greys get |a|, |b| ≲ 0.005.)
    white = rgb_to_xyz.sum(1).view(1, 3, 1, 1)
    xyz = torch.einsum("ij,bjhw->bihw", rgb_to_xyz, linear) / white               # (B, 3, H, W): X/X_n, Y/Y_n, Z/Z_n
    delta = 6 / 29
    f = torch.where(xyz > delta ** 3, xyz.pow(1 / 3), xyz / (3 * delta ** 2) + 4 / 29)   # cube root, linear near 0
    fx, fy, fz = f.unbind(1)
    return torch.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], 1)          # L*, a*, b*


def uciqe_terms(lab, convention="matlab"):
    """(σ_c, con_l, μ_s) of UCIQE for one image's CIELab values (3, H, W), in the given convention."""
    lightness, a, b = lab.flatten(1)                                                     # (H·W,) each
    N = lightness.numel()
    if convention == "matlab":
        # UNSPECIFIED: [55] does not give the scale of L, a, b. We follow the UCIQE.m that circulates with the
        # coefficients (e.g. bilityniu/underwater_image_fusion; JOU-UIP/UCIQE ports it to Python): applycform on
        # a uint8 image returns the 8-bit Lab encoding (L·255/100, a + 128, b + 128, rounded), divided by 255.
        # The +128 offsets stay in: grey has "chroma" √2·128/255. This is the scale of Table VII (≈0.5).
        # (MATLAB's makecform('srgb2lab') adapts to the ICC D50 white; like the Python ports we keep D65.)
        lightness = torch.round(lightness * 255 / 100) / 255
        a, b = torch.round(a + 128) / 255, torch.round(b + 128) / 255
        chroma = torch.sqrt(a * a + b * b)                                                 # C = √(a² + b²)
        # UNSPECIFIED: UCIQE.m's "standard deviation of chroma" is √mean|1 − (mean(C)/C)²|, its saturation
        # C/√(C² + L²) (CIE s_ab), its contrast stretchlim's 1% and 99% limits (Octave's stretchlim states
        # them: the sorted values at ⌊0.01·N⌋+1 and ⌈0.99·N⌉, 1-based) and [0, 1] when the two coincide.
        sigma_c = torch.sqrt((1 - (chroma.mean() / chroma) ** 2).abs().mean())
        ordered = lightness.sort().values
        low, high = ordered[N // 100], ordered[math.ceil(0.99 * N) - 1]                     # 0-based indices
        con_l = high - low if high > low else torch.ones_like(high)                       # stretchlim's flat case
        mu_s = (chroma / torch.sqrt(chroma * chroma + lightness * lightness)).mean()
    elif convention == "lab":
        # UNSPECIFIED: read as written, in CIELab units (xueleichen/PSNR-SSIM-UCIQE-UIQM-Python's evaluate.py):
        # σ_c the standard deviation of C, con_l the mean of the top 1% of L minus the mean of the bottom 1%
        # (round(0.01·N) pixels each), μ_s the mean of C/L (0 where C or L is 0).
        chroma = torch.sqrt(a * a + b * b)
        sigma_c = chroma.std(correction=0)
        ordered, count = lightness.sort().values, round(0.01 * N)
        con_l = ordered[-count:].mean() - ordered[:count].mean()
        mu_s = torch.where((chroma > 0) & (lightness > 0), chroma / lightness, 0).mean()
    else:
        raise ValueError(f"unknown UCIQE convention {convention!r}; choose one of {list(UCIQE_CONVENTIONS)}")
    return sigma_c.item(), con_l.item(), mu_s.item()


def uciqe(image, convention="matlab"):
    """UCIQE of Yang and Sowmya (TIP 2015), one value per image of (3, H, W) or (B, 3, H, W) in [0, 1]:
        UCIQE = c1·σ_c + c2·con_l + c3·μ_s,  (c1, c2, c3) = (0.4680, 0.2745, 0.2576)
    σ_c: spread of chroma, con_l: contrast of luminance, μ_s: mean saturation, all in CIELab. Higher is better."""
    lab = srgb_to_lab(check_image(image) / 255)                                           # (B, 3, H, W)
    return [0.4680 * sigma_c + 0.2745 * con_l + 0.2576 * mu_s
            for sigma_c, con_l, mu_s in (uciqe_terms(one, convention) for one in lab)]


def uicm(rgb, alpha=0.1):
    """UICM, the colourfulness term of [56] for one 0-255 image (3, H, W), from the opponent channels
    RG = R − G and YB = (R + G)/2 − B:  UICM = −0.0268·√(μ²_α,RG + μ²_α,YB) + 0.1586·√(σ²_α,RG + σ²_α,YB)."""
    red, green, blue = rgb.flatten(1)
    K = red.numel()
    trim_left, trim_right = math.ceil(alpha * K), math.floor(alpha * K)                # T_αL = ⌈α_L·K⌉, T_αR = ⌊α_R·K⌋
    terms = []
    for opponent in (red - green, (red + green) / 2 - blue):                             # RG, YB
        # The asymmetric α-trimmed mean sums sorted values T_αL+1 ... K−T_αR (1-based); FUnIE-GAN's port
        # starts one later (off by one, ≤ 255/(0.8·K) apart).
        mean = opponent.sort().values[trim_left:K - trim_right].mean()                   # μ_α
        # UNSPECIFIED: [56] leaves open whether σ²_α runs over the trimmed pixels; we average (x − μ_α)² over
        # all K, as FUnIE-GAN and tkrahn108/UIQM do.
        terms.append((mean, (opponent - mean).pow(2).mean()))                            # (μ_α, σ²_α)
    (mean_rg, var_rg), (mean_yb, var_yb) = terms
    return (-0.0268 * torch.sqrt(mean_rg ** 2 + mean_yb ** 2) + 0.1586 * torch.sqrt(var_rg + var_yb)).item()


def blocks_min_max(maps, block=UIQM_BLOCK):
    """Per-block minimum and maximum of maps (C, H, W) over block×block tiles → two (C, k2, k1) tensors.
    # UNSPECIFIED: [56] does not say what happens to a last, partial block; FUnIE-GAN drops it (crops)."""
    C, H, W = maps.shape
    k2, k1 = H // block, W // block
    tiles = maps[:, :k2 * block, :k1 * block].reshape(C, k2, block, k1, block)           # (C, k2, block, k1, block)
    return tiles.amin((2, 4)), tiles.amax((2, 4))


def eme(maps, block=UIQM_BLOCK):
    """EME = 2/(k1·k2) · Σ_blocks log(I_max/I_min) per map, (C, H, W) → (C,).
    # UNSPECIFIED: log(max/min) is undefined when a block's minimum is 0 (flat, so no edge); such blocks add 0
    # but still count in k1·k2, as FUnIE-GAN and tkrahn108/UIQM do."""
    low, high = blocks_min_max(maps, block)
    log_ratio = torch.where(low > 0, torch.log(high / low), 0)
    return 2 * log_ratio.sum((1, 2)) / (low.shape[1] * low.shape[2])


def uism(rgb, block=UIQM_BLOCK):
    """UISM, the sharpness term of [56] for one 0-255 image (3, H, W): the EME of each channel's "grayscale edge
    map" (the channel times its Sobel gradient magnitude), weighted 0.299, 0.587, 0.114 for R, G, B."""
    sobel = torch.tensor([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], dtype=rgb.dtype)
    kernels = torch.stack([sobel, sobel.T])[:, None]                                    # (2, 1, 3, 3): d/dx, d/dy
    padded = F.pad(rgb[:, None], (1, 1, 1, 1), mode="replicate")     # scipy.ndimage.sobel's "reflect" for 3 taps
    gradients = F.conv2d(padded, kernels)                                                # (3, 2, H, W)
    edge_map = rgb * torch.hypot(gradients[:, 0], gradients[:, 1])                       # (3, H, W)
    # (FUnIE-GAN rescales the magnitude to 0-255 first, which EME's max/min ratio ignores; it also weighs B by
    # 0.144, a typo for the 0.114 of [56].)
    return (torch.tensor([0.299, 0.587, 0.114], dtype=rgb.dtype) * eme(edge_map, block)).sum().item()


def uiconm(rgb, block=UIQM_BLOCK):
    """UIConM, the contrast term of [56] for one 0-255 image (3, H, W): the logAMEE of its intensity with PLIP
    operations,  (1/(k1·k2)) ⊗ Σ_blocks m·log m,  m = (I_max ⊖ I_min) / (I_max ⊕ I_min)."""
    # UNSPECIFIED: "intensity" is (R + G + B)/3 (tkrahn108/UIQM; HSI's I); the PLIP operations act on it
    # directly (xueleichen's logamee), not on PLIP's gray tones μ − I.
    low, high = blocks_min_max(rgb.mean(0, keepdim=True), block)                       # (1, k2, k1) each
    plip_difference = PLIP_GAMMA * (high - low) / (PLIP_GAMMA - low)                     # I_max ⊖ I_min
    plip_sum = high + low - high * low / PLIP_GAMMA                                      # I_max ⊕ I_min
    m = torch.where(plip_sum > 0, plip_difference / plip_sum, 0)                         # 0 for a black block
    total = torch.where(m > 0, m * torch.log(m), 0).sum()                                # Σ m·log m (0·log 0 = 0)
    c = 1 / (low.shape[1] * low.shape[2])
    plip_product = PLIP_GAMMA - PLIP_GAMMA * (1 - total / PLIP_GAMMA) ** c               # c ⊗ total
    # UNSPECIFIED: m·log m ≤ 0, so the logAMEE as printed is ≤ 0 and, times c3 > 0, would pull UIQM down.
    # The public implementations report it positive (FUnIE-GAN weighs by −1/(k1·k2)); we negate the product.
    return -plip_product.item()


def uiqm(image, block=UIQM_BLOCK):
    """UIQM of Panetta, Gao and Agaian (IEEE JOE 2016), one value per image of (3, H, W) or (B, 3, H, W) in [0, 1]:
        UIQM = c1·UICM + c2·UISM + c3·UIConM,  (c1, c2, c3) = (0.0282, 0.2953, 3.5753)
    computed on the 0-255 values [56] was fitted on (UICM changes with the scale). Higher is better."""
    images = check_image(image, block)                                                 # (B, 3, H, W), 0-255
    return [0.0282 * uicm(rgb) + 0.2953 * uism(rgb, block) + 3.5753 * uiconm(rgb, block) for rgb in images]


NO_REFERENCE = "no-reference"                      # the table of metrics that read the restored image alone
NR_METRICS = {"uciqe": uciqe, "uiqm": uiqm}         # --nr-metrics (Table VII)


if __name__ == "__main__":
    torch.manual_seed(0)
    clean = 0.5 + 0.3 * F.interpolate(torch.rand(1, 3, 8, 8), size=96, mode="bicubic").clamp(-1, 1)   # (1, 3, 96, 96)
    noisy = (clean + 25 / 255 * torch.randn_like(clean)).clamp(0, 1)                      # σ = 25 Gaussian noise
    for convention, header in CONVENTIONS.items():
        values = compute_metrics(noisy, clean, convention)
        print(f"{header:70s} PSNR {values['psnr']:6.2f} dB  SSIM {values['ssim']:.4f}")
    for name, metric in NR_METRICS.items():
        print(f"{name.upper():5s} clean {metric(clean)[0]:.4f}  noisy {metric(noisy)[0]:.4f}  (no reference)")
