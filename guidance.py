"""Semantic and degradation guidance, and the full Perceive-IR network (Sec. III-C.2-3, Eq. 5-8, Fig. 4, Table X).

The Restoration Branch of `backbone.py` is an ordinary U-shaped network. Perceive-IR makes its
latent and decoder blocks "enhanced" (ETB, Eq. 3): each block's attention takes its query from
a feature modulated by two priors,
  F_l — what is in the image: the CLS token of a frozen DINOv2 after block 1, 4, 8 or 12 (Eq. 5),
  Z   — what is wrong with it: a 128-d degradation code from a small CNN, trained by L_cl (Eq. 12).

What is in here:
- `SemanticGuidance` (SGM, Eq. 5) and `build_sgm`: the frozen DINOv2 ViT-B/14 from timm (hub, a
  local file through `--dino-weights`, or a tiny random stand-in for tests and the offline demo).
- `CFE`: Compact Feature Extraction (Fig. 4(b)), degraded image → Z ∈ R^128, optionally normalised (`--cfe-norm`):
  each image's own statistics, or `CodeBatchNorm`, batch norm over the global batch.
- `PGM` (Eq. 6): Y_l = X_l^d ⊙ (1 + γ) + β with (γ, β) from concat(F_l, Z).
- `PGCA` (Eq. 7-8): channel cross-attention, query from Y_l, key/value from X_l^d, residual + Y_l.
- `GuidedMixer`: PGM then PGCA, the token mixer an ETB uses in place of MDTA.
- `BACKBONES`, `NETWORKS`, `build_backbone`: Table XV's four backbones, Table XIV's restorers (`networks/`).
- `PerceiveIR`: any of them + the guidance; the ablations of Table X; `build_model` from train.py's settings.
- `restore_image`: any image size, the backbone optionally on tiles, the priors from the whole image.
- `degradation_centroids`, `perceive`: per-task centroids of Z, and what the model perceives in an image.

DINOv2 is never part of `PerceiveIR`: it is frozen and stays outside the optimiser and DDP; the
caller runs `semantic = sgm(degraded)` once per batch and passes it to `model(degraded, semantic)`.
"""

import sys

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.nn.functional import all_reduce as differentiable_all_reduce

import backbone
from backbone import Restormer, channel_attention, count_parameters, tiled_forward
from networks.airnet import AirNet
from networks.grl import GRL
from networks.mprnet import MPRNet
from networks.nafnet import NAFNet
from networks.promptir import PromptIR
from networks.xrestormer import XRestormer

CODE_DIM = 128                      # Z ∈ R^{1×128} (Sec. III-C.2)
CFE_WIDTHS = {"paper": (64, 128, 256), "laptop": (16, 32, 64), "tiny": (16, 32, 64)}   # by the backbone's config
DINO_BLOCKS = (0, 3, 7, 11)         # Eq. (5): i = 1, 4, 8, 12, 1-based → 0-based block indices
BACKBONES = {"restormer": Restormer, "nafnet": NAFNet, "xrestormer": XRestormer, "grl": GRL}   # Table XV: guided
NETWORKS = {**BACKBONES, "promptir": PromptIR, "mprnet": MPRNet, "airnet": AirNet}   # + Table XIV's, plain only


def backbone_config(name, config):
    """Resolve a named config ("paper", "tiny") of a network, or pass a dict of constructor keywords through."""
    if name not in NETWORKS:
        raise ValueError(f"unknown network {name!r}; choose one of {sorted(NETWORKS)} (--backbone, --medium-backbone)")
    if isinstance(config, dict):
        return dict(config)
    if config not in NETWORKS[name].CONFIGS:
        raise ValueError(f"unknown config {config!r} for {name}; choose one of {sorted(NETWORKS[name].CONFIGS)} "
                         "or pass a dict")
    return dict(NETWORKS[name].CONFIGS[config])


def build_backbone(name, config="paper", guided_attention=None):
    """`build_backbone("restormer", "paper")` → the 26,126,644-parameter Restormer of the paper."""
    kwargs = backbone_config(name, config)                    # an unknown name or config: a clear error
    return NETWORKS[name](**kwargs, guided_attention=guided_attention)


def size_multiple(name, config="paper"):
    """The multiple every side is padded to (training crops must be one): Restormer 8, NAFNet 16, X-Restormer
    8 × window (64), GRL the windows and stripes (128)."""
    return NETWORKS[name].size_multiple(backbone_config(name, config))


