"""NAFNet (Chen et al., ECCV 2022), the second backbone of Table XV, with Perceive-IR's guidance hook.

A "Nonlinear Activation Free" U-Net: convolutions, a SimpleGate (x₁ · x₂) and a simplified channel attention.
Its state-dict keys and its zero-padding forward are the official ones (megvii-research/NAFNet), so released
checkpoints load by key. Its decoder stages take Perceive-IR's guided mixer (PGM + PGCA) when built with
`guided_attention=` (the interface is described in `backbone.py`).

What is in here:
- `LayerNorm2d`, `SimpleGate`, `NAFBlock`: NAFNet's block; with a mixer, its token-mixing half becomes an ETB's.
- `NAFNet` and its `CONFIGS` ("paper": the 17.11M width-32 model of Table II; "tiny" for tests).
"""

import torch
import torch.nn as nn

from backbone import check_image, count_parameters, pad_to_multiple, run_level


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


if __name__ == "__main__":
    for name, config in NAFNet.CONFIGS.items():
        print(f"NAFNet {name:5s} {count_parameters(NAFNet(**config)):>12,d} parameters, pads to a multiple of "
              f"{NAFNet.size_multiple(config)}")
    model = NAFNet(**NAFNet.CONFIGS["tiny"]).eval()
    with torch.no_grad():
        out = model(torch.rand(1, 3, 37, 53))
    print(f"tiny NAFNet: input (1, 3, 37, 53) -> output {tuple(out.shape)}")
