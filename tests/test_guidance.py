"""Claims of Sec. III-C.2-3 (Eq. 5-8), Fig. 4 and Table X about the guidance and the full network."""

import pytest
import torch

from backbone import build_backbone, count_parameters
from guidance import CFE, PGCA, PGM, GuidedMixer, PerceiveIR, SemanticGuidance, build_sgm, parameter_breakdown


@pytest.fixture(scope="module")
def sgm():
    return build_sgm("tiny")                                  # 640K-parameter DINOv2 stand-in


def tiny_model(sgm, **ablation):
    return PerceiveIR("restormer", "tiny", semantic_dim=sgm.embed_dim, **ablation)


def test_eq5_sgm_returns_the_cls_token_after_blocks_1_4_8_12(sgm):
    degraded = torch.rand(2, 3, 40, 70)
    semantic = sgm(degraded)
    assert semantic.shape == (2, 4, sgm.embed_dim)
    # Independent check with forward hooks on blocks 0, 3, 7, 11 (0-based) of the same ViT.
    captured = []
    hooks = [sgm.vit.blocks[i].register_forward_hook(lambda m, i, o: captured.append(o[:, 0])) for i in (0, 3, 7, 11)]
    with torch.no_grad():
        x = torch.nn.functional.interpolate(degraded, size=(56, 56), mode="bicubic", antialias=True)
        sgm.vit.forward_features((x - sgm.mean) / sgm.std)
    for hook in hooks:
        hook.remove()
    assert torch.allclose(semantic, torch.stack(captured, dim=1), atol=1e-5)


def test_eq6_pgm_is_a_per_channel_affine_modulation_that_starts_as_identity():
    pgm = PGM(prior_dim=6, channels=4)
    x, prior = torch.randn(2, 4, 5, 5), torch.randn(2, 6)
    assert torch.equal(pgm(x, prior), x)                      # zero-initialised: Y = X at start
    with torch.no_grad():
        pgm.to_scale_shift.bias.copy_(torch.tensor([1.0, 0, 0, 0, 0, 0, 0, 2.0]))   # γ_0 = 1, β_3 = 2
    y = pgm(x, prior)
    assert torch.allclose(y[:, 0], 2 * x[:, 0]) and torch.allclose(y[:, 3], x[:, 3] + 2)
    assert torch.allclose(y[:, 1:3], x[:, 1:3])


def test_eq7_pgca_takes_the_query_from_y_and_key_value_from_x():
    pgca = PGCA(dim=8, num_heads=2)
    x, y = torch.randn(1, 8, 6, 6), torch.randn(1, 8, 6, 6)
    out, attn = pgca(y, x, return_attention=True)
    assert out.shape == (1, 8, 6, 6) and attn.shape == (1, 2, 4, 4)      # (B, heads, C/h, C/h)
    # The attention map depends on Y only through Q: rescaling Y leaves it unchanged (Q̂ is
    # L2-normalised) while changing X's values changes the output through V.
    _, attn_scaled = pgca(3 * y, x, return_attention=True)
    assert torch.allclose(attn, attn_scaled, atol=1e-5)
    assert not torch.allclose(pgca(y, x), pgca(y, x + 1))
    # By hand for one head: softmax(normalize(q) normalize(k)ᵀ α) v.
    with torch.no_grad():
        q = pgca.q_dwconv(pgca.q(y)).reshape(1, 2, 4, 36)
        k, v = pgca.kv_dwconv(pgca.kv(x)).chunk(2, dim=1)
        k, v = k.reshape(1, 2, 4, 36), v.reshape(1, 2, 4, 36)
        qn, kn = q / q.norm(dim=-1, keepdim=True), k / k.norm(dim=-1, keepdim=True)
        expected = torch.softmax(qn[0, 1] @ kn[0, 1].T * pgca.temperature[1], dim=-1)
    assert torch.allclose(attn[0, 1], expected, atol=1e-6)


def test_eq8_the_residual_of_the_etb_mixer_is_y():
    mixer = GuidedMixer(dim=8, num_heads=2, semantic_dim=6, code_dim=2)
    with torch.no_grad():
        mixer.pgca.project_out.weight.zero_()                 # proj(CrossAtt(...)) = 0 → X^m = Y
        mixer.modulate.to_scale_shift.bias.fill_(0.5)
    x, prior = torch.randn(2, 8, 4, 4), torch.randn(2, 8)
    y = mixer.modulate(x, prior)
    assert torch.allclose(mixer(x, torch.nn.Identity(), prior), y)
    assert torch.allclose(y, x * 1.5 + 0.5)


def test_cfe_gives_a_128_d_code_for_any_image_size():
    cfe = CFE()
    assert cfe(torch.rand(3, 3, 37, 29)).shape == (3, 128)
    assert cfe(torch.rand(1, 3, 128, 128)).shape == (1, 128)


@pytest.mark.parametrize("backbone", ["restormer", "nafnet"])
def test_output_shape_equals_input_shape_for_odd_sizes(sgm, backbone):
    model = PerceiveIR(backbone, "tiny", semantic_dim=sgm.embed_dim).eval()
    degraded = torch.rand(2, 3, 23, 41)
    with torch.no_grad():
        restored, code = model(degraded, sgm(degraded))
    assert restored.shape == degraded.shape and code.shape == (2, 128)


