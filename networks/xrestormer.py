"""X-Restormer (Chen et al. 2023, arXiv:2310.11881), a restoration backbone of Table XV (Sec. IV-G).

X-Restormer keeps Restormer's U-shaped network (Eq. 4) and its channel ("transposed") attention,
and adds the one thing Restormer lacks: attention between pixels. Every block mixes twice,
    X ← X + MDTA(LN(X));  X ← X + GDFN(LN(X))      channel mixing, global over the image
    X ← X + OCA(LN(X));   X ← X + GDFN(LN(X))      spatial mixing, inside overlapping windows
where OCA is HAT's overlapping cross-attention (Chen et al. 2023, "HAT"): queries come from
non-overlapping M × M windows, keys and values from larger windows that overlap their neighbours.
Perceive-IR plugs its guidance in exactly as for Restormer: in the latent and decoder blocks the
guided mixer (PGM + PGCA, Eq. 3) takes MDTA's place; the spatial half of the block is kept.

What is in here:
- `RelativePositionEmbedding`: a learned embedding per row offset and per column offset between a
  query and a key, added to the attention logits as q·e (HaloNet style).
- `OCAB`: the overlapping window attention (query windows M × M, key/value windows (1 + γ)M).
- `XRestormerBlock`: MDTA + GDFN, then OCA + GDFN; with a guided mixer, an ETB (Eq. 3).
- `XRestormer`: the network, key-for-key compatible with the official checkpoints, padding any
  image size inside `forward` as the official test pipeline does; `load_official(model, path)`.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from backbone import (GDFN, MDTA, Downsample, LayerNorm, OverlapPatchEmbed, Upsample, check_image, count_parameters,
                      load_official, pad_to_multiple, unet_levels)   # load_official: BasicSR's params(_ema) format


# --- Spatial attention in overlapping windows (HAT's OCA, as X-Restormer uses it) ----------------------------------

def relative_index(window_size, overlap_size):
    """Which of the 2R − 1 learned offsets each (query, key) pair uses, along one axis and in 2-D.

    A query at position i ∈ [0, M) of its M-wide window meets keys at positions j ∈ [0, R) of the
    R-wide key window (R = overlap window). The official code computes q·e for all 2R − 1 entries
    and then "skews" the result (pad one zero column, flatten, pad, reshape, crop; the rel_to_abs
    trick of Bello et al. 2019 / HaloNet) so that pair (i, j) ends up with entry j − i + R − 1.
    We build that index directly. Note that it counts j in key-window coordinates: the key window
    starts (R − M)/2 pixels before the query window, so the pixel itself (j = i + (R − M)/2) is not
    entry R − 1. The shift is the same for every pair, so it only relabels learned vectors; but
    pairs use entries R − M … 2R − 2 only, so the first R − M vectors of each table (4 of 23 for
    M = 8) never receive a gradient, in the official code as here.

    Returns (height, width), each (M², R²): tokens flattened row-major, as the windows are.
    """
    M, R = window_size, overlap_size
    offset = torch.arange(R)[None, :] - torch.arange(M)[:, None] + R - 1             # (M, R): j − i + R − 1
    # query (row a, col b) = a·M + b, key (row c, col d) = c·R + d: rows pair a with c, columns b with d.
    height = offset[:, None, :, None].expand(M, M, R, R).reshape(M * M, R * R)      # offset[a, c]
    width = offset[None, :, None, :].expand(M, M, R, R).reshape(M * M, R * R)       # offset[b, d]
    return height, width


class RelativePositionEmbedding(nn.Module):
    """Logit bias q·e_h[Δrow] + q·e_w[Δcol] for every query/key pair of a window (HaloNet style).

    Unlike Swin/HAT, whose bias is a learned scalar per offset and head, X-Restormer learns a vector
    per offset (shared by all heads) and dots it with the query, so the bias depends on content.
    Parameter names `rel_height`, `rel_width` follow the official code so checkpoints load.
    """

    def __init__(self, window_size, overlap_size, dim_head):
        super().__init__()
        self.rel_height = nn.Parameter(torch.randn(2 * overlap_size - 1, dim_head) * dim_head ** -0.5)
        self.rel_width = nn.Parameter(torch.randn(2 * overlap_size - 1, dim_head) * dim_head ** -0.5)
        height, width = relative_index(window_size, overlap_size)
        # Derived from the config, not learned: kept out of the state_dict (the official one has no such key).
        self.register_buffer("index_height", height, persistent=False)
        self.register_buffer("index_width", width, persistent=False)

    def forward(self, q):
        # q: (N, M², d) queries of N windows·heads, already scaled by d^-½ as in the official code.
        N = q.shape[0]
        by_row = (q @ self.rel_height.t()).gather(-1, self.index_height.expand(N, -1, -1))   # (N, M², R²)
        by_col = (q @ self.rel_width.t()).gather(-1, self.index_width.expand(N, -1, -1))     # (N, M², R²)
        return by_row + by_col


class OCAB(nn.Module):
    """Overlapping Cross-Attention (HAT's OCA; X-Restormer's spatial attention).

    The image is cut into non-overlapping M × M query windows. Each query window attends to a
    larger R × R key/value window centred on it, R = M + ⌊γM⌋ (γ = overlap_ratio, 0.5 → R = 12 for
    M = 8), so information crosses window borders without shifting windows as Swin does. Along
    one axis, with M = 4 and R = 6:
        pixel           2  3  4  5  6  7  8  9
        query window          4  5  6  7           M pixels; query windows tile the image
        key window         3  4  5  6  7  8        (R − M)/2 more on each side: key windows overlap
    The key/value windows are cut with `F.unfold` (stride M, padding (R − M)/2); at the image
    border they reach into zero padding, and those zero keys are not masked: they take part in
    the softmax (logit = position bias only) and add nothing to the output. The official code
    does the same; we keep it so the outputs match.
    Q, K, V come from one 1×1 conv (no depthwise conv here), heads × dim_head channels each.
    """

    def __init__(self, dim, window_size, overlap_ratio, num_heads, dim_head, bias=False):
        super().__init__()
        self.window_size = window_size
        self.overlap_size = int(window_size * overlap_ratio) + window_size       # R
        if (self.overlap_size - window_size) % 2:
            raise ValueError(f"OCAB: window {window_size} with overlap_ratio {overlap_ratio} gives key windows of "
                             f"{self.overlap_size}; the margin R − M must be even to centre them")
        self.num_heads = num_heads
        self.dim_head = dim_head
        self.scale = dim_head ** -0.5
        inner = num_heads * dim_head
        self.qkv = nn.Conv2d(dim, inner * 3, kernel_size=1, bias=bias)
        self.project_out = nn.Conv2d(inner, dim, kernel_size=1, bias=bias)
        self.rel_pos_emb = RelativePositionEmbedding(window_size, self.overlap_size, dim_head)

    def forward(self, x):
        B, _, H, W = x.shape
        M, R, heads, d = self.window_size, self.overlap_size, self.num_heads, self.dim_head
        rows, cols = H // M, W // M                                  # windows per column and per row
        q, k, v = self.qkv(x).chunk(3, dim=1)                        # 3 × (B, heads·d, H, W)

        # Queries: non-overlapping M × M windows; one batch entry per (image, window, head).
        q = q.reshape(B, heads, d, rows, M, cols, M)
        q = q.permute(0, 3, 5, 1, 4, 6, 2).reshape(-1, M * M, d)     # (B·windows·heads, M², d)

        # Keys and values: R × R windows with the same centres (stride M), cut by unfold.
        def key_windows(t):
            t = F.unfold(t, kernel_size=R, stride=M, padding=(R - M) // 2)   # (B, heads·d·R², windows)
            t = t.reshape(B, heads, d, R * R, rows * cols)
            return t.permute(0, 4, 1, 3, 2).reshape(-1, R * R, d)    # (B·windows·heads, R², d)
        k, v = key_windows(k), key_windows(v)

        q = q * self.scale
        attn = q @ k.transpose(-2, -1)                               # (B·windows·heads, M², R²)
        attn = (attn + self.rel_pos_emb(q)).softmax(dim=-1)
        out = attn @ v                                               # (B·windows·heads, M², d)

        out = out.reshape(B, rows, cols, heads, M, M, d)
        out = out.permute(0, 3, 6, 1, 4, 2, 5).reshape(B, heads * d, H, W)   # windows back in place
        return self.project_out(out)


class XRestormerBlock(nn.Module):
    """The X-Restormer block: channel attention (MDTA) + GDFN, then spatial attention (OCA) + GDFN.

    Plain:  X ← X + MDTA(LN₁(X));      X ← X + GDFN(LN₂(X));  X ← X + OCA(LN₃(X));  X ← X + GDFN(LN₄(X))
    ETB:    X ← mixer(X, LN₁, prior);  ... the rest unchanged (Eq. 3: PGCA takes MDTA's place).
    Attribute names (`channel_attn`, `channel_ffn`, `spatial_attn`, `spatial_ffn`, `norm1`-`norm4`)
    are the official ones, so checkpoints load; a guided mixer is stored as `channel_attn` too.
    # UNSPECIFIED: the paper does not say where PGCA enters an X-Restormer block, which has two
    # attentions; we put it in MDTA's place (PGCA is a channel attention like MDTA, and this is how
    # it enters Restormer) and keep OCA and both GDFNs.
    """

    def __init__(self, dim, window_size, overlap_ratio, channel_heads, spatial_heads, dim_head,
                 ffn_expansion_factor=2.66, bias=False, layer_norm_type="WithBias", mixer=None):
        super().__init__()
        self.guided = mixer is not None
        self.channel_attn = MDTA(dim, channel_heads, bias) if mixer is None else mixer
        self.spatial_attn = OCAB(dim, window_size, overlap_ratio, spatial_heads, dim_head, bias)
        self.norm1, self.norm2, self.norm3, self.norm4 = (LayerNorm(dim, layer_norm_type) for _ in range(4))
        self.channel_ffn = GDFN(dim, ffn_expansion_factor, bias)
        self.spatial_ffn = GDFN(dim, ffn_expansion_factor, bias)

    def forward(self, x, prior=None):
        if self.guided:
            x = self.channel_attn(x, self.norm1, prior)          # Eq. (3): PGCA in place of MDTA
        else:
            x = x + self.channel_attn(self.norm1(x))
        x = x + self.channel_ffn(self.norm2(x))
        x = x + self.spatial_attn(self.norm3(x))
        return x + self.spatial_ffn(self.norm4(x))


# --- The network ---------------------------------------------------------------------------------------------------

class XRestormer(nn.Module):
    """X-Restormer: Restormer's U-Net (Eq. 4) built from `XRestormerBlock`s.

    Accepts the official constructor keywords (defaults = the official class's defaults; the
    released restoration models use `CONFIGS["paper"]`), and its state-dict keys equal the
    official ones. Guided levels as in `backbone.Restormer`: l = 4 `latent`, l = 3, 2, 1
    `decoder_level3/2/1`; encoder and refinement blocks stay plain.
    Level i ∈ {1, 2, 3, 4} uses channel_heads[i−1], spatial_heads[i−1] and overlap_ratio[i−1];
    decoder_level1 and the refinement blocks (2C channels) use level 1's.
    """

    # UNSPECIFIED: the paper gives no X-Restormer config (Table XV lists only Perceive-IR's total,
    # 39.67M); we use the released restoration models' config (official options/test/00[2-5]_*.yml).
    CONFIGS = {
        # 26,041,208 parameters; the official code's defaults (num_blocks [4, 6, 6, 8], ...) are not this.
        "paper": dict(dim=48, num_blocks=[2, 4, 4, 4], num_refinement_blocks=4, channel_heads=[1, 2, 4, 8],
                      spatial_heads=[1, 2, 4, 8], overlap_ratio=[0.5, 0.5, 0.5, 0.5], window_size=8,
                      spatial_dim_head=16, ffn_expansion_factor=2.66, bias=False, LayerNorm_type="WithBias"),
        # Tests and demos (the shape of the reference vector): pads to 32, so 64-px crops run unpadded.
        "tiny": dict(dim=8, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1, channel_heads=[1, 2, 2, 4],
                     spatial_heads=[1, 2, 2, 2], overlap_ratio=[0.5, 0.5, 0.5, 0.5], window_size=4,
                     spatial_dim_head=4, ffn_expansion_factor=2.66, bias=False, LayerNorm_type="WithBias"),
    }

    @staticmethod
    def size_multiple(config):
        """Every side is padded to this: three 2× downsamplings, then whole windows at the latent (8·M).

        With `scale` > 1 (the official SR variant upsamples the input first) the low-resolution
        input needs only 8·M / gcd(8·M, scale): 16 for M = 8, ×4, as in the official SR options.
        """
        multiple = 8 * config.get("window_size", 8)
        return multiple // math.gcd(multiple, config.get("scale", 1))

    # Keys of the official code: keep them, released checkpoints load by these names.
    def __init__(self, inp_channels=3, out_channels=3, dim=48, num_blocks=(4, 6, 6, 8), num_refinement_blocks=4,
                 channel_heads=(1, 2, 4, 8), spatial_heads=(2, 2, 3, 4), overlap_ratio=(0.5, 0.5, 0.5, 0.5),
                 window_size=8, spatial_dim_head=16, bias=False, ffn_expansion_factor=2.66,
                 LayerNorm_type="WithBias", dual_pixel_task=False, scale=1, guided_attention=None):
        super().__init__()
        if isinstance(overlap_ratio, (int, float)):
            overlap_ratio = [overlap_ratio] * 4
        for name, value in (("num_blocks", num_blocks), ("channel_heads", channel_heads),
                            ("spatial_heads", spatial_heads), ("overlap_ratio", overlap_ratio)):
            if len(value) != 4:
                raise ValueError(f"XRestormer: {name} needs 4 entries (one per level); got {value}")
        # The official class accepts dual_pixel_task and ignores it (it has no skip_conv, and its global
        # residual fails for 6 input channels); we refuse True rather than silently ignore it.
        if dual_pixel_task:
            raise ValueError("XRestormer has no dual-pixel variant (the official flag is ignored); "
                             "use backbone.Restormer(dual_pixel_task=True)")
        self.inp_channels = inp_channels
        self.scale = scale
        self.multiple = self.size_multiple(dict(window_size=window_size, scale=scale))
        self.guided = guided_attention is not None

        def stack(n, channels, i, level=None):        # i: index of the level's heads/overlap; level: guided l
            def mixer():
                if level is None or guided_attention is None:
                    return None
                return guided_attention(level, channels, channel_heads[i])
            return nn.Sequential(*[
                XRestormerBlock(channels, window_size, overlap_ratio[i], channel_heads[i], spatial_heads[i],
                                spatial_dim_head, ffn_expansion_factor, bias, LayerNorm_type, mixer())
                for _ in range(n)])

        self.patch_embed = OverlapPatchEmbed(inp_channels, dim)          # bias-free in the official code
        self.encoder_level1 = stack(num_blocks[0], dim, 0)
        self.down1_2 = Downsample(dim)
        self.encoder_level2 = stack(num_blocks[1], dim * 2, 1)
        self.down2_3 = Downsample(dim * 2)
        self.encoder_level3 = stack(num_blocks[2], dim * 4, 2)
        self.down3_4 = Downsample(dim * 4)
        self.latent = stack(num_blocks[3], dim * 8, 3, level=4)
        self.up4_3 = Upsample(dim * 8)
        self.reduce_chan_level3 = nn.Conv2d(dim * 8, dim * 4, kernel_size=1, bias=bias)
        self.decoder_level3 = stack(num_blocks[2], dim * 4, 2, level=3)
        self.up3_2 = Upsample(dim * 4)
        self.reduce_chan_level2 = nn.Conv2d(dim * 4, dim * 2, kernel_size=1, bias=bias)
        self.decoder_level2 = stack(num_blocks[1], dim * 2, 1, level=2)
        self.up2_1 = Upsample(dim * 2)
        self.decoder_level1 = stack(num_blocks[0], dim * 2, 0, level=1)   # 2C channels: no reduction, as Restormer
        self.refinement = stack(num_refinement_blocks, dim * 2, 0)
        self.output = nn.Conv2d(dim * 2, out_channels, kernel_size=3, padding=1, bias=bias)

    def forward(self, image, priors=None):
        check_image(image, self.inp_channels, "XRestormer")
        if self.guided and priors is None:
            raise ValueError("this XRestormer was built with guided_attention; pass priors for levels 1-4")
        priors = priors if priors is not None else (None,) * 4
        H, W = image.shape[-2:]
        # The network needs whole windows at every level. The official test pipeline (XRestormerModel.
        # pre_process/post_process, padding_size: 64) reflect-pads bottom/right and crops back; we do
        # it here so any size runs. Images smaller than the pad fall back to replication (the official
        # reflect pad fails there).
        x_in = pad_to_multiple(image, self.multiple)
        if self.scale > 1:                                       # official SR variant: upsample first
            x_in = F.interpolate(x_in, scale_factor=self.scale, mode="bilinear", align_corners=False)

        shallow = self.patch_embed(x_in)                                            # X_s (B, C, H, W)
        x = unet_levels(self, shallow, priors)                                      # Restormer's U-Net (Eq. 4)
        x = self.output(x) + x_in                                                   # global residual: + I_d
        return x[..., :H * self.scale, :W * self.scale]


if __name__ == "__main__":
    for name, config in XRestormer.CONFIGS.items():
        print(f"X-Restormer {name:5s} {count_parameters(XRestormer(**config)):>12,d} parameters, pads to a multiple of "
              f"{XRestormer.size_multiple(config)}")
    model = XRestormer(**XRestormer.CONFIGS["tiny"]).eval()
    with torch.no_grad():
        out = model(torch.rand(1, 3, 37, 53))
    print(f"tiny X-Restormer: input (1, 3, 37, 53) -> output {tuple(out.shape)}")