def load_released(name, model, path):
    """A released checkpoint of network `name`, in its authors' format, into `model` (`--medium-weights`):
    BasicSR's for Restormer and NAFNet, PromptIR's Lightning .ckpt, MPRNet's and AirNet's own (`networks/`)."""
    loader = getattr(sys.modules[NETWORKS[name].__module__], "load_official", backbone.load_official)
    return loader(model, path)


# --- SGM: frozen DINOv2 (Sec. III-C.3, Eq. 5) ----------------------------------------------------------------------

class SemanticGuidance(nn.Module):
    """F_1, F_2, F_3, F_4 = D_i(I_d), i = 1, 4, 8, 12 — Eq. (5).

    The degraded image is resized to the ViT's input size (224 for ViT-B/14: a 16×16 grid) and
    normalised with ImageNet statistics; the CLS token after each of the four blocks is one F_l.
    # UNSPECIFIED: the paper says neither the input size nor which token F_l ∈ R^768 is; we take the
    # CLS token (the one 768-d summary of a block) at 224 px, the size timm resamples DINOv2 to, and
    # squash whole images to 224×224 (training crops are square): the CLS token then summarises all of
    # the image on the 16×16 grid the position embeddings were resampled for; keeping the aspect ratio
    # would need a centre crop (losing content) or position embeddings for other grids.
    Frozen: eval mode, no gradients, no autograd graph (no_grad rather than inference_mode,
    because F_l later enters the trainable PGM, which must be able to save it for backward).
    """

    def __init__(self, vit, image_size, description):
        super().__init__()
        self.vit = vit.eval().requires_grad_(False)
        self.image_size = image_size
        self.embed_dim = vit.embed_dim                       # 768 for ViT-B/14
        self.description = description
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)

    def train(self, mode=True):                              # stays in eval mode, always
        return super().train(False)

    @torch.no_grad()
    def forward(self, degraded):
        x = F.interpolate(degraded, size=(self.image_size, self.image_size), mode="bicubic",
                          align_corners=False, antialias=True)
        x = (x - self.mean) / self.std
        blocks = self.vit.forward_intermediates(x, indices=list(DINO_BLOCKS), return_prefix_tokens=True,
                                                norm=False, intermediates_only=True)
        # each entry: (patch tokens (B, D, h, w), prefix tokens (B, 1, D)); keep the CLS token
        return torch.stack([prefix[:, 0] for _, prefix in blocks], dim=1)     # (B, 4, D)


def build_sgm(variant="base", weights=None, random_weights=False):
    """DINOv2 through timm's own loader: the hub weights, or a local file (`--dino-weights`).

    variant "base": ViT-B/14 `vit_base_patch14_dinov2.lvd142m` at 224 (the paper's "base version",
    Sec. IV-A.4). variant "tiny": a 640K-parameter ViT with the same 12-block layout at 56 px,
    randomly initialised unless a weight file is given; for tests and the offline demo only.
    `random_weights=True` builds the architecture without weights, for cost measurements only.
    """
    import timm

    overlay = dict(pretrained_cfg_overlay=dict(file=str(weights))) if weights else {}
    if variant == "base":
        name, size, kwargs = "vit_base_patch14_dinov2.lvd142m", 224, {}
        pretrained = not random_weights
    elif variant == "tiny":
        name, size, kwargs = "vit_small_patch14_dinov2", 56, dict(embed_dim=64, depth=12, num_heads=2)
        pretrained = weights is not None
    else:
        raise ValueError(f"unknown DINOv2 variant {variant!r}; choose 'base' or 'tiny' (--dino)")
    try:
        with torch.random.fork_rng(devices=[]):              # a random stand-in is the same in every
            torch.manual_seed(0)                              # process and when evaluate.py rebuilds it
            vit = timm.create_model(name, pretrained=pretrained, img_size=size, **kwargs, **overlay)
    except Exception as error:                               # hub unreachable, bad file, ...
        source = f"the file {weights}" if weights else "the Hugging Face hub"
        raise RuntimeError(
            f"could not load DINOv2 weights ({name}) from {source}: {type(error).__name__}: {error}. "
            "Download the weights once (e.g. timm.create_model('vit_base_patch14_dinov2.lvd142m', "
            "pretrained=True) on a machine with internet, then save model.state_dict()) and pass the "
            "file with --dino-weights FILE.") from error
    if variant == "base":
        source = "random weights, for cost only" if random_weights else weights or "hub weights"
        description = f"DINOv2 ViT-B/14 ({source})"
    else:
        description = f"tiny DINOv2 stand-in ({weights or 'random weights, NOT pretrained'})"
    return SemanticGuidance(vit, size, description)


