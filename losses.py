"""Quality-aware learning and the training loss of Perceive-IR (Sec. III-D, III-E, Fig. 5, Eq. 9-13).

The restoration stage trains with four terms (Eq. 13): an L1 reconstruction loss; the degradation
contrastive loss L_cl, which teaches CFE to give crops of the same degraded image similar codes Z
and images of other degradations different ones (Eq. 12); the CLIP-aware loss L_clip, which pulls
I_r towards the stage-1 "excellent" prompt (Eq. 9, Fig. 5(a)); and the difficulty-adaptive
perceptual loss L_dpl, a contrastive regularisation in VGG-16 feature space whose non-easy
negatives are re-weighted each epoch by comparing the model's PSNR with theirs (Eq. 10-11,
Fig. 5(b)). Nothing here imports another file of this project: the quality perceiver of
`clip_prompts.py` is used only through its call interface.

What is in here:
- `reconstruction_loss` (L_rec) and `contrastive_loss` (L_cl, Eq. 12; under torch.distributed its
  negatives span the global batch and it equals the single-process loss).
- `clip_aware_loss` (L_clip, Eq. 9) on the probabilities of a quality perceiver.
- `build_vgg` / `VGGFeatures` / `load_vgg16_features`: frozen VGG-16 taps V_i for Eq. (11) (or a tiny
  random stand-in); evaluate.py's LPIPS loads its VGG-16 the same way.
- `batch_psnr`, `average_psnr` and `negative_weights` (avgPSNR and O_k, Eq. 10), and
  `difficulty_adaptive_perceptual_loss` (Eq. 11).
- `PerceiveIRLoss`: L_total of Eq. (13), one switch per term; `TABLE_XI` names the ablation rows.
"""

from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models import VGG16_Weights, vgg16
from torchvision.models.vgg import cfgs, make_layers

IMAGENET_MEAN = (0.485, 0.456, 0.406)   # the normalisation VGG-16 was trained with
IMAGENET_STD = (0.229, 0.224, 0.225)

# UNSPECIFIED: the paper takes V_i from "the 3rd, 7th, 11th, 15th layers" of VGG-16 without saying
# how layers are counted. We read them as 0-based indices into torchvision's `vgg16().features`,
# as the code in the authors' repository does (House-yuyu/Perceive-IR, read at commit c7f79d4):
# relu1_2, conv2_2, relu3_1, relu3_3 (1-based: conv1_2, relu2_1, conv3_1, conv3_3). Tap 7 is a conv
# output; there the in-place ReLU at index 8 overwrites it, so it silently becomes relu2_2. Ours stays conv2_2.
TAPS = (3, 7, 11, 15)
TAP_NAMES = ("relu1_2", "conv2_2", "relu3_1", "relu3_3")
XI = (1 / 12, 1 / 6, 1 / 3, 1.0)        # ξ_3, ξ_7, ξ_11, ξ_15 of Eq. (11)


# --- L_rec and the degradation contrastive loss L_cl (Sec. III-E, Eq. 12) ------------------------------------------

def reconstruction_loss(restored, target):
    """L_rec = ‖I_r − I_g‖₁, the mean absolute error over all pixels (Eq. 13)."""
    return F.l1_loss(restored, target)


def world_size():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_with_local_grad(tensor):
    """(n, ...) on every rank → (W·n, ...) in rank order; the identity without a process group.

    The slices received from other ranks are constants; this rank's own slice is the input tensor
    itself, so autograd still reaches the local codes. Every rank must hold the same n (train.py's
    DistributedSampler drops the last incomplete batch).
    """
    if world_size() == 1:
        return tensor
    gathered = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(gathered, tensor.detach().contiguous())
    gathered[dist.get_rank()] = tensor
    return torch.cat(gathered)


