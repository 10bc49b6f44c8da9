"""MPRNet (Zamir et al., "Multi-Stage Progressive Image Restoration", CVPR 2021): a restorer of Table XIV.

Perceive-IR's stage 1 (Sec. III-B) needs medium-quality images I_m from a restorer trained by 2-fold
cross-validation; Table XIV swaps that restorer, and MPRNet is one of the choices. It is a plain network
(no guided blocks): it restores in three stages, each seeing more of the image (the multi-patch hierarchy):
    stage 1: the four quarters of the image, each through a U-Net (encoder-decoder of CABs);
    stage 2: the top and bottom halves, through a second U-Net that also reads stage 1's features (CSFF);
    stage 3: the whole image at full resolution, through the ORSNet (no downsampling), reading stage 2's.
Between stages a supervised attention module (SAM) predicts that stage's image and passes on features
gated by it. Every stage's image is supervised; the last one is the restoration.

What is in here:
- `CAB` (channel attention block) with its `CALayer`, and `SAM` (supervised attention module).
- `Encoder` / `Decoder`: the U-Net of stages 1 and 2 (3 levels, bilinear resampling, CSFF inputs).
- `ORB` / `ORSNet`: stage 3's original-resolution blocks.
- `MPRNet` and its `CONFIGS` ("derain", "deblur", "denoise" = "paper": the released models; "tiny"),
  key-for-key compatible with the released checkpoints; `restore(image)` pads, crops and keeps stage 3.
- `load_official(model, path)` and `medium_step`, the official training loss (Charbonnier + 0.05 · edge).
"""

from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F

from backbone import check_image, count_parameters, pad_to_multiple


def conv(in_channels, out_channels, kernel_size, bias=False):
    """A "same" convolution (stride 1, padding k // 2): MPRNet never changes resolution with a conv."""
    return nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias)


# --- Building blocks -----------------------------------------------------------------------------------------------