# --- CFE: Compact Feature Extraction (Sec. III-C.2, Fig. 4(b)) -----------------------------------------------------

class CodeBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics span the global batch: every rank's crops, as one process sees them.

    torch's SyncBatchNorm runs on GPUs only; this one all-reduces the per-channel sums (autograd flows through
    the all-reduce), so one process and two gloo or NCCL processes normalise a batch alike. In eval mode it is
    BatchNorm2d with its running statistics.
    """

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        y = x.float()                                              # bf16 sums under autocast would round
        count = y.new_tensor([y.numel() / y.shape[1]])                              # values per channel
        stats = torch.cat([y.sum(dim=(0, 2, 3)), y.square().sum(dim=(0, 2, 3)), count])   # (2C + 1,)
        if dist.is_available() and dist.is_initialized():
            stats = differentiable_all_reduce(stats)                                # summed over the ranks
        channels, count = y.shape[1], stats[-1]
        mean = stats[:channels] / count
        var = (stats[channels:2 * channels] / count - mean.square()).clamp_min(0)     # biased, as BN normalises
        with torch.no_grad():                                                        # running var: unbiased
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * count / (count - 1).clamp_min(1), self.momentum)
            self.num_batches_tracked += 1
        scale = self.weight * torch.rsqrt(var + self.eps)
        return (y * scale[:, None, None] + (self.bias - mean * scale)[:, None, None]).to(x.dtype)


CFE_NORMS = ("none", "batch", "instance")      # train.py --cfe-norm


class ResidualBlock(nn.Module):
    """conv3×3 → LeakyReLU → conv3×3, plus a (strided 1×1) shortcut, then LeakyReLU. norm "batch": a
    CodeBatchNorm after each conv, shortcut too, as in AirNet's degradation encoder; "instance": each image's
    own statistics (GroupNorm with a group per channel) after the two body convs, the shortcut left as it is."""

    def __init__(self, in_channels, out_channels, stride=1, norm="none"):
        super().__init__()
        def normalise():                                     # none: the module keys of earlier checkpoints
            return {"none": [], "batch": [CodeBatchNorm(out_channels)],
                    "instance": [nn.GroupNorm(out_channels, out_channels)]}[norm]

        bias = norm == "none"                                # a bias before a norm cancels: gradient 0
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=bias), *normalise(),
            nn.LeakyReLU(0.1, inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=bias), *normalise())
        # Instance norm takes each image's level and contrast out of the body; the unnormalised shortcut (with
        # its bias) still carries them to Z, so a dark or hazy crop stays apart from a clean one.
        shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=norm != "batch")
        self.shortcut = (nn.Identity() if stride == 1 and in_channels == out_channels
                         else nn.Sequential(shortcut, CodeBatchNorm(out_channels)) if norm == "batch" else shortcut)

    def forward(self, x):
        return F.leaky_relu(self.body(x) + self.shortcut(x), 0.1)


class CFE(nn.Module):
    """Compact Feature Extraction: degraded image (B, 3, H, W) → degradation code Z (B, 128).

    Fig. 4(b) shows residual conv blocks, average pooling and an MLP.
    # UNSPECIFIED: the paper gives no widths or depths; we use a stem conv and three residual
    # blocks of 64, 128, 256 channels (the last two strided), global average pooling and a
    # 256 → 256 → 128 MLP, the shape of AirNet's degradation encoder, which L_cl also trains.
    # UNSPECIFIED: whether the blocks normalise. By default they do not (the paper names no normalisation).
    # norm="batch" (train.py --cfe-norm batch) puts AirNet's batch norm after each conv (`CodeBatchNorm`,
    # statistics of the global batch); norm="instance" normalises each image's feature maps by their own
    # statistics, per channel, after the two convs of each block's body (the shortcut carries the level).
    # Without a norm the codes of all crops start almost alike (cosine 0.998), and at the laptop preset's
    # 4 crops a step L_cl trained in one preset run of three (0.93 → 0.33, the shipped weights; 0.92 → 0.82
    # and 0.95 → 1.10 in the others). CFE alone, trained by L_cl alone on the preset's real crops, 500 steps:
    # no norm 0.92 → 0.96, instance norm 0.72 → 0.21 (tests/test_laptop.py). Batch norm trains too, but a code
    # then depends on the other crops of the batch in training and on running statistics in eval; instance
    # norm gives every image the same code in both (README, "What Z learns").
    Average pooling makes Z's shape independent of the image size, so crops and whole images share CFE; the
    value can differ between an image and its crops, most with instance norm (`image_code`).
    """

    def __init__(self, channels=(64, 128, 256), code_dim=CODE_DIM, norm="none"):
        super().__init__()
        if norm not in CFE_NORMS:
            raise ValueError(f"CFE norm {norm!r}: choose one of {', '.join(CFE_NORMS)}")
        c1, c2, c3 = channels
        self.features = nn.Sequential(
            nn.Conv2d(3, c1, 3, padding=1), nn.LeakyReLU(0.1, inplace=True), ResidualBlock(c1, c1, 1, norm),
            ResidualBlock(c1, c2, 2, norm), ResidualBlock(c2, c3, 2, norm),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())                              # (B, c3)
        self.mlp = nn.Sequential(nn.Linear(c3, c3), nn.LeakyReLU(0.1, inplace=True), nn.Linear(c3, code_dim))

    def forward(self, degraded):
        return self.mlp(self.features(degraded))                                 # Z (B, 128)


# --- PGM and PGCA: the ETB's guided token mixer (Eq. 6-8, Fig. 4(c)) -----------------------------------------------

class PGM(nn.Module):
    """Prompt Guidance Module, Eq. (6): Y_l = F_pgm(F_l, Z, X_l^d) = X_l^d ⊙ (1 + γ) + β.

    (γ, β) ∈ R^C per image come from a linear map of LN(concat(F_l, Z)); the affine modulation
    is per channel, broadcast over the pixels.
    # DEVIATION: the paper writes the affine transform as X ⊙ γ + β; we predict 1 + γ with a
    # zero-initialised map, so every ETB starts as the identity modulation (Y = X) and training
    # begins from the plain backbone's behaviour instead of a randomly scaled feature.
    # UNSPECIFIED: the paper does not say how the raw DINOv2 CLS tokens (whose scale grows with
    # depth) are brought to a common scale; we apply a LayerNorm to concat(F_l, Z) first.
    """

    def __init__(self, prior_dim, channels):
        super().__init__()
        self.norm = nn.LayerNorm(prior_dim)
        self.to_scale_shift = nn.Linear(prior_dim, 2 * channels)
        nn.init.zeros_(self.to_scale_shift.weight)
        nn.init.zeros_(self.to_scale_shift.bias)

    def forward(self, x, prior):
        gamma, beta = self.to_scale_shift(self.norm(prior)).chunk(2, dim=1)     # 2 × (B, C)
        return x * (1 + gamma[:, :, None, None]) + beta[:, :, None, None]


class PriorProjection(nn.Module):
    """Table X, "w/o PGM": Y_l = X_l^d + W·F_l — F_l alone, projected, no Z and no modulation.

    # UNSPECIFIED: Table X only says "cross-attention using F_l's features without the processing
    # through Z"; we add a linear projection of LN(F_l) to X, the query source PGCA then reads.
    """

    def __init__(self, semantic_dim, channels):
        super().__init__()
        self.semantic_dim = semantic_dim
        self.norm = nn.LayerNorm(semantic_dim)
        self.project = nn.Linear(semantic_dim, channels)

    def forward(self, x, prior):
        semantic = prior[:, :self.semantic_dim]                                   # F_l, Z dropped
        return x + self.project(self.norm(semantic))[:, :, None, None]


class PGCA(nn.Module):
    """Prior Guidance Cross Attention, Eq. (7)-(8).

    CrossAtt(Y, X, X) = Softmax(Q̂ · K̂ᵀ · α) · V̂  with Q from Y and K, V from X
    (1×1 conv + 3×3 depthwise conv each), Q̂, K̂ L2-normalised, α a learnable temperature per
    head: the transposed (C/heads × C/heads) attention of MDTA, made cross.
    X^m = proj(CrossAtt(Y, X, X)) + Y   — the paper's F_mpta is this output 1×1 projection.
    # DEVIATION: the paper divides by α; like Restormer's MDTA we multiply by the learnable α
    # (the same family of functions; α starts at 1 either way).
    """

    def __init__(self, dim, num_heads, bias=False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"PGCA: channels ({dim}) must be divisible by heads ({num_heads})")
        self.num_heads = num_heads
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))             # α
        self.q = nn.Conv2d(dim, dim, 1, bias=bias)
        self.q_dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim, bias=bias)
        self.kv = nn.Conv2d(dim, 2 * dim, 1, bias=bias)
        self.kv_dwconv = nn.Conv2d(2 * dim, 2 * dim, 3, padding=1, groups=2 * dim, bias=bias)
        self.project_out = nn.Conv2d(dim, dim, 1, bias=bias)

    def forward(self, query_source, key_source, return_attention=False):
        q = self.q_dwconv(self.q(query_source))                                  # (B, C, H, W)
        k, v = self.kv_dwconv(self.kv(key_source)).chunk(2, dim=1)                # 2 × (B, C, H, W)
        out, attn = channel_attention(q, k, v, self.num_heads, self.temperature)  # Eq. (7)
        out = self.project_out(out)
        return (out, attn) if return_attention else out


class GuidedMixer(nn.Module):
    """The token mixer of an ETB (Eq. 3): PGM (Eq. 6), then PGCA with its residual (Eq. 8).

        Y   = PGM(F_l, Z, X)                  (or X + W·F_l without PGM, Table X)
        X^m = proj(CrossAtt(LN(Y), LN(X), LN(X))) + Y
    # DEVIATION: Eq. (6) writes one Y_l per level, from "the input of the l-th decoder layer"; we
    # give every ETB its own PGM applied to that block's input, so that Y and the residual of
    # Eq. (8) follow the running feature through the level's blocks (one PGM per level would
    # modulate only the level's first input, and 9.34M of our 36.79M parameters are these PGMs).
    # UNSPECIFIED: Y and X are normalised with the block's pre-norm LN, as Restormer does before
    # every attention; the refinement blocks after level 1 stay plain TBs.
    A backbone whose own attention is spatial (GRL) may pass `attention`, a module called as
    attention(query_source, key_source): its attention made cross then takes PGCA's place.
    """

    def __init__(self, dim, num_heads, semantic_dim, code_dim=CODE_DIM, use_pgm=True, attention=None):
        super().__init__()
        self.modulate = (PGM(semantic_dim + code_dim, dim) if use_pgm
                         else PriorProjection(semantic_dim, dim))
        self.pgca = PGCA(dim, num_heads) if attention is None else attention

    def forward(self, x, norm, prior):
        y = self.modulate(x, prior)                                              # Y_l, Eq. (6)
        return self.pgca(norm(y), norm(x)) + y                                   # X_l^m, Eq. (8)


# --- The full network and the ablations of Table X -----------------------------------------------------------------

class PerceiveIR(nn.Module):
    """Perceive-IR's trainable network: a guided backbone + CFE (Fig. 4).

    forward(degraded, semantic=None, positive=None):
      degraded  I_d (B, 3, H, W) in [0, 1];
      semantic  F_1..F_4 (B, 4, D) from `SemanticGuidance` (computed outside, frozen);
      positive  optional second crop of each degraded image: its code Z+ is computed in the same
                CFE pass (one batched call, and DDP sees every trainable parameter in forward).
    Returns (I_r, Z) or, with a positive, (I_r, Z, Z+). Z is None for the unguided baseline.

    Table X ablations: use_dino=False replaces F_l by learnable parameters; use_pgm=False guides
    PGCA by a projection of F_l alone; use_cfe=False replaces Z by a learnable parameter (L_cl is
    then meaningless and must be switched off); guided=False is the plain backbone, rows (a)/(b).
    """

    def __init__(self, backbone="restormer", backbone_config="paper", semantic_dim=768, guided=True,
                 use_dino=True, use_pgm=True, use_cfe=True, code_dim=CODE_DIM, cfe_norm="none"):
        super().__init__()
        self.guided, self.use_dino, self.use_cfe = guided, use_dino, use_cfe
        self.semantic_dim, self.code_dim = semantic_dim, code_dim

        def mixer(level, dim, num_heads, attention=None):
            return GuidedMixer(dim, num_heads, semantic_dim, code_dim, use_pgm, attention)

        self.backbone = build_backbone(backbone, backbone_config, guided_attention=mixer if guided else None)
        if not guided:
            return
        if use_cfe:
            named = backbone_config if isinstance(backbone_config, str) else "paper"
            self.cfe = CFE(CFE_WIDTHS.get(named, CFE_WIDTHS["paper"]), code_dim, cfe_norm)
        else:                                                 # Table X, "w/o CFE": Z is learnt
            self.learned_code = nn.Parameter(torch.zeros(code_dim))
        if not use_dino:                                      # Table X, "w/o DINO-v2": F_l is learnt
            self.learned_semantic = nn.Parameter(0.02 * torch.randn(4, semantic_dim))

    def degradation_code(self, images):
        """Z for each image (B, 128): CFE, or the learnt code of the "w/o CFE" ablation."""
        if self.use_cfe:
            return self.cfe(images)
        return self.learned_code.expand(images.shape[0], -1)

    def priors(self, semantic, code):
        """The four per-level guidance vectors concat(F_l, Z) (B, D + 128), l = 1..4."""
        if not self.use_dino:
            semantic = self.learned_semantic.expand(code.shape[0], -1, -1)        # (B, 4, D)
        elif semantic is None:
            raise ValueError("PerceiveIR needs the DINOv2 features: semantic = sgm(degraded)")
        elif semantic.shape[1:] != (4, self.semantic_dim):
            raise ValueError(f"semantic features must be (B, 4, {self.semantic_dim}); got "
                             f"{tuple(semantic.shape)} — was the model built for another DINOv2?")
        return [torch.cat([semantic[:, level], code], dim=1) for level in range(4)]

    def forward(self, degraded, semantic=None, positive=None):
        if not self.guided:                                   # PromptIR's restore pads to 8 as the others' forward
            restored = getattr(self.backbone, "restore", self.backbone)(degraded)
            return (restored, None, None) if positive is not None else (restored, None)
        if positive is not None:                              # Z and Z+ in one CFE pass
            code, code_positive = self.degradation_code(torch.cat([degraded, positive])).chunk(2)
        else:
            code = self.degradation_code(degraded)
        restored = self.backbone(degraded, self.priors(semantic, code))
        return (restored, code, code_positive) if positive is not None else (restored, code)


SEMANTIC_DIM = {"base": 768, "tiny": 64}          # width of F_l: DINOv2 ViT-B/14 and the tiny stand-in
# The settings that decide the shapes of the weights, each with the value a checkpoint written before it existed means.
ARCHITECTURE = {"backbone": None, "backbone_config": None, "dino": None, "no_guidance": None, "no_dino": None,
                "no_pgm": None, "no_cfe": None, "cfe_norm": "none"}


def build_model(config):
    """PerceiveIR from a dict of train.py's settings (its args, or a checkpoint's own: evaluate.py rebuilds with
    them); the ARCHITECTURE settings decide the shapes of its weights."""
    return PerceiveIR(config["backbone"], config["backbone_config"], semantic_dim=SEMANTIC_DIM[config["dino"]],
                      guided=not config["no_guidance"], use_dino=not config["no_dino"],
                      use_pgm=not config["no_pgm"], use_cfe=not config["no_cfe"],
                      cfe_norm=architecture(config)["cfe_norm"])


def architecture(config):
    """The ARCHITECTURE settings of a dict of train.py's settings (a setting a checkpoint predates: its ARCHITECTURE
    value; a checkpoint written before --cfe-norm said --cfe-batch-norm for CFE's norm "batch", or nothing)."""
    legacy = "batch" if config.get("cfe_batch_norm") else ARCHITECTURE["cfe_norm"]
    return {**{key: config.get(key, default) for key, default in ARCHITECTURE.items()},
            "cfe_norm": config.get("cfe_norm") or legacy}


