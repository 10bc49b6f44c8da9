"""Claims about GRL (Li et al., CVPR 2023), the backbone of Table XV's Perceive-IR_GRL rows, and its guidance."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from backbone import count_parameters
from networks.grl import BUFFER_NAMES, GRL, MixedAttention, load_official

# One stage of four blocks: windows shifted or not, wide or tall stripes, stripes shifted or not (all four kinds).
SMALL = dict(img_size=(16, 32), embed_dim=36, depths=[4], num_heads_window=[2], num_heads_stripe=[3], window_size=4,
             stripe_size=[8, 16], stripe_shift=True, mlp_ratio=2.0, anchor_window_down_factor=2,
             local_connection=True, drop_path_rate=0.0)


def stages(depths):
    return dict(SMALL, depths=depths, num_heads_window=[2] * len(depths), num_heads_stripe=[3] * len(depths))


def randomize(model, seed=1):
    """Every parameter from N(0, 0.05²), as the reference vectors do, so that no block is an identity."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    return model


def weights_only(state):
    return {k: v for k, v in state.items() if k not in BUFFER_NAMES}


def test_grl_reproduces_the_official_buffers_padding_and_output_on_the_reference_vector(shared_dir):
    vector = torch.load(shared_dir / "reference" / "grl_tiny_vector.pt", weights_only=True)
    model = GRL(**vector["config"]).eval()                   # the official constructor keywords
    for name in BUFFER_NAMES:                                 # tables, indices and masks built here, not loaded
        assert torch.equal(model.state_dict()[name], vector["state_dict"][name]), name
    assert GRL.size_multiple(vector["config"]) == vector["pad_size"]
    model.load_state_dict(vector["state_dict"], strict=True)
    with torch.no_grad():
        output = model(vector["input"])                       # 32 × 40, reflect-padded to 32 × 48 inside forward
    assert (output - vector["input"]).abs().max().item() > 0.05
    assert (output - vector["output"]).abs().max().item() < 1e-5


def test_a_model_built_for_another_size_recomputes_the_tables_and_still_matches_the_official_output(shared_dir):
    vector = torch.load(shared_dir / "reference" / "grl_tiny_vector.pt", weights_only=True)
    model = GRL(**dict(vector["config"], img_size=[48, 48])).eval()      # its buffers are for 48 × 48
    model.load_state_dict(weights_only(vector["state_dict"]), strict=True)
    with torch.no_grad():
        output = model(vector["input"])                       # padded to 32 × 48: tables computed afresh
    assert (output - vector["output"]).abs().max().item() < 1e-5


def test_grl_b_for_restoration_has_19805263_parameters_and_pads_to_the_128_px_patches_of_table_xv():
    config = GRL.CONFIGS["paper"]
    assert count_parameters(GRL(**config)) == 19_805_263
    assert GRL.size_multiple(config) == 128
    assert GRL.size_multiple(GRL.CONFIGS["tiny"]) == 16


@pytest.mark.parametrize("size", [(21, 35), (16, 32), (5, 3)])
def test_any_size_comes_back_at_its_size_padded_as_the_official_forward_pads_it(size):
    model = randomize(GRL(**SMALL)).eval()
    image = torch.rand(2, 3, *size)
    (H, W), multiple = size, GRL.size_multiple(SMALL)
    pad_h, pad_w = (-H) % multiple, (-W) % multiple
    # Official check_image_size: reflect-pad bottom/right; zeros when reflection is impossible (5 × 3 → 16 × 16).
    padded = F.pad(image, (0, pad_w, 0, pad_h), mode="reflect" if pad_h < H and pad_w < W else "constant")
    with torch.no_grad():
        output = model(image)
        assert output.shape == image.shape
        assert torch.allclose(output, model(padded)[..., :H, :W], atol=1e-6)


def test_tables_for_a_new_size_equal_those_a_fresh_model_builds_for_that_size():
    model = randomize(GRL(**SMALL)).eval()                    # buffers for 16 × 32
    fresh = GRL(**dict(SMALL, img_size=(32, 48))).eval()
    recomputed = model.tables_for((32, 48))
    for name in BUFFER_NAMES:
        assert torch.equal(recomputed[name], fresh.state_dict()[name]), name
    assert recomputed["mask_w"].shape != model.mask_w.shape
    fresh.load_state_dict(weights_only(model.state_dict()), strict=True)
    image = torch.rand(1, 3, 30, 41)                          # padded to 32 × 48
    with torch.no_grad():
        assert torch.allclose(model(image), fresh(image), atol=1e-6)
        assert model.double()(image.double()).dtype == torch.float64     # recomputed tables follow the cast


