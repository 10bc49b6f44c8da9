"""AirNet (Li et al., CVPR 2022, "All-in-one image restoration for unknown corruption"), one of the stage-1
restorers of Table XIV (Sec. IV-F.5): the network that makes the "medium"-quality images I_m for prompt learning.

AirNet restores without being told which degradation it sees. A contrastive encoder (CBDE) learns a representation
in which two crops of one degraded image lie close and crops of other images lie far (MoCo: a momentum-updated key
encoder and a queue of earlier keys as negatives). Its full-resolution feature map `inter` then steers every block
of the restorer (DGRN) twice: as the input of a deformable convolution's offsets and masks, and as the source of a
spatial feature transform x·γ + β.

What is in here:
- `ResBlock`, `ResEncoder`, `MoCo`, `CBDE`: the contrastive-based degradation encoder.
- `DCN`, `SFT`, `DGM`, `DGB`, `DGG`, `DGRN`: the degradation-guided restoration network.
- `AirNet`: both, key-for-key compatible with the released checkpoints (All.pth, Denoise.pth, ...), its
  `CONFIGS` and `restore(image)`; `load_official(model, path)`.
- `medium_step(net, batch, state, warmup_steps)`: the official two-phase loss (contrastive warm-up, then
  L1 + 0.1 · contrastive).
The module and attribute names (R, E, E.E.encoder_q, dgm1, conv_offset_mask, ...) are the official ones: released
checkpoints load by these keys.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops import deform_conv2d

from backbone import check_image, count_parameters, pad_to_multiple

QUEUE_PER_IMAGE = 256            # the MoCo queue holds batch_size × 256 keys (official CBDE: K = opt.batch_size · dim)


# --- CBDE: contrastive-based degradation encoder ------------------------------------------------------------------

class ResBlock(nn.Module):
    """conv3×3-BN-LeakyReLU-conv3×3-BN plus a 1×1 conv-BN shortcut, then LeakyReLU (slope 0.1 everywhere)."""

    def __init__(self, in_channels, out_channels, stride=1):
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.LeakyReLU(0.1),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels))
        self.shortcut = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
            nn.BatchNorm2d(out_channels))

    def forward(self, x):
        return F.leaky_relu(self.backbone(x) + self.shortcut(x), 0.1)


class ResEncoder(nn.Module):
    """One of MoCo's two encoders: image (B, 3, H, W) → (fea (B, 256), projection (B, 256), inter (B, 64, H, W))."""

    def __init__(self):
        super().__init__()
        self.E_pre = ResBlock(3, 64)                      # stride 1: `inter` is the restorer's full-size guide
        self.E = nn.Sequential(ResBlock(64, 128, stride=2), ResBlock(128, 256, stride=2), nn.AdaptiveAvgPool2d(1))
        self.mlp = nn.Sequential(nn.Linear(256, 256), nn.LeakyReLU(0.1), nn.Linear(256, 256))

    def forward(self, x):
        inter = self.E_pre(x)                             # (B, 64, H, W)
        fea = self.E(inter).flatten(1)                    # (B, 256, 1, 1) → (B, 256): pooled over H/4 × W/4
        return fea, self.mlp(fea), inter                  # the contrastive loss sees the MLP's projection


