"""Claims about PromptIR (Potlapalli et al., NeurIPS 2023), a stage-1 restorer of Table XIV: the official network,
its input-conditioned prompts, its released checkpoints and its training loss."""

import argparse
import functools
import zlib

import pytest
import torch
import torch.nn.functional as F

from backbone import Restormer, count_parameters
from networks.promptir import PromptGenBlock, PromptIR, load_official, medium_step

TINY = PromptIR.CONFIGS["tiny"]
UNUSED = ("chnl_reduce1", "chnl_reduce2", "chnl_reduce3",
          "reduce_noise_channel_1", "reduce_noise_channel_2", "reduce_noise_channel_3")


@functools.lru_cache(maxsize=1)
def reference(shared_dir):
    """The vector and the official tiny model with its weights rebuilt by the reference README's recipe."""
    vector = torch.load(shared_dir / "reference" / "promptir_tiny_vector.pt", weights_only=True)
    seed, std = vector["recipe"]["seed"], vector["recipe"]["std"]
    state = dict(vector["buffers"])
    for key, shape in vector["shapes"]:
        if key in state:
            continue
        generator = torch.Generator().manual_seed(seed + zlib.crc32(key.encode()))
        if key.endswith("prompt_param"):
            state[key] = torch.rand(shape, generator=generator)
        else:
            one = 1.0 if len(shape) == 1 and key.endswith("weight") else 0.0
            state[key] = std * torch.randn(shape, generator=generator) + one
    model = PromptIR(**vector["kwargs"]).eval()               # the official constructor keywords
    model.load_state_dict(state, strict=True)
    return vector, model


@functools.lru_cache(maxsize=1)
def tiny_model():
    torch.manual_seed(0)
    return PromptIR(**TINY).eval()


def test_promptir_reproduces_the_official_output_of_the_tiny_reference(shared_dir):
    vector, model = reference(shared_dir)
    with torch.no_grad():
        output = model(vector["input"])                       # 32 × 48: a multiple of 8, no padding
    assert (output - vector["input"]).abs().max().item() > 0.05          # the blocks do change the image
    assert (output - vector["output"]).abs().max().item() < 1e-5


def test_a_build_has_exactly_the_official_state_dict_keys_and_shapes_in_the_official_order(shared_dir):
    vector, _ = reference(shared_dir)
    assert TINY == dict(PromptIR.CONFIGS["paper"], **vector["kwargs"])  # "tiny" is the vector's kwargs
    built = [(key, tuple(value.shape)) for key, value in PromptIR(**TINY).state_dict().items()]
    assert built == [(key, tuple(shape)) for key, shape in vector["shapes"]]


def test_the_released_config_has_35592263_parameters_of_which_the_six_unused_convs_are_frozen():
    model = PromptIR(**PromptIR.CONFIGS["paper"])
    assert sum(p.numel() for p in model.parameters()) == 35_592_263
    unused = 64 * 64 + 128 * 128 + 320 * 256 + 112 * 48 + 224 * 96 + 448 * 192      # 1×1 convs, no bias
    assert count_parameters(model, trainable=False) == unused == 215_296
    assert count_parameters(model) == 35_592_263 - 215_296
    assert PromptIR.size_multiple(PromptIR.CONFIGS["paper"]) == PromptIR.size_multiple(TINY) == 8


def test_pgm_prompt_is_the_softmax_weighted_sum_of_the_components_resized_and_convolved():
    block = PromptGenBlock(prompt_dim=6, prompt_len=5, prompt_size=8, lin_dim=4)
    features = torch.randn(2, 4, 5, 7)
    weights = torch.softmax(features.mean(dim=(2, 3)) @ block.linear_layer.weight.t() + block.linear_layer.bias, 1)
    mixed = sum(weights[:, i, None, None, None] * block.prompt_param[:, i] for i in range(5))   # (2, 6, 8, 8)
    expected = block.conv3x3(F.interpolate(mixed, size=(5, 7), mode="bilinear", align_corners=False))
    assert torch.allclose(block.mixture(features), weights, atol=1e-6)
    assert torch.allclose(block(features), expected, atol=1e-6)


def test_the_prompt_mixture_depends_on_the_input_image_and_on_nothing_else():
    # PromptIR is never told the degradation: each image picks its own mixture of the same learned components.
    model, seen = tiny_model(), {}
    hooks = [getattr(model, name).register_forward_hook(lambda block, inputs, _, name=name: seen.update(
        {name: block.mixture(inputs[0])})) for name in ("prompt1", "prompt2", "prompt3")]
    noise, smooth = torch.rand(1, 3, 32, 48), torch.linspace(0, 1, 48).expand(1, 3, 32, 48)
    with torch.no_grad():
        model(torch.cat([noise, smooth, noise]))
    for hook in hooks:
        hook.remove()
    for name, weights in seen.items():                        # (3 images, 5 components)
        assert torch.allclose(weights.sum(1), torch.ones(3)), name
        assert torch.allclose(weights[0], weights[2], atol=1e-6), name             # same image, same mixture
        assert (weights[0] - weights[1]).abs().max() > 1e-4, name                # ≫ float32 rounding (~1e-7)


@pytest.mark.parametrize("size", [(37, 53), (5, 3)])
def test_restore_keeps_the_shape_of_any_size_and_equals_reflect_padding_by_hand(size):
    model, image = tiny_model(), torch.rand(1, 3, *size)
    with torch.no_grad():
        restored = model.restore(image)
        assert restored.shape == image.shape
        if size == (37, 53):                                   # reflect to 40 × 56, as demo.py's pad_input does
            assert torch.allclose(restored, model(F.pad(image, (0, 3, 0, 3), mode="reflect"))[..., :37, :53])


