"""Stage 1 of Perceive-IR: multi-level quality-driven prompt learning (Sec. III-B, Fig. 3, Eq. 1).

A frozen CLIP ViT-B/32 sees the degraded input I_d, a medium-quality restoration I_m and the ground
truth I_g of every training image. One learnable text prompt per quality level (N = 16 embedded
tokens each) is trained so that CLIP's image-text cosine similarity classifies the three tiers as
"terrible", "mediocre", "excellent" (Eq. 1). Frozen, the prompts turn CLIP into a no-reference
quality perceiver, used by stage 2 in the CLIP-aware loss (Eq. 9).

What is in here:
- `load_clip`, `clip_preprocess`, `encode_images`: the frozen CLIP (OpenAI weights, a local
  `--clip-weights` file, or a tiny random stand-in) and its differentiable 224×224 input.
- `PromptLearner` (Table XII initialisations) and `encode_prompts`: prompts through CLIP's text
  tower, cut right after the end token.
- `prompt_logits`, `prompt_loss` (Eq. 1), `quality_views`, `build_embedding_bank`, `embedding_dataset`,
  `triplet_bank`: features of the crops L_clip judges are cached once, so a step (train.py) costs only the
  text tower; `held_out_accuracy` on crops of triplets kept out of training.
- `QualityPerceiver` and `save_prompts` / `load_prompts`: the trained prompts as P(level | image).
- Medium-quality images by 2-fold cross-validation: `two_fold_split`, `cross_validation_rounds`,
  `held_out_split` (10% of the triplets kept out of prompt training),
  `medium_path`, `write_medium_manifest`, `read_medium_manifest` (the loop lives in train.py).
- `python clip_prompts.py score --prompts CKPT IMAGE...`, and a tiny self-check.
Training defaults live in `train.py --stage prompt` (Sec. IV-A.4): AdamW, lr 4e-5, batch 32
triplets (96 images), 100K iterations.
"""

import argparse
import hashlib
import json
import logging
import os
import zlib
from functools import partial
from pathlib import Path, PurePosixPath

import numpy as np
import open_clip
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms.functional as TF

# Level words, best → worst; label k of an image is the index of its tier (Table XII (c), (i), (m)).
LEVEL_WORDS = {2: ("excellent", "terrible"),
               3: ("excellent", "mediocre", "terrible"),
               4: ("excellent", "slightly better", "slightly worse", "terrible")}
INITS = ("partial", "random", "fixed")          # Sec. IV-F.3, schemes iii), ii), i); Table XII
PROMPTS_FORMAT = "perceive-ir/prompts"
MEDIUM_FORMAT = "perceive-ir/medium"
FOLDS = ("a", "b")
SOT, EOT = open_clip.tokenize([""])[0, :2].tolist()     # start / end-of-text token ids


# --- The frozen CLIP (Sec. IV-A.4: ViT-B/32) -----------------------------------------------------------------------

# Every config is built by open_clip's own factory from the OpenAI ViT-B/32 recipe; OpenAI's
# weights were trained with QuickGELU, so the "-quickgelu" variant is the faithful architecture.
OPEN_CLIP_ARCH = "ViT-B-32-quickgelu"
CLIP_CONFIGS = {
    "ViT-B-32": {},
    # Tests and the offline demo: same tokenizer, vocabulary and 77-token context, ~1.7M parameters.
    "tiny": dict(embed_dim=32,
                 vision_cfg=dict(image_size=224, layers=2, width=32, head_width=16, patch_size=32),
                 text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=2)),
}