def contrastive_loss(code, code_positive, task, tau=0.1):
    """L_cl, Eq. (12): InfoNCE on the CFE codes with cosine similarity S and temperature τ.

    code (B, D): Z of the anchor crops; code_positive (B, D): Z⁺ of a second random crop of the
    same degraded images; task (B,) long: the degradation labels. The negatives Z⁻ of an anchor
    are the anchor codes Z of every sample whose task differs; samples of the same task are neither
    positives nor negatives. Returns (loss, valid_fraction), two 0-d tensors (no host sync).

    Only the anchor codes serve as negatives, not the second-crop codes Z⁺ of other samples: each
    other-degradation image then counts once, as the n negatives of Eq. (12) count images ("patches
    of different degradation types"), and its second crop would carry the same degradation again.

    An anchor without any negative (every sample of the global batch has its task, as always in
    One-by-One training) has nothing to contrast against and is masked out; the loss is the mean
    over the valid anchors (0 when there is none), and valid_fraction says how many there were.

    Under an initialised process group the codes and labels of all ranks are gathered, so the
    negatives span the global batch, and every rank computes the loss of the whole global batch:
    its value equals the single-process loss on that batch.
    """
    pair = gather_with_local_grad(torch.stack((code, code_positive), dim=1))   # (N, 2, D), N = global batch
    task = gather_with_local_grad(task)                                         # (N,)
    anchor = F.normalize(pair[:, 0], dim=-1)                                    # Z/‖Z‖, so a·b = S(·,·)
    positive = F.normalize(pair[:, 1], dim=-1)                                  # Z⁺/‖Z⁺‖
    positive_logit = (anchor * positive).sum(dim=-1) / tau                     # S(Z, Z⁺)/τ   (N,)
    # UNSPECIFIED: the paper does not say which codes are the negatives nor what happens to an anchor
    # without one. Ours: the anchor codes of the other-task samples (not their Z⁺); no negative → masked.
    is_negative = task[:, None] != task[None, :]                               # (N, N); False on the diagonal
    negative_logits = (anchor @ anchor.T / tau).masked_fill(~is_negative, float("-inf"))  # S(Z, Z⁻)/τ (N, N)
    logits = torch.cat((positive_logit[:, None], negative_logits), dim=1)      # (N, 1 + N)
    # Eq. (12): −log(e^{s⁺/τ} / (e^{s⁺/τ} + Σᵢ e^{sᵢ⁻/τ})) = logsumexp(s⁺/τ, s⁻/τ, …) − s⁺/τ,
    # masked entries are −∞ and add e^{−∞} = 0, so an anchor without negatives gives exactly 0.
    per_anchor = torch.logsumexp(logits, dim=1) - positive_logit               # (N,)
    valid = is_negative.any(dim=1)                                             # (N,)
    loss = (per_anchor * valid).sum() / valid.sum().clamp_min(1)
    if world_size() > 1:
        # Each rank holds the whole global-batch loss, but autograd reaches only its own codes, and
        # they receive their complete single-process gradient ∂L_cl/∂Z. DDP averages gradients over
        # the W ranks, which is right for the per-rank means of the other terms (W × their share);
        # scaling this term's gradient by W, its value unchanged, keeps the average exact.
        loss = world_size() * loss - (world_size() - 1) * loss.detach()
    return loss, valid.float().mean()


# --- CLIP-aware loss (Sec. III-D.1, Eq. 9, Fig. 5(a)) --------------------------------------------------------------

def clip_aware_loss(perceiver, restored):
    """L_clip, Eq. (9), averaged over the batch.

    `perceiver(restored)` returns (B, K) probabilities over the fixed stage-1 quality prompts and is
    differentiable with respect to the images (its CLIP weights are frozen; it resizes to 224 and
    applies CLIP's normalisation); `perceiver.excellent_index` is the column of T_e.
    """
    # L_clip = 1 − exp(S(Φ_I(I_r), Φ_T(T_e))) / Σ_{k∈{e,m,t}} exp(S(Φ_I(I_r), Φ_T(T_k)))
    # DEVIATION: Eq. (9) as printed, and the code in the authors' repository (commit c7f79d4), take
    # the softmax of raw cosines. CLIP's image-text cosines lie in a narrow band (≈ 0.2-0.3), so that softmax is
    # close to uniform (P(excellent) ≈ 1/3 whatever the image) and L_clip is nearly flat. The
    # perceiver multiplies the cosines by CLIP's logit scale (100 for the OpenAI weights), the
    # scale the prompts were learned with in stage 1, so these are the probabilities stage 1 trained.
    probabilities = perceiver(restored)                                        # (B, K)
    return (1 - probabilities[:, perceiver.excellent_index]).mean()


