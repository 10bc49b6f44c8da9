"""The Restoration Branch of Perceive-IR (Sec. III-C.1, Fig. 4(a), Eq. 2-4) and its backbones (Table XV).

Perceive-IR restores with an ordinary U-shaped network whose latent and decoder blocks are made
"enhanced" (ETB) by semantic and degradation guidance. This file holds the networks themselves;
`guidance.py` builds the guidance and plugs it in. Nothing here imports another file of this project.

What is in here:
- `MDTA`, `GDFN`, `TransformerBlock` (TB, Eq. 2): Restormer's blocks (Zamir et al., CVPR 2022),
  written from its paper; with a guided attention plugged in, a TB becomes an ETB (Eq. 3).
- `Restormer`: the paper's backbone (Eq. 4), key-for-key compatible with official checkpoints.
- `NAFBlock`, `NAFNet`: the second backbone of Table XV (Chen et al., ECCV 2022); X-Restormer and GRL,
  the other two, are in `xrestormer.py` and `grl.py`.
- `CONFIGS` of each network: named configs ("paper", "tiny"); `guidance.build_backbone` builds by name.
- `tiled_forward`: overlapping tiles with blending, so any image size runs in bounded memory.

The guidance interface, shared by the four backbones: a backbone is built with
`guided_attention=factory`, where `factory(level, dim, num_heads)` returns the token mixer of every
block at guided level l ∈ {1, 2, 3, 4} (l = 1 is the finest decoder level, l = 4 the coarsest,
Fig. 4); GRL also passes its own attention (`attention=`), which the mixer makes cross. At run time
`forward(image, priors)` hands `priors[l - 1]` (one vector per image) to each guided block, which
calls `mixer(x, norm, prior)` and uses the returned X_l^m (Eq. 8).
With `guided_attention=None` the blocks are plain blocks and the network is exactly the original.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


# --- Restormer building blocks (Sec. III-C.1; Zamir et al. 2022, Sec. 3.1-3.2) -------------------------------------

class LayerNorm(nn.Module):
    """LayerNorm over channels at every pixel of a (B, C, H, W) map.

    Restormer has two kinds: "WithBias" (ordinary LayerNorm) and "BiasFree" (divides by the
    standard deviation without centring and has no bias). The paper config uses WithBias.
    The parameters live in `.body` so official checkpoints load by key (`norm1.body.weight`).
    """

    def __init__(self, dim, layer_norm_type="WithBias"):
        super().__init__()
        if layer_norm_type not in ("WithBias", "BiasFree"):
            raise ValueError(f"LayerNorm_type must be 'WithBias' or 'BiasFree', got {layer_norm_type!r}")
        self.body = nn.Module()
        self.body.weight = nn.Parameter(torch.ones(dim))
        self.body.bias = nn.Parameter(torch.zeros(dim)) if layer_norm_type == "WithBias" else None

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)                               # (B, H, W, C)
        if self.body.bias is None:                              # BiasFree: no centring
            x = x / torch.sqrt(x.var(-1, keepdim=True, unbiased=False) + 1e-5) * self.body.weight
        else:                                                   # one fused kernel
            x = F.layer_norm(x, x.shape[-1:], self.body.weight, self.body.bias, eps=1e-5)
        return x.permute(0, 3, 1, 2)                            # (B, C, H, W)


def channel_attention(q, k, v, num_heads, temperature):
    """Transposed ("channel") attention shared by MDTA and PGCA (Eq. 7).

    q, k, v: (B, C, H, W). The attention map is (C/heads) × (C/heads) per head instead of
    (H·W) × (H·W), which is what makes Restormer affordable at full resolution.
    Softmax(Q̂ · K̂ᵀ · α) · V̂ with Q̂, K̂ L2-normalised along the pixels; α is the learnable
    per-head temperature (the paper writes /α; Restormer multiplies, we follow Restormer).
    Returns the output (B, C, H, W) and the attention map (B, heads, C/heads, C/heads).
    """
    B, C, H, W = q.shape
    q = q.reshape(B, num_heads, C // num_heads, H * W)          # (B, heads, C/heads, H·W)
    k = k.reshape(B, num_heads, C // num_heads, H * W)
    v = v.reshape(B, num_heads, C // num_heads, H * W)
    q = F.normalize(q, dim=-1)
    k = F.normalize(k, dim=-1)
    attn = (q @ k.transpose(-2, -1)) * temperature              # (B, heads, C/heads, C/heads)
    attn = attn.softmax(dim=-1)
    out = attn @ v                                              # (B, heads, C/heads, H·W)
    return out.reshape(B, C, H, W), attn


class MDTA(nn.Module):
    """Multi-Dconv head Transposed Attention (Restormer, Sec. 3.1).

    Q, K and V come from one 1×1 conv followed by one 3×3 depthwise conv (local context), then
    channel attention per head with a learnable temperature, then a 1×1 output projection.
    Key names (`qkv`, `qkv_dwconv`, `temperature`, `project_out`) follow the official code so
    its checkpoints load.
    """

    def __init__(self, dim, num_heads, bias=False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"MDTA: channels ({dim}) must be divisible by heads ({num_heads})")
        self.num_heads = num_heads
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.qkv = nn.Conv2d(dim, dim * 3, kernel_size=1, bias=bias)
        self.qkv_dwconv = nn.Conv2d(dim * 3, dim * 3, kernel_size=3, padding=1, groups=dim * 3, bias=bias)
        self.project_out = nn.Conv2d(dim, dim, kernel_size=1, bias=bias)

    def forward(self, x, return_attention=False):
        q, k, v = self.qkv_dwconv(self.qkv(x)).chunk(3, dim=1)    # 3 × (B, C, H, W)
        out, attn = channel_attention(q, k, v, self.num_heads, self.temperature)
        out = self.project_out(out)
        return (out, attn) if return_attention else out


class GDFN(nn.Module):
    """Gated-Dconv Feed-forward Network (Restormer, Sec. 3.2).

    Two parallel paths of 1×1 conv + 3×3 depthwise conv; one goes through GELU and gates the
    other element-wise; a 1×1 conv projects back. Hidden width = int(dim · 2.66).
    """

    def __init__(self, dim, ffn_expansion_factor=2.66, bias=False):
        super().__init__()
        hidden = int(dim * ffn_expansion_factor)
        self.project_in = nn.Conv2d(dim, hidden * 2, kernel_size=1, bias=bias)
        self.dwconv = nn.Conv2d(hidden * 2, hidden * 2, kernel_size=3, padding=1, groups=hidden * 2, bias=bias)
        self.project_out = nn.Conv2d(hidden, dim, kernel_size=1, bias=bias)

    def forward(self, x):
        gate, value = self.dwconv(self.project_in(x)).chunk(2, dim=1)   # 2 × (B, hidden, H, W)
        return self.project_out(F.gelu(gate) * value)


class TransformerBlock(nn.Module):
    """TB (Eq. 2) or, with a guided mixer, ETB (Eq. 3).

    TB:  X ← X + MDTA(LN(X));      X ← X + GDFN(LN(X))
    ETB: X ← mixer(X, LN, prior);  X ← X + GDFN(LN(X))
    where the mixer (PGM + PGCA from guidance.py) returns X_l^m of Eq. 8, residual included.
    In an ETB the mixer takes the place of MDTA and is stored under the same name, `attn`.
    """

    def __init__(self, dim, num_heads, ffn_expansion_factor=2.66, bias=False,
                 layer_norm_type="WithBias", mixer=None):
        super().__init__()
        self.norm1 = LayerNorm(dim, layer_norm_type)
        self.attn = MDTA(dim, num_heads, bias) if mixer is None else mixer
        self.norm2 = LayerNorm(dim, layer_norm_type)
        self.ffn = GDFN(dim, ffn_expansion_factor, bias)
        self.guided = mixer is not None

    def forward(self, x, prior=None):
        if self.guided:
            x = self.attn(x, self.norm1, prior)          # Eq. (3): PGCA in place of MDTA
        else:
            x = x + self.attn(self.norm1(x))             # Eq. (2)
        return x + self.ffn(self.norm2(x))


def run_level(blocks, x, prior):
    """Run one level's stack of blocks, handing the level's prior to guided blocks."""
    for block in blocks:
        x = block(x, prior)
    return x


def pad_to_multiple(image, multiple, mode="reflect"):
    """Pad the bottom/right of a (B, C, H, W) image to a multiple of `multiple`.

    mode "reflect" (Restormer's official test script) or "zeros" (NAFNet's official forward).
    Reflection needs the pad to be smaller than the side; tiny images fall back to replication.
    """
    H, W = image.shape[-2:]
    pad_h, pad_w = (-H) % multiple, (-W) % multiple
    if pad_h == 0 and pad_w == 0:
        return image
    if mode == "zeros":
        return F.pad(image, (0, pad_w, 0, pad_h))
    mode = "reflect" if pad_h < H and pad_w < W else "replicate"
    return F.pad(image, (0, pad_w, 0, pad_h), mode=mode)


def check_image(image, channels, who):
    """Bad input gets a message that says what was expected."""
    if not isinstance(image, torch.Tensor) or image.dim() != 4:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"{who} expects a 4-D tensor (B, {channels}, H, W); got {shape}. "
                         "Add a batch dimension with image.unsqueeze(0).")
    if image.shape[1] != channels:
        raise ValueError(f"{who} expects {channels} input channels; got {image.shape[1]} "
                         f"(shape {tuple(image.shape)}). Convert grayscale to RGB first.")


# --- Restormer (Eq. 4; Sec. IV-A.4 config) -------------------------------------------------------------------------

class OverlapPatchEmbed(nn.Module):
    """The shallow 3×3 conv of Eq. (4): I_d (B, 3, H, W) → X_s (B, C, H, W)."""

    def __init__(self, in_channels, dim, bias=False):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=3, padding=1, bias=bias)

    def forward(self, x):
        return self.proj(x)


class Downsample(nn.Module):
    """(B, C, H, W) → 3×3 conv → (B, C/2, H, W) → PixelUnshuffle → (B, 2C, H/2, W/2)."""

    def __init__(self, channels, bias=False):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, channels // 2, 3, padding=1, bias=bias), nn.PixelUnshuffle(2))

    def forward(self, x):
        return self.body(x)


class Upsample(nn.Module):
    """(B, C, H, W) → 3×3 conv → (B, 2C, H, W) → PixelShuffle → (B, C/2, 2H, 2W)."""

    def __init__(self, channels, bias=False):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, channels * 2, 3, padding=1, bias=bias), nn.PixelShuffle(2))

    def forward(self, x):
        return self.body(x)


def unet_levels(net, shallow, priors):
    """The levels of Eq. (4) between the shallow conv and the output conv, for Restormer and X-Restormer (which
    share the U-Net and its module names): X_s (B, C, H, W) → refined features (B, 2C, H, W). Level l's blocks get
    priors[l − 1]: l = 4 the latent, 3, 2, 1 the decoder levels; encoder and refinement blocks get none."""
    enc1 = run_level(net.encoder_level1, shallow, None)                         # (B, C, H, W)
    enc2 = run_level(net.encoder_level2, net.down1_2(enc1), None)               # (B, 2C, H/2, W/2)
    enc3 = run_level(net.encoder_level3, net.down2_3(enc2), None)               # (B, 4C, H/4, W/4)
    x = run_level(net.latent, net.down3_4(enc3), priors[3])                     # (B, 8C, H/8, W/8)
    x = torch.cat([net.up4_3(x), enc3], dim=1)                                  # (B, 8C, H/4, W/4)
    x = run_level(net.decoder_level3, net.reduce_chan_level3(x), priors[2])     # (B, 4C, H/4, W/4)
    x = torch.cat([net.up3_2(x), enc2], dim=1)                                  # (B, 4C, H/2, W/2)
    x = run_level(net.decoder_level2, net.reduce_chan_level2(x), priors[1])     # (B, 2C, H/2, W/2)
    x = torch.cat([net.up2_1(x), enc1], dim=1)                                  # (B, 2C, H, W)
    x = run_level(net.decoder_level1, x, priors[0])                             # (B, 2C, H, W): no reduction
    return run_level(net.refinement, x, None)


class Restormer(nn.Module):
    """The Restoration Branch, Eq. (4):  I_r = Conv(F_etb^{4,3,2,1}(F_tb^{1,2,3}(Conv(I_d))↓, Y_l)↑) + I_d

    Accepts the official constructor keywords, and its state-dict keys equal the official ones,
    so `model.load_state_dict(torch.load(ckpt, weights_only=True)["params"])` loads released checkpoints.
    Guided levels: l = 4 is `latent`, l = 3, 2, 1 are `decoder_level3/2/1` (F_1 guides the finest
    decoder level, Fig. 4). The refinement blocks stay plain TBs.
    """

    CONFIGS = {
        # Sec. IV-A.4: blocks [4, 6, 6, 8], heads [1, 2, 4, 8], channels [48, 96, 192, 384], 4 refinement.
        "paper": dict(dim=48, num_blocks=[4, 6, 6, 8], num_refinement_blocks=4, heads=[1, 2, 4, 8],
                      ffn_expansion_factor=2.66, bias=False, LayerNorm_type="WithBias"),
        # `--preset laptop`: the same four levels at a third of the width and a quarter of the blocks, 1.56M
        # parameters, trainable on real data in an hour on 2 CPU cores (README, "A real restorer").
        "laptop": dict(dim=16, num_blocks=[1, 2, 2, 4], num_refinement_blocks=1, heads=[1, 2, 4, 8],
                       ffn_expansion_factor=2.66, bias=False, LayerNorm_type="WithBias"),
        # Tests and the offline demo: same topology, a few thousand times cheaper.
        "tiny": dict(dim=8, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1, heads=[1, 2, 2, 4],
                     ffn_expansion_factor=2.66, bias=False, LayerNorm_type="WithBias"),
    }

    @staticmethod
    def size_multiple(config):
        """Every side is padded to a multiple of 8: three 2× downsamplings."""
        return 8

    # Keys of the official code: keep them, released checkpoints load by these names.
    def __init__(self, inp_channels=3, out_channels=3, dim=48, num_blocks=(4, 6, 6, 8),
                 num_refinement_blocks=4, heads=(1, 2, 4, 8), ffn_expansion_factor=2.66, bias=False,
                 LayerNorm_type="WithBias", dual_pixel_task=False, guided_attention=None):
        super().__init__()
        if len(num_blocks) != 4 or len(heads) != 4:
            raise ValueError(f"num_blocks and heads need 4 entries (one per level); got {num_blocks}, {heads}")
        self.inp_channels = inp_channels
        self.dual_pixel_task = dual_pixel_task
        self.guided = guided_attention is not None

        def stack(n, channels, num_heads, level=None):
            def mixer():
                if level is None or guided_attention is None:
                    return None
                return guided_attention(level, channels, num_heads)
            return nn.Sequential(*[
                TransformerBlock(channels, num_heads, ffn_expansion_factor, bias, LayerNorm_type, mixer())
                for _ in range(n)])

        self.patch_embed = OverlapPatchEmbed(inp_channels, dim, bias)   # Conv(I_d) of Eq. (4)
        # Encoder: TBs at C, 2C, 4C channels; downsampling halves H, W and doubles channels.
        self.encoder_level1 = stack(num_blocks[0], dim, heads[0])
        self.down1_2 = Downsample(dim, bias)
        self.encoder_level2 = stack(num_blocks[1], dim * 2, heads[1])
        self.down2_3 = Downsample(dim * 2, bias)
        self.encoder_level3 = stack(num_blocks[2], dim * 4, heads[2])
        self.down3_4 = Downsample(dim * 4, bias)
        self.latent = stack(num_blocks[3], dim * 8, heads[3], level=4)
        # Decoder: upsample, concatenate the encoder skip, reduce channels with a 1×1 conv.
        self.up4_3 = Upsample(dim * 8, bias)
        self.reduce_chan_level3 = nn.Conv2d(dim * 8, dim * 4, kernel_size=1, bias=bias)
        self.decoder_level3 = stack(num_blocks[2], dim * 4, heads[2], level=3)
        self.up3_2 = Upsample(dim * 4, bias)
        self.reduce_chan_level2 = nn.Conv2d(dim * 4, dim * 2, kernel_size=1, bias=bias)
        self.decoder_level2 = stack(num_blocks[1], dim * 2, heads[1], level=2)
        self.up2_1 = Upsample(dim * 2, bias)
        # Level 1 keeps the concatenated 2C channels (no reduction), as in Restormer.
        self.decoder_level1 = stack(num_blocks[0], dim * 2, heads[0], level=1)
        self.refinement = stack(num_refinement_blocks, dim * 2, heads[0])
        if dual_pixel_task:
            self.skip_conv = nn.Conv2d(dim, dim * 2, kernel_size=1, bias=bias)
        self.output = nn.Conv2d(dim * 2, out_channels, kernel_size=3, padding=1, bias=bias)

    def forward(self, image, priors=None):
        check_image(image, self.inp_channels, "Restormer")
        if self.guided and priors is None:
            raise ValueError("this Restormer was built with guided_attention; pass priors for levels 1-4")
        priors = priors if priors is not None else (None,) * 4
        H, W = image.shape[-2:]
        x_in = pad_to_multiple(image, 8)                          # three 2× downsamplings

        shallow = self.patch_embed(x_in)                                            # X_s (B, C, H, W)
        x = unet_levels(self, shallow, priors)                                      # (B, 2C, H, W)
        if self.dual_pixel_task:                                  # official dual-pixel variant
            x = self.output(x + self.skip_conv(shallow))
        else:
            x = self.output(x) + x_in                             # global residual: + I_d
        return x[..., :H, :W]


# --- NAFNet (Chen et al., ECCV 2022), the second backbone of Table XV ----------------------------------------------

class LayerNorm2d(nn.Module):
    """NAFNet's channel LayerNorm (eps 1e-6) on a (B, C, H, W) map."""

    def __init__(self, channels, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x):
        mean = x.mean(1, keepdim=True)
        variance = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(variance + self.eps)
        return x * self.weight[:, None, None] + self.bias[:, None, None]