def load_clip(name="ViT-B-32", pretrained="openai", weights=None, seed=0):
    """Frozen open_clip CLIP in eval mode. Weights: `weights` (a local state-dict file, the
    `--clip-weights` flag) if given, else the `pretrained` tag; `pretrained=None` or "random" (and
    always for "tiny", which has no published weights) gives random weights drawn with `seed`, so
    that the same CLIP can be rebuilt later from a checkpoint's `clip_info`."""
    if name not in CLIP_CONFIGS:
        raise ValueError(f"unknown CLIP {name!r}; choose one of {sorted(CLIP_CONFIGS)}")
    if weights is not None and not os.path.isfile(weights):
        raise FileNotFoundError(f"--clip-weights {weights}: file not found")
    if weights is not None:
        weights = source = os.path.abspath(weights)
        pretrained = "file"
    elif name == "tiny" or pretrained in (None, "random"):
        source, pretrained = None, "random"
    else:
        source = pretrained
    # open_clip logs "no pretrained weights" (random on purpose here: clip_info says so) and its
    # download failures (the error below repeats them, naming --clip-weights): one message, not three.
    previous_level = logging.root.manager.disable
    logging.disable(logging.ERROR)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model = open_clip.create_model(OPEN_CLIP_ARCH, pretrained=source, **CLIP_CONFIGS[name])
        except Exception as error:
            if weights is not None:
                raise ValueError(f"--clip-weights {weights} does not load into CLIP {name}: {error}. "
                                 "Pass a plain state dict of that architecture.") from error
            raise RuntimeError(f"CLIP {name} weights {pretrained!r} are not available ({error}). "
                               "Without network access, save OpenAI's ViT-B/32 weights as a plain state "
                               "dict on a connected machine and pass --clip-weights FILE.") from error
        finally:
            logging.disable(previous_level)
    model.eval().requires_grad_(False)
    model.clip_info = dict(name=name, pretrained=pretrained, weights=weights, seed=seed)
    return model


def clip_preprocess(images, size=224):
    """(B, 3, H, W) in [0, 1] → CLIP input (B, 3, size, size), differentiable (Eq. 9 needs it).

    Same recipe as open_clip's eval transform: bicubic resize of the short side (antialiased), centre
    crop, OpenAI mean/std. It runs on tensors, so there is no 8-bit rounding of the resized image.
    A 128×128 training crop is upsampled to 224×224 whole: that is the view L_clip judges (Eq. 9).
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"clip_preprocess expects (B, 3, H, W) RGB in [0, 1]; got {tuple(images.shape)}")
    x = TF.resize(images, size, interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    x = TF.center_crop(x, [size, size])                                   # (B, 3, size, size)
    mean = x.new_tensor(open_clip.OPENAI_DATASET_MEAN)[:, None, None]
    std = x.new_tensor(open_clip.OPENAI_DATASET_STD)[:, None, None]
    return (x - mean) / std


@torch.no_grad()
def encode_images(clip_model, images, batch_size=64):
    """L2-normalised CLIP image features Φ_I (N, D) of a (N, 3, H, W) tensor or a list of (3, H, W)
    images of any sizes; batched on the CLIP's device, returned on the CPU."""
    device = clip_model.logit_scale.device
    size = clip_model.visual.image_size[0]
    features = []
    for start in range(0, len(images), batch_size):
        chunk = [clip_preprocess(image[None].to(device), size) for image in images[start:start + batch_size]]
        features.append(clip_model.encode_image(torch.cat(chunk), normalize=True).cpu())
    return torch.cat(features)


# --- Learnable prompts (Sec. III-B, Table XII) through CLIP's text tower -------------------------------------------

