"""Claims about MPRNet, a stage-1 restorer of Table XIV: the official network, its checkpoints, its training loss."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from networks.mprnet import MPRNet, charbonnier, laplacian, load_official, medium_step

TINY = MPRNet.CONFIGS["tiny"]


def load_vector(shared_dir):
    return torch.load(shared_dir / "reference" / "mprnet_tiny_vector.pt", weights_only=True)


def official_model(vector):
    model = MPRNet(**vector["kwargs"]).eval()                 # the official constructor keywords
    model.load_state_dict(vector["state_dict"], strict=True)
    return model


def test_mprnet_reproduces_the_official_three_stage_outputs_of_the_tiny_reference(shared_dir):
    vector = load_vector(shared_dir)
    with torch.no_grad():
        outputs = official_model(vector)(vector["input"])     # 32 × 48: a multiple of 8, no padding
    assert len(outputs) == 3                                  # [stage 3, stage 2, stage 1]
    assert (outputs[0] - vector["input"]).abs().max().item() > 0.3       # the stages do change the image
    for output, expected in zip(outputs, vector["output"]):
        assert (output - expected).abs().max().item() < 1e-5


def test_a_plain_build_has_exactly_the_official_state_dict_keys_and_shapes(shared_dir):
    reference = load_vector(shared_dir)["state_dict"]
    state = MPRNet(**TINY).state_dict()                       # "tiny" is the reference vector's config
    assert [(k, tuple(v.shape)) for k, v in state.items()] == [(k, tuple(v.shape)) for k, v in reference.items()]


def test_every_cab_shares_one_prelu_slope_counted_once_as_in_the_official_code():
    model = MPRNet(**TINY)
    slopes = [k for k in model.state_dict() if k.endswith("body.1.weight")]
    assert len(slopes) == 37                                  # one key per CAB of the tiny config
    assert len({model.get_parameter(k).data_ptr() for k in slopes}) == 1
    assert sum(p.numel() for p in model.parameters()) == sum(v.numel() for v in model.state_dict().values()) - 36


@pytest.mark.parametrize("name, count", [("derain", 3_637_249), ("deblur", 20_127_073), ("denoise", 15_741_025)])
def test_the_released_configs_have_their_official_parameter_counts(name, count):
    with torch.device("meta"):                                # shapes only: no memory, no initialisation
        model = MPRNet(**MPRNet.CONFIGS[name])
    assert sum(p.numel() for p in model.parameters()) == count


def test_the_class_defaults_are_the_deraining_model_and_paper_is_table_ii_s_15_74m_denoising_model():
    with torch.device("meta"):
        default, derain = MPRNet().state_dict(), MPRNet(**MPRNet.CONFIGS["derain"]).state_dict()
        paper = MPRNet(**MPRNet.CONFIGS["paper"])
    assert {k: v.shape for k, v in default.items()} == {k: v.shape for k, v in derain.items()}
    assert MPRNet.CONFIGS["paper"] == MPRNet.CONFIGS["denoise"]
    assert round(sum(p.numel() for p in paper.parameters()) / 1e6, 2) == 15.74      # Table II, Params (M)


def test_the_padding_multiple_is_8_two_halvings_inside_the_quarter_patches():
    assert all(MPRNet.size_multiple(config) == 8 for config in MPRNet.CONFIGS.values())


@pytest.mark.parametrize("size", [(29, 43), (32, 41), (25, 48)])      # all padded to the vector's 32 × 48 (fast)
def test_restore_reflect_pads_to_8_and_returns_stage_3_cropped_to_the_input_size(size):
    model = MPRNet(**TINY).eval()
    image = torch.rand(1, 3, *size)
    padded = F.pad(image, (0, (-size[1]) % 8, 0, (-size[0]) % 8), mode="reflect")   # as the official demo.py
    with torch.no_grad():
        restored = model.restore(image)
        assert restored.shape == image.shape
        assert torch.allclose(restored, model(padded)[0][..., :size[0], :size[1]], atol=1e-6)


def test_a_non_default_config_runs_and_its_three_stages_keep_the_image_size():
    model = MPRNet(n_feat=12, scale_unetfeats=6, scale_orsnetfeats=2, num_cab=1, reduction=2, bias=True).eval()
    with torch.no_grad():
        assert [tuple(out.shape) for out in model(torch.rand(1, 3, 24, 40))] == [(1, 3, 24, 40)] * 3
        assert model.restore(torch.rand(1, 3, 21, 13)).shape == (1, 3, 21, 13)


def test_forward_refuses_sides_not_divisible_by_8_and_points_to_restore():
    with pytest.raises(ValueError, match="restore"):
        MPRNet(**TINY)(torch.rand(1, 3, 30, 32))


def official_checkpoint(model):
    """The released format: DataParallel's `module.` keys under "state_dict", beside epoch and optimizer."""
    return {"epoch": 250, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()},
            "optimizer": {"state": {}, "param_groups": [{"lr": 2e-4, "params": list(range(len(model.state_dict())))}]}}


def test_load_official_reads_released_prefixed_checkpoints_and_plain_state_dicts(shared_dir, tmp_path):
    vector = load_vector(shared_dir)
    source = official_model(vector)
    torch.save(official_checkpoint(source), tmp_path / "model_deraining.pth")
    torch.save(source.state_dict(), tmp_path / "plain.pth")
    for name in ("model_deraining.pth", "plain.pth"):
        model = load_official(MPRNet(**TINY), tmp_path / name).eval()
        with torch.no_grad():
            assert (model(vector["input"])[0] - vector["output"][0]).abs().max().item() < 1e-5, name


