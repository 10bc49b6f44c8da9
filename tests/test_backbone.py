"""Claims of Sec. III-C.1 (Eq. 2-4), Sec. IV-A.4 and Table XV about the Restoration Branch."""

import pytest
import torch
import torch.nn as nn

from backbone import MDTA, Restormer, count_parameters, tiled_forward
from networks.nafnet import NAFNet
from guidance import build_backbone


def read_reference_keys(path):
    keys = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            name, shape = line.split()
            keys[name] = tuple(int(s) for s in shape.split("x"))
    return keys


def test_paper_config_has_26126644_parameters_and_the_official_keys(shared_dir):
    model = build_backbone("restormer", "paper")
    reference = read_reference_keys(shared_dir / "reference" / "restormer_paper_state_dict_keys.txt")
    state = model.state_dict()
    assert count_parameters(model) == 26_126_644
    assert set(state) == set(reference)
    assert {k: tuple(v.shape) for k, v in state.items()} == reference


@pytest.mark.parametrize("vector_name", ["restormer_tiny_vector.pt", "restormer_biasfree_vector.pt"])
def test_restormer_reproduces_the_official_output_on_the_reference_vector(shared_dir, vector_name):
    # WithBias (the paper config) and BiasFree (the official denoising checkpoints) LayerNorms.
    vector = torch.load(shared_dir / "reference" / vector_name, weights_only=True)
    model = Restormer(**vector["config"])                     # the official constructor keywords
    model.load_state_dict(vector["state_dict"], strict=True)
    with torch.no_grad():
        output = model.eval()(vector["input"])
    assert (output - vector["input"]).abs().max().item() > 0.05      # the blocks do change the image
    assert (output - vector["output"]).abs().max().item() < 1e-5


def test_nafnet_loads_the_official_keys_and_reproduces_the_official_output_at_both_sizes(shared_dir):
    vector = torch.load(shared_dir / "reference" / "nafnet_tiny_vector.pt", weights_only=True)
    model = NAFNet(**vector["config"]).eval()
    model.load_state_dict(vector["state_dict"], strict=True)
    for image, expected in zip(vector["inputs"], vector["outputs"]):  # 64×80, then 61×77: zero-padded to 64×80
        with torch.no_grad():
            assert (model(image) - expected).abs().max().item() < 1e-5, tuple(image.shape)


def test_the_dual_pixel_variant_has_no_global_residual_and_adds_the_shallow_skip():
    # Official defocus checkpoints: 6 input channels (two views), output = Conv(x + skip_conv(X_s)).
    model = Restormer(inp_channels=6, out_channels=3, dim=8, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1,
                      heads=[1, 2, 2, 4], dual_pixel_task=True).eval()
    image = torch.rand(1, 6, 16, 16)
    with torch.no_grad():
        model.output.weight.zero_()
        assert torch.equal(model(image), torch.zeros(1, 3, 16, 16))   # no "+ I_d" in this variant
        skips = []
        model.skip_conv.register_forward_hook(lambda module, inputs, output: skips.append(output))
        model.output.weight.normal_()
        model(image)
    assert len(skips) == 1 and skips[0].shape == (1, 16, 16, 16)


@pytest.mark.parametrize("name", ["restormer", "nafnet", "xrestormer", "grl"])
@pytest.mark.parametrize("size", [(17, 29), (8, 8), (33, 50), (5, 3)])
def test_output_shape_equals_input_shape_for_any_size(name, size):
    model = build_backbone(name, "tiny").eval()
    image = torch.rand(2, 3, *size)
    with torch.no_grad():
        assert model(image).shape == image.shape


def test_odd_sizes_are_padded_as_the_official_code_does_and_cropped_back():
    image = torch.rand(1, 3, 21, 30)
    for name, padded in (("restormer", torch.nn.functional.pad(image, (0, 2, 0, 3), mode="reflect")),  # 24 × 32
                         ("nafnet", torch.nn.functional.pad(image, (0, 2, 0, 11)))):                 # zeros, 32 × 32
        model = build_backbone(name, "tiny").eval()
        with torch.no_grad():
            assert torch.allclose(model(image), model(padded)[..., :21, :30], atol=1e-6), name


def test_mdta_attention_map_is_channels_by_channels_per_head():
    attention = MDTA(dim=16, num_heads=4)
    out, attn = attention(torch.rand(2, 16, 10, 12), return_attention=True)
    assert out.shape == (2, 16, 10, 12)
    assert attn.shape == (2, 4, 4, 4)                         # (B, heads, C/heads, C/heads)
    assert torch.allclose(attn.sum(-1), torch.ones(2, 4, 4))  # rows are softmax distributions


@pytest.mark.parametrize("name", ["restormer", "nafnet", "xrestormer", "grl"])
def test_every_trainable_parameter_receives_a_gradient(name):
    model = build_backbone(name, "tiny")
    for n, p in model.named_parameters():
        if n.endswith(("beta", "gamma")):                     # NAFNet's zero-initialised residual
            nn.init.constant_(p, 0.5)                         # scales: as after some training
        if n.endswith("attention.1.bias"):                    # GRL's 2-unit channel squeeze: ReLUs alive,
            nn.init.constant_(p, 1.0)                         # not dead by the draw of the initial weights
    model(torch.rand(2, 3, 16, 16)).abs().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, f"{name}: no gradient for {missing}"