def encode_prompts(clip_model, embeddings, truncate=True):
    """Text features Φ_T(T_k) (K, D), L2-normalised, of prompts given as token embeddings (K, N, D_text).

    The sequence is [SOT, T_k, EOT] exactly as `encode_text` builds it from token ids; CLIP pools the
    EOT position. The text transformer is causal, so nothing after EOT can change that position:
    `truncate=True` stops the sequence there (N + 2 = 18 instead of 77 tokens, same features).
    """
    K, N, _ = embeddings.shape
    table = clip_model.token_embedding.weight
    sot, eot = table[SOT].expand(K, 1, -1), table[EOT].expand(K, 1, -1)       # (K, 1, D_text)
    x = torch.cat([sot, embeddings, eot], dim=1)                          # (K, N + 2, D_text)
    if not truncate:                                                      # pad id 0, as the tokenizer does
        x = torch.cat([x, table[0].expand(K, clip_model.context_length - N - 2, -1)], dim=1)
    L = x.shape[1]
    x = x + clip_model.positional_embedding[:L]
    # The causal mask is what makes the cut exact; forgetting it runs silently with wrong features.
    x = clip_model.transformer(x, attn_mask=clip_model.attn_mask[:L, :L])  # (K, L, D_text)
    x = clip_model.ln_final(x)[:, N + 1]                                  # (K, D_text) at EOT
    projection = clip_model.text_projection
    x = projection(x) if isinstance(projection, nn.Linear) else x @ projection   # (K, D)
    return F.normalize(x, dim=-1)


class PromptLearner(nn.Module):
    """One learnable prompt T_k ∈ R^{N×D_text} per quality level (Sec. III-B; N = 16, Sec. IV-A.4).

    init (Sec. IV-F.3, Table XII): "partial" (scheme iii), the paper's row (i)): random tokens, the
    last one(s) initialised from the level word, all trained; "random" (ii)); "fixed" (i)): the
    tokenised sentence "X X … X <word>" (N tokens), frozen. `words` go best → worst and label k is the k-th tier.
    The CLIP model is referenced, not registered, so `parameters()` and `state_dict()` hold the
    prompts only; build the learner after moving CLIP to its device.
    """

    def __init__(self, clip_model, words=LEVEL_WORDS[3], n_tokens=16, init="partial"):
        super().__init__()
        self.words, self.n_tokens, self.init = [str(w) for w in words], n_tokens, init
        if not 2 <= len(self.words) <= 4:
            raise ValueError(f"--prompt-words: 2, 3 or 4 quality levels (Table XII); got {self.words}")
        if init not in INITS:
            raise ValueError(f"--prompt-init must be one of {INITS}; got {init!r}")
        object.__setattr__(self, "clip", clip_model)
        table = clip_model.token_embedding.weight
        rows = []
        for word in self.words:
            word_length = int((open_clip.tokenize([word])[0] > 0).sum()) - 2      # BPE tokens of the word
            if not 1 <= word_length <= n_tokens:
                raise ValueError(f"level word {word!r} takes {word_length} tokens; the prompt has {n_tokens}")
            ids = open_clip.tokenize([" ".join(["X"] * (n_tokens - word_length) + [word])])[0]
            sentence = table[ids[1:n_tokens + 1]].detach().clone()                  # (N, D_text)
            # UNSPECIFIED: the paper does not give the random distribution; N(0, 0.02²) as in CoOp.
            prompt = torch.randn_like(sentence) * 0.02
            if init == "partial":                                        # Sec. IV-F.3, scheme iii)
                prompt[n_tokens - word_length:] = sentence[n_tokens - word_length:]
            rows.append(sentence if init == "fixed" else prompt)
        embeddings = torch.stack(rows)                                              # (K, N, D_text)
        if init == "fixed":
            self.register_buffer("embeddings", embeddings)
        else:
            self.embeddings = nn.Parameter(embeddings)

    def forward(self, truncate=True):
        return encode_prompts(self.clip, self.embeddings, truncate)                # (K, D)


# --- Eq. (1) and the cached training step --------------------------------------------------------------------------