def prior_view(degraded, prior_size=1024):
    """What CFE sees of a whole image: itself, or a copy resized to `prior_size` px on the long side.

    # UNSPECIFIED: inference on large images is not described; beyond `prior_size` CFE sees the
    # image resized (its average pooling makes Z size-independent, but resizing also changes the
    # degradation's scale, so keep prior_size large when memory allows).
    """
    scale = min(1.0, prior_size / max(degraded.shape[-2:]))
    if scale == 1:
        return degraded
    return F.interpolate(degraded, scale_factor=scale, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)


def _starts(length, crop):
    """Tile starts 0, crop, 2·crop, ... and length − crop: crop × crop tiles that cover `length` px."""
    return sorted({*range(0, length - crop + 1, crop), length - crop})


def image_code(model, degraded, prior_size=1024, crop=0):
    """Z of whole images (B, 128): CFE on `prior_view`, or, with crop > 0, the mean of the codes CFE gives to the
    crop × crop tiles that cover that view, as CFE saw crops of that size in training.

    # UNSPECIFIED: the paper does not say what CFE sees of a test image. A code is not the same for a whole image
    # and for its crops (the statistics CFE pools cover a different area), and PGM and PGCA were trained on the
    # codes of crops; crop = the training crop size gives the network the codes it was trained on (README,
    # "What Z learns"). Tiles go through CFE 256 at a time.
    """
    view = prior_view(degraded, prior_size)
    if not crop or max(view.shape[-2:]) <= crop:
        return model.degradation_code(view)
    (H, W), B = view.shape[-2:], view.shape[0]
    ch, cw = min(crop, H), min(crop, W)
    tiles = torch.stack([view[:, :, y:y + ch, x:x + cw] for y in _starts(H, ch) for x in _starts(W, cw)], dim=1)
    codes = torch.cat([model.degradation_code(part) for part in tiles.flatten(0, 1).split(256)])
    return codes.unflatten(0, (B, -1)).mean(1)                                           # (B, 128)