# --- VGG-16 features V_i (Sec. III-D.2) ----------------------------------------------------------------------------

class VGGFeatures(nn.Module):
    """V_i of Eq. (11): frozen VGG features at the four taps, for images (n, 3, H, W) in [0, 1].

    `layers` is a `vgg16().features` stack cut after the deepest tap, so the unused layers never
    run; its ReLUs are rebuilt out-of-place so that the conv2_2 tap is not overwritten by the ReLU
    that follows it. Returns a list of four maps (n, C_i, H_i, W_i). `description` says what was
    loaded, for the training log.
    """

    def __init__(self, features, description, taps=TAPS):
        super().__init__()
        self.taps = tuple(taps)
        self.layers = nn.Sequential(*[nn.ReLU(inplace=False) if isinstance(layer, nn.ReLU) else layer
                                      for layer in features[:max(self.taps) + 1]])
        self.description = description
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False).eval()

    def forward(self, images):
        x = (images - self.mean) / self.std          # no clamp: I_r outside [0, 1] still gets a gradient
        features = []
        for index, layer in enumerate(self.layers):
            x = layer(x)
            if index in self.taps:
                features.append(x)
        return features


def load_vgg16_features(weights=None):
    """torchvision's VGG-16 `features` stack with its IMAGENET1K_V1 weights, through torchvision's own
    loader (torch hub cache, or a download), or with `weights=FILE` (the --vgg-weights flag) from a
    state_dict of torchvision's vgg16 saved with torch.save (of the whole model or of its `features`
    stack; only the feature stack is built and loaded, strictly). Returns (features, description)."""
    if weights is None:
        try:
            return vgg16(weights=VGG16_Weights.IMAGENET1K_V1).features, "VGG-16 IMAGENET1K_V1 (torchvision)"
        except Exception as error:                   # no cached copy and no network: URLError, OSError, ...
            raise RuntimeError(
                f"VGG-16 IMAGENET1K_V1 weights are not available (not cached under {torch.hub.get_dir()} "
                f"and the download failed: {error}). Pass a local file with --vgg-weights FILE, made where "
                "the weights are available by torch.save(torchvision.models.vgg16(weights='IMAGENET1K_V1')"
                ".state_dict(), FILE)") from error
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(f"--vgg-weights {path}: no such file (expected a state_dict of "
                                "torchvision's vgg16 saved with torch.save)")
    features = make_layers(cfgs["D"])                # = vgg16().features, without the unused classifier
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if any(key.startswith("features.") for key in state):          # a whole vgg16: the classifier
            state = {key[len("features."):]: value for key, value in state.items()   # is never used
                     if key.startswith("features.")}
        features.load_state_dict(state)
    except Exception as error:
        raise ValueError(f"--vgg-weights {path}: not a state_dict of torchvision's vgg16 ({error}). "
                         "Save one with torch.save(vgg16(...).state_dict(), FILE)") from error
    return features, f"VGG-16 from {path}"


def build_vgg(weights=None, variant="vgg16"):
    """Frozen feature extractor for L_dpl (Eq. 11): VGG-16 (the paper; see `load_vgg16_features`), or
    variant "tiny", a narrow VGG-shaped network with random weights for tests and the offline demo;
    it is not VGG-16, and its `.description` says so for the log."""
    if variant == "tiny":
        with torch.random.fork_rng(devices=[]):      # the same stand-in every run, global RNG untouched
            torch.manual_seed(0)
            layers = make_layers([8, 8, "M", 16, 16, "M", 32, 32, 32])   # vgg16 features[:16], narrow
        return VGGFeatures(layers, "tiny random VGG-shaped stand-in, NOT pretrained VGG-16 "
                                   "(L_dpl is a smoke test only)")
    if variant != "vgg16":
        raise ValueError(f"unknown VGG variant {variant!r}; choose 'vgg16' (the paper) or 'tiny' (tests, demo)")
    return VGGFeatures(*load_vgg16_features(weights))


# --- Difficulty-adaptive perceptual loss (Sec. III-D.2, Eq. 10-11, Fig. 5(b)) --------------------------------------