def prompt_logits(image_features, text_features, logit_scale):
    """logit_scale · S(Φ_I(I_i), Φ_T(T_k)): (B, D) × (K, D) → (B, K). `logit_scale` is the
    multiplier exp(CLIP's logit_scale), 100 for the OpenAI weights."""
    # DEVIATION: Eq. (1) writes exp(S) of the bare cosine; we scale by CLIP's logit scale as CLIP,
    # CoOp and CLIP-LIT do: with logits in [−1, 1], three levels could never
    # give one of them more than e¹/(e¹ + 2e⁻¹) = 0.79.
    image_features = F.normalize(image_features, dim=-1)
    text_features = F.normalize(text_features, dim=-1)
    return logit_scale * image_features @ text_features.t()                         # (B, K)


def prompt_loss(learner, image_features, labels, logit_scale, truncate=True):
    """Eq. (1): L_ce = −mean_i log softmax_k(logits)_{y_i}; returns (loss, accuracy)."""
    logits = prompt_logits(image_features, learner(truncate), logit_scale)
    accuracy = (logits.argmax(-1) == labels).float().mean()
    return F.cross_entropy(logits, labels), accuracy


def quality_tiers(item, num_levels):
    """A TripletDataset item → its images best → worst, one per level; label = position."""
    target, medium, degraded = item["target"], item["medium"], item["degraded"]
    if num_levels == 2:
        # UNSPECIFIED: Table XII (a-c) has no "mediocre" prompt; we drop I_m: I_g → T_e, I_d → T_t.
        return [target, degraded]
    if num_levels == 4:
        # UNSPECIFIED: there are only three image tiers for four prompts. Our rule: I_m → "slightly
        # better", the pixel average (I_m + I_d)/2 → "slightly worse", a tier between the two.
        return [target, medium, (medium + degraded) / 2, degraded]
    return [target, medium, degraded]                     # Sec. III-B: I_g, I_m, I_d → e, m, t


def quality_views(item, num_levels, view="crop", crops=4, patch_size=128, seed=0):
    """The images stage 1 shows CLIP for one triplet: `crops` views × K tiers, view-major (or K whole images).

    # UNSPECIFIED: the paper does not say what CLIP sees in stage 1. L_clip (Eq. 9) later judges
    # 128-px training crops upsampled to 224, so by default stage 1 trains the prompts on the same
    # view: `crops` fixed patch_size crops per image, at the same place in I_d, I_m and I_g, each
    # resized by clip_preprocess as the perceiver does. The positions come from (seed, task, key),
    # so the cache stays exact. view="whole" is the short-side resize + centre crop of whole images.
    """
    tiers = quality_tiers(item, num_levels)
    if view == "whole":
        return tiers
    H, W = tiers[0].shape[-2:]
    P = min(patch_size, H, W)
    rng = np.random.default_rng([seed, zlib.crc32(f"{int(item['task'])}/{item['key']}".encode())])
    corners = rng.integers(0, [H - P + 1, W - P + 1], size=(crops, 2))                # (crops, 2)
    return [tier[:, y:y + P, x:x + P] for y, x in corners for tier in tiers]