class MoCo(nn.Module):
    """Momentum contrast (He et al. 2020) as AirNet uses it: one GPU's keys, no shuffled BatchNorm.

    Queries q come from `encoder_q` (trained by gradient), keys k from `encoder_k`, a moving average of it
    (θ_k ← m·θ_k + (1 − m)·θ_q, m = 0.999, no gradient). Of each image two crops are taken: the other crop of
    the same image is the positive key, the K queued keys of earlier batches are the negatives:
        logits = [q·k⁺, q·k⁻_1, ..., q·k⁻_K] / T  (T = 0.07),  target class 0.
    """

    def __init__(self, dim=256, K=3 * 256, m=0.999, T=0.07):
        super().__init__()
        self.K, self.m, self.T = K, m, T
        self.encoder_q = ResEncoder()
        self.encoder_k = ResEncoder()                     # built like the official one, then a copy of encoder_q
        for param_q, param_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            param_k.data.copy_(param_q.data)
            param_k.requires_grad = False
        self.register_buffer("queue", F.normalize(torch.randn(dim, K), dim=0))   # (256, K): unit keys, as columns
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    @torch.no_grad()
    def _momentum_update_key_encoder(self):
        for param_q, param_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            param_k.mul_(self.m).add_(param_q.detach(), alpha=1.0 - self.m)

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys):
        batch_size = keys.shape[0]
        if batch_size > self.K:
            raise ValueError(f"AirNet's MoCo queue holds {self.K} keys, fewer than a batch of {batch_size}: "
                             f"build AirNet(batch_size={batch_size}) or use a smaller per-rank batch")
        # DEVIATION: the official code asserts K % batch == 0; we wrap around the ring instead, so a released
        # model's queue (5 × 256 keys) trains with any batch (stage 1a's is 6 or 8); same writes when it divides.
        slots = (int(self.queue_ptr) + torch.arange(batch_size, device=keys.device)) % self.K
        self.queue[:, slots] = keys.T                     # (256, B): the oldest keys are replaced
        self.queue_ptr[0] = (int(self.queue_ptr) + batch_size) % self.K

    def forward(self, im_q, im_k):
        if not self.training:
            embedding, _, inter = self.encoder_q(im_q)
            return embedding, inter
        embedding, q, inter = self.encoder_q(im_q)
        q = F.normalize(q, dim=1)                         # (B, 256) on the unit sphere
        with torch.no_grad():                             # no gradient to the keys
            self._momentum_update_key_encoder()
            k = F.normalize(self.encoder_k(im_k)[1], dim=1)                      # (B, 256)
        positive = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)                  # (B, 1): q·k⁺
        # A copy of the queue: the enqueue below writes into it in place, and autograd keeps it for q's gradient.
        negative = torch.einsum("nc,ck->nk", q, self.queue.clone().detach())     # (B, K): q·k⁻
        logits = torch.cat([positive, negative], dim=1) / self.T                # (B, 1 + K)
        labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)   # the positive is class 0
        self._dequeue_and_enqueue(k)
        return embedding, logits, labels, inter


class CBDE(nn.Module):
    """Contrastive-Based Degradation Encoder: MoCo over ResEncoders, a queue of batch_size × 256 keys."""

    def __init__(self, batch_size):
        super().__init__()
        self.E = MoCo(dim=256, K=batch_size * QUEUE_PER_IMAGE)

    def forward(self, x_query, x_key):
        """Training: (fea, logits, labels, inter); eval: (fea, inter) of x_query alone."""
        return self.E(x_query, x_key)


# --- DGRN: degradation-guided restoration network ----------------------------------------------------------------

def default_conv(in_channels, out_channels, kernel_size):
    return nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)


class DCN(nn.Module):
    """Modulated deformable convolution (DCNv2) whose offsets and masks are predicted from [x, inter].

    Each of the k² taps of the 3×3 kernel samples x at its grid position plus a learned (Δy, Δx) and is
    weighted by a mask in (0, 1); both are read off the feature and the degradation map together, so the
    sampling pattern follows the degradation. No bias (the official DGM builds it with bias=False).
    """

    def __init__(self, channels_in, channels_out, kernel_size, padding):
        super().__init__()
        self.padding = padding
        self.weight = nn.Parameter(torch.empty(channels_out, channels_in, kernel_size, kernel_size))
        self.conv_offset_mask = nn.Conv2d(2 * channels_in, 3 * kernel_size * kernel_size, kernel_size,
                                          padding=padding)
        # Official initialisation: offsets 0 and masks sigmoid(0) = ½, so training starts from a plain
        # convolution at half strength; the weight is U(±1/√(C·k²)).
        nn.init.zeros_(self.conv_offset_mask.weight)
        nn.init.zeros_(self.conv_offset_mask.bias)
        bound = 1.0 / math.sqrt(channels_in * kernel_size * kernel_size)
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, x, inter):
        out = self.conv_offset_mask(torch.cat([x, inter], dim=1))     # (B, 2C, H, W) → (B, 3k², H, W)
        o1, o2, mask = torch.chunk(out, 3, dim=1)                       # (B, k², H, W) each
        # (B, 2k², H, W): channels 2i, 2i+1 are tap i's (Δy, Δx), the layout of mmcv's modulated_deform_conv2d
        # and of torchvision's deform_conv2d; o1 and o2 are not "all Δy" and "all Δx", just the first 2k² channels.
        offset = torch.cat([o1, o2], dim=1)
        # DEVIATION: the official code calls mmcv's modulated_deform_conv2d; torchvision's op is the same DCNv2.
        return deform_conv2d(x, offset, self.weight, padding=(self.padding, self.padding), mask=torch.sigmoid(mask))


class SFT(nn.Module):
    """Spatial feature transform: x·γ + β, with γ and β (B, C, H, W) from `inter` by 1×1 conv-LReLU-1×1 conv."""

    def __init__(self, channels_in, channels_out):
        super().__init__()

        def branch():
            return nn.Sequential(nn.Conv2d(channels_in, channels_out, 1, bias=False), nn.LeakyReLU(0.1),
                                 nn.Conv2d(channels_out, channels_out, 1, bias=False))
        self.conv_gamma = branch()
        self.conv_beta = branch()

    def forward(self, x, inter):
        return x * self.conv_gamma(inter) + self.conv_beta(inter)