def batch_psnr(x, y, data_range=1.0):
    """PSNR in dB per image, 10·log10(R² / MSE) with the MSE over (C, H, W): (B, 3, H, W) → (B,).

    Leading dimensions broadcast: (B, Q, 3, H, W) against (B, 1, 3, H, W) gives (B, Q). Identical
    images give +inf.
    """
    mse = (x.float() - y.float()).square().mean(dim=(-3, -2, -1))
    return 10 * torch.log10(data_range ** 2 / mse)


def negative_weights(avg_psnr, negative_psnr, gamma=0.25):
    """O_k(N_q), Eq. (10): 1 + γ where avgPSNR(I_r, Θ_{k−1}) ≥ PSNR(N_q) (a hard negative), else 1 − γ
    (a very-hard negative, better than the model).

    avg_psnr: the model's average PSNR measured at the start of this epoch (a float, or a tensor
    that broadcasts against negative_psnr, e.g. one value per task), or None before any measurement.
    """
    if avg_psnr is None:
        # UNSPECIFIED: the paper does not say what O_k is before the model has been measured. We use
        # 1 − γ for every negative, which is what Eq. (10) gives for the initial network Θ_0: with
        # the global residual of Eq. (4) it starts near the identity, I_r ≈ I_d, whose PSNR is
        # below that of any restoration a proxy model made. train.py passes None until it has one.
        return torch.full_like(negative_psnr, 1 - gamma)
    return torch.where(negative_psnr <= avg_psnr, 1 + gamma, 1 - gamma)     # avgPSNR ≥ PSNR(N_q): hard


@torch.no_grad()
def average_psnr(restore, probe, device):
    """avgPSNR(I_r, Θ_{k−1}) of Eq. (10) per stratum of a probe {stratum: (I_d, I_g)} (a task, or denoising
    at one σ) and each task's mean over its strata; `restore(I_d)` is the network. Under an initialised
    process group each rank restores every world-th patch and the sums are added over the ranks.

    # UNSPECIFIED: the paper measures "the average PSNR" of the network at each epoch start without
    # saying on what. One number over all tasks would decide hard / very hard by the task alone (task
    # PSNRs differ by 10-15 dB): so we measure each task (and σ) on the same number of fixed
    # training patches (train.py: --probe-size per stratum, never test images) and compare each
    # negative with the value of its own stratum.
    """
    rank, world = (dist.get_rank(), world_size()) if world_size() > 1 else (0, 1)
    totals = torch.zeros(len(probe), 2, device=device)                             # (strata, [Σ PSNR, count])
    for row, (degraded, target) in enumerate(probe.values()):
        for d, t in zip(degraded[rank::world].split(8), target[rank::world].split(8)):
            psnr = batch_psnr(restore(d.to(device)), t.to(device))
            totals[row] += torch.stack([psnr.sum(), torch.tensor(float(len(t)), device=device)])
    if world > 1:
        dist.all_reduce(totals)
    measured, result = {name: total / count for name, (total, count) in zip(probe, totals.tolist())}, {}
    for name, value in measured.items():             # "denoise", the mean over σ, before "denoise_sigma15"
        task = name.split("_sigma")[0]
        if task != name and task not in result:
            by_sigma = [v for n, v in measured.items() if n.startswith(f"{task}_sigma")]
            result[task] = sum(by_sigma) / len(by_sigma)
        result[name] = value
    return result


def feature_distance(a, b):
    """M_i(a, b) = mean |V_i(a) − V_i(b)| over (C, H, W), one value per image; leading dims broadcast."""
    return (a - b).abs().mean(dim=(-3, -2, -1))


