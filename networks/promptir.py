"""PromptIR (Potlapalli et al., NeurIPS 2023), a restorer behind stage 1's medium-quality images (Table XIV).

Sec. IV-F.5 makes stage 1a's medium-quality images I_m with PromptIR instead of Restormer (Table XIV: Perceive-IR
then reaches 37.57 dB on Rain100L, not 37.76 dB): PromptIR restores so well that "mediocre" drifts towards
"excellent". PromptIR is Restormer's U-Net (Eq. 4) with a prompt block after the latent and after decoder levels
3 and 2. A prompt block holds N learned prompt components and mixes them with weights predicted from the features,
so the prompt depends on the input (the degradation is never given):
    w = softmax(Linear(GAP(F)))                      (B, N): how much of each component this image gets   (PGM)
    P = Conv3×3(Resize_{h×w}(Σ_i w_i · P_i))          P_i ∈ R^{C_p × S × S}, learned                       (PGM)
    F ← Conv1×1(TB(Concat(F, P)))                    a transformer block reads features and prompt        (PIM)
Its state-dict keys are the official ones (va1shn9v/PromptIR, `net/model.py`), so released checkpoints load by key.

What is in here:
- `PromptGenBlock`: the Prompt Generation Module (PGM) above.
- `PromptIR`: the network, its `CONFIGS` ("paper": the released model, "tiny" for tests) and `restore(image)`
  for any image size; Restormer's blocks come from `backbone.py`.
- `load_official(model, path)`: the released PyTorch Lightning `.ckpt` (or a plain state_dict).
- `medium_step`: PromptIR's training loss (L1), with the signature of train.py's step functions.
"""

import pickle
import re
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from backbone import (Downsample, OverlapPatchEmbed, TransformerBlock, Upsample, check_image,
                      count_parameters, pad_to_multiple)


class PromptGenBlock(nn.Module):
    """PGM, PromptIR's Prompt Generation Module: an input-conditioned prompt from `prompt_len` learned components.

    The mixing weights come from a Linear layer on the globally pooled features, so two images get two different
    mixtures of the same components. The components live at a fixed S × S and are resized to the features' size.
    Key names (`prompt_param`, `linear_layer`, `conv3x3`) follow the official code so its checkpoints load.
    """

    def __init__(self, prompt_dim=128, prompt_len=5, prompt_size=96, lin_dim=192):
        super().__init__()
        self.prompt_param = nn.Parameter(torch.rand(1, prompt_len, prompt_dim, prompt_size, prompt_size))
        self.linear_layer = nn.Linear(lin_dim, prompt_len)
        self.conv3x3 = nn.Conv2d(prompt_dim, prompt_dim, kernel_size=3, padding=1, bias=False)

    def mixture(self, x):
        """w = softmax(Linear(GAP(F))): (B, C, H, W) features → (B, N) weights of the N components, summing to 1."""
        return F.softmax(self.linear_layer(x.mean(dim=(-2, -1))), dim=1)

    def forward(self, x):
        weights = self.mixture(x)                                                   # (B, N)
        prompt = torch.einsum("bn,nchw->bchw", weights, self.prompt_param[0])       # (B, C_p, S, S): Σ_i w_i · P_i
        prompt = F.interpolate(prompt, x.shape[-2:], mode="bilinear")               # (B, C_p, H, W)
        return self.conv3x3(prompt)