class PriorShift(nn.Module):
    """A stand-in guided mixer: X ← X + proj(LN(X)) + W·prior. Checks the interface only."""

    def __init__(self, level, dim, num_heads, prior_dim=5):
        super().__init__()
        self.level = level
        self.proj = nn.Conv2d(dim, dim, 1)
        self.from_prior = nn.Linear(prior_dim, dim)

    def forward(self, x, norm, prior):
        return x + self.proj(norm(x)) + self.from_prior(prior)[:, :, None, None]


@pytest.mark.parametrize("name", ["restormer", "nafnet", "xrestormer"])   # GRL's guided blocks: tests/test_grl.py
def test_guided_levels_receive_their_own_prior_and_train(name):
    model = build_backbone(name, "tiny", guided_attention=PriorShift)
    mixers = [m for m in model.modules() if isinstance(m, PriorShift)]
    assert sorted({m.level for m in mixers}) == [1, 2, 3, 4]
    priors = [torch.randn(2, 5, requires_grad=True) for _ in range(4)]
    out = model(torch.rand(2, 3, 19, 21), priors)
    assert out.shape == (2, 3, 19, 21)
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in priors)
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(ValueError, match="pass priors"):
        model(torch.rand(1, 3, 16, 16))


class RecordingMixer(PriorShift):
    """Records the prior it receives in forward and the width of the feature it modulates."""
    seen = []

    def forward(self, x, norm, prior):
        RecordingMixer.seen.append((self.level, int(prior[0, 0]), x.shape[1]))
        return super().forward(x, norm, prior)


@pytest.mark.parametrize("name, widths", [("restormer", {4: 64, 3: 32, 2: 16, 1: 16}),
                                          ("nafnet", {4: 64, 3: 32, 2: 16, 1: 8}),
                                          ("xrestormer", {4: 64, 3: 32, 2: 16, 1: 16})])
def test_guided_level_mapping_follows_fig4_in_forward(name, widths):
    # F_1 guides the finest decoder level, F_4 the coarsest; encoder and refinement stay plain.
    model = build_backbone(name, "tiny", guided_attention=RecordingMixer)
    priors = [torch.full((1, 5), float(level)) for level in (1, 2, 3, 4)]      # priors[l − 1] carries l
    RecordingMixer.seen = []
    with torch.no_grad():
        model(torch.rand(1, 3, 32, 32), priors)
    assert RecordingMixer.seen and all(level == carried for level, carried, _ in RecordingMixer.seen)
    assert [level for level, _, _ in RecordingMixer.seen] == sorted([level for level, _, _ in RecordingMixer.seen],
                                                                   reverse=True)   # coarse → fine
    assert {level: width for level, _, width in RecordingMixer.seen} == widths
    if name == "restormer":
        assert all(isinstance(m.attn, MDTA) for m in (*model.encoder_level1, *model.refinement))
    if name == "xrestormer":
        assert all(isinstance(m.channel_attn, MDTA) for m in (*model.encoder_level1, *model.refinement))


def test_without_guidance_nafnet_has_exactly_the_published_parameter_count():
    assert count_parameters(build_backbone("nafnet", "paper")) == 17_111_907   # Table II: 17.11M


@pytest.mark.parametrize("bad, message", [
    (torch.rand(3, 16, 16), "4-D tensor"),
    (torch.rand(1, 1, 16, 16), "3 input channels"),
    ([1, 2, 3], "4-D tensor"),
])
def test_bad_input_raises_a_clear_value_error(bad, message):
    for name in ("restormer", "nafnet"):
        with pytest.raises(ValueError, match=message):
            build_backbone(name, "tiny")(bad)


def test_unknown_names_say_what_is_available():
    with pytest.raises(ValueError, match="restormer"):
        build_backbone("unet", "tiny")
    with pytest.raises(ValueError, match="paper"):
        build_backbone("restormer", "huge")


def test_tiled_forward_equals_whole_image_for_a_pointwise_restorer():
    image = torch.rand(1, 3, 70, 45)
    pointwise = lambda x: 2 * x - 0.5                         # exact under any tiling
    assert torch.allclose(tiled_forward(pointwise, image, tile=32, overlap=8), pointwise(image), atol=1e-6)


def test_tiled_forward_is_close_to_whole_image_for_a_restormer():
    model = build_backbone("restormer", "tiny").eval()
    image = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        whole = model(image)
        tiled = tiled_forward(model, image, tile=48, overlap=16)
    # Tiles see less context (attention is global per tile), so equality is approximate: blending
    # the 16-px overlaps gives a mean difference of about 0.003, butting tiles (overlap 0) about 0.008.
    with torch.no_grad():
        butted = tiled_forward(model, image, tile=48, overlap=0)
    assert tiled.shape == whole.shape
    assert 0 < (tiled - whole).abs().mean() < 0.005 < (butted - whole).abs().mean()