def difficulty_adaptive_perceptual_loss(vgg, restored, target, degraded, negatives, negative_mask, avg_psnr,
                                        lam=2.0, xi=XI, gamma=0.25, return_very_hard=False):
    """L_dpl, Eq. (11); with `return_very_hard`, also the (B, Q) mask of present negatives weighted 1 − γ.

    vgg: a `VGGFeatures` (anything that maps (n, 3, P, P) to a list of feature maps, one per ξ_i).
    restored I_r (B, 3, P, P) is the anchor, target I_g the positive, degraded I_d the easy negative
    (weight λ), negatives N_q (B, Q, 3, P, P) the non-easy ones (Q may be 0), each weighted by
    O_k(N_q) of Eq. (10) with PSNR(N_q) measured against the target crop, and by 0 where
    negative_mask (B, Q) is False (no such negative for that image). avg_psnr: see negative_weights;
    train.py passes one value per image, the avgPSNR of the image's own task (and σ), shape (B, 1).
    """
    B, Q = negatives.shape[:2]
    with torch.no_grad():                            # I_g, I_d and all N_q: one batched call, no graph
        references = torch.cat((target, degraded, negatives.flatten(0, 1)))           # (B·(2+Q), 3, P, P)
        reference_features = vgg(references)
        negative_psnr = batch_psnr(negatives, target[:, None])                        # PSNR(N_q) (B, Q)
        weights = negative_weights(avg_psnr, negative_psnr, gamma)                     # O_k(N_q) (B, Q)
        very_hard = negative_mask & (weights < 1)                                      # weighted 1 − γ
        weights = weights * negative_mask                                              # 0 if missing
    anchor_features = vgg(restored)                  # V_i(I_r) keeps its graph
    # UNSPECIFIED: Eq. (11) does not say whether the ratio is formed per image or over the batch. We
    # form it per image (each image has its own negatives, masks and O_k) and average the ratios
    # over the batch, as the authors' repository (commit c7f79d4) does. M_i is a mean rather than a sum of
    # |V_i(·) − V_i(I_r)|; every M_i of one ratio counts the same elements, so the ratio is the same.
    loss = 0
    for xi_i, anchor, reference in zip(xi, anchor_features, reference_features):
        positive, easy, hard = reference.split((B, B, B * Q))
        hard = hard.view(B, Q, *hard.shape[1:])                                      # (B, Q, C_i, H_i, W_i)
        numerator = feature_distance(positive, anchor)                               # M_i(I_g, I_r) (B,)
        denominator = (lam * feature_distance(easy, anchor)                         # λ·M_i(I_d, I_r)
                       + (weights * feature_distance(hard, anchor[:, None])).sum(dim=1))  # Σ_q O_k·M_i(N_q, I_r)
        loss = loss + xi_i * (numerator / denominator.clamp_min(1e-12)).mean()     # Eq. (11)
    return (loss, very_hard) if return_very_hard else loss


# --- L_total (Sec. III-E, Eq. 13; Sec. IV-A.4; Table XI) -----------------------------------------------------------

# Table XI: which of L_clip, L_dpl, L_cl join L_rec in each row ((a) = L_rec only, (h) = all).
TABLE_XI = {
    row: dict(use_clip=clip, use_dpl=dpl, use_cl=cl)
    for row, (clip, dpl, cl) in {
        "a": (False, False, False), "b": (True, False, False), "c": (False, True, False),
        "d": (False, False, True), "e": (False, True, True), "f": (True, True, False),
        "g": (True, False, True), "h": (True, True, True)}.items()
}