class PromptIR(nn.Module):
    """PromptIR: Restormer's U-Net with a prompt block (PGM + PIM) on the way into each of its three decoder levels.

    Channels at dim C = 48 (the only width whose prompt blocks fit, see `__init__`):
      encoder   C, 2C, 4C at H, H/2, H/4; latent 8C at H/8            (as in Restormer)
      prompt3   latent 8C + P 320 → TB (704) → 1×1 → 4C; up4_3 → 2C, concat skip 4C → 1×1 → 4C → decoder_level3
      prompt2   4C + P 128 → TB (320) → 1×1 → 4C; up3_2 → 2C, concat skip 2C → 1×1 → 2C → decoder_level2
      prompt1   2C + P 64  → TB (160) → 1×1 → 2C; up2_1 → C, concat skip C → 2C → decoder_level1, refinement
    Unlike Restormer, the upsampling convs see the prompt path's reduced channels (up4_3 takes 4C, not 8C).
    The official names call the prompt path "noise": `noise_level{l}` is PIM's TB, `reduce_noise_level{l}` its 1×1.
    """

    CONFIGS = {
        # The released all-in-one model: `PromptIR(decoder=True)` with the official defaults spelled out.
        "paper": dict(inp_channels=3, out_channels=3, dim=48, num_blocks=[4, 6, 6, 8], num_refinement_blocks=4,
                      heads=[1, 2, 4, 8], ffn_expansion_factor=2.66, bias=False, LayerNorm_type="WithBias",
                      decoder=True),
        # The reference vector's config: one block per level. Still 16M parameters: the prompt blocks fix the width.
        "tiny": dict(inp_channels=3, out_channels=3, dim=48, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1,
                     heads=[1, 2, 4, 8], ffn_expansion_factor=2.66, bias=False, LayerNorm_type="WithBias",
                     decoder=True),
    }

    @staticmethod
    def size_multiple(config):
        """Every side must be a multiple of 8: three 2× downsamplings."""
        return 8

    # Keys of the official code: keep them (and their order), released checkpoints load by these names.
    def __init__(self, inp_channels=3, out_channels=3, dim=48, num_blocks=(4, 6, 6, 8), num_refinement_blocks=4,
                 heads=(1, 2, 4, 8), ffn_expansion_factor=2.66, bias=False, LayerNorm_type="WithBias",
                 # DEVIATION: the official default is decoder=False, with which the official forward cannot run.
                 decoder=True, guided_attention=None):
        super().__init__()
        if guided_attention is not None:
            raise ValueError("PromptIR has no guided blocks (no ETB hook): train it with --no-guidance")
        if not decoder:     # without the prompt path, up4_3 (built for 4C channels) would get the 8C latent
            raise ValueError("PromptIR(decoder=False) cannot run in the official code either (up4_3 expects the "
                             "prompt path's 4·dim channels); every released model uses decoder=True")
        if dim != 48:       # the prompt blocks' widths are written for 48: lin_dim 96/192/384, 4·dim + 512 = 704
            raise ValueError(f"PromptIR's prompt blocks are built for dim=48 (Linear inputs 96/192/384); got dim={dim}")
        if len(num_blocks) != 4 or len(heads) != 4:
            raise ValueError(f"num_blocks and heads need 4 entries (one per level); got {num_blocks}, {heads}")
        self.inp_channels = inp_channels

        def stack(n, channels, num_heads):
            return nn.Sequential(*[TransformerBlock(channels, num_heads, ffn_expansion_factor, bias, LayerNorm_type)
                                   for _ in range(n)])

        self.patch_embed = OverlapPatchEmbed(inp_channels, dim)      # the official code passes no `bias` here
        # PGM of each decoder level: 5 components each; C_p = 64, 128, 320 at S = 64, 32, 16.
        self.prompt1 = PromptGenBlock(prompt_dim=64, prompt_len=5, prompt_size=64, lin_dim=dim * 2)
        self.prompt2 = PromptGenBlock(prompt_dim=128, prompt_len=5, prompt_size=32, lin_dim=dim * 4)
        self.prompt3 = PromptGenBlock(prompt_dim=320, prompt_len=5, prompt_size=16, lin_dim=dim * 8)
        # Six 1×1 convs the official forward never calls (chnl_reduce*, reduce_noise_channel_*): kept so that
        # checkpoints load and the parameter count is the released one; they never receive a gradient.
        self.chnl_reduce1 = nn.Conv2d(64, 64, kernel_size=1, bias=bias)
        self.chnl_reduce2 = nn.Conv2d(128, 128, kernel_size=1, bias=bias)
        self.chnl_reduce3 = nn.Conv2d(320, 256, kernel_size=1, bias=bias)
        self.reduce_noise_channel_1 = nn.Conv2d(dim + 64, dim, kernel_size=1, bias=bias)
        # Encoder: as Restormer's (Downsample/Upsample are Restormer's, always without bias in the official code).
        self.encoder_level1 = stack(num_blocks[0], dim, heads[0])
        self.down1_2 = Downsample(dim)
        self.reduce_noise_channel_2 = nn.Conv2d(dim * 2 + 128, dim * 2, kernel_size=1, bias=bias)
        self.encoder_level2 = stack(num_blocks[1], dim * 2, heads[1])
        self.down2_3 = Downsample(dim * 2)
        self.reduce_noise_channel_3 = nn.Conv2d(dim * 4 + 256, dim * 4, kernel_size=1, bias=bias)
        self.encoder_level3 = stack(num_blocks[2], dim * 4, heads[2])
        self.down3_4 = Downsample(dim * 4)
        self.latent = stack(num_blocks[3], dim * 8, heads[3])
        # Decoder level 3, entered through prompt 3's PIM (TB on 8C + 320 = 4C + 512 channels, then 1×1 to 4C).
        self.up4_3 = Upsample(dim * 4)
        self.reduce_chan_level3 = nn.Conv2d(dim * 2 + dim * 4, dim * 4, kernel_size=1, bias=bias)
        self.noise_level3 = TransformerBlock(dim * 4 + 512, heads[2], ffn_expansion_factor, bias, LayerNorm_type)
        self.reduce_noise_level3 = nn.Conv2d(dim * 4 + 512, dim * 4, kernel_size=1, bias=bias)
        self.decoder_level3 = stack(num_blocks[2], dim * 4, heads[2])
        # Decoder level 2, after prompt 2's PIM (4C + 128 = 2C + 224 channels, back to 4C). All PIMs use heads[2].
        self.up3_2 = Upsample(dim * 4)
        self.reduce_chan_level2 = nn.Conv2d(dim * 4, dim * 2, kernel_size=1, bias=bias)
        self.noise_level2 = TransformerBlock(dim * 2 + 224, heads[2], ffn_expansion_factor, bias, LayerNorm_type)
        self.reduce_noise_level2 = nn.Conv2d(dim * 2 + 224, dim * 4, kernel_size=1, bias=bias)
        self.decoder_level2 = stack(num_blocks[1], dim * 2, heads[1])
        # Decoder level 1, after prompt 1's PIM (2C + 64 channels, back to 2C); no channel reduction after the concat.
        self.up2_1 = Upsample(dim * 2)
        self.noise_level1 = TransformerBlock(dim * 2 + 64, heads[2], ffn_expansion_factor, bias, LayerNorm_type)
        self.reduce_noise_level1 = nn.Conv2d(dim * 2 + 64, dim * 2, kernel_size=1, bias=bias)
        self.decoder_level1 = stack(num_blocks[0], dim * 2, heads[0])
        self.refinement = stack(num_refinement_blocks, dim * 2, heads[0])
        self.output = nn.Conv2d(dim * 2, out_channels, kernel_size=3, padding=1, bias=bias)

        # The official train.py needs DDP's find_unused_parameters for them; no gradient ever reaches them, so AdamW
        # never moves them there either. Frozen, they change nothing and DDP runs without that flag.
        unused = (self.chnl_reduce1, self.chnl_reduce2, self.chnl_reduce3,
                  self.reduce_noise_channel_1, self.reduce_noise_channel_2, self.reduce_noise_channel_3)
        for module in unused:
            module.requires_grad_(False)  # DEVIATION: frozen here, trainable (but never given a gradient) officially

    @staticmethod
    def prompt_interaction(features, prompt_block, transformer_block, reduce):
        """One prompt block: PGM makes P from F, PIM merges them: F ← Conv1×1(TB(Concat(F, P)))."""
        x = torch.cat([features, prompt_block(features)], dim=1)                    # (B, C + C_p, h, w)
        return reduce(transformer_block(x))

    def forward(self, image, noise_emb=None):
        """The official forward: (B, 3, H, W) with H, W multiples of 8 → restored (B, 3, H, W).

        `noise_emb` is accepted and ignored, as in the official code. Any other size goes through `restore`.
        """
        check_image(image, self.inp_channels, "PromptIR")
        if image.shape[-2] % 8 or image.shape[-1] % 8:
            raise ValueError(f"PromptIR's forward needs H and W multiples of 8 (three 2× downsamplings); got "
                             f"{tuple(image.shape[-2:])}. PromptIR.restore(image) pads any size.")
        enc1 = self.encoder_level1(self.patch_embed(image))                         # (B, C, H, W)
        enc2 = self.encoder_level2(self.down1_2(enc1))                              # (B, 2C, H/2, W/2)
        enc3 = self.encoder_level3(self.down2_3(enc2))                              # (B, 4C, H/4, W/4)
        x = self.latent(self.down3_4(enc3))                                         # (B, 8C, H/8, W/8)
        x = self.prompt_interaction(x, self.prompt3, self.noise_level3, self.reduce_noise_level3)     # (.., 4C, ..)

        x = torch.cat([self.up4_3(x), enc3], dim=1)                                 # (B, 2C + 4C, H/4, W/4)
        x = self.decoder_level3(self.reduce_chan_level3(x))                         # (B, 4C, H/4, W/4)
        x = self.prompt_interaction(x, self.prompt2, self.noise_level2, self.reduce_noise_level2)     # (.., 4C, ..)

        x = torch.cat([self.up3_2(x), enc2], dim=1)                                 # (B, 2C + 2C, H/2, W/2)
        x = self.decoder_level2(self.reduce_chan_level2(x))                         # (B, 2C, H/2, W/2)
        x = self.prompt_interaction(x, self.prompt1, self.noise_level1, self.reduce_noise_level1)     # (.., 2C, ..)

        x = torch.cat([self.up2_1(x), enc1], dim=1)                                 # (B, C + C, H, W)
        x = self.refinement(self.decoder_level1(x))                                 # (B, 2C, H, W)
        return self.output(x) + image                                               # global residual

    def restore(self, image):
        """Restore any (B, 3, H, W): reflect-pad the bottom/right to a multiple of 8, run, crop back."""
        # DEVIATION: official test.py crops each image to a multiple of 16; we reflect-pad as its demo.py --tile does
        H, W = image.shape[-2:]
        return self(pad_to_multiple(image, 8))[..., :H, :W]