@pytest.mark.parametrize("backbone", ["restormer", "nafnet"])
def test_every_trainable_parameter_gets_a_gradient_and_no_dinov2_parameter_does(sgm, backbone):
    model = PerceiveIR(backbone, "tiny", semantic_dim=sgm.embed_dim)
    for name, p in model.named_parameters():                  # leave the identity start so that
        if name.endswith(("to_scale_shift.weight", "beta", "gamma")):   # every path carries gradient
            torch.nn.init.normal_(p, std=0.1)
    degraded, positive = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    restored, code, code_positive = model(degraded, sgm(degraded), positive)
    (restored.abs().mean() + code.square().mean() + code_positive.square().mean()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing
    assert all(p.grad is None and not p.requires_grad for p in sgm.parameters())
    assert not any(n.startswith("vit") or ".vit." in n for n, _ in model.named_parameters())


def test_positive_crop_code_equals_the_code_of_a_separate_pass(sgm):
    model = tiny_model(sgm).eval()
    degraded, positive = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        _, code, code_positive = model(degraded, sgm(degraded), positive)
        assert torch.allclose(code_positive, model.cfe(positive), atol=1e-5)
        assert torch.allclose(code, model.cfe(degraded), atol=1e-5)


def test_at_initialisation_the_guidance_changes_only_the_attention_not_the_shapes(sgm):
    model = tiny_model(sgm)
    kinds = {type(block.attn).__name__ for block in model.backbone.latent}
    assert kinds == {"GuidedMixer"}
    assert {type(b.attn).__name__ for b in model.backbone.encoder_level1} == {"MDTA"}


@pytest.mark.parametrize("ablation", [dict(use_dino=False), dict(use_pgm=False), dict(use_cfe=False),
                                      dict(use_dino=False, use_pgm=False, use_cfe=False), dict(guided=False)])
def test_each_table_x_ablation_builds_and_trains(sgm, ablation):
    model = tiny_model(sgm, **ablation)
    degraded = torch.rand(2, 3, 16, 16)
    semantic = sgm(degraded) if ablation.get("use_dino", True) else None
    restored, code = model(degraded, semantic)
    restored.abs().mean().backward()
    assert any(p.grad is not None for p in model.parameters())
    if ablation.get("use_dino") is False:
        assert model.learned_semantic.grad is not None
    if ablation.get("use_cfe") is False:
        assert not hasattr(model, "cfe") and code.shape == (2, 128)
    if ablation.get("guided") is False:
        assert code is None and count_parameters(model) == count_parameters(build_backbone("restormer", "tiny"))


def test_without_pgm_the_guidance_ignores_z(sgm):
    model = tiny_model(sgm, use_pgm=False).eval()
    degraded = torch.rand(1, 3, 16, 16)
    semantic = sgm(degraded)
    with torch.no_grad():
        priors = model.priors(semantic, torch.zeros(1, 128))
        other = model.priors(semantic, torch.ones(1, 128))
        assert torch.equal(model.backbone(degraded, priors), model.backbone(degraded, other))


def test_missing_or_mismatched_semantic_features_give_a_clear_error(sgm):
    model = tiny_model(sgm)
    with pytest.raises(ValueError, match="sgm"):
        model(torch.rand(1, 3, 16, 16))
    with pytest.raises(ValueError, match="another DINOv2"):
        model(torch.rand(1, 3, 16, 16), torch.rand(1, 4, 768))


def test_a_dinov2_weight_file_loads_through_the_real_loading_path_and_changes_the_features(sgm, tmp_path):
    import timm
    trained = timm.create_model("vit_small_patch14_dinov2", pretrained=False, embed_dim=64, depth=12,
                                num_heads=2, img_size=56)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = tmp_path / "dinov2_tiny.pth"
    torch.save(trained.state_dict(), path)
    loaded = build_sgm("tiny", weights=path)
    image = torch.rand(1, 3, 56, 56)
    for name, tensor in trained.state_dict().items():
        assert torch.equal(loaded.vit.state_dict()[name], tensor), name
    assert not torch.allclose(loaded(image), sgm(image))
    assert "NOT pretrained" not in loaded.description


def test_unavailable_dinov2_weights_name_the_flag(monkeypatch, tmp_path):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)   # read at import time:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")                               # fail at once, no retries
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(RuntimeError, match="--dino-weights"):
        build_sgm("base")
    with pytest.raises(RuntimeError, match="--dino-weights"):
        build_sgm("tiny", weights=tmp_path / "missing.pth")


def test_sgm_stays_frozen_in_train_mode(sgm):
    sgm.train()
    assert not sgm.training and not sgm.vit.training
    assert isinstance(sgm, SemanticGuidance) and count_parameters(sgm) == 0


def test_parameter_breakdown_adds_up_to_the_trainable_count(sgm):
    model = PerceiveIR("restormer", "paper")
    breakdown = parameter_breakdown(model)
    assert sum(breakdown.values()) == count_parameters(model)
    # With guidance removed, the rest is exactly the 26.13M Restormer minus its 24 replaced MDTAs.
    guided = breakdown["PGM (Eq. 6)"] + breakdown["PGCA (Eq. 7-8)"] + breakdown["CFE / Z"]
    replaced_mdta = 8 * (4 * 384**2 + 9 * 3 * 384 + 8) + 6 * (4 * 192**2 + 9 * 3 * 192 + 4) \
        + 6 * (4 * 96**2 + 9 * 3 * 96 + 2) + 4 * (4 * 96**2 + 9 * 3 * 96 + 1)
    assert count_parameters(model) - guided == 26_126_644 - replaced_mdta


def test_the_random_tiny_stand_in_is_the_same_in_every_process_and_rebuild():
    torch.manual_seed(1)
    first = build_sgm("tiny")
    torch.manual_seed(2)
    second = build_sgm("tiny")
    image = torch.rand(1, 3, 56, 56)
    assert torch.equal(first(image), second(image))