def build_embedding_bank(clip_model, dataset, views=None, batch_size=64, num_levels=3, num_workers=0):
    """Encode the images of every TripletDataset item once: features (N·K, D) and labels (N·K,),
    view-major (row n·K + k is tier k of view n); `views(item)` gives an item's images (default:
    its K whole images). The image tower is frozen and the views deterministic, so these are exactly
    the features an uncached step would compute."""
    views = views or (lambda item: quality_tiers(item, num_levels))
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=num_workers)
    features, pending = [], []
    for item in loader:
        pending += views(item)
        if len(pending) >= batch_size:
            features.append(encode_images(clip_model, pending, batch_size))
            pending = []
    if pending:
        features.append(encode_images(clip_model, pending, batch_size))
    features = torch.cat(features)                                                  # (N·K, D)
    labels = torch.arange(num_levels).repeat(len(features) // num_levels)           # (N·K,)
    return features, labels


def embedding_dataset(clip_model, triplets, views, num_levels=3, num_workers=0):
    """The cache of Eq. (1) as a dataset: one item {"features": (K, D), "labels": (K,)} per view of each
    triplet. Under torch.distributed each rank encodes every world-th triplet once, and the shares are
    gathered on every rank."""
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    share = torch.utils.data.Subset(triplets, range(rank, len(triplets), world))
    features, _ = build_embedding_bank(clip_model, share, views, num_levels=num_levels, num_workers=num_workers)
    shares = [features.view(-1, num_levels, features.shape[-1])] * world      # (views of this rank, K, D)
    if distributed:
        dist.all_gather_object(shares, shares[0])
    return [{"features": f, "labels": torch.arange(num_levels)} for f in torch.cat(shares)]   # a list is a dataset


def triplet_bank(clip_model, samples, medium_dir, num_levels, view, crops, patch_size, seed, sigmas, workers=0):
    """`embedding_dataset` of the (I_g, I_m, I_d) triplets of `samples`, I_m read from `medium_dir`."""
    import data                                               # lazily: data is a sibling module
    views = partial(quality_views, num_levels=num_levels, view=view, crops=crops, patch_size=patch_size, seed=seed)
    triplets = data.TripletDataset(samples, Path(medium_dir), sigmas=sigmas)
    return embedding_dataset(clip_model, triplets, views, num_levels, workers)


@torch.no_grad()
def held_out_accuracy(learner, bank, logit_scale):
    """(accuracy, crops): how often the prompts put a cached crop of `bank` in its own tier (Eq. 1's argmax)."""
    features = torch.stack([view["features"] for view in bank]).to(learner.embeddings.device)        # (n, K, D)
    labels = torch.arange(features.shape[1], device=features.device).repeat(len(features))   # tier k: I_g, I_m, I_d
    return prompt_loss(learner, features.flatten(0, 1), labels, logit_scale)[1].item(), len(features)


# --- The quality perceiver (used by Eq. 9 and evaluation) and the prompt checkpoint --------------------------------

class QualityPerceiver(nn.Module):
    """P(level | image): frozen CLIP image tower + the fixed stage-1 prompt features (Fig. 5(a)).

    `perceiver(images)` with images (B, 3, H, W) in [0, 1] of any size → probabilities (B, K),
    differentiable w.r.t. the images; `levels` are the level words and `excellent_index` (always 0,
    the tier trained on ground truths) the column of T_e. It stays in eval mode and frozen.
    """

    def __init__(self, clip_model, text_features, levels):
        super().__init__()
        self.visual = clip_model.visual
        self.register_buffer("text_features", F.normalize(text_features.detach(), dim=-1))  # (K, D)
        self.register_buffer("logit_scale", clip_model.logit_scale.detach().exp())
        self.levels, self.excellent_index = list(levels), 0
        self.image_size = clip_model.visual.image_size[0]
        self.requires_grad_(False).eval()

    def train(self, mode=True):
        return super().train(False)                        # frozen network: always eval mode

    def forward(self, images):
        features = self.visual(clip_preprocess(images, self.image_size))             # (B, D)
        return prompt_logits(features, self.text_features, self.logit_scale).softmax(-1)

    @classmethod
    def from_checkpoint(cls, path, clip_weights=None, device="cpu"):
        """Rebuild CLIP as the checkpoint recorded it (or from `clip_weights`, the --clip-weights
        override) and check that it reproduces the stored prompt features."""
        checkpoint = load_prompts(path)
        info = checkpoint["clip"]
        weights = clip_weights or info["weights"]
        if clip_weights is None and weights is not None and not os.path.isfile(weights):
            raise FileNotFoundError(f"{path} was trained with CLIP weights {weights}, which is not found; "
                                    "pass the same file with --clip-weights FILE")
        clip_model = load_clip(info["name"], info["pretrained"], weights, info["seed"]).to(device)
        with torch.no_grad():
            text_features = encode_prompts(clip_model, checkpoint["embeddings"].to(device))
        difference = (text_features.cpu() - checkpoint["text_features"]).abs().max().item()
        if difference > 1e-3:
            raise ValueError(f"the CLIP rebuilt for {path} does not reproduce its prompt features (max "
                             f"difference {difference:.3g}): the prompts were trained with other CLIP "
                             "weights; pass those with --clip-weights FILE")
        perceiver = cls(clip_model, text_features, checkpoint["levels"]).to(device)
        perceiver.stage1_restorer = checkpoint["config"].get("medium_backbone", "restormer")    # Table XIV's row
        return perceiver


def save_prompts(path, learner, clip_info, config, step, held_out=None):
    """The stage-1 result as one plain dict (torch.load(weights_only=True)), written atomically.
    `clip_info` is `clip_model.clip_info`; the stored text features let a reader check its CLIP;
    `held_out` is the perceiver's accuracy on the held-out triplets' crops (train.py)."""
    with torch.no_grad():
        text_features = learner().cpu()                                             # (K, D)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": PROMPTS_FORMAT, "embeddings": learner.embeddings.detach().cpu(),
                "levels": list(learner.words), "n_tokens": learner.n_tokens, "init": learner.init,
                "text_features": text_features, "clip": dict(clip_info), "config": dict(config),
                "step": int(step), "held_out": dict(held_out or {})}, f"{path}.tmp")
    os.replace(f"{path}.tmp", path)