def test_a_non_default_config_runs_and_keeps_the_official_bias_free_resampling():
    config = dict(TINY, num_blocks=[1, 2, 1, 1], heads=[1, 2, 4, 4], bias=True, LayerNorm_type="BiasFree")
    model = PromptIR(**config).eval()
    keys = model.state_dict()
    assert "encoder_level2.1.attn.qkv.bias" in keys and "noise_level3.ffn.project_in.bias" in keys
    assert "encoder_level1.0.norm1.body.bias" not in keys     # BiasFree LayerNorm
    assert not any(k.startswith(("patch_embed", "down", "up")) and k.endswith("bias") for k in keys)
    with torch.no_grad():
        assert model.restore(torch.rand(1, 3, 21, 30)).shape == (1, 3, 21, 30)


def test_the_forward_refuses_sizes_that_are_not_multiples_of_8_and_points_to_restore():
    with pytest.raises(ValueError, match="restore"):
        tiny_model()(torch.rand(1, 3, 30, 32))


def test_load_official_reads_a_lightning_checkpoint_and_reproduces_the_output(shared_dir, tmp_path):
    vector, model = reference(shared_dir)
    state = {"net." + key: value for key, value in model.state_dict().items()}   # the LightningModule's self.net
    state["loss_fn.weight"] = torch.ones(3)                   # a loss module's key: not the network's, dropped
    torch.save({"state_dict": state, "epoch": 149, "global_step": 120_000, "pytorch-lightning_version": "2.0.6"},
               tmp_path / "model.ckpt")
    loaded = load_official(PromptIR(**TINY).eval(), tmp_path / "model.ckpt")
    with torch.no_grad():
        assert (loaded(vector["input"]) - vector["output"]).abs().max().item() < 1e-5


def test_load_official_accepts_a_plain_state_dict(tmp_path):
    torch.save(tiny_model().state_dict(), tmp_path / "plain.pth")
    loaded = load_official(PromptIR(**TINY), tmp_path / "plain.pth").state_dict()
    assert all(torch.equal(loaded[key], value) for key, value in tiny_model().state_dict().items())


def test_load_official_unpickles_python_objects_only_when_told_the_file_is_trusted(tmp_path):
    state = {"net." + key: value for key, value in tiny_model().state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": argparse.Namespace(lr=2e-4)}, tmp_path / "hparams.ckpt")
    with pytest.raises(ValueError, match=r"hparams.ckpt holds Python objects .*trusted=True"):
        load_official(PromptIR(**TINY), tmp_path / "hparams.ckpt")
    loaded = load_official(PromptIR(**TINY), tmp_path / "hparams.ckpt", trusted=True)
    assert torch.equal(loaded.prompt3.prompt_param, tiny_model().prompt3.prompt_param)


def test_load_official_names_the_file_and_the_difference_when_it_does_not_fit(tmp_path):
    deeper = PromptIR(**dict(TINY, num_blocks=[1, 1, 1, 2])).state_dict()           # another config
    torch.save({"state_dict": {"net." + k: v for k, v in deeper.items()}}, tmp_path / "deeper.ckpt")
    with pytest.raises(ValueError, match=r"deeper.ckpt does not fit .* unexpected keys \(latent.1.norm1"):
        load_official(tiny_model(), tmp_path / "deeper.ckpt")
    torch.save(Restormer(**Restormer.CONFIGS["tiny"]).state_dict(), tmp_path / "restormer.pth")   # another network
    with pytest.raises(ValueError, match=r"restormer.pth .*missing keys \(prompt1.prompt_param.*"
                                         r"patch_embed.proj.weight: checkpoint \(8, 3, 3, 3\), model \(48, 3, 3, 3\)"):
        load_official(tiny_model(), tmp_path / "restormer.pth")
    (tmp_path / "garbage.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.ckpt is not a readable"):
        load_official(tiny_model(), tmp_path / "garbage.ckpt")
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        load_official(tiny_model(), tmp_path / "missing.ckpt")


def test_medium_step_is_the_official_l1_loss_and_reaches_every_parameter_the_forward_uses():
    torch.manual_seed(1)
    net = PromptIR(**TINY)
    batch = {"degraded": torch.rand(2, 3, 16, 16), "target": torch.rand(2, 3, 16, 16)}
    restored = []                                             # what the step's forward returned

    def recording(image):
        restored.append(net(image))
        return restored[-1]

    loss, parts = medium_step(recording, batch, {"step": 0})
    expected = (restored[0].detach() - batch["target"]).abs().mean()      # nn.L1Loss(): mean absolute error
    assert torch.allclose(loss, expected) and torch.equal(parts["loss_rec"], loss.detach())
    loss.backward()
    without = {name.split(".")[0] for name, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum()}
    assert without == set(UNUSED)                             # exactly the six convs the forward never calls
    assert all(not p.requires_grad for name in UNUSED for p in getattr(net, name).parameters())


def test_guided_attention_is_refused_with_a_pointer_to_no_guidance():
    with pytest.raises(ValueError, match="PromptIR has no guided blocks.*--no-guidance"):
        PromptIR(**TINY, guided_attention=lambda level, dim, heads: None)


@pytest.mark.parametrize("change, message", [
    (dict(decoder=False), "decoder=False"),                   # up4_3 would get the 8·dim latent
    (dict(dim=32), "dim=48"),                                 # the prompt blocks' Linear layers expect 96/192/384
    (dict(heads=[1, 2, 4]), "4 entries"),
])
def test_configs_the_official_code_cannot_run_raise_a_clear_value_error(change, message):
    with pytest.raises(ValueError, match=message):
        PromptIR(**dict(TINY, **change))


def test_bad_input_says_what_was_expected():
    with pytest.raises(ValueError, match="3 input channels"):
        tiny_model()(torch.rand(1, 1, 16, 16))