# --- Released checkpoints and the training loss ----------------------------------------------------------------------

def read_checkpoint(path, trusted):
    """torch.load with weights_only=True; full unpickling only for a file the caller trusts. One-line errors."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such PromptIR checkpoint")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        if found is None:
            raise ValueError(f"{path} is not a readable PyTorch checkpoint") from None
        if not trusted:
            raise ValueError(f"{path} holds Python objects besides tensors ({found.group(1)}, e.g. Lightning's "
                             f"hyper-parameters); unpickling them can run code: if you trust the file, call "
                             f"load_official(model, path, trusted=True)") from None
    except Exception as error:
        raise ValueError(f"{path} is not a readable PyTorch checkpoint ({type(error).__name__}: "
                         f"{str(error).splitlines()[0][:120]})") from None
    try:    # trusted=True: the caller vouches for the file, so full unpickling (which may run its code) is accepted
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:          # e.g. the classes it pickled (Lightning's) are not installed here
        raise ValueError(f"{path} could not be unpickled ({type(error).__name__}: {str(error)[:120]})") from None


def load_official(model, path, trusted=False):
    """Load a released PromptIR checkpoint into `model`; return the model.

    The released weights are PyTorch Lightning `.ckpt` files: the network sits in `ckpt["state_dict"]` under `net.`
    (the LightningModule holds it as `self.net`), next to Lightning's bookkeeping (epoch, global_step, optimizer
    states, callbacks). Non-`net.` keys of that state_dict (a loss module's) are dropped. A plain state_dict loads
    too. Lightning may pickle Python objects (hyper-parameters, callbacks) that `weights_only=True` refuses; reading
    those runs code from the file, so we do it only when the caller says the file is trusted.
    """
    checkpoint = read_checkpoint(Path(path), trusted)
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a Lightning checkpoint with a 'state_dict' or a plain state_dict")
    for prefix in ("net.", "module."):                       # Lightning's self.net, then a DDP wrapper's
        if any(key.startswith(prefix) for key in state):
            state = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}

    expected = model.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    mismatched = [key for key in expected if key in state and state[key].shape != expected[key].shape]
    if missing or unexpected or mismatched:
        differences = [f"{len(keys)} {what} keys ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
                       for what, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
        if mismatched:
            key = mismatched[0]
            differences.append(f"{key}: checkpoint {tuple(state[key].shape)}, model {tuple(expected[key].shape)}")
        raise ValueError(f"{path} does not fit this PromptIR config: {'; '.join(differences)}")
    model.load_state_dict(state, strict=True)
    return model


def medium_step(net, batch, state):
    """PromptIR's training loss (official train.py: nn.L1Loss): L_rec = mean |net(I_d) − I_g|.

    The signature of train.py's step functions; `state` (the step, avgPSNR) is not needed by a plain L1 loss.
    """
    loss_rec = F.l1_loss(net(batch["degraded"]), batch["target"])
    return loss_rec, {"loss_rec": loss_rec.detach()}


if __name__ == "__main__":
    for name, config in PromptIR.CONFIGS.items():
        model = PromptIR(**config)
        print(f"PromptIR {name:5s} {sum(p.numel() for p in model.parameters()):>12,d} parameters "
              f"({count_parameters(model):,d} trainable, {count_parameters(model, trainable=False):,d} in the six "
              f"unused 1×1 convs), pads to a multiple of {PromptIR.size_multiple(config)}")
    model = PromptIR(**PromptIR.CONFIGS["tiny"]).eval()
    with torch.no_grad():
        out = model.restore(torch.rand(1, 3, 37, 53))
    print(f"tiny PromptIR: input (1, 3, 37, 53) -> output {tuple(out.shape)}")