def load_prompts(path):
    """Read and check a prompt checkpoint; a missing, corrupt or foreign file names itself."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"--prompts {path}: file not found; train prompts with "
                                "`python train.py --stage prompt` first")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"--prompts {path} is not a readable checkpoint ({type(error).__name__}: "
                         f"{str(error)[:200]}); pass a file written by `train.py --stage prompt`") from error
    keys = {"format", "embeddings", "levels", "text_features", "clip", "config", "step"}
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != PROMPTS_FORMAT or keys - set(checkpoint):
        raise ValueError(f"--prompts {path} is not a Perceive-IR prompt checkpoint (format "
                         f"{PROMPTS_FORMAT!r} with keys {sorted(keys)}); pass the file from `--stage prompt`")
    if checkpoint["embeddings"].shape[0] != len(checkpoint["levels"]):
        raise ValueError(f"--prompts {path} is corrupt: {checkpoint['embeddings'].shape[0]} prompts "
                         f"for levels {checkpoint['levels']}")
    return checkpoint


# --- Medium-quality images I_m by 2-fold cross-validation (Sec. III-B, Table XIV) ----------------------------------

def two_fold_split(samples):
    """"We divide the degraded inputs equally into two subsets" (Sec. III-B) → (fold_a, fold_b).

    Per task, samples are ordered by a stable hash of (task, key) (the same on every machine, and
    whatever the data root) and dealt alternately, starting each task on the fold that is behind,
    so every task and the whole set split within one sample.
    UNSPECIFIED: the paper does not say how the halves are drawn; this rule makes them reproducible.
    """
    by_task, seen = {}, set()
    for sample in samples:
        if (sample.task, sample.key) in seen:
            raise ValueError(f"duplicate training sample {sample.task}/{sample.key}")
        seen.add((sample.task, sample.key))
        by_task.setdefault(sample.task, []).append(sample)
    folds = ([], [])
    for task in sorted(by_task):
        offset = int(len(folds[0]) > len(folds[1]))
        for i, sample in enumerate(sorted(by_task[task], key=stable_hash)):
            folds[(i + offset) % 2].append(sample)
    return folds


def stable_hash(sample):
    """The same on every machine and whatever the data root: it orders samples for the splits."""
    return hashlib.sha256(f"{sample.task}/{sample.key}".encode()).hexdigest()


def held_out_split(samples, fraction=0.1):
    """{(task, key)} of the triplets kept out of prompt training: a fixed `fraction` of each task, by
    stable hash (none for a task of fewer than 5 images). The perceiver's accuracy on their crops
    says whether the prompts learned quality or memorised images."""
    held_out = set()
    for task in {s.task for s in samples}:
        ordered = sorted((s for s in samples if s.task == task), key=stable_hash)
        held_out |= {(s.task, s.key) for s in ordered[:round(fraction * len(ordered))]}
    return held_out


def cross_validation_rounds(samples):
    """The two rounds of Sec. III-B: the model trained on one fold restores the other fold."""
    fold_a, fold_b = two_fold_split(samples)
    return [dict(model="a", train=fold_a, restore=fold_b), dict(model="b", train=fold_b, restore=fold_a)]


def medium_path(medium_dir, task, key):
    """`<medium_dir>/<task>/<key with suffix .png>` (the layout of data.keyed_path)."""
    key = PurePosixPath(key)
    if key.is_absolute() or ".." in key.parts:
        raise ValueError(f"sample key {key} must be a relative path below its task folder")
    return Path(medium_dir) / task / key.with_suffix(".png")


@torch.no_grad()
def render_medium_images(restorer, samples, medium_dir, sigmas, device="cpu"):
    """Restore each sample's whole degraded image into `medium_path` (tiles only if it does not fit).

    Files are written under a temporary name and renamed, and existing ones are skipped, so an
    interrupted rendering resumes where it stopped. The denoising inputs are data.load_pair's
    deterministic noisy images, the same ones stage 1 later pairs with these restorations.
    """
    import data                                               # lazily: data is a sibling module
    from backbone import tiled_forward
    for sample in samples:
        path = medium_path(medium_dir, sample.task, sample.key)
        if path.is_file():
            continue
        degraded = data.load_pair(sample, sigmas)[0][None].to(device)
        try:                                                  # whole, as evaluation restores test images
            restored = restorer(degraded)[0]
        except torch.cuda.OutOfMemoryError:                   # a GPU too small for this image: 512-px tiles
            torch.cuda.empty_cache()
            restored = tiled_forward(restorer, degraded, 512, 32)[0]
        data.write_image(path.with_name(path.stem + ".tmp.png"), restored)
        os.replace(path.with_name(path.stem + ".tmp.png"), path)


def write_medium_manifest(medium_dir, entries, info):
    """manifest.json of the `--medium-dir`: the restorer (`info`: name, config, ...) and, per image,
    task, key, its fold, the fold whose model restored it and its path relative to the folder."""
    rows = []
    for entry in entries:
        task, key, fold, restored_by = entry["task"], entry["key"], entry["fold"], entry["restored_by"]
        if fold not in FOLDS or restored_by not in FOLDS or fold == restored_by:
            raise ValueError(f"{task}/{key}: fold {fold!r} restored by {restored_by!r}; a sample must be "
                             f"restored by the model of the other fold (folds {FOLDS})")
        rows.append(dict(task=task, key=key, fold=fold, restored_by=restored_by,
                         path=medium_path(".", task, key).as_posix()))
    path = Path(medium_dir) / "manifest.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json.tmp").write_text(json.dumps(
        {"format": MEDIUM_FORMAT, "restorer": dict(info), "entries": rows}, indent=1))
    os.replace(path.with_suffix(".json.tmp"), path)


def read_medium_manifest(medium_dir):
    path = Path(medium_dir) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"--medium-dir {medium_dir} has no manifest.json; build the medium-quality "
                                f"images first with `python train.py --stage medium --medium-dir {medium_dir}`")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"--medium-dir {medium_dir}: manifest.json is corrupt ({error}); rebuild it "
                         "with `python train.py --stage medium`") from error
    fields = {"task", "key", "fold", "restored_by", "path"}
    ok = isinstance(manifest, dict) and manifest.get("format") == MEDIUM_FORMAT
    entries = manifest.get("entries", [None]) if ok else [None]
    if not all(isinstance(e, dict) and fields <= set(e) for e in entries):
        raise ValueError(f"--medium-dir {medium_dir}: manifest.json is not a Perceive-IR medium-image "
                         f"manifest (format {MEDIUM_FORMAT!r}, entries with {sorted(fields)})")
    if any(e["fold"] == e["restored_by"] for e in entries):
        raise ValueError(f"--medium-dir {medium_dir}: some images were restored by a model trained on "
                         "them; rebuild with `python train.py --stage medium`")
    return manifest


# --- Command line: quality scores and a self-check -----------------------------------------------------------------

def score(args):
    """P(level) of each image; an unreadable image is named and skipped, and the exit status says so."""
    import data                                    # image reading is data.py's job
    try:
        perceiver = QualityPerceiver.from_checkpoint(args.prompts, args.clip_weights, args.device)
    except (OSError, RuntimeError, ValueError, KeyError) as error:
        raise SystemExit(f"clip_prompts.py score: {error}") from None
    skipped = []
    for path in args.images:
        try:
            image = data.read_image(path)
        except ValueError as error:                # one bad file must not cost the others
            print(f"SKIPPED {path}: {error}")
            skipped.append(path)
            continue
        with torch.no_grad():
            probabilities = perceiver(image[None].to(args.device))[0]
        print(f"{path}\t" + "  ".join(f"{w}={p:.4f}" for w, p in zip(perceiver.levels, probabilities.tolist())))
    if skipped:
        raise SystemExit(f"scored {len(args.images) - len(skipped)} image(s); skipped {len(skipped)}")


def self_check():
    """Tiny CLIP: the truncated tower equals encode_text, and prompts learn three noise levels."""
    torch.manual_seed(0)
    torch.set_num_threads(1)                      # microsecond ops: threads cost more than they save
    clip_model = load_clip("tiny")
    logit_scale = clip_model.logit_scale.exp()
    learner = PromptLearner(clip_model, init="fixed")
    reference = clip_model.encode_text(open_clip.tokenize(["X " * 15 + w for w in learner.words]), normalize=True)
    print(f"tiny CLIP, {sum(p.numel() for p in clip_model.parameters()):,d} parameters: truncated text tower "
          f"vs encode_text, max |diff| {(learner() - reference).abs().max().item():.1e}")
    clean = 0.4 + 0.3 * F.interpolate(torch.rand(24, 3, 4, 4), size=64, mode="bicubic")   # (24, 3, 64, 64)
    tiers = [clean] + [(clean + s * torch.randn_like(clean)).clamp(0, 1) for s in (0.2, 0.8)]
    features = encode_images(clip_model, torch.stack(tiers, 1).flatten(0, 1))        # (24·3, D)
    labels = torch.arange(3).repeat(24)
    learner = PromptLearner(clip_model)
    optimizer = torch.optim.AdamW(learner.parameters(), lr=1e-2)
    for step in range(301):                                   # full-batch Eq. (1) on the cached features
        loss, accuracy = prompt_loss(learner, features, labels, logit_scale)
        if step % 100 == 0:
            print(f"step {step:3d}  L_ce {loss:.3f}  accuracy {accuracy:.2f} (toy clean / σ=0.2 / σ=0.8)")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def main(argv=None):
    parser = argparse.ArgumentParser(description="Stage-1 quality prompts (Sec. III-B); no command: self-check")
    commands = parser.add_subparsers(dest="command")
    scorer = commands.add_parser("score", help="print P(level) per image (a no-reference quality score)")
    scorer.add_argument("--prompts", required=True, help="prompt checkpoint from `train.py --stage prompt`")
    scorer.add_argument("--clip-weights", default=None, help="local CLIP state-dict file (offline machines)")
    scorer.add_argument("--device", default="cpu")
    scorer.add_argument("images", nargs="+")
    args = parser.parse_args(argv)
    if args.command == "score":
        score(args)
    else:
        self_check()


if __name__ == "__main__":
    main()