class PerceiveIRLoss:
    """L_total = L_rec + λ1·L_cl + λ2·L_clip + λ3·L_dpl (Eq. 13), λ = (0.1, 0.05, 0.1) (Sec. IV-A.4).

    Holds the frozen VGG features and the quality perceiver (built outside, kept outside DDP) and no
    trainable parameters. A switched-off term costs nothing (no VGG or CLIP forward) and reports 0.
    `criterion(restored, batch, code, code_positive, avg_psnr) -> (total, parts)` with `batch` the
    training batch dict of data.TrainDataset and `parts` detached tensors: the loss terms (0-d) and,
    per image (B,), how many non-easy negatives it has and how many of them weigh 1 − γ (Eq. 10).
    """

    def __init__(self, vgg=None, perceiver=None, lambda_cl=0.1, lambda_clip=0.05, lambda_dpl=0.1,
                 use_cl=True, use_clip=True, use_dpl=True, tau=0.1, lam=2.0, xi=XI, gamma=0.25):
        if use_clip and perceiver is None:
            raise ValueError("L_clip is on but no quality perceiver was given: build it from the stage-1 "
                             "prompts (clip_prompts) or switch L_clip off (Table XI)")
        if use_dpl and vgg is None:
            raise ValueError("L_dpl is on but no VGG was given: build_vgg(--vgg-weights ...) or switch "
                             "L_dpl off (Table XI)")
        self.vgg, self.perceiver = vgg, perceiver
        self.lambda_cl, self.lambda_clip, self.lambda_dpl = lambda_cl, lambda_clip, lambda_dpl   # λ1, λ2, λ3
        self.use_cl, self.use_clip, self.use_dpl = use_cl, use_clip, use_dpl
        self.tau, self.lam, self.xi, self.gamma = tau, lam, tuple(xi), gamma

    def __call__(self, restored, batch, code=None, code_positive=None, avg_psnr=None):
        # Every term in float32, whatever autocast did upstream (--amp bf16): bf16 keeps 8 bits of mantissa,
        # so a loss near 1.4 would move in steps of 1/64 and the small differences the terms measure vanish.
        device = restored.device.type             # (devices without autocast, e.g. "meta", have nothing to switch off)
        with torch.autocast(device, enabled=False) if torch.amp.is_autocast_available(device) else nullcontext():
            restored = restored.float()
            code, code_positive = (None if z is None else z.float() for z in (code, code_positive))
            return self.loss_terms(restored, batch, code, code_positive, avg_psnr)

    def loss_terms(self, restored, batch, code, code_positive, avg_psnr):
        """L_total of Eq. (13) and its parts, in float32 (called by __call__)."""
        zero = restored.new_zeros(())
        loss_rec = reconstruction_loss(restored, batch["target"])
        loss_cl, cl_valid_fraction = zero, zero
        if self.use_cl:
            if code is None or code_positive is None:
                raise ValueError("L_cl is on but no degradation codes Z, Z⁺ were given: switch L_cl off (Table XI)")
            loss_cl, cl_valid_fraction = contrastive_loss(code, code_positive, batch["task"], self.tau)
        loss_clip = clip_aware_loss(self.perceiver, restored) if self.use_clip else zero
        loss_dpl = zero
        if self.use_dpl:
            loss_dpl, very_hard = difficulty_adaptive_perceptual_loss(
                self.vgg, restored, batch["target"], batch["degraded"], batch["negatives"],
                batch["negative_mask"], avg_psnr, self.lam, self.xi, self.gamma, return_very_hard=True)
        total = (loss_rec + self.lambda_cl * loss_cl + self.lambda_clip * loss_clip    # Eq. (13)
                 + self.lambda_dpl * loss_dpl)
        parts = dict(loss_rec=loss_rec, loss_cl=loss_cl, loss_clip=loss_clip, loss_dpl=loss_dpl,
                     cl_valid_fraction=cl_valid_fraction)
        if self.use_dpl:                                # what Eq. (10) decided, for the training log
            parts.update(non_easy_count=batch["negative_mask"].sum(1).float(), very_hard_count=very_hard.sum(1).float())
        return total, {name: value.detach() for name, value in parts.items()}


if __name__ == "__main__":
    torch.manual_seed(0)
    B, Q, P = 6, 1, 128                              # the paper's batch of 6 and 128×128 crops
    vgg = build_vgg(variant="tiny")
    shapes = [tuple(f.shape[1:]) for f in vgg(torch.rand(1, 3, P, P))]
    print(f"{vgg.description}\n  taps {dict(zip(TAP_NAMES, shapes))}")
    target = torch.rand(B, 3, P, P)
    batch = dict(target=target, degraded=(target + 0.2 * torch.randn_like(target)).clamp(0, 1),
                 negatives=(target[:, None] + 0.05 * torch.randn(B, Q, 3, P, P)).clamp(0, 1),
                 negative_mask=torch.ones(B, Q, dtype=torch.bool), task=torch.arange(B) % 3)
    restored = (batch["degraded"] + 0.1 * (target - batch["degraded"])).requires_grad_()
    code, code_positive = torch.randn(B, 128, requires_grad=True), torch.randn(B, 128, requires_grad=True)
    criterion = PerceiveIRLoss(vgg, use_clip=False)
    total, parts = criterion(restored, batch, code, code_positive, avg_psnr=None)
    total.backward()
    print(f"L_total {total.item():.4f}  " + "  ".join(f"{k} {v.item():.4f}" for k, v in parts.items() if v.dim() == 0))
    print(f"very hard negatives (avgPSNR not yet measured: all of them): {parts['very_hard_count'].tolist()}")