def test_a_lightning_checkpoint_without_buffers_loads_strictly_and_restores_the_same_output(tmp_path):
    source = randomize(GRL(**SMALL)).eval()
    # The Lightning engine keeps the network as `model.` next to its own buffers; the official
    # convert_checkpoint drops tables, indices and masks; older releases kept per-block copies of them.
    state = {f"model.{k}": v for k, v in weights_only(source.state_dict()).items()}
    state["best_val_metric"] = torch.zeros(1)
    state["model.layers.0.blocks.0.attn.window_attn.attn_transform.relative_coords_table"] = torch.zeros(1)
    path = tmp_path / "grl.ckpt"
    torch.save({"epoch": 3, "global_step": 1000, "state_dict": state}, path)
    target = load_official(GRL(**SMALL).eval(), path)
    image = torch.rand(1, 3, 16, 32)
    with torch.no_grad():
        assert torch.equal(target(image), source(image))
    plain = GRL(**SMALL)
    plain.load_state_dict(weights_only(source.state_dict()), strict=True)     # plain state_dict, no buffers
    with pytest.raises(RuntimeError, match="Unexpected"):                      # anything else: strict
        plain.load_state_dict({**source.state_dict(), "stray.weight": torch.zeros(1)}, strict=True)


class HyperParameters:
    """Stands for the OmegaConf objects a Lightning .ckpt pickles next to its tensors."""


def test_load_official_explains_a_checkpoint_that_weights_only_refuses(tmp_path):
    path = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": HyperParameters()}, path)
    with pytest.raises(RuntimeError, match=r"weights_only=True refuses. If you trust the file"):
        load_official(GRL(**SMALL), path)


def test_official_keywords_of_variants_not_implemented_are_refused_with_a_reason():
    with pytest.raises(ValueError, match="upsampler"):
        GRL(**SMALL, upsampler="pixelshuffle")
    with pytest.raises(ValueError, match="img_size"):
        GRL(**dict(SMALL, img_size=20))
    with pytest.raises(TypeError, match="unexpected keyword"):
        GRL(**SMALL, window=8)


class RecordingMixer(nn.Module):
    """A stand-in with guidance.GuidedMixer's interface: Y = X + W·prior, X^m = attention(norm(Y), norm(X)) + Y."""
    seen = []

    def __init__(self, level, dim, num_heads, attention=None, prior_dim=5):
        super().__init__()
        self.level, self.attention = level, attention
        self.from_prior = nn.Linear(prior_dim, dim)

    def forward(self, x, norm, prior):
        RecordingMixer.seen.append((self.level, int(prior[0, 0]), tuple(x.shape)))
        y = x + self.from_prior(prior)[:, :, None, None]
        return self.attention(norm(y), norm(x)) + y


def test_the_last_four_of_seven_stages_are_guided_by_f4_f3_f2_f1_and_the_first_three_stay_official():
    config = stages([1] * 7)                                  # GRL-B's seven stages, one block each
    model = GRL(**config, guided_attention=RecordingMixer)
    assert model.levels == [None, None, None, 4, 3, 2, 1]
    plain_keys = {k for k in GRL(**config).state_dict() if k.startswith(("layers.0.", "layers.1.", "layers.2."))}
    assert plain_keys == {k for k in model.state_dict() if k.startswith(("layers.0.", "layers.1.", "layers.2."))}
    for stage, level in zip(model.layers, model.levels):
        block = stage.blocks[0]
        if level is None:
            assert isinstance(block.attn, MixedAttention) and not hasattr(block, "mixer")
        else:                                                 # the mixer owns the one (cross) attention
            assert block.mixer.level == level and not hasattr(block, "attn")
            assert isinstance(block.mixer.attention.attn, MixedAttention)
    priors = [torch.full((2, 5), float(level)) for level in (1, 2, 3, 4)]    # priors[l − 1] carries l
    RecordingMixer.seen = []
    with torch.no_grad():
        model(torch.rand(2, 3, 13, 29), priors)
    assert [(level, carried) for level, carried, _ in RecordingMixer.seen] == [(4, 4), (3, 3), (2, 2), (1, 1)]
    assert all(shape == (2, 36, 16, 32) for _, _, shape in RecordingMixer.seen)   # (B, C, H, W) padded maps
    with pytest.raises(ValueError, match="pass priors"):
        model(torch.rand(1, 3, 16, 32))


def test_every_parameter_of_a_guided_grl_and_every_prior_receive_a_gradient():
    model = randomize(GRL(**stages([1, 4, 1, 1, 1]), guided_attention=RecordingMixer)).train()
    for name, p in model.named_parameters():                 # CAB's squeeze ReLUs, off for every image under this
        if name.endswith("attention.1.bias"):                 # init, would pass no gradient: open them, as after
            nn.init.constant_(p, 0.5)                         # some training
    priors = [torch.randn(2, 5, requires_grad=True) for _ in range(4)]
    output = model(torch.rand(2, 3, 13, 29), priors)
    assert output.shape == (2, 3, 13, 29)
    output.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, f"no gradient for {missing}"
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in priors)