def test_load_official_says_in_one_line_which_file_does_not_fit_and_how(tmp_path):
    torch.save(official_checkpoint(MPRNet(**dict(TINY, n_feat=16))), tmp_path / "wider.pth")
    with pytest.raises(ValueError, match=r"wider.pth .*shallow_feat1.0.weight: checkpoint \(16, 3, 3, 3\), "
                                         r"model \(8, 3, 3, 3\)"):
        load_official(MPRNet(**TINY), tmp_path / "wider.pth")
    torch.save({"state_dict": {"module.conv.weight": torch.zeros(1)}}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match=r"other.pth is not this MPRNet: 226 missing keys .* 1 unexpected"):
        load_official(MPRNet(**TINY), tmp_path / "other.pth")
    (tmp_path / "broken.pth").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="broken.pth is not a readable checkpoint"):
        load_official(MPRNet(**TINY), tmp_path / "broken.pth")
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_official(MPRNet(**TINY), tmp_path / "missing.pth")


# --- The official training loss, against a straightforward NumPy computation -----------------------------------------

def numpy_charbonnier(x, y):
    return np.mean(np.sqrt((x - y) ** 2 + 1e-6))


def numpy_blur(image):
    """5×5 Gaussian [.05, .25, .4, .25, .05]ᵀ[...] over edge-replicated borders, as 25 shifted sums."""
    taps = np.array([0.05, 0.25, 0.4, 0.25, 0.05])
    padded = np.pad(image, ((0, 0), (0, 0), (2, 2), (2, 2)), mode="edge")
    H, W = image.shape[-2:]
    return sum(taps[i] * taps[j] * padded[..., i:i + H, j:j + W] for i in range(5) for j in range(5))


def numpy_edge_loss(x, y):
    def laplacian(image):
        blurred = numpy_blur(image)
        zero_filled = np.zeros_like(blurred)
        zero_filled[..., ::2, ::2] = 4 * blurred[..., ::2, ::2]
        return image - numpy_blur(zero_filled)
    return numpy_charbonnier(laplacian(x), laplacian(y))


def test_charbonnier_of_equal_images_is_eps():
    image = torch.rand(1, 3, 16, 16)
    assert charbonnier(image, image).item() == pytest.approx(1e-3)                 # √(0 + ε²)


def test_the_laplacian_of_a_constant_is_zero_inside_and_shows_the_replicate_padding_at_the_borders():
    # Zero-filled ×4 then blurred: inside, even and odd taps each sum to 1/2 per axis, 4 · ½ · ½ = 1, so c − c = 0.
    # On the first row the replicated rows −2, −1 join row 0 (weights .05 + .25 + .4 + .05 = 3/4): 4 · ¾ · ½ = 3/2.
    c = 0.7
    level = laplacian(torch.full((1, 3, 10, 10), c))[0, 0]
    assert level[2:-2, 2:-2].abs().max().item() < 1e-6
    assert level[0, 2:-2].tolist() == pytest.approx([c - 1.5 * c] * 6)               # −c/2
    assert level[0, 0].item() == pytest.approx(c - 4 * 0.75 * 0.75 * c)             # the corner: −5c/4


def test_medium_step_is_the_official_charbonnier_plus_0_05_edge_loss_summed_over_the_three_stages():
    model = MPRNet(**TINY)
    batch = {"degraded": torch.rand(1, 3, 32, 48), "target": torch.rand(1, 3, 32, 48)}
    total, parts = medium_step(model, batch, {"step": 0})
    with torch.no_grad():
        stages = [stage.double().numpy() for stage in model(batch["degraded"])]
    target = batch["target"].double().numpy()
    loss_rec = sum(numpy_charbonnier(stage, target) for stage in stages)
    loss_edge = sum(numpy_edge_loss(stage, target) for stage in stages)
    assert parts["loss_rec"].item() == pytest.approx(loss_rec, rel=1e-5)
    assert parts["loss_edge"].item() == pytest.approx(loss_edge, rel=1e-5)
    assert total.item() == pytest.approx(loss_rec + 0.05 * loss_edge, rel=1e-5)
    assert not parts["loss_rec"].requires_grad and not parts["loss_edge"].requires_grad


def test_medium_step_backpropagates_to_every_parameter_and_a_step_against_its_gradient_lowers_it():
    model = MPRNet(**TINY)
    batch = {"degraded": torch.rand(1, 3, 32, 48), "target": torch.rand(1, 3, 32, 48)}
    total, _ = medium_step(model, batch, {"step": 0})
    total.backward()
    # reached by the graph; some CA squeeze units may be dead (ReLU, no bias) for one random batch: grad 0
    assert all(p.grad is not None for p in model.parameters())
    with torch.no_grad():
        for p in model.parameters():
            p -= 1e-3 * p.grad
    assert medium_step(model, batch, {"step": 1})[0].item() < total.item()


def test_guided_attention_is_refused_mprnet_has_no_etb_hook():
    with pytest.raises(ValueError, match="no guided blocks .*--no-guidance"):
        MPRNet(**TINY, guided_attention=object())


def test_bad_input_says_what_was_expected():
    with pytest.raises(ValueError, match="3 input channels"):
        MPRNet(**TINY).restore(torch.rand(1, 1, 16, 16))
    with pytest.raises(ValueError, match="4-D tensor"):
        MPRNet(**TINY)(torch.rand(3, 16, 16))
