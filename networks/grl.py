"""GRL, a restoration backbone of Table XV (Li et al., "Efficient and Explicit Modelling of Image Hierarchies for
Image Restoration", CVPR 2023), written from the official code and key-for-key compatible with its checkpoints.

GRL is isotropic: a 3×3 conv, stages of transformer blocks that all run at full resolution, a 3×3 conv, and a
global residual. Every block models the image hierarchy at three ranges at once (the paper's title): far, through
anchored stripe attention; regional, through window attention; local, through a channel-attention conv (CAB).

What is in here:
- position tables, indices and shift masks (`position_tables`): the look-up data of the continuous position bias
  and of shifted windows, kept as persistent buffers (as the official code does) and recomputed for other sizes;
- `WindowAttention`, `AnchorStripeAttention`, `MixedAttention`: half of the channels attend inside w×w windows,
  the other half inside long stripes through a few anchors; cosine attention with a position bias;
- `GRLBlock` (the official EfficientMixAttnTransformerBlock), `TransformerStage`, `GRL` with `CONFIGS`;
- guidance (Perceive-IR, Eq. 3, 6-8): guided stages give the mixer of `guidance.py` GRL's attention made cross;
- `load_official`: released Lightning checkpoints, with or without their buffers.
"""

import math
import pickle

import torch
import torch.nn as nn
import torch.nn.functional as F

from backbone import check_image, count_parameters, pad_to_multiple

RGB_MEAN = (0.4488, 0.4371, 0.4040)      # the official GRL subtracts this (DIV2K) mean from RGB input
BUFFER_NAMES = ("table_w", "table_sh", "table_sv", "index_w", "index_sh_a2w", "index_sh_w2a", "index_sv_a2w",
                "index_sv_w2a", "mask_w", "mask_sh_a2w", "mask_sh_w2a", "mask_sv_a2w", "mask_sv_w2a")
# Official keywords of variants no released restoration model uses: accepted at these values only (official configs).
OFFICIAL_FIXED = dict(upscale=1, upsampler="", stripe_groups=[None, None], qkv_proj_type="linear", conv_type="1conv",
                      anchor_one_stage=True, out_proj_type="linear", init_method="n", drop_rate=0.0, attn_drop_rate=0.0,
                      pretrained_window_size=[0, 0], pretrained_stripe_size=[0, 0], fairscale_checkpoint=False,
                      offload_to_cpu=False, euclidean_dist=False)


# --- Tokens, windows and heads ---------------------------------------------------------------------------------------

def tokens_to_map(x, size):
    """(B, H·W, C) → (B, C, H, W)"""
    return x.transpose(1, 2).reshape(x.shape[0], -1, *size)


def map_to_tokens(x):
    """(B, C, H, W) → (B, H·W, C)"""
    return x.flatten(2).transpose(1, 2)


