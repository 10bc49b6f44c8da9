"""Claims about the X-Restormer backbone of Table XV (Sec. IV-G): the official network, its padding, its guidance."""

import pytest
import torch
import torch.nn.functional as F

from backbone import GDFN, MDTA, LayerNorm
from test_backbone import PriorShift
from networks.xrestormer import OCAB, XRestormer, load_official, relative_index

TINY = XRestormer.CONFIGS["tiny"]


def load_vector(shared_dir):
    return torch.load(shared_dir / "reference" / "xrestormer_tiny_vector.pt", weights_only=True)


def official_model(vector):
    model = XRestormer(**vector["config"]).eval()              # the official constructor keywords
    model.load_state_dict(vector["state_dict"], strict=True)
    return model


def test_xrestormer_reproduces_the_official_output_of_the_tiny_reference(shared_dir):
    vector = load_vector(shared_dir)
    with torch.no_grad():
        output = official_model(vector)(vector["input"])      # 32 × 64: a multiple of 8·window, no padding
    assert (output - vector["input"]).abs().max().item() > 0.05          # the blocks do change the image
    assert (output - vector["output"]).abs().max().item() < 1e-5


def test_odd_sizes_are_reflect_padded_to_8_windows_as_the_official_test_pipeline_does(shared_dir):
    vector = load_vector(shared_dir)
    protocol = vector["test_protocol"]                        # 29 × 61, padded to 32 × 64 by the official model
    assert protocol["pad_mode"] == "reflect"
    assert protocol["padding_size"] == XRestormer.size_multiple(vector["config"]) == 8 * 4
    with torch.no_grad():
        output = official_model(vector)(protocol["input"])
    assert output.shape == protocol["input"].shape
    assert (output - protocol["output"]).abs().max().item() < 1e-5


def test_a_plain_build_has_exactly_the_official_state_dict_keys_and_shapes(shared_dir):
    reference = load_vector(shared_dir)["state_dict"]
    state = XRestormer(**TINY).state_dict()                   # "tiny" is the reference vector's config
    assert {k: tuple(v.shape) for k, v in state.items()} == {k: tuple(v.shape) for k, v in reference.items()}


def test_the_released_restoration_config_has_26041208_parameters():
    model = XRestormer(**XRestormer.CONFIGS["paper"])
    assert sum(p.numel() for p in model.parameters()) == 26_041_208


def test_the_padding_multiple_is_8_windows_and_shrinks_by_the_sr_scale():
    # Official options: padding_size 64 for the restoration models (window 8), 16 for ×4 SR.
    assert XRestormer.size_multiple(XRestormer.CONFIGS["paper"]) == 64
    assert XRestormer.size_multiple(TINY) == 32
    assert XRestormer.size_multiple(dict(XRestormer.CONFIGS["paper"], scale=4)) == 16


@pytest.mark.parametrize("size", [(29, 61), (17, 40), (5, 3)])
def test_output_shape_equals_input_shape_for_any_size(size):
    model = XRestormer(**TINY).eval()
    image = torch.rand(2, 3, *size)
    with torch.no_grad():
        assert model(image).shape == image.shape


def test_padding_inside_forward_equals_reflect_padding_by_hand_and_cropping():
    model = XRestormer(**TINY).eval()
    image = torch.rand(1, 3, 21, 30)
    padded = F.pad(image, (0, 2, 0, 11), mode="reflect")     # 32 × 32
    with torch.no_grad():
        assert torch.allclose(model(image), model(padded)[..., :21, :30], atol=1e-6)


def test_the_sr_variant_upsamples_the_input_first_and_returns_scale_times_the_size():
    model = XRestormer(**dict(TINY, scale=2)).eval()
    with torch.no_grad():
        assert model(torch.rand(1, 3, 13, 20)).shape == (1, 3, 26, 40)


def test_relative_index_is_key_position_minus_query_position_plus_r_minus_1():
    # M = 4 query pixels per side, R = 6 key pixels per side: 2R − 1 = 11 learned offsets.
    height, width = relative_index(4, 6)
    assert height.shape == width.shape == (16, 36)            # (M², R²)
    query, key = 3 * 4 + 1, 5 * 6 + 0                         # query at (row 3, col 1), key at (row 5, col 0)
    assert height[query, key] == 5 - 3 + 5 and width[query, key] == 0 - 1 + 5
    assert height[0, 0] == width[0, 0] == 5
    assert height.min() == 0 - 3 + 5 and height.max() == 5 - 0 + 5   # offsets 0 and 1 are never used


