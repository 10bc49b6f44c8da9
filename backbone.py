"""The Restoration Branch of Perceive-IR (Sec. III-C.1, Fig. 4(a), Eq. 2-4) and the ETB hook of its backbones.

Perceive-IR restores with an ordinary U-shaped network whose latent and decoder blocks are made
"enhanced" (ETB) by semantic and degradation guidance. This file holds the paper's network, Restormer;
`guidance.py` builds the guidance and plugs it in. Nothing here imports another file of this project;
the other papers' networks (`networks/`) import their shared pieces from here.

What is in here:
- `MDTA`, `GDFN`, `TransformerBlock` (TB, Eq. 2): Restormer's blocks (Zamir et al., CVPR 2022),
  written from its paper; with a guided attention plugged in, a TB becomes an ETB (Eq. 3).
- `Restormer`: the paper's backbone (Eq. 4), key-for-key compatible with official checkpoints.
- `CONFIGS`: named configs ("paper", "laptop", "tiny"); `guidance.build_backbone` builds any network by name.
- `pad_to_multiple`, `check_image`, `count_parameters`, `tiled_forward` (overlapping tiles with blending, so any
  image size runs in bounded memory): shared with the networks of `networks/`; `load_official` (BasicSR files).
The other backbones of Table XV (NAFNet, X-Restormer, GRL) and the restorers of Table XIV (PromptIR, MPRNet,
AirNet) are in `networks/`, one file per network.

The guidance interface, shared by the four backbones: a backbone is built with
`guided_attention=factory`, where `factory(level, dim, num_heads)` returns the token mixer of every
block at guided level l ∈ {1, 2, 3, 4} (l = 1 is the finest decoder level, l = 4 the coarsest,
Fig. 4); GRL also passes its own attention (`attention=`), which the mixer makes cross. At run time
`forward(image, priors)` hands `priors[l - 1]` (one vector per image) to each guided block, which
calls `mixer(x, norm, prior)` and uses the returned X_l^m (Eq. 8).
With `guided_attention=None` the blocks are plain blocks and the network is exactly the original. The restorers of
Table XIV have no such hook: they accept only `guided_attention=None`, so they train as plain networks.
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


# --- Released checkpoints ----------------------------------------------------------------------------------------

def load_official(model, path):
    """A released BasicSR checkpoint (Restormer's, NAFNet's): `params_ema` if present, else `params`, else a bare
    state_dict. Anything else, or another network's keys, is one line naming the file and the difference."""
    name = type(model).__name__
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such {name} checkpoint") from None
    except Exception as error:
        raise ValueError(f"{path} is not a readable checkpoint ({type(error).__name__}: {str(error)[:200]})") from error
    state = checkpoint.get("params_ema", checkpoint.get("params", checkpoint)) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"{path}: expected a state_dict or a BasicSR checkpoint with 'params'/'params_ema'")
    ours = model.state_dict()
    missing, unexpected = sorted(set(ours) - set(state)), sorted(set(state) - set(ours))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)}, model {tuple(ours[k].shape)}"
              for k in ours if k in state and state[k].shape != ours[k].shape]
    if missing or unexpected or shapes:
        differences = [f"missing {missing[:3]}"] * bool(missing) + [f"unexpected {unexpected[:3]}"] * bool(unexpected)
        raise ValueError(f"{path} is not this {name} config: " + "; ".join(differences + shapes[:1]))
    model.load_state_dict(state, strict=True)
    return model


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
    for name, config in Restormer.CONFIGS.items():
        print(f"Restormer {name:6s} {count_parameters(Restormer(**config)):>12,d} parameters")
    model = Restormer(**Restormer.CONFIGS["tiny"]).eval()
    with torch.no_grad():
        out = model(torch.rand(1, 3, 37, 53))
    print(f"tiny Restormer: input (1, 3, 37, 53) -> output {tuple(out.shape)}")