@torch.no_grad()
def restore_image(model, sgm, degraded, tile=None, overlap=32, prior_size=1024, steer=None, code_crop=0):
    """I_r of a (B, 3, H, W) batch of any size, optionally with the backbone run tile by tile.

    The priors F_l and Z are per-image vectors, so DINOv2 and CFE see the whole image once, even
    when the backbone runs on tiles (memory bounded by the tile size): DINOv2 resized to its input
    size as always (Eq. 5), CFE through `image_code` (whole, or in code_crop tiles). `steer`, a unit (128,)
    direction (a task's centroid of Z), turns each Z to it, its length kept: restored as if perceived as that task.
    """
    if not model.guided:
        return tiled_forward(lambda x: model(x)[0], degraded, tile, overlap).clamp(0, 1)
    code = image_code(model, degraded, prior_size, code_crop)                          # Z of the whole image
    if steer is not None:                                        # ‖Z‖ · centroid: the type told, not perceived
        code = code.norm(dim=-1, keepdim=True) * steer.to(code)
    priors = model.priors(sgm(degraded) if model.use_dino else None, code)
    return tiled_forward(lambda x: model.backbone(x, priors), degraded, tile, overlap).clamp(0, 1)


# --- What the model perceives: the degradation code Z against per-task centroids -----------------------------------