def window_partition(x, window):
    """(B, H, W, C) → (B·nW, wh·ww, C): non-overlapping wh × ww windows (or stripes), batch-major, row-major."""
    B, H, W, C = x.shape
    x = x.reshape(B, H // window[0], window[0], W // window[1], window[1], C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window[0] * window[1], C)


def window_merge(windows, window, size):
    """(B·nW, wh·ww, C) → (B, H, W, C), the inverse of `window_partition`."""
    (H, W), C = size, windows.shape[-1]
    x = windows.reshape(-1, H // window[0], W // window[1], window[0], window[1], C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, H, W, C)


def split_heads(x, num_heads):
    """(B', N, C) → (B', heads, N, C/heads)"""
    return x.reshape(*x.shape[:2], num_heads, -1).transpose(1, 2)


def merge_heads(x):
    """(B', heads, N, d) → (B', N, heads·d)"""
    return x.transpose(1, 2).flatten(2)


# --- Continuous position bias and shift masks: the persistent buffers ------------------------------------------------
# Attention inside a window (or stripe) adds a bias that depends on where query and key sit relative to each
# other (Swin V2's continuous position bias). The official code precomputes three kinds of tensors per padded size:
#   table (1, T_h, T_w, 2): every possible offset (Δh, Δw), log-spaced; a small MLP turns each into a bias per head;
#   index (N_q, N_k):       for every (query, key) pair of a window, the flat table entry of its offset;
#   mask (nW, N_q, N_k):    −100 between tokens that a cyclic shift brought together from opposite borders.
# Windows (w×w) use table_w / index_w / mask_w. Stripes come wide ("sh": s_h × s_w) and tall ("sv": s_w × s_h), and
# their tokens talk to anchors (a stripe pooled by the down factor df) in two directions: anchors query the
# stripe's tokens ("a2w") and tokens query the anchors ("w2a"); both directions share one table per orientation.

def relative_coords_table(window, down_factor=1):
    """Every offset between a token of a window and a token of its anchor window, log-spaced: (1, T_h, T_w, 2).

    Along an axis of w tokens and a = w/df anchors the offsets run from −(a − 1) − (w − a)//2 to
    (w − 1) − (w − a)//2 (T = w + a − 1 values): the official code places anchor j at position j + (w − a)/2,
    i.e. the anchors sit side by side in the middle of the stripe, not at their pooled centres j·df + (df − 1)/2.
    Offsets are scaled to [−8, 8] and squashed, sign(t)·log2(1 + |t|)/log2(8) (Swin V2's log-spaced coordinates).
    With df = 1 this is the ordinary window table, offsets −(w − 1) … w − 1.
    """
    axes = []
    for w in window:
        a = w // down_factor
        largest = w - 1 - (w - a) // 2
        offsets = torch.arange(-(a - 1) - (w - a) // 2, largest + 1, dtype=torch.float32)
        axes.append(offsets / largest * 8)
    table = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)[None]          # (1, T_h, T_w, 2)
    return torch.sign(table) * torch.log2(table.abs() + 1.0) / math.log2(8)


def relative_position_index(query_window, key_window):
    """Flat table entry of the offset of every (query, key) pair: (N_q, N_k), N = wh·ww of each window.

    Offset (Δh, Δw) = query position − key position, shifted to start at 0 (Δ + key side − 1), flattened
    row-major (rows of T_w = query width + key width − 1). Windows: w × w queries and keys; "w2a": stripe queries,
    anchor keys; "a2w": the reverse. Entry i of an axis holds the table's offset i − (a − 1) − (w − a)//2, so both
    directions read one table, with the anchors placed as `relative_coords_table` says (rounded up in a2w).
    """
    def coordinates(window):                                                          # (2, N)
        return torch.stack(torch.meshgrid(torch.arange(window[0]), torch.arange(window[1]), indexing="ij")).flatten(1)
    offset = coordinates(query_window)[:, :, None] - coordinates(key_window)[:, None, :]      # (2, N_q, N_k)
    row, column = offset[0] + key_window[0] - 1, offset[1] + key_window[1] - 1
    return row * (query_window[1] + key_window[1] - 1) + column


def region_labels(size, window, shift):
    """Where each position of the cyclically shifted map came from: one label per token of each window, (nW, N).

    Rolling the map by −shift moves the first `shift` rows (columns) to the far border, so the last window of each
    row of windows mixes pixels that were never neighbours. Along each axis of length d the rolled map has three
    bands, [0, d − w), [d − w, d − s), [d − s, d), labelled 0, 1, 2; a position's label is 3·band_h + band_w.
    With s = 0 the official slicing (slice(−0, None) is the whole axis) puts the whole axis in band 2.
    """
    bands = []
    for d, w, s in zip(size, window, shift):
        position = torch.arange(d)
        bands.append((position >= d - w).long() + (position >= d - s).long() if s > 0 else torch.full((d,), 2))
    labels = (3 * bands[0][:, None] + bands[1][None, :]).float()                     # (H, W)
    return window_partition(labels[None, :, :, None], window)[..., 0]                # (nW, wh·ww)


def shift_mask(query_labels, key_labels):
    """−100 where query and key came from different regions, 0 elsewhere: (nW, N_q, N_k)."""
    different = query_labels[:, :, None] != key_labels[:, None, :]
    return torch.zeros(different.shape).masked_fill(different, -100.0)


def position_tables(size, window_size, stripe_size, down_factor):
    """The 13 buffers of the official GRL (`set_table_index_mask`) for a padded size (H, W)."""
    window = (window_size, window_size)
    window_labels = region_labels(size, window, [w // 2 for w in window])
    tables = {"table_w": relative_coords_table(window), "index_w": relative_position_index(window, window),
              "mask_w": shift_mask(window_labels, window_labels)}
    anchor_map = [d // down_factor for d in size]
    for orientation, stripe in (("sh", list(stripe_size)), ("sv", list(stripe_size[::-1]))):
        anchor = [s // down_factor for s in stripe]
        shift = [s // 2 for s in stripe]
        token_labels = region_labels(size, stripe, shift)                                       # (nS, N)
        anchor_labels = region_labels(anchor_map, anchor, [s // down_factor for s in shift])    # (nS, N_a)
        tables[f"table_{orientation}"] = relative_coords_table(stripe, down_factor)
        tables[f"index_{orientation}_a2w"] = relative_position_index(anchor, stripe)            # (N_a, N)
        tables[f"index_{orientation}_w2a"] = relative_position_index(stripe, anchor)            # (N, N_a)
        tables[f"mask_{orientation}_a2w"] = shift_mask(anchor_labels, token_labels)
        tables[f"mask_{orientation}_w2a"] = shift_mask(token_labels, anchor_labels)
    return tables


# --- Attention: cosine logits, windows, anchored stripes -------------------------------------------------------------

def linear(in_features, out_features, bias=True):
    """nn.Linear with the official GRL init: truncated normal (std 0.02) weights, zero bias."""
    layer = nn.Linear(in_features, out_features, bias=bias)
    nn.init.trunc_normal_(layer.weight, std=0.02)
    if bias:
        nn.init.zeros_(layer.bias)
    return layer


def drop_path(x, rate, training):
    """Stochastic depth: drop a residual branch for whole samples with probability `rate`, rescale the rest."""
    if rate == 0 or not training:
        return x
    keep = torch.rand(x.shape[0], *[1] * (x.dim() - 1), device=x.device) >= rate
    return x * keep.to(x.dtype) / (1 - rate)


class AffineTransform(nn.Module):
    """The logits of GRL's cosine attention (from Swin V2): τ·cos(q, k) + 16·σ(B[index]) (+ shift mask).

    τ = exp(logit_scale), a learnt temperature per head capped at 100; B = cpb_mlp(table), the continuous position
    bias: an MLP 2 → 512 → heads applied to every offset of the table, then picked per (query, key) pair by index.
    """

    def __init__(self, num_heads):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.log(10 * torch.ones(num_heads, 1, 1)))
        self.cpb_mlp = nn.Sequential(linear(2, 512), nn.ReLU(inplace=True), linear(512, num_heads, bias=False))

    def forward(self, attn, table, index, mask):
        B_, heads, N_q, N_k = attn.shape
        attn = attn * torch.clamp(self.logit_scale, max=math.log(100)).exp()
        bias = self.cpb_mlp(table).view(-1, heads)[index.view(-1)]                     # (N_q·N_k, heads)
        attn = attn + 16 * torch.sigmoid(bias.view(N_q, N_k, heads).permute(2, 0, 1))  # (B', heads, N_q, N_k)
        if mask is not None:                       # one mask per window position; windows are batch-major
            nW = mask.shape[0]
            attn = (attn.view(B_ // nW, nW, heads, N_q, N_k) + mask[None, :, None]).view(B_, heads, N_q, N_k)
        return attn


def cosine_attention(q, k, v, transform, table, index, mask):
    """softmax(τ·cos(q, k) + bias + mask)·v: q (B', heads, N_q, d), k, v (B', heads, N_k, d) → (B', heads, N_q, d)"""
    attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)          # (B', heads, N_q, N_k)
    return transform(attn, table, index, mask).softmax(dim=-1) @ v


class WindowAttention(nn.Module):
    """Regional range: attention inside w × w windows (Swin), the windows shifted by w/2 in every other block."""

    def __init__(self, window_size, num_heads, shifted):
        super().__init__()
        self.window, self.num_heads = (window_size, window_size), num_heads
        self.shift = window_size // 2 if shifted else 0
        self.attn_transform = AffineTransform(num_heads)

    def forward(self, q, k, v, size, table, index, mask):
        # q, k, v: (B, H, W, C/2)
        if self.shift:                             # the windows now straddle the previous block's borders
            q, k, v = (torch.roll(t, (-self.shift, -self.shift), dims=(1, 2)) for t in (q, k, v))
        q, k, v = (split_heads(window_partition(t, self.window), self.num_heads) for t in (q, k, v))  # (B·nW,h,w²,d)
        out = cosine_attention(q, k, v, self.attn_transform, table, index, mask)
        out = window_merge(merge_heads(out), self.window, size)                          # (B, H, W, C/2)
        return torch.roll(out, (self.shift, self.shift), dims=(1, 2)) if self.shift else out


class AnchorStripeAttention(nn.Module):
    """Far range: GRL's anchored stripe self-attention.

    Tokens attend inside a stripe, e.g. 64 × 128 pixels (wide; the next block uses 128 × 64, tall), far more than a
    window. Plain attention over its N tokens would cost N²; instead the stripe is also pooled by df into N_a = N/df²
    anchors A (one per df × df patch) and attention goes through them in two steps:
      1. anchors → tokens:  S = softmax(A·Kᵀ) · V     (N_a × N): every anchor summarises the stripe;
      2. tokens → anchors:  out = softmax(Q·Aᵀ) · S   (N × N_a): every token reads the summaries.
    The product of the two attention maps, N × N, stands in for softmax(Q·Kᵀ) at a cost of 2·N·N_a.
    """

    def __init__(self, stripe_size, num_heads, shifted, down_factor):
        super().__init__()
        self.stripe, self.num_heads = tuple(stripe_size), num_heads
        self.anchor_stripe = tuple(s // down_factor for s in stripe_size)
        self.shift = [s // 2 for s in stripe_size] if shifted else None                 # half a stripe
        self.anchor_shift = [s // down_factor for s in self.shift] if shifted else None
        self.attn_transform1 = AffineTransform(num_heads)                                # step 1: anchors → tokens
        self.attn_transform2 = AffineTransform(num_heads)                                # step 2: tokens → anchors

    def forward(self, q, k, v, anchor, size, table, index_a2w, index_w2a, mask_a2w, mask_w2a):
        # q, k, v: (B, H, W, C/2); anchor: (B, H/df, W/df, C/2)
        if self.shift:
            q, k, v = (torch.roll(t, [-s for s in self.shift], dims=(1, 2)) for t in (q, k, v))
            anchor = torch.roll(anchor, [-s for s in self.anchor_shift], dims=(1, 2))
        q, k, v = (split_heads(window_partition(t, self.stripe), self.num_heads) for t in (q, k, v))  # (B·nS, h, N, d)
        anchor = split_heads(window_partition(anchor, self.anchor_stripe), self.num_heads)          # (B·nS, h, N_a, d)
        summary = cosine_attention(anchor, k, v, self.attn_transform1, table, index_a2w, mask_a2w)  # (B·nS, h, N_a, d)
        out = cosine_attention(q, anchor, summary, self.attn_transform2, table, index_w2a, mask_w2a)  # (B·nS, h, N, d)
        out = window_merge(merge_heads(out), self.stripe, size)                                     # (B, H, W, C/2)
        return torch.roll(out, self.shift, dims=(1, 2)) if self.shift else out


class AnchorProjection(nn.Module):
    """The anchors: the feature map pooled by df, then a linear map C → C/2: (B, H, W, C) → (B, H/df, W/df, C/2).

    Its one stage lives in `body[0]`, so the keys are the official `anchor.body.0.reduction.*`.
    """

    def __init__(self, dim, down_factor, pooling):
        super().__init__()
        stage = nn.Module()
        stage.pooling = (nn.AvgPool2d if pooling == "avgpool" else nn.MaxPool2d)(down_factor)
        stage.reduction = linear(dim, dim // 2)
        self.body = nn.ModuleList([stage])

    def forward(self, x):
        pooled = self.body[0].pooling(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)               # (B, H/df, W/df, C)
        return self.body[0].reduction(pooled)


class MixedAttention(nn.Module):
    """GRL's mixed attention: one projection to q, k, v for all channels; window attention on the first half of the
    channels, anchored stripe attention on the second half (each with its own heads); concat; linear projection.

    Self-attention (the official block) is query_source = key_source = X. Made cross for a guided block, the queries
    come from query_source (PGM's Y) and the keys, values and anchors from key_source (X).
    """

    def __init__(self, dim, num_heads_window, num_heads_stripe, window_size, window_shift, stripe_size,
                 stripe_shift, qkv_bias, anchor_proj_type, down_factor):
        super().__init__()
        self.qkv = nn.ModuleDict({"body": linear(dim, 3 * dim, bias=qkv_bias)})      # official key: qkv.body
        self.anchor = AnchorProjection(dim, down_factor, anchor_proj_type)
        self.window_attn = WindowAttention(window_size, num_heads_window, window_shift)
        self.stripe_attn = AnchorStripeAttention(stripe_size, num_heads_stripe, stripe_shift, down_factor)
        self.proj = linear(dim, dim)

    def forward(self, query_source, key_source, size, window_tables, stripe_tables):
        # query_source, key_source: (B, H·W, C) tokens
        (B, L, C), (H, W) = key_source.shape, size
        # Rows of the official qkv weight: [q, k, v] of the window half, then [q, k, v] of the stripe half.
        weight = self.qkv.body.weight.view(2, 3, C // 2, C)                                # (half, q|k|v, C/2, C)
        bias = self.qkv.body.bias

        def project(source, parts):
            part_bias = None if bias is None else bias.view(2, 3, C // 2)[:, parts].reshape(-1)
            return F.linear(source, weight[:, parts].reshape(-1, C), part_bias)

        queries = project(query_source, slice(0, 1)).reshape(B, H, W, C)                          # (B, H, W, C)
        keys_values = project(key_source, slice(1, 3)).reshape(B, H, W, 2 * C)                    # (B, H, W, 2C)
        q_window, q_stripe = queries.chunk(2, dim=-1)                                             # 2 × (B, H, W, C/2)
        k_window, v_window, k_stripe, v_stripe = keys_values.chunk(4, dim=-1)                     # 4 × (B, H, W, C/2)
        anchor = self.anchor(key_source.reshape(B, H, W, C))                                      # (B, H/df, W/df, C/2)
        window = self.window_attn(q_window, k_window, v_window, size, *window_tables)              # (B, H, W, C/2)
        stripe = self.stripe_attn(q_stripe, k_stripe, v_stripe, anchor, size, *stripe_tables)      # (B, H, W, C/2)
        return self.proj(torch.cat([window, stripe], dim=-1).reshape(B, L, C))                     # (B, H·W, C)


# --- Blocks and stages ----------------------------------------------------------------------------------------------

class ChannelAttention(nn.Module):
    """RCAN's channel attention: squeeze (global average) C → C/18 → C, sigmoid, scale the channels."""

    def __init__(self, dim, reduction=18):
        super().__init__()
        self.attention = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(dim, dim // reduction, 1),
                                       nn.ReLU(inplace=True), nn.Conv2d(dim // reduction, dim, 1), nn.Sigmoid())

    def forward(self, x):
        return x * self.attention(x)


class CAB(nn.Module):
    """Local range: Channel-Attention Block, 3×3 conv C → C/4, GELU, 3×3 conv C/4 → C, channel attention."""

    def __init__(self, dim, compress_ratio=4):
        super().__init__()
        self.cab = nn.Sequential(nn.Conv2d(dim, dim // compress_ratio, 3, padding=1), nn.GELU(),
                                 nn.Conv2d(dim // compress_ratio, dim, 3, padding=1), ChannelAttention(dim))

    def forward(self, x, size):
        return map_to_tokens(self.cab(tokens_to_map(x, size)))                          # (B, H·W, C)


class MLP(nn.Module):
    """The feed-forward network: Linear C → mlp_ratio·C, GELU, Linear back."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = linear(dim, hidden), nn.GELU(), linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def no_norm(x):
    """GRL normalises after attention (post-norm), so the guided mixer's pre-norm is the identity."""
    return x


class CrossAttention(nn.Module):
    """GRL's attention made cross: what a guided mixer calls as attention(query_source, key_source) (Eq. 7-8).

    Returns norm1(MixedAttention(Y → X)) for (B, C, H, W) maps, so the mixer's "attention(norm(Y), norm(X)) + Y",
    with `no_norm`, is X^m = norm1(CrossAttn(Y, X)) + Y: the official post-norm residual with Y in place of X.
    The mixer passes maps only: the block puts the current size's position tables into the shared `context` first.
    """

    def __init__(self, attn, norm1, drop_path_rate, context):
        super().__init__()
        self.attn, self.norm1, self.drop_path_rate, self.context = attn, norm1, drop_path_rate, context

    def forward(self, query_source, key_source):
        size = tuple(query_source.shape[-2:])
        # UNSPECIFIED: Perceive-IR does not describe a GRL ETB. Only the queries come from Y; keys, values and the
        # anchors (which summarise the key side) come from X, as PGCA's keys and values do (Eq. 7).
        out = self.attn(map_to_tokens(query_source), map_to_tokens(key_source), size,
                        self.context["window"], self.context["stripe"])                # (B, H·W, C)
        return tokens_to_map(drop_path(self.norm1(out), self.drop_path_rate, self.training), size)


class GRLBlock(nn.Module):
    """One GRL block (official EfficientMixAttnTransformerBlock, keys included), post-norm:

        X ← X + norm1(MixedAttention(X)) + CAB(X)            (CAB with local_connection)
        X ← X + norm2(MLP(X))
    Block i of a stage shifts its windows when i is even, uses wide stripes when i is even and tall ones when odd,
    and (with stripe_shift) shifts its stripes when i mod 4 ∈ {2, 3}: four kinds of blocks, cycled.
    Guided (an ETB of Perceive-IR, Eq. 3): the attention half becomes the mixer, X ← mixer(X, no_norm, F_l) + CAB(X),
    where the mixer returns X^m = norm1(CrossAttn(Y, X)) + Y with Y = PGM(X, F_l) (Eq. 6, 8).
    """

    def __init__(self, dim, index, num_heads_window, num_heads_stripe, window_size, stripe_size, stripe_shift,
                 mlp_ratio, qkv_bias, anchor_proj_type, down_factor, local_connection, drop_path_rate,
                 guided_attention=None, level=None):
        super().__init__()
        self.orientation = "sh" if index % 2 == 0 else "sv"
        self.window_shift = index % 2 == 0
        self.stripe_shift = stripe_shift and index % 4 in (2, 3)
        stripe = stripe_size if self.orientation == "sh" else stripe_size[::-1]
        attn = MixedAttention(dim, num_heads_window, num_heads_stripe, window_size, self.window_shift, stripe,
                              self.stripe_shift, qkv_bias, anchor_proj_type, down_factor)
        self.drop_path_rate, self.guided = drop_path_rate, guided_attention is not None
        if self.guided:                            # the mixer owns the attention (no second copy here)
            self.context = {}
            cross = CrossAttention(attn, nn.LayerNorm(dim), drop_path_rate, self.context)
            self.mixer = guided_attention(level, dim, num_heads_window, attention=cross)
        else:
            self.attn, self.norm1 = attn, nn.LayerNorm(dim)
        self.conv = CAB(dim) if local_connection else None
        self.mlp = MLP(dim, int(dim * mlp_ratio))
        self.norm2 = nn.LayerNorm(dim)

    def select_tables(self, tables):
        """This block's (table, index, mask) for its windows and its stripes; masks only where it shifts."""
        o = self.orientation
        window = (tables["table_w"], tables["index_w"], tables["mask_w"] if self.window_shift else None)
        masks = (tables[f"mask_{o}_a2w"], tables[f"mask_{o}_w2a"]) if self.stripe_shift else (None, None)
        return window, (tables[f"table_{o}"], tables[f"index_{o}_a2w"], tables[f"index_{o}_w2a"], *masks)

    def forward(self, x, size, tables, prior=None):
        # x: (B, H·W, C) tokens
        window_tables, stripe_tables = self.select_tables(tables)
        local = self.conv(x, size) if self.conv is not None else 0
        if self.guided:
            self.context.update(window=window_tables, stripe=stripe_tables)
            # UNSPECIFIED: CAB keeps reading the block input X and the MLP stays as in GRL.
            x = map_to_tokens(self.mixer(tokens_to_map(x, size), no_norm, prior)) + local     # X^m + CAB(X)
            self.context.clear()
        else:
            attended = self.norm1(self.attn(x, x, size, window_tables, stripe_tables))
            x = x + drop_path(attended, self.drop_path_rate, self.training) + local
        return x + drop_path(self.norm2(self.mlp(x)), self.drop_path_rate, self.training)


class TransformerStage(nn.Module):
    """A stage: its blocks, a 3×3 conv, and a residual connection around them all."""

    def __init__(self, dim, depth, drop_path_rates, guided_attention, level, **block_options):
        super().__init__()
        self.blocks = nn.ModuleList([
            GRLBlock(dim, i, drop_path_rate=drop_path_rates[i], level=level,
                     guided_attention=guided_attention if level is not None else None, **block_options)
            for i in range(depth)])
        self.conv = nn.Conv2d(dim, dim, 3, padding=1)

    def forward(self, x, size, tables, prior):
        out = x
        for block in self.blocks:
            out = block(out, size, tables, prior)
        return x + map_to_tokens(self.conv(tokens_to_map(out, size)))                    # (B, H·W, C)


# --- The network ----------------------------------------------------------------------------------------------------

class GRL(nn.Module):
    """GRL for restoration (official `models/networks/grl.py:GRL` with upscale 1):

        I_r = I_d + conv_last(conv_after_body(norm_end(stages(norm_start(X_s)))) + X_s),   X_s = conv_first(I_d)
    computed on the mean-subtracted image, reflect-padded inside forward to `size_multiple` and cropped back.
    Accepts the official constructor keywords (others only at the values of OFFICIAL_FIXED) and state-dict keys.
    With `guided_attention`, the last four stages are guided (see `levels` below); without, it is the official network.
    """

    CONFIGS = {
        # GRL-B (grl_base.yaml: embed 180, depths [4, 4, 8, 8, 8, 4, 4], 3 + 3 heads, MLP ratio 2, CAB, anchors
        # pooled by 4, stripe shifts, stochastic depth 0.1 by default) with the released restoration settings.
        # UNSPECIFIED: Perceive-IR does not give GRL's window and stripe sizes; we take those of the released
        # denoising experiment (window 16, stripes 64 × 128), whose pad multiple, 128, is the paper's training patch
        # (GRL-128 of Table XV). The parameter count does not depend on them: 19,805,263.
        "paper": dict(img_size=128, embed_dim=180, depths=[4, 4, 8, 8, 8, 4, 4], num_heads_window=[3] * 7,
                      num_heads_stripe=[3] * 7, window_size=16, stripe_size=[64, 128], stripe_shift=True,
                      mlp_ratio=2.0, qkv_bias=True, anchor_proj_type="avgpool", anchor_window_down_factor=4,
                      local_connection=True, drop_path_rate=0.1),
        # Tests and the CPU demo (64-px crops, ~1.3 s per step of 6 on 2 cores): one plain and four guided stages of
        # two blocks (too shallow to shift stripes: blocks 2 and 3 do), width 36 so CAB's squeeze keeps 36 // 18 = 2.
        "tiny": dict(img_size=64, embed_dim=36, depths=[2] * 5, num_heads_window=[2] * 5, num_heads_stripe=[2] * 5,
                     window_size=4, stripe_size=[8, 16], stripe_shift=True, mlp_ratio=2.0, qkv_bias=True,
                     anchor_proj_type="avgpool", anchor_window_down_factor=2, local_connection=True,
                     drop_path_rate=0.0),
    }

    def __init__(self, img_size=64, in_channels=3, out_channels=None, embed_dim=96, img_range=1.0,
                 depths=(6, 6, 6, 6, 6, 6), num_heads_window=(3,) * 6, num_heads_stripe=(3,) * 6, window_size=8,
                 stripe_size=(8, 8), stripe_shift=False, mlp_ratio=4.0, qkv_bias=True, anchor_proj_type="avgpool",
                 anchor_window_down_factor=1, local_connection=False, drop_path_rate=0.1, guided_attention=None,
                 **official_options):
        super().__init__()
        for name, value in official_options.items():
            if name not in OFFICIAL_FIXED:
                raise TypeError(f"GRL got an unexpected keyword {name!r}")
            if (list(value) if isinstance(value, tuple) else value) != OFFICIAL_FIXED[name]:
                raise ValueError(f"GRL here implements {name}={OFFICIAL_FIXED[name]!r} only (the released "
                                 f"restoration models); got {value!r}")
        self.img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.geometry = (window_size, tuple(stripe_size), anchor_window_down_factor)
        self.multiple = GRL.size_multiple(dict(window_size=window_size, stripe_size=stripe_size))
        if any(s % anchor_window_down_factor for s in stripe_size) or any(d % self.multiple for d in self.img_size):
            raise ValueError(f"GRL: stripes {list(stripe_size)} must divide by anchor_window_down_factor "
                             f"({anchor_window_down_factor}) and img_size {self.img_size} by {self.multiple}")
        if embed_dim % 2 or any((embed_dim // 2) % h for h in (*num_heads_window, *num_heads_stripe)):
            raise ValueError(f"GRL: embed_dim ({embed_dim}) must be even and its halves divisible by the heads")
        if anchor_proj_type not in ("avgpool", "maxpool"):
            raise ValueError(f"GRL here implements anchor_proj_type 'avgpool' or 'maxpool'; got {anchor_proj_type!r}")
        self.in_channels, self.out_channels = in_channels, out_channels or in_channels
        self.img_range, self.guided = img_range, guided_attention is not None

        self.conv_first = nn.Conv2d(in_channels, embed_dim, 3, padding=1)
        self.norm_start = nn.LayerNorm(embed_dim)
        for name, tensor in position_tables(self.img_size, *self.geometry).items():
            self.register_buffer(name, tensor)         # persistent: official checkpoints carry them
        # UNSPECIFIED: GRL has no levels (every stage runs at full resolution). Perceive-IR guides a U-Net's latent
        # and three decoder levels, F_4 (coarsest) first and F_1 (finest) last, and leaves the encoder plain; we guide
        # GRL's last four stages in the same order, l = 4, 3, 2, 1 (for GRL-B: depths 8, 8, 4, 4 after a plain
        # 4, 4, 8), so the finest prior acts last, next to the reconstruction, as in the U-Net.
        num_stages = len(depths)
        self.levels = [num_stages - i if self.guided and num_stages - i <= 4 else None for i in range(num_stages)]
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()     # stochastic depth grows with depth
        self.layers = nn.ModuleList()
        for i, depth in enumerate(depths):
            self.layers.append(TransformerStage(
                embed_dim, depth, rates[sum(depths[:i]):sum(depths[:i + 1])], guided_attention, self.levels[i],
                num_heads_window=num_heads_window[i], num_heads_stripe=num_heads_stripe[i], window_size=window_size,
                stripe_size=list(stripe_size), stripe_shift=stripe_shift, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                anchor_proj_type=anchor_proj_type, down_factor=anchor_window_down_factor,
                local_connection=local_connection))
        self.norm_end = nn.LayerNorm(embed_dim)
        self.conv_after_body = nn.Conv2d(embed_dim, embed_dim, 3, padding=1)
        self.conv_last = nn.Conv2d(embed_dim, self.out_channels, 3, padding=1)

    @staticmethod
    def size_multiple(config):
        """Inputs are padded to this multiple, so that whole windows and whole wide and tall stripes fit."""
        # The official code pads to max(window, stripes), which runs only when the others divide it; we pad to
        # their least common multiple, the same number whenever the official code runs.
        return math.lcm(config.get("window_size", 8), *config.get("stripe_size", (8, 8)))

    def tables_for(self, size):
        """Tables, indices and masks for a padded size: the buffers if built for it, else computed (as official)."""
        if tuple(size) == self.img_size:
            return {name: getattr(self, name) for name in BUFFER_NAMES}
        reference = self.table_w                   # the buffers' device and float type (a model may be cast)
        return {name: t.to(reference.device, reference.dtype if t.is_floating_point() else t.dtype)
                for name, t in position_tables(tuple(size), *self.geometry).items()}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Tables, indices and masks are functions of the sizes: a state_dict without them (the official
        # convert_checkpoint drops them) keeps this model's own; present ones load as usual, strictly.
        for name in BUFFER_NAMES:
            state_dict.setdefault(prefix + name, getattr(self, name))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, image, priors=None):
        check_image(image, self.in_channels, "GRL")
        if self.guided and priors is None:
            raise ValueError("this GRL was built with guided_attention; pass priors for levels 1-4")
        H, W = image.shape[-2:]
        # As the official check_image_size: reflect-pad bottom/right, zeros when the image is too small to reflect.
        pad_h, pad_w = (-H) % self.multiple, (-W) % self.multiple
        x = pad_to_multiple(image, self.multiple, "reflect" if pad_h < H and pad_w < W else "zeros")
        mean = x.new_tensor(RGB_MEAN).view(1, 3, 1, 1) if self.in_channels == 3 else x.new_zeros(1, 1, 1, 1)
        x = (x - mean) * self.img_range

        shallow = self.conv_first(x)                                                      # X_s (B, C, H', W')
        size = tuple(shallow.shape[-2:])
        tokens = self.norm_start(map_to_tokens(shallow))                                  # (B, H'·W', C)
        tables = self.tables_for(size)
        for stage, level in zip(self.layers, self.levels):
            tokens = stage(tokens, size, tables, None if level is None else priors[level - 1])
        deep = self.conv_after_body(tokens_to_map(self.norm_end(tokens), size)) + shallow
        out = x + self.conv_last(deep) if self.in_channels == self.out_channels else self.conv_last(deep)
        return (out / self.img_range + mean)[..., :H, :W]


def load_official(model, path):
    """Load released GRL weights: a Lightning .ckpt (the network is the engine's `model.`) or a plain state_dict.

    Buffers absent from the file are recomputed (see GRL._load_from_state_dict); everything else loads strictly.
    """
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise RuntimeError(
            f"{path} pickles Python objects besides tensors (a Lightning .ckpt keeps its hyper-parameters as "
            "OmegaConf objects), which loading with weights_only=True refuses. If you trust the file, load it once "
            "with weights_only=False, save its 'state_dict' alone with torch.save, and pass that file instead."
        ) from error
    state = checkpoint.get("state_dict", checkpoint)
    if any(key.startswith("model.") for key in state):         # Lightning engine: keep its `model` only
        state = {key[len("model."):]: value for key, value in state.items() if key.startswith("model.")}
    # Older releases kept per-block copies of the buffers: derived data, dropped as official convert_checkpoint does.
    legacy = ("relative_coords_table", "relative_position_index", "attn_mask")
    model.load_state_dict({k: v for k, v in state.items() if not k.endswith(legacy)}, strict=True)
    return model


if __name__ == "__main__":
    for name, config in GRL.CONFIGS.items():
        print(f"GRL {name:5s} {count_parameters(GRL(**config)):>12,d} parameters, "
              f"inputs padded to a multiple of {GRL.size_multiple(config)}")
    model = GRL(**GRL.CONFIGS["tiny"]).eval()
    with torch.no_grad():
        out = model(torch.rand(1, 3, 37, 53))
    print(f"tiny GRL: input (1, 3, 37, 53) -> output {tuple(out.shape)}")