class SimpleGate(nn.Module):
    """Split the channels in two halves and multiply them (NAFNet's activation-free gate)."""

    def forward(self, x):
        a, b = x.chunk(2, dim=1)
        return a * b


class NAFBlock(nn.Module):
    """NAFNet's block: a token-mixing half (1×1, 3×3 depthwise, SimpleGate, simplified channel
    attention, 1×1) and a feed-forward half (1×1, SimpleGate, 1×1), each a scaled residual.

    With a guided mixer (decoder levels of Perceive-IR_NAFNet, Table XV) the token-mixing half is
    replaced by PGM + PGCA, exactly as in the Restormer ETB: X ← mixer(X, LN, prior).
    """

    def __init__(self, channels, dw_expand=2, ffn_expand=2, mixer=None):
        super().__init__()
        self.guided = mixer is not None
        self.norm1 = LayerNorm2d(channels)
        if self.guided:
            self.attn = mixer
        else:
            dw_channels = channels * dw_expand
            self.conv1 = nn.Conv2d(channels, dw_channels, 1)
            self.conv2 = nn.Conv2d(dw_channels, dw_channels, 3, padding=1, groups=dw_channels)
            self.conv3 = nn.Conv2d(dw_channels // 2, channels, 1)
            self.sca = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(dw_channels // 2, dw_channels // 2, 1))
            self.sg = SimpleGate()
            self.beta = nn.Parameter(torch.zeros(1, channels, 1, 1))
        ffn_channels = channels * ffn_expand
        self.conv4 = nn.Conv2d(channels, ffn_channels, 1)
        self.conv5 = nn.Conv2d(ffn_channels // 2, channels, 1)
        self.norm2 = LayerNorm2d(channels)
        self.gamma = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x, prior=None):
        if self.guided:
            x = self.attn(x, self.norm1, prior)                  # Eq. (3) with NAFNet's FFN
        else:
            y = self.sg(self.conv2(self.conv1(self.norm1(x))))   # (B, C·dw_expand/2, H, W)
            y = self.conv3(y * self.sca(y))
            x = x + y * self.beta
        y = self.conv5(SimpleGate()(self.conv4(self.norm2(x))))
        return x + y * self.gamma


class NAFNet(nn.Module):
    """NAFNet: intro conv, encoder stages with strided-conv downsampling, middle blocks, decoder
    stages with PixelShuffle upsampling and additive skips, ending conv, global residual.

    # UNSPECIFIED: the paper does not say where NAFNet takes the guidance (Table XV). NAFNet has
    # four decoder stages and a middle stage below them, one more than Fig. 4's four levels; we
    # guide the four decoder stages, F_1 at the finest (l = 1), and keep the middle blocks plain.
    """

    CONFIGS = {
        # UNSPECIFIED: the paper does not give its NAFNet config; we use the width-32 model whose
        # 17.11M parameters match Table II's NAFNet entry (NAFNet's GoPro config).
        "paper": dict(width=32, middle_blk_num=1, enc_blk_nums=[1, 1, 1, 28], dec_blk_nums=[1, 1, 1, 1],
                      pgca_heads=[1, 2, 4, 8]),
        "tiny": dict(width=8, middle_blk_num=1, enc_blk_nums=[1, 1, 1, 1], dec_blk_nums=[1, 1, 1, 1],
                     pgca_heads=[1, 2, 2, 4]),
    }

    @staticmethod
    def size_multiple(config):
        """Every side is padded to 2 per downsampling, one per encoder stage (16 for both configs)."""
        return 2 ** len(config["enc_blk_nums"])

    def __init__(self, img_channel=3, width=32, middle_blk_num=1, enc_blk_nums=(1, 1, 1, 28),
                 dec_blk_nums=(1, 1, 1, 1), pgca_heads=(1, 2, 4, 8), guided_attention=None):
        super().__init__()
        if len(enc_blk_nums) != len(dec_blk_nums):
            raise ValueError(f"NAFNet needs as many decoder as encoder stages; got {enc_blk_nums}, {dec_blk_nums}")
        if guided_attention is not None and len(dec_blk_nums) > len(pgca_heads):
            raise ValueError(f"guided NAFNet: pgca_heads {pgca_heads} must name a head count per decoder stage")
        self.img_channel = img_channel
        self.guided = guided_attention is not None
        self.intro = nn.Conv2d(img_channel, width, 3, padding=1)
        self.ending = nn.Conv2d(width, img_channel, 3, padding=1)
        self.encoders, self.downs = nn.ModuleList(), nn.ModuleList()
        self.ups, self.decoders = nn.ModuleList(), nn.ModuleList()
        channels = width
        for n in enc_blk_nums:
            self.encoders.append(nn.Sequential(*[NAFBlock(channels) for _ in range(n)]))
            self.downs.append(nn.Conv2d(channels, channels * 2, 2, stride=2))
            channels *= 2
        self.middle_blks = nn.Sequential(*[NAFBlock(channels) for _ in range(middle_blk_num)])
        num_levels = len(dec_blk_nums)
        for i, n in enumerate(dec_blk_nums):
            self.ups.append(nn.Sequential(nn.Conv2d(channels, channels * 2, 1, bias=False), nn.PixelShuffle(2)))
            channels //= 2
            level = num_levels - i                                # decoders run coarse → fine
            self.decoders.append(nn.Sequential(*[
                NAFBlock(channels, mixer=None if guided_attention is None
                         else guided_attention(level, channels, pgca_heads[level - 1]))
                for _ in range(n)]))

    def forward(self, image, priors=None):
        check_image(image, self.img_channel, "NAFNet")
        if self.guided and priors is None:
            raise ValueError("this NAFNet was built with guided_attention; pass priors for its decoder levels")
        H, W = image.shape[-2:]
        x_in = pad_to_multiple(image, 2 ** len(self.encoders), "zeros")   # as the official forward does
        x = self.intro(x_in)
        skips = []
        for encoder, down in zip(self.encoders, self.downs):
            x = run_level(encoder, x, None)
            skips.append(x)
            x = down(x)                                           # (B, 2C, H/2, W/2)
        x = run_level(self.middle_blks, x, None)
        num_levels = len(self.decoders)
        for i, (up, decoder, skip) in enumerate(zip(self.ups, self.decoders, skips[::-1])):
            level = num_levels - i
            x = up(x) + skip                                      # (B, C/2, 2H, 2W)
            x = run_level(decoder, x, None if priors is None else priors[level - 1])
        x = self.ending(x) + x_in
        return x[..., :H, :W]


# --- Tiled inference ------------------------------------------------------------------------------------------------

def count_parameters(module, trainable=True):
    return sum(p.numel() for p in module.parameters() if p.requires_grad == trainable)


def tiled_forward(restore, image, tile=512, overlap=32):
    """Apply `restore` ((B, C, h, w) → (B, C, h, w)) to overlapping tiles and blend them.

    Memory is bounded by the tile size. Each tile's contribution is weighted by a ramp that falls
    to near zero over the overlap at every inner edge, so seams disappear; outer borders keep
    full weight. `tile=None` or an image no larger than one tile runs whole.
    """
    B, C, H, W = image.shape
    if tile is None or (H <= tile and W <= tile):
        return restore(image)
    if not 0 <= overlap < tile:
        raise ValueError(f"--tile-overlap ({overlap}) must be in [0, --tile ({tile}))")
    stride = tile - overlap

    def starts(size):
        if size <= tile:
            return [0]
        last = size - tile
        return sorted(set(list(range(0, last, stride)) + [last]))

    def ramp(length, at_start, at_end):
        weight = torch.ones(length, dtype=image.dtype, device=image.device)
        if overlap > 0:
            edge = torch.arange(1, overlap + 1, dtype=image.dtype, device=image.device) / (overlap + 1)
            if not at_start:
                weight[:overlap] = edge
            if not at_end:
                weight[-overlap:] = edge.flip(0)
        return weight

    output = torch.zeros_like(image)
    total = torch.zeros(1, 1, H, W, dtype=image.dtype, device=image.device)
    ys, xs = starts(H), starts(W)
    for y in ys:
        for x in xs:
            h, w = min(tile, H), min(tile, W)
            piece = restore(image[:, :, y:y + h, x:x + w])
            weight = (ramp(h, y == 0, y == ys[-1])[:, None] * ramp(w, x == 0, x == xs[-1])[None, :])
            output[:, :, y:y + h, x:x + w] += piece * weight
            total[:, :, y:y + h, x:x + w] += weight
    return output / total


if __name__ == "__main__":
    for network in (Restormer, NAFNet):
        for name, config in network.CONFIGS.items():
            print(f"{network.__name__:9s} {name:5s} {count_parameters(network(**config)):>12,d} parameters")
    model = Restormer(**Restormer.CONFIGS["tiny"]).eval()
    with torch.no_grad():
        out = model(torch.rand(1, 3, 37, 53))
    print(f"tiny Restormer: input (1, 3, 37, 53) -> output {tuple(out.shape)}")