@torch.no_grad()
def degradation_centroids(model, images, prior_size=1024, report=None, code_crop=0):
    """Per-task centroids of Z, the "type" half of what Perceive-IR perceives (Sec. III-C.2).

    `images` yields (task, I_d (3, H, W)) of training images, seen as a query is seen (`image_code`: whole,
    or in code_crop tiles). Returns {"tasks", "centroids" (T, 128) unit vectors, "threshold",
    "right", "prior_size", "code_crop"}: threshold is the 5th percentile of the training images' cosine similarities to
    their own task's centroid; a query below it resembles no task seen in training. "right" is the share of
    these images whose nearest centroid is their own task's: near chance (1/T), Z has not learnt the tasks
    apart, as when L_cl does not train. `report` (e.g. print) gets one line with the count, and a warning when
    the share is closer to chance than to all.
    """
    codes = {}
    for task, image in images:
        code = image_code(model, image[None].to(next(model.parameters()).device), prior_size, code_crop)
        codes.setdefault(task, []).append(F.normalize(code, dim=-1)[0])                  # Z/‖Z‖ (128,)
    tasks, codes = list(codes), [torch.stack(c) for c in codes.values()]                       # (N_t, 128) each
    centroids = torch.stack([F.normalize(c.mean(0), dim=0) for c in codes])                      # (T, 128)
    similarity = [c @ centroids.T for c in codes]                                                # (N_t, T) each
    own = torch.cat([s[:, i] for i, s in enumerate(similarity)])                                 # (N,)
    right = sum(int((s.argmax(1) == i).sum()) for i, s in enumerate(similarity))
    share, chance = right / len(own), 1 / len(tasks)
    if report is not None:                 # closer to chance than to every image right: say what that means
        report(f"centroids of Z: the nearest one names the task of {right} of {len(own)} training images "
               f"({share:.0%}; chance {chance:.0%})" + ("" if share >= (1 + chance) / 2 else
               "; Z hardly tells the tasks apart: did L_cl fall (loss_cl in log.jsonl)? --cfe-norm instance helps it"))
    return {"tasks": tasks, "centroids": centroids.cpu(), "threshold": torch.quantile(own, 0.05).item(),
            "right": share, "prior_size": prior_size, "code_crop": code_crop}