class CALayer(nn.Module):
    """Channel attention (squeeze and excitation): global average → 1×1 down → ReLU → 1×1 up → sigmoid gate."""

    def __init__(self, channels, reduction, bias):
        super().__init__()
        self.conv_du = nn.Sequential(nn.Conv2d(channels, channels // reduction, 1, bias=bias), nn.ReLU(inplace=True),
                                     nn.Conv2d(channels // reduction, channels, 1, bias=bias), nn.Sigmoid())

    def forward(self, x):
        return x * self.conv_du(x.mean(dim=(2, 3), keepdim=True))       # gate (B, C, 1, 1) on (B, C, H, W)


class CAB(nn.Module):
    """Channel attention block: x + CA(conv(act(conv(x)))), the unit every stage is made of."""

    def __init__(self, channels, kernel_size, reduction, bias, act):
        super().__init__()
        self.CA = CALayer(channels, reduction, bias)                 # registered first: the official key order
        self.body = nn.Sequential(conv(channels, channels, kernel_size, bias), act,
                                  conv(channels, channels, kernel_size, bias))

    def forward(self, x):
        return self.CA(self.body(x)) + x


class SAM(nn.Module):
    """Supervised attention module: predicts this stage's image and gates the features passed on by it.

    image = conv2(x) + degraded input (the residual the loss supervises);
    passed on = conv1(x) · sigmoid(conv3(image)) + x.
    """

    def __init__(self, channels, kernel_size, bias):
        super().__init__()
        self.conv1 = conv(channels, channels, kernel_size, bias)
        self.conv2 = conv(channels, 3, kernel_size, bias)
        self.conv3 = conv(3, channels, kernel_size, bias)

    def forward(self, x, degraded):
        image = self.conv2(x) + degraded                             # (B, 3, H, W)
        gate = torch.sigmoid(self.conv3(image))                      # (B, C, H, W)
        return self.conv1(x) * gate + x, image


class DownSample(nn.Module):
    """Bilinear ½× then a 1×1 conv that widens: (B, C, H, W) → (B, C + s, H/2, W/2)."""

    def __init__(self, channels, extra):
        super().__init__()
        self.down = nn.Sequential(nn.Upsample(scale_factor=0.5, mode="bilinear", align_corners=False),
                                  nn.Conv2d(channels, channels + extra, 1, bias=False))

    def forward(self, x):
        return self.down(x)


class UpSample(nn.Module):
    """Bilinear 2× then a 1×1 conv that narrows: (B, C + s, H, W) → (B, C, 2H, 2W), plus a skip if given.

    The official code has two classes (UpSample, SkipUpSample) with the same weights; one serves both here.
    """

    def __init__(self, channels, extra):
        super().__init__()
        self.up = nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                                nn.Conv2d(channels + extra, channels, 1, bias=False))

    def forward(self, x, skip=None):
        x = self.up(x)
        return x if skip is None else x + skip


# --- Stages 1 and 2: the U-Net -------------------------------------------------------------------------------------

def cabs(n, channels, kernel_size, reduction, bias, act):
    return nn.Sequential(*[CAB(channels, kernel_size, reduction, bias, act) for _ in range(n)])


class Encoder(nn.Module):
    """Three levels of 2 CABs at C, C + s, C + 2s channels, each level at half the previous resolution.

    With `csff` (stage 2) each level also adds 1×1 convs of the previous stage's encoder and decoder features
    at that level: the cross-stage feature fusion that lets stage 2 reuse what stage 1 found.
    """

    def __init__(self, n_feat, kernel_size, reduction, act, bias, scale_unetfeats, csff):
        super().__init__()
        widths = [n_feat + level * scale_unetfeats for level in range(3)]    # C, C + s, C + 2s
        self.encoder_level1 = cabs(2, widths[0], kernel_size, reduction, bias, act)
        self.encoder_level2 = cabs(2, widths[1], kernel_size, reduction, bias, act)
        self.encoder_level3 = cabs(2, widths[2], kernel_size, reduction, bias, act)
        self.down12 = DownSample(widths[0], scale_unetfeats)
        self.down23 = DownSample(widths[1], scale_unetfeats)
        if csff:
            for level, width in enumerate(widths, start=1):
                setattr(self, f"csff_enc{level}", nn.Conv2d(width, width, 1, bias=bias))
            for level, width in enumerate(widths, start=1):
                setattr(self, f"csff_dec{level}", nn.Conv2d(width, width, 1, bias=bias))

    def forward(self, x, encoder_outs=None, decoder_outs=None):
        """x (B, C, h, w) → [(B, C, h, w), (B, C + s, h/2, w/2), (B, C + 2s, h/4, w/4)]."""
        enc1 = self.fuse(1, self.encoder_level1(x), encoder_outs, decoder_outs)
        enc2 = self.fuse(2, self.encoder_level2(self.down12(enc1)), encoder_outs, decoder_outs)
        enc3 = self.fuse(3, self.encoder_level3(self.down23(enc2)), encoder_outs, decoder_outs)
        return [enc1, enc2, enc3]

    def fuse(self, level, x, encoder_outs, decoder_outs):
        """CSFF (stage 2 only): add the previous stage's encoder and decoder features of this level, 1×1-mapped."""
        if encoder_outs is None or decoder_outs is None:
            return x
        return (x + getattr(self, f"csff_enc{level}")(encoder_outs[level - 1])
                + getattr(self, f"csff_dec{level}")(decoder_outs[level - 1]))


class Decoder(nn.Module):
    """The mirror of `Encoder`: 2 CABs per level, upsampling adds the encoder's skip (itself through a CAB)."""

    def __init__(self, n_feat, kernel_size, reduction, act, bias, scale_unetfeats):
        super().__init__()
        widths = [n_feat + level * scale_unetfeats for level in range(3)]
        self.decoder_level1 = cabs(2, widths[0], kernel_size, reduction, bias, act)
        self.decoder_level2 = cabs(2, widths[1], kernel_size, reduction, bias, act)
        self.decoder_level3 = cabs(2, widths[2], kernel_size, reduction, bias, act)
        self.skip_attn1 = CAB(widths[0], kernel_size, reduction, bias, act)
        self.skip_attn2 = CAB(widths[1], kernel_size, reduction, bias, act)
        self.up21 = UpSample(widths[0], scale_unetfeats)
        self.up32 = UpSample(widths[1], scale_unetfeats)

    def forward(self, outs):
        """The encoder's three levels → the decoder's three levels [finest, middle, coarsest], same shapes."""
        enc1, enc2, enc3 = outs
        dec3 = self.decoder_level3(enc3)
        dec2 = self.decoder_level2(self.up32(dec3, self.skip_attn2(enc2)))
        dec1 = self.decoder_level1(self.up21(dec2, self.skip_attn1(enc1)))
        return [dec1, dec2, dec3]


# --- Stage 3: the original-resolution subnetwork -------------------------------------------------------------------

class ORB(nn.Module):
    """Original-resolution block: num_cab CABs and a conv, with a residual around them all."""

    def __init__(self, channels, kernel_size, reduction, act, bias, num_cab):
        super().__init__()
        # The closing conv has no bias whatever `bias` says: the official code calls conv() without it.
        self.body = nn.Sequential(*[CAB(channels, kernel_size, reduction, bias, act) for _ in range(num_cab)],
                                  conv(channels, channels, kernel_size))

    def forward(self, x):
        return self.body(x) + x


class ORSNet(nn.Module):
    """Three ORBs at full resolution (C + o channels); after each, stage 2's encoder and decoder features of
    one U-Net level (upsampled to full resolution, then 1×1 to C + o) are added: finest after ORB 1."""

    def __init__(self, n_feat, scale_orsnetfeats, kernel_size, reduction, act, bias, scale_unetfeats, num_cab):
        super().__init__()
        width = n_feat + scale_orsnetfeats
        self.orb1 = ORB(width, kernel_size, reduction, act, bias, num_cab)
        self.orb2 = ORB(width, kernel_size, reduction, act, bias, num_cab)
        self.orb3 = ORB(width, kernel_size, reduction, act, bias, num_cab)
        middle, coarse = (n_feat, scale_unetfeats), (n_feat + scale_unetfeats, scale_unetfeats)
        self.up_enc1 = UpSample(*middle)                                        # level 2 → full resolution
        self.up_dec1 = UpSample(*middle)
        self.up_enc2 = nn.Sequential(UpSample(*coarse), UpSample(*middle))     # level 3 → full resolution
        self.up_dec2 = nn.Sequential(UpSample(*coarse), UpSample(*middle))
        for name in ("conv_enc1", "conv_enc2", "conv_enc3", "conv_dec1", "conv_dec2", "conv_dec3"):
            setattr(self, name, nn.Conv2d(n_feat, width, 1, bias=bias))

    def forward(self, x, encoder_outs, decoder_outs):
        x = self.orb1(x)
        x = x + self.conv_enc1(encoder_outs[0]) + self.conv_dec1(decoder_outs[0])
        x = self.orb2(x)
        x = x + self.conv_enc2(self.up_enc1(encoder_outs[1])) + self.conv_dec2(self.up_dec1(decoder_outs[1]))
        x = self.orb3(x)
        x = x + self.conv_enc3(self.up_enc2(encoder_outs[2])) + self.conv_dec3(self.up_dec2(decoder_outs[2]))
        return x


# --- The network ---------------------------------------------------------------------------------------------------

class MPRNet(nn.Module):
    """Multi-stage progressive restoration: forward returns [stage 3, stage 2, stage 1] images, as the official
    code does (the training loss supervises all three); `restore` returns stage 3's, for any image size."""

    CONFIGS = {
        # The released models (swz30/MPRNet: one MPRNet.py per task, differing only in defaults; Deraining's
        # are the class defaults here).
        "derain": dict(n_feat=40, scale_unetfeats=20, scale_orsnetfeats=16, num_cab=8),       # 3,637,249
        "deblur": dict(n_feat=96, scale_unetfeats=48, scale_orsnetfeats=32, num_cab=8),       # 20,127,073
        "denoise": dict(n_feat=80, scale_unetfeats=48, scale_orsnetfeats=32, num_cab=8),      # 15,741,025
        # UNSPECIFIED: Table XIV does not give MPRNet's config; Table II lists MPRNet at 15.74M: the denoising one.
        "paper": dict(n_feat=80, scale_unetfeats=48, scale_orsnetfeats=32, num_cab=8),
        "tiny": dict(n_feat=8, scale_unetfeats=4, scale_orsnetfeats=4, num_cab=2),            # the reference vector
    }

    @staticmethod
    def size_multiple(config):
        """8 for every config: stage 1 halves each side (quarters), and its U-Net halves twice more."""
        return 8

    # Keys of the official code: keep them, released checkpoints load by these names.
    def __init__(self, in_c=3, out_c=3, n_feat=40, scale_unetfeats=20, scale_orsnetfeats=16, num_cab=8,
                 kernel_size=3, reduction=4, bias=False, guided_attention=None):
        super().__init__()
        if guided_attention is not None:
            raise ValueError("MPRNet has no guided blocks (no ETB hook): train it with --no-guidance")
        # DEVIATION: the official code runs in_c/out_c ≠ 3 only by broadcasting against its 3-channel SAM; we refuse.
        if in_c != 3 or out_c != 3:
            raise ValueError(f"MPRNet restores RGB images only (the official SAM is 3-channel); got in_c={in_c}, "
                             f"out_c={out_c}")
        # One PReLU (one learned slope) shared by every CAB, as in the official code: the state dict repeats it
        # under each CAB's body.1, the parameter count holds it once.
        act = nn.PReLU()
        unet = (n_feat, kernel_size, reduction, act, bias, scale_unetfeats)

        def shallow():                  # each stage's own shallow features: a conv and a CAB
            return nn.Sequential(conv(3, n_feat, kernel_size, bias), CAB(n_feat, kernel_size, reduction, bias, act))

        self.shallow_feat1, self.shallow_feat2, self.shallow_feat3 = shallow(), shallow(), shallow()
        self.stage1_encoder = Encoder(*unet, csff=False)
        self.stage1_decoder = Decoder(*unet)
        self.stage2_encoder = Encoder(*unet, csff=True)
        self.stage2_decoder = Decoder(*unet)
        self.stage3_orsnet = ORSNet(n_feat, scale_orsnetfeats, kernel_size, reduction, act, bias, scale_unetfeats,
                                    num_cab)
        self.sam12 = SAM(n_feat, kernel_size=1, bias=bias)
        self.sam23 = SAM(n_feat, kernel_size=1, bias=bias)
        self.concat12 = conv(2 * n_feat, n_feat, kernel_size, bias)
        self.concat23 = conv(2 * n_feat, n_feat + scale_orsnetfeats, kernel_size, bias)
        self.tail = conv(n_feat + scale_orsnetfeats, 3, kernel_size, bias)

    def forward(self, image):
        """I_d (B, 3, H, W), H and W multiples of 8 → [stage 3, stage 2, stage 1] images, each (B, 3, H, W)."""
        check_image(image, 3, "MPRNet")
        H, W = image.shape[-2:]
        if H % 8 or W % 8:
            raise ValueError(f"MPRNet.forward needs sides divisible by 8; got {H} × {W}: use restore(image), "
                             "which pads and crops")
        halves = [image[..., :H // 2, :], image[..., H // 2:, :]]              # top, bottom: (B, 3, H/2, W)

        # Stage 1: the four quarters through one U-Net; per half, left and right features side by side.
        stage1_encoded, stage1_decoded, stage1_gated, stage1_images = [], [], [], []
        for half in halves:
            left, right = (self.stage1_encoder(self.shallow_feat1(quarter))
                           for quarter in (half[..., :W // 2], half[..., W // 2:]))   # (B, 3, H/2, W/2) each
            encoded = [torch.cat(pair, dim=3) for pair in zip(left, right)]     # level l: (B, C_l, H/2^l, W/2^(l-1))
            decoded = self.stage1_decoder(encoded)
            gated, half_image = self.sam12(decoded[0], half)                    # (B, C, H/2, W), (B, 3, H/2, W)
            stage1_encoded.append(encoded)
            stage1_decoded.append(decoded)
            stage1_gated.append(gated)
            stage1_images.append(half_image)
        stage1_image = torch.cat(stage1_images, dim=2)                          # (B, 3, H, W)

        # Stage 2: each half, its shallow features joined with stage 1's gated ones, through the CSFF U-Net.
        stage2_halves = []
        for half, gated, encoded, decoded in zip(halves, stage1_gated, stage1_encoded, stage1_decoded):
            x = self.concat12(torch.cat([self.shallow_feat2(half), gated], dim=1))   # (B, 2C, ·) → (B, C, H/2, W)
            stage2_halves.append(self.stage2_encoder(x, encoded, decoded))
        stage2_encoded = [torch.cat(pair, dim=2) for pair in zip(*stage2_halves)]   # top over bottom, per level
        stage2_decoded = self.stage2_decoder(stage2_encoded)
        stage2_gated, stage2_image = self.sam23(stage2_decoded[0], image)         # (B, C, H, W), (B, 3, H, W)

        # Stage 3: the whole image at full resolution.
        x = self.concat23(torch.cat([self.shallow_feat3(image), stage2_gated], dim=1))   # (B, 2C, ·) → (B, C + o, ·)
        x = self.stage3_orsnet(x, stage2_encoded, stage2_decoded)
        return [self.tail(x) + image, stage2_image, stage1_image]

    def restore(self, image):
        """I_d (B, 3, H, W), any H, W → stage 3's image I_r (B, 3, H, W), not clamped.

        Pads bottom/right by reflection to a multiple of 8 and crops back, as the official demo.py and
        Deblurring/test.py (RealBlur) do; the other official test scripts feed sizes that are already multiples.
        """
        # UNSPECIFIED: the official scripts clamp to [0, 1] here; we leave that to the caller (data.write_image).
        check_image(image, 3, "MPRNet")
        H, W = image.shape[-2:]
        return self(pad_to_multiple(image, 8))[0][..., :H, :W]


def load_official(model, path):
    """Load a released checkpoint, torch.load(path)["state_dict"] with DataParallel's `module.` prefixes;
    a plain state dict and unprefixed keys load too. Returns the model."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such MPRNet checkpoint") from None
    except Exception as error:
        raise ValueError(f"{path} is not a readable checkpoint ({type(error).__name__}: {str(error)[:200]})") from None
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"{path}: expected a state dict or a checkpoint with 'state_dict' (the official format)")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    expected = model.state_dict()
    missing, unexpected = [k for k in expected if k not in state], [k for k in state if k not in expected]
    if missing or unexpected:
        raise ValueError(f"{path} is not this MPRNet: {len(missing)} missing keys {missing[:3]}, "
                         f"{len(unexpected)} unexpected keys {unexpected[:3]}")
    for key, value in expected.items():
        if state[key].shape != value.shape:
            raise ValueError(f"{path} is another MPRNet config: {key}: checkpoint {tuple(state[key].shape)}, "
                             f"model {tuple(value.shape)}")
    model.load_state_dict(state, strict=True)
    return model


# --- The official training loss (Deraining/ and Deblurring/ train.py, losses.py) -------------------------------------

def charbonnier(x, y, eps=1e-3):
    """mean √((x − y)² + ε²), a smooth L1 (ε = 1e-3 as the official CharbonnierLoss)."""
    return torch.sqrt((x - y) ** 2 + eps * eps).mean()


def gaussian_blur(image):
    """The official 5×5 Gaussian, outer product of [.05, .25, .4, .25, .05], per channel, replicate-padded."""
    taps = torch.tensor([0.05, 0.25, 0.4, 0.25, 0.05], device=image.device, dtype=image.dtype)
    kernel = torch.outer(taps, taps).expand(image.shape[1], 1, 5, 5)          # (C, 1, 5, 5): one per channel
    return F.conv2d(F.pad(image, (2, 2, 2, 2), mode="replicate"), kernel, groups=image.shape[1])


def laplacian(image):
    """One Laplacian-pyramid level: the image minus its blurred, 2× decimated, zero-filled ×4, re-blurred self."""
    blurred = gaussian_blur(image)
    upsampled = torch.zeros_like(blurred)
    upsampled[..., ::2, ::2] = 4 * blurred[..., ::2, ::2]                     # ×4 keeps the mean with 3/4 zeros
    return image - gaussian_blur(upsampled)


def edge_loss(x, y):
    """The official EdgeLoss: Charbonnier between the two images' Laplacians."""
    return charbonnier(laplacian(x), laplacian(y))


def medium_step(net, batch, state, edge_weight=0.05):
    """MPRNet's training loss as a step of train.fit: Σ_stages Charbonnier + 0.05 · Σ_stages edge loss.

    `state` is unused (the official loss has no schedule). The official scripts sum the per-stage losses
    with np.sum / torch.sum over a Python list; a plain sum is what they mean.
    """
    # DEVIATION: Denoising/train.py uses Charbonnier alone on clamped outputs; we use this loss for every config.
    stages = net(batch["degraded"])                                           # [stage 3, stage 2, stage 1]
    device = batch["target"].device.type                                      # float32 whatever autocast did
    with torch.autocast(device, enabled=False) if torch.amp.is_autocast_available(device) else nullcontext():
        target = batch["target"].float()
        loss_rec = sum(charbonnier(stage.float(), target) for stage in stages)
        loss_edge = sum(edge_loss(stage.float(), target) for stage in stages)
        total = loss_rec + edge_weight * loss_edge
    return total, {"loss_rec": loss_rec.detach(), "loss_edge": loss_edge.detach()}


if __name__ == "__main__":
    for name, config in MPRNet.CONFIGS.items():
        print(f"MPRNet {name:7s} {count_parameters(MPRNet(**config)):>12,d} parameters, pads to a multiple of "
              f"{MPRNet.size_multiple(config)}")
    model = MPRNet(**MPRNet.CONFIGS["tiny"]).eval()
    with torch.no_grad():
        out = model.restore(torch.rand(1, 3, 37, 53))
    print(f"tiny MPRNet: input (1, 3, 37, 53) -> restore() output {tuple(out.shape)} (stage 3)")