class DGM(nn.Module):
    """Degradation-Guided Module: x + DCN(x | inter) + SFT(x | inter)."""

    def __init__(self, channels_in, channels_out, kernel_size):
        super().__init__()
        self.dcn = DCN(channels_in, channels_out, kernel_size, padding=(kernel_size - 1) // 2)
        self.sft = SFT(channels_in, channels_out)

    def forward(self, x, inter):
        return x + (self.dcn(x, inter) + self.sft(x, inter))


class DGB(nn.Module):
    """Degradation-Guided Block: DGM-LReLU-conv-LReLU-DGM-LReLU-conv, plus the block's input."""

    def __init__(self, n_feat, kernel_size):
        super().__init__()
        self.dgm1 = DGM(n_feat, n_feat, kernel_size)     # registered in the official order (the state_dict's)
        self.dgm2 = DGM(n_feat, n_feat, kernel_size)
        self.conv1 = default_conv(n_feat, n_feat, kernel_size)
        self.conv2 = default_conv(n_feat, n_feat, kernel_size)

    def forward(self, x, inter):
        out = F.leaky_relu(self.dgm1(x, inter), 0.1)
        out = F.leaky_relu(self.conv1(out), 0.1)
        out = F.leaky_relu(self.dgm2(out, inter), 0.1)
        return self.conv2(out) + x


class DGG(nn.Module):
    """Degradation-Guided Group: n_blocks DGBs and a conv, plus the group's input."""

    def __init__(self, n_feat, kernel_size, n_blocks):
        super().__init__()
        self.body = nn.Sequential(*[DGB(n_feat, kernel_size) for _ in range(n_blocks)],
                                  default_conv(n_feat, n_feat, kernel_size))

    def forward(self, x, inter):
        res = x
        for block in self.body[:-1]:                      # every block sees the same degradation map
            res = block(res, inter)
        return self.body[-1](res) + x


class DGRN(nn.Module):
    """Degradation-Guided Restoration Network: head conv, 5 DGGs of 5 DGBs at 64 channels, conv, tail conv.

    All at full resolution (stride 1), and the output is the tail's image itself: no skip from the input.
    """

    def __init__(self, n_groups=5, n_blocks=5, n_feats=64, kernel_size=3):
        super().__init__()
        self.head = nn.Sequential(default_conv(3, n_feats, kernel_size))
        self.body = nn.Sequential(*[DGG(n_feats, kernel_size, n_blocks) for _ in range(n_groups)],
                                  default_conv(n_feats, n_feats, kernel_size))
        self.tail = nn.Sequential(default_conv(n_feats, 3, kernel_size))

    def forward(self, x, inter):
        x = self.head(x)                                  # (B, 64, H, W)
        res = x
        for group in self.body[:-1]:
            res = group(res, inter)
        return self.tail(self.body[-1](res) + x)          # (B, 3, H, W)


# --- AirNet ------------------------------------------------------------------------------------------------------

class AirNet(nn.Module):
    """AirNet = DGRN (`R`) guided by CBDE (`E`): 8,930,313 parameters, 7,610,377 of them trainable.

    The widths are fixed in the official code; the one option is `batch_size`, which sets the MoCo queue
    (batch_size × 256 keys): a buffer, so it changes no parameter count but must match a checkpoint's.
    Build it as `AirNet(batch_size=5)` or, like the official code, `AirNet(opt)` with `opt.batch_size`.
    """

    SKIPS_PARAMETERS = True     # the encoder-only warm-up leaves the restorer unused: DDP must not wait for it

    CONFIGS = {                                           # the released checkpoints, by their test.py batch_size
        "paper": dict(batch_size=5),                      # All.pth: option.py's batch_size = len(de_type) = 5
        "denoise": dict(batch_size=3),                    # Denoise.pth (test.py --mode 0)
        "derain": dict(batch_size=1),                     # Derain.pth (--mode 1)
        "dehaze": dict(batch_size=1),                     # Dehaze.pth (--mode 2)
        "tiny": dict(batch_size=2),                       # the reference vector's: a queue of 512 keys
    }

    @staticmethod
    def size_multiple(config):
        """1: the restorer runs at stride 1 and the encoder ends in global pooling, so any H × W works."""
        # DEVIATION: the official test crops images to a multiple of 16 (crop_img(base=16)); we restore them whole.
        return 1

    def __init__(self, opt=None, batch_size=5, guided_attention=None):
        if guided_attention is not None:
            raise ValueError("AirNet has no guided blocks (no ETB hook): train it with --no-guidance")
        super().__init__()
        if opt is not None:                               # the official AirNet(opt) form
            batch_size = opt.batch_size
        self.R = DGRN()                                   # built first, as the official code does (same RNG use)
        self.E = CBDE(batch_size)

    def forward(self, x_query, x_key, encoder_only=False):
        """Training: (restored, logits, labels); eval: restored (x_key unused: the encoder sees x_query).

        `encoder_only=True` returns CBDE's output alone, the official warm-up's `net.E(x_query, x_key)`, through
        forward so that a DDP-wrapped network can run it.
        """
        if encoder_only:
            return self.E(x_query, x_key)
        if not self.training:
            _, inter = self.E(x_query, x_query)
            return self.R(x_query, inter)
        _, logits, labels, inter = self.E(x_query, x_key)
        return self.R(x_query, inter), logits, labels

    def restore(self, image):
        """(B, 3, H, W) → (B, 3, H, W) by the eval forward; in training mode the forward would update the queue."""
        check_image(image, 3, "AirNet")
        if self.training:
            raise RuntimeError("AirNet.restore runs the eval forward: call model.eval() first (in training mode "
                               "AirNet's forward runs MoCo and writes its queue)")
        H, W = image.shape[-2:]
        padded = pad_to_multiple(image, self.size_multiple(None))
        return self(padded, padded)[..., :H, :W]


def load_official(model, path):
    """Load a released AirNet checkpoint: a plain state_dict (`torch.load(ckpt)`), `module.` (DataParallel) stripped."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such AirNet checkpoint") from None
    except Exception as error:
        raise ValueError(f"{path} is not a readable checkpoint ({type(error).__name__}: {str(error)[:200]})") from error
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"{path}: expected a plain AirNet state_dict of tensors, as the official train.py saves")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise ValueError(f"{path} is not an AirNet checkpoint: {len(missing)} keys missing {missing[:3]}, "
                         f"{len(unexpected)} unexpected {unexpected[:3]}")
    for key, value in state.items():
        if value.shape != expected[key].shape:
            hint = ""
            if key == "E.E.queue" and value.dim() == 2:      # (256, batch_size × 256)
                queue_size = value.shape[1]
                hint = f"; a queue of {queue_size} keys: build AirNet(batch_size={queue_size // QUEUE_PER_IMAGE})"
            raise ValueError(f"{path} does not fit this AirNet: {key}: checkpoint {tuple(value.shape)}, "
                             f"model {tuple(expected[key].shape)}{hint}")
    model.load_state_dict(state, strict=True)
    return model


def medium_step(net, batch, state, warmup_steps):
    """AirNet's official training (train.py) as a stage-1a step; batch "degraded"/"positive" are two crops of the
    same degraded images (query and key; data.TrainDataset's L_cl positive), "target" the clean crop of "degraded".

    While state["step"] < warmup_steps only the encoder learns (official: the first 100 epochs):
        L = L_contrast = CE(logits, labels)      (InfoNCE: the positive key is class 0)
    afterwards the whole network:
        L = ‖I_r − I_gt‖₁ + 0.1 · L_contrast
    MoCo's momentum update and enqueue happen inside the training forward, as in the official code.
    """
    if state["step"] < warmup_steps:
        _, logits, labels, _ = net(batch["degraded"], batch["positive"], encoder_only=True)
        loss_contrast = F.cross_entropy(logits, labels)
        return loss_contrast, {"loss_contrast": loss_contrast.detach()}
    restored, logits, labels = net(batch["degraded"], batch["positive"])
    loss_rec = F.l1_loss(restored, batch["target"])
    loss_contrast = F.cross_entropy(logits, labels)
    return loss_rec + 0.1 * loss_contrast, {"loss_rec": loss_rec.detach(), "loss_contrast": loss_contrast.detach()}


if __name__ == "__main__":
    for name, config in AirNet.CONFIGS.items():
        model = AirNet(**config)
        trainable, frozen = count_parameters(model), count_parameters(model, trainable=False)
        print(f"AirNet {name:7s} {trainable + frozen:>10,d} parameters, {trainable:,d} trainable "
              f"(MoCo key encoder frozen), queue of {model.E.E.K} keys")
    model = AirNet(**AirNet.CONFIGS["tiny"]).eval()
    with torch.no_grad():
        out = model.restore(torch.rand(1, 3, 37, 53))
    print(f"tiny AirNet: input (1, 3, 37, 53) -> output {tuple(out.shape)}")