@torch.no_grad()
def query_code(model, degraded, centroids=None, prior_size=1024):
    """Z/‖Z‖ (B, 128) of query images seen as `centroids` saw theirs (whole or in tiles); else whole at prior_size."""
    seen = centroids or {}
    return F.normalize(image_code(model, degraded, seen.get("prior_size", prior_size), seen.get("code_crop", 0)),
                       dim=-1)


def perceive(model, centroids, degraded):
    """Per image of a batch: the nearest task centroid of its Z, the similarity to every task, and
    whether it is unfamiliar (no similarity reaches the training images' 5th percentile)."""
    code = query_code(model, degraded, centroids)                                                   # (B, 128)
    similarity = code @ centroids["centroids"].to(code).T                                            # (B, T)
    return [{"task": centroids["tasks"][int(row.argmax())], "similarity": dict(zip(centroids["tasks"], row.tolist())),
             "unfamiliar": bool(row.max() < centroids["threshold"])} for row in similarity]


BACKBONE_GROUPS = {   # top-level backbone modules → part of Fig. 4(a); GRL's stages count by whether they are guided
    "encoder": ("patch_embed", "encoder_level1", "encoder_level2", "encoder_level3", "down1_2", "down2_3",
                "down3_4", "intro", "encoders", "downs", "conv_first", "norm_start", "plain stages"),
    "latent": ("latent", "middle_blks"),
    "decoder levels": ("up4_3", "up3_2", "up2_1", "reduce_chan_level3", "reduce_chan_level2",
                       "decoder_level3", "decoder_level2", "decoder_level1", "ups", "decoders", "guided stages"),
    "refinement + output": ("refinement", "output", "skip_conv", "ending", "norm_end", "conv_after_body", "conv_last"),
}