def test_oca_a_pixel_on_a_window_border_reaches_the_neighbouring_windows_through_the_overlap():
    # M = 4, R = 6: each key window reaches one pixel beyond its query window on every side.
    attention = OCAB(dim=8, window_size=4, overlap_ratio=0.5, num_heads=2, dim_head=4).eval()
    image = torch.rand(1, 8, 16, 16)

    def windows_changed_by(row, col):
        changed = image.clone()
        changed[..., row, col] += 1.0
        with torch.no_grad():
            difference = (attention(changed) - attention(image)).abs().sum(1)[0]    # (16, 16)
        per_window = difference.reshape(4, 4, 4, 4).amax(dim=(1, 3))                # (window rows, window cols)
        return {(r, c) for r, c in (per_window > 1e-6).nonzero().tolist()}

    assert windows_changed_by(5, 5) == {(1, 1)}                                     # inside window (1, 1) only
    assert windows_changed_by(4, 4) == {(0, 0), (0, 1), (1, 0), (1, 1)}             # first row/col of (1, 1)
    assert windows_changed_by(3, 9) == {(0, 2), (1, 2)}                             # last row of window (0, 2)


def test_every_trainable_parameter_receives_a_gradient():
    model = XRestormer(**TINY)
    model(torch.rand(2, 3, 32, 32)).abs().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, f"no gradient for {missing}"


class RecordingMixer(PriorShift):
    """test_backbone.py's stand-in mixer, recording what it is handed (the norm too)."""
    seen = []

    def forward(self, x, norm, prior):
        RecordingMixer.seen.append((self.level, int(prior[0, 0]), x.shape[1], type(norm)))
        return super().forward(x, norm, prior)


def test_guided_build_runs_the_mixer_in_exactly_the_latent_and_decoder_blocks_with_their_own_prior():
    # F_1 guides the finest decoder level, F_4 the latent (Fig. 4); encoder and refinement stay plain.
    config = dict(TINY, num_blocks=[2, 1, 1, 2], num_refinement_blocks=1)
    model = XRestormer(**config, guided_attention=RecordingMixer)
    priors = [torch.full((1, 5), float(level), requires_grad=True) for level in (1, 2, 3, 4)]   # priors[l−1] is l
    RecordingMixer.seen = []
    model(torch.rand(1, 3, 32, 32), priors).square().mean().backward()
    assert [(level, carried) for level, carried, _, _ in RecordingMixer.seen] == \
        [(4, 4), (4, 4), (3, 3), (2, 2), (1, 1), (1, 1)]      # latent ×2, decoder 3, 2, decoder 1 ×2
    assert {level: width for level, _, width, _ in RecordingMixer.seen} == {4: 64, 3: 32, 2: 16, 1: 16}
    assert all(norm is LayerNorm for _, _, _, norm in RecordingMixer.seen)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in priors)

    guided = [*model.latent, *model.decoder_level3, *model.decoder_level2, *model.decoder_level1]
    plain = [*model.encoder_level1, *model.encoder_level2, *model.encoder_level3, *model.refinement]
    assert all(isinstance(block.channel_attn, RecordingMixer) for block in guided)   # in MDTA's place
    assert all(isinstance(block.channel_attn, MDTA) for block in plain)
    assert all(isinstance(block.spatial_attn, OCAB) and isinstance(block.channel_ffn, GDFN)
               and isinstance(block.spatial_ffn, GDFN) for block in guided + plain)
    with pytest.raises(ValueError, match="pass priors"):
        model(torch.rand(1, 3, 32, 32))


def test_load_official_prefers_params_ema_then_params_then_a_bare_state_dict(tmp_path):
    source, target = XRestormer(**TINY), XRestormer(**TINY)
    ema = {k: v + 1.0 for k, v in source.state_dict().items()}
    for name, checkpoint, expected in (("both.pth", {"params": source.state_dict(), "params_ema": ema}, ema),
                                       ("params.pth", {"params": source.state_dict()}, source.state_dict()),
                                       ("bare.pth", source.state_dict(), source.state_dict())):
        torch.save(checkpoint, tmp_path / name)
        loaded = load_official(target, tmp_path / name).state_dict()
        assert all(torch.equal(loaded[k], expected[k]) for k in expected), name


def test_load_official_names_the_file_when_it_does_not_fit(tmp_path):
    torch.save({"params": XRestormer(**dict(TINY, dim=16)).state_dict()}, tmp_path / "wider.pth")
    with pytest.raises(ValueError, match="wider.pth"):
        load_official(XRestormer(**TINY), tmp_path / "wider.pth")
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_official(XRestormer(**TINY), tmp_path / "missing.pth")


@pytest.mark.parametrize("change, message", [
    (dict(dual_pixel_task=True), "dual-pixel"),
    (dict(window_size=6), "must be even"),                    # R = 9: key windows cannot be centred
    (dict(spatial_heads=[1, 2, 2]), "4 entries"),
])
def test_configs_the_official_code_cannot_run_raise_a_clear_value_error(change, message):
    with pytest.raises(ValueError, match=message):
        XRestormer(**dict(TINY, **change))


def test_bad_input_says_what_was_expected():
    with pytest.raises(ValueError, match="3 input channels"):
        XRestormer(**TINY)(torch.rand(1, 1, 16, 16))