GROUP_ORDER = [*BACKBONE_GROUPS, "PGM (Eq. 6)", "F_l projection (w/o PGM)", "PGCA (Eq. 7-8)",
               "GRL attention made cross (Eq. 7-8)", "CFE (Fig. 4(b))", "learnt Z (w/o CFE)", "learnt F_l (w/o DINOv2)"]


def parameter_breakdown(model):
    """Trainable parameters per module of Fig. 4: encoder, latent, decoder levels, PGM, PGCA, CFE."""
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if ".modulate." in name:
            owner = model.get_submodule(name.split(".modulate.")[0] + ".modulate")
            group = "PGM (Eq. 6)" if isinstance(owner, PGM) else "F_l projection (w/o PGM)"
        elif ".pgca." in name:
            owner = model.get_submodule(name.split(".pgca.")[0] + ".pgca")
            group = "PGCA (Eq. 7-8)" if isinstance(owner, PGCA) else "GRL attention made cross (Eq. 7-8)"
        elif name.startswith("cfe."):
            group = "CFE (Fig. 4(b))"
        elif name in ("learned_code", "learned_semantic"):
            group = "learnt Z (w/o CFE)" if name == "learned_code" else "learnt F_l (w/o DINOv2)"
        else:
            top = name.split(".")[1]                          # backbone.<top>.…
            if top == "layers":                               # GRL: backbone.layers.<stage>.…
                top = "guided stages" if model.backbone.levels[int(name.split(".")[2])] else "plain stages"
            group = next(g for g, tops in BACKBONE_GROUPS.items() if top in tops)
        groups[group] = groups.get(group, 0) + p.numel()
    return groups


if __name__ == "__main__":
    for name in BACKBONES:
        model = PerceiveIR(name, "paper")
        print(f"Perceive-IR ({name}, paper config): {count_parameters(model):,d} trainable parameters "
              f"(plain backbone {count_parameters(build_backbone(name, 'paper')):,d})")
        for group, n in sorted(parameter_breakdown(model).items(), key=lambda item: GROUP_ORDER.index(item[0])):
            print(f"  {group:36s} {n:>12,d}")
    frozen = build_sgm("base", random_weights=True)           # the architecture, to count it
    print(f"frozen SGM, DINOv2 ViT-B/14: {count_parameters(frozen, trainable=False):,d} parameters (not trained)")
    sgm = build_sgm("tiny")
    model = PerceiveIR("restormer", "tiny", semantic_dim=sgm.embed_dim).eval()
    degraded = torch.rand(2, 3, 45, 61)
    with torch.no_grad():
        restored, code = model(degraded, sgm(degraded))
    print(f"tiny Perceive-IR: I_d {tuple(degraded.shape)} -> I_r {tuple(restored.shape)}, Z {tuple(code.shape)}")
