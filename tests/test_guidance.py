"""Claims of Sec. III-C.2-3 (Eq. 5-8), Fig. 4 and Table X about the guidance and the full network."""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from backbone import TransformerBlock, count_parameters, tiled_forward
from guidance import (CFE, PGCA, PGM, CodeBatchNorm, GuidedMixer, PerceiveIR, PriorProjection, SemanticGuidance,
                      build_backbone, build_sgm, degradation_centroids, parameter_breakdown, perceive, prior_view,
                      restore_image)


@pytest.fixture(scope="module")
def sgm():
    return build_sgm("tiny")                                  # 640K-parameter DINOv2 stand-in


def tiny_model(sgm, **ablation):
    return PerceiveIR("restormer", "tiny", semantic_dim=sgm.embed_dim, **ablation)


def test_eq5_sgm_returns_the_cls_token_after_blocks_1_4_8_12():
    sgm = build_sgm("tiny")
    with torch.no_grad():                         # timm starts LayerScale at 1e-5: every random block would
        for block in sgm.vit.blocks:              # leave the CLS token almost as it came, hiding a wrong index
            block.ls1.gamma.fill_(1.0)
            block.ls2.gamma.fill_(1.0)
    degraded = torch.rand(2, 3, 40, 70)
    semantic = sgm(degraded)
    assert semantic.shape == (2, 4, sgm.embed_dim)
    # Independent check with forward hooks on every block of the same ViT.
    captured = []
    hooks = [block.register_forward_hook(lambda m, i, o: captured.append(o[:, 0])) for block in sgm.vit.blocks]
    with torch.no_grad():
        x = torch.nn.functional.interpolate(degraded, size=(56, 56), mode="bicubic", antialias=True)
        sgm.vit.forward_features((x - sgm.mean) / sgm.std)
    for hook in hooks:
        hook.remove()
    assert torch.allclose(semantic, torch.stack([captured[i] for i in (0, 3, 7, 11)], dim=1), atol=1e-5)
    for wrong in ((1, 4, 8, 11), (0, 4, 8, 11)):                      # 1-based read as 0-based, off by one
        assert (semantic - torch.stack([captured[i] for i in wrong], dim=1)).abs().max() > 1e-2


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
    # By hand: Q from Y, K and V from X; softmax(normalize(q) normalize(k)ᵀ α) per head; out = proj(A v).
    with torch.no_grad():
        q = pgca.q_dwconv(pgca.q(y)).reshape(1, 2, 4, 36)
        k, v = pgca.kv_dwconv(pgca.kv(x)).chunk(2, dim=1)
        k, v = k.reshape(1, 2, 4, 36), v.reshape(1, 2, 4, 36)
        qn, kn = q / q.norm(dim=-1, keepdim=True), k / k.norm(dim=-1, keepdim=True)
        expected_attn = torch.softmax(qn @ kn.transpose(-2, -1) * pgca.temperature, dim=-1)   # (1, 2, 4, 4)
        expected = pgca.project_out((expected_attn @ v).reshape(1, 8, 6, 6))
    assert torch.allclose(attn, expected_attn, atol=1e-6)
    assert torch.allclose(out, expected, atol=1e-5)
    assert not torch.allclose(pgca(x, y), out, atol=1e-3)             # swapping the roles changes it


def test_eq8_the_residual_of_the_etb_mixer_is_y():
    mixer = GuidedMixer(dim=8, num_heads=2, semantic_dim=6, code_dim=2)
    with torch.no_grad():
        mixer.pgca.project_out.weight.zero_()                 # proj(CrossAtt(...)) = 0 → X^m = Y
        mixer.modulate.to_scale_shift.bias.fill_(0.5)
    x, prior = torch.randn(2, 8, 4, 4), torch.randn(2, 8)
    y = mixer.modulate(x, prior)
    assert torch.allclose(mixer(x, torch.nn.Identity(), prior), y)
    assert torch.allclose(y, x * 1.5 + 0.5)


def test_eq3_an_etb_is_gdfn_after_the_guided_mixer_which_takes_the_place_of_mdta():
    mixer = GuidedMixer(dim=8, num_heads=2, semantic_dim=6, code_dim=2)
    torch.nn.init.normal_(mixer.modulate.to_scale_shift.weight, std=0.1)
    block = TransformerBlock(8, 2, mixer=mixer)
    x, prior = torch.randn(2, 8, 5, 5), torch.randn(2, 8)
    with torch.no_grad():
        # Eq. (3): F_etb(X, Y) = F_gdfn(F_pgca(X, Y)), each with its residual, PGCA reading LN(Y), LN(X).
        y = mixer.modulate(x, prior)
        mixed = mixer.pgca(block.norm1(y), block.norm1(x)) + y
        expected = mixed + block.ffn(block.norm2(mixed))
        assert torch.allclose(block(x, prior), expected, atol=1e-6)
    assert not any(type(m).__name__ == "MDTA" for m in block.modules())


def test_cfe_gives_a_128_d_code_for_any_image_size():
    cfe = CFE()
    assert cfe(torch.rand(3, 3, 37, 29)).shape == (3, 128)
    assert cfe(torch.rand(1, 3, 128, 128)).shape == (1, 128)


def test_cfes_batch_norm_is_torchs_in_one_process_with_its_running_statistics_in_eval():
    torch.manual_seed(0)
    ours, torchs = CodeBatchNorm(5), torch.nn.BatchNorm2d(5)
    for module in (ours, torchs):
        torch.nn.init.normal_(module.weight)
        torch.nn.init.normal_(module.bias)
    torchs.load_state_dict(ours.state_dict())
    for _ in range(3):
        x = (torch.randn(4, 5, 6, 7) * 3 + 1).requires_grad_()
        y = x.detach().clone().requires_grad_()
        assert torch.allclose(ours(x), torchs(y), atol=1e-5)
        (ours(x) * torch.arange(5.0)[:, None, None]).sum().backward()        # a second pass: stats move on
        (torchs(y) * torch.arange(5.0)[:, None, None]).sum().backward()
        assert torch.allclose(x.grad, y.grad, atol=1e-5)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.allclose(getattr(ours, name).double(), getattr(torchs, name).double(), atol=1e-5), name
    x = torch.randn(2, 5, 3, 3)
    assert torch.allclose(ours.eval()(x), torchs.eval()(x), atol=1e-5)
    blocks = CFE((8, 16, 32), norm="batch").modules()
    assert sum(isinstance(m, CodeBatchNorm) for m in blocks) == 8             # 2 + 3 + 3 (two with shortcuts)
    assert not any(isinstance(m, (CodeBatchNorm, torch.nn.GroupNorm)) for m in CFE((8, 16, 32)).modules())  # none
    from guidance import build_model                       # a checkpoint written before --cfe-norm: its own flag
    old = dict(backbone="restormer", backbone_config="tiny", dino="tiny", no_guidance=False, no_dino=False,
               no_pgm=False, no_cfe=False)
    assert any(isinstance(m, CodeBatchNorm) for m in build_model({**old, "cfe_batch_norm": True}).cfe.modules())
    assert not any(isinstance(m, CodeBatchNorm) for m in build_model(old).cfe.modules())


def test_cfes_instance_norm_uses_each_images_own_statistics_alike_in_training_and_in_eval():
    torch.manual_seed(0)
    cfe = CFE((8, 16, 32), norm="instance")
    norms = [m for m in cfe.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert len(norms) == 6 and all(m.num_groups == m.num_channels for m in norms)   # two per block, body only
    images = torch.rand(3, 3, 24, 24)
    alone = torch.cat([cfe(image[None]) for image in images])
    assert torch.allclose(cfe(images), alone, atol=1e-5)                   # no image's code depends on the batch
    assert torch.allclose(cfe.eval()(images), alone, atol=1e-5)            # and training mode is eval mode
    dark = cfe(0.1 * images)                                               # the shortcut keeps the level
    assert (F.normalize(dark, dim=1) * F.normalize(alone, dim=1)).sum(1).max() < 0.9999
    with pytest.raises(ValueError, match="CFE norm 'layer': choose one of none, batch, instance"):
        CFE(norm="layer")


def test_z_of_a_whole_image_from_training_size_tiles_is_the_mean_of_the_codes_of_tiles_that_cover_it(sgm):
    from guidance import image_code, prior_view
    model = tiny_model(sgm).eval()
    image = torch.rand(2, 3, 70, 100)
    with torch.no_grad():
        assert torch.equal(image_code(model, image), model.cfe(image))                  # crop 0: the whole image
        assert torch.equal(image_code(model, image, crop=128), model.cfe(image))        # a tile as large: the same
        tiles = [image[:, :, y:y + 32, x:x + 32] for y in (0, 32, 38) for x in (0, 32, 64, 68)]   # 3 × 4 cover it
        by_hand = torch.stack([model.cfe(tile) for tile in tiles]).mean(0)
        assert torch.allclose(image_code(model, image, crop=32), by_hand, atol=1e-5)
        small = prior_view(image, 50)                                                    # the view comes first
        tiles = [small[:, :, y:y + 32, x:x + 32] for y in (0, 3) for x in (0, 18)]
        assert torch.allclose(image_code(model, image, prior_size=50, crop=32),
                              torch.stack([model.cfe(tile) for tile in tiles]).mean(0), atol=1e-5)
        # The centroids remember how they saw Z, and perception sees queries the same way.
        found = degradation_centroids(model, iter([("denoise", image[0]), ("lowlight", 0.1 * image[1])]),
                                      code_crop=32)
        assert found["code_crop"] == 32
        assert [p["task"] for p in perceive(model, found, torch.stack([image[0], 0.1 * image[1]]))] == \
            ["denoise", "lowlight"]


def degradation_crops(n, generator):
    """n (3, 24, 24) crops of smooth random images and their labels: 0 noise, 1 dark, 2 blur, 3 haze."""
    clean = F.interpolate(torch.rand(n, 3, 6, 6, generator=generator), size=24, mode="bicubic").clamp(0, 1)
    task = torch.arange(n) % 4
    degraded = torch.stack([
        (c + 0.15 * torch.randn(c.shape, generator=generator)).clamp(0, 1) if t == 0 else
        0.15 * c if t == 1 else
        F.avg_pool2d(F.pad(c[None], (2, 2, 2, 2), mode="replicate"), 5, stride=1)[0] if t == 2 else
        0.4 * c + 0.6 * 0.9 for c, t in zip(clean, task)])
    return degraded, task


@pytest.mark.parametrize("norm", ["batch", "instance"])
def test_l_cl_on_four_crops_a_step_teaches_the_cfe_to_tell_the_degradations_apart(norm):
    # The laptop preset's regime: 4 crops a step, a second view of each image as its positive. (On the real
    # training crops, without a norm in CFE, L_cl trained in one preset run of three: README, "What Z learns";
    # tests/test_laptop.py trains CFE with L_cl alone on the real crops.)
    from losses import contrastive_loss
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    cfe = CFE((8, 16, 32), norm=norm)
    optimizer = torch.optim.AdamW(cfe.parameters(), lr=1e-3)
    images, task = degradation_crops(400, generator)
    held_out, held_out_task = degradation_crops(80, generator)
    seen = []
    for step in range(300):
        pick = torch.randint(0, 400, (4,), generator=generator)
        anchor, positive = images[pick], images[pick].flip(-1)
        code, code_positive = cfe(torch.cat([anchor, positive])).chunk(2)
        loss, _ = contrastive_loss(code, code_positive, task[pick])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        seen.append(loss.item())
    cfe.eval()
    with torch.no_grad():
        train_codes, codes = F.normalize(cfe(images), dim=1), F.normalize(cfe(held_out), dim=1)
    centroids = F.normalize(torch.stack([train_codes[task == t].mean(0) for t in range(4)]), dim=1)
    accuracy = ((codes @ centroids.T).argmax(1) == held_out_task).float().mean().item()
    assert sum(seen[-30:]) / 30 < 0.5 * sum(seen[:30]) / 30, seen
    assert accuracy >= 0.9, accuracy


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


def test_the_guidance_keeps_every_feature_shape_of_the_plain_backbone(sgm):
    guided, plain = tiny_model(sgm), build_backbone("restormer", "tiny")
    shapes = {}
    for name, network in (("guided", guided.backbone), ("plain", plain)):
        shapes[name] = []
        for level in ("encoder_level1", "latent", "decoder_level3", "decoder_level2", "decoder_level1", "refinement"):
            last_block = getattr(network, level)[-1]           # run_level calls the blocks one by one
            last_block.register_forward_hook(lambda m, i, o, s=shapes[name]: s.append(tuple(o.shape)))
    degraded = torch.rand(1, 3, 24, 40)
    with torch.no_grad():
        guided(degraded, sgm(degraded))
        plain(degraded)
    assert shapes["guided"] == shapes["plain"] and len(shapes["plain"]) == 6
    assert {type(block.attn).__name__ for block in guided.backbone.latent} == {"GuidedMixer"}
    assert {type(b.attn).__name__ for b in guided.backbone.encoder_level1} == {"MDTA"}


@pytest.mark.parametrize("ablation, absent, present", [
    (dict(use_dino=False), "F_l projection", "learnt F_l (w/o DINOv2)"),
    (dict(use_pgm=False), "PGM (Eq. 6)", "F_l projection (w/o PGM)"),
    (dict(use_cfe=False), "CFE (Fig. 4(b))", "learnt Z (w/o CFE)"),
    (dict(guided=False), "PGCA (Eq. 7-8)", "decoder levels")])
def test_each_table_x_ablation_builds_and_trains(sgm, ablation, absent, present):
    model = tiny_model(sgm, **ablation)
    for name, p in model.named_parameters():                  # leave the zero-initialised identity start
        if name.endswith("to_scale_shift.weight") or name == "learned_code":
            torch.nn.init.normal_(p, std=0.1)
    degraded = torch.rand(2, 3, 16, 16)
    semantic = sgm(degraded) if ablation.get("use_dino", True) else None
    restored, code = model(degraded, semantic)
    (restored.abs().mean() + (code.square().mean() if code is not None else 0)).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, missing
    groups = parameter_breakdown(model)
    assert absent not in groups and present in groups, groups
    if ablation.get("use_cfe") is False:
        assert not hasattr(model, "cfe") and code.shape == (2, 128) and groups["learnt Z (w/o CFE)"] == 128
    if ablation.get("guided") is False:
        assert code is None and count_parameters(model) == count_parameters(build_backbone("restormer", "tiny"))


def test_without_pgm_the_guidance_ignores_z_and_with_pgm_it_does_not(sgm):
    degraded = torch.rand(1, 3, 16, 16)
    semantic = sgm(degraded)
    outputs = {}
    for use_pgm in (False, True):
        model = tiny_model(sgm, use_pgm=use_pgm).eval()
        for name, p in model.named_parameters():                 # as after training: no zero maps
            if "modulate" in name:
                torch.nn.init.normal_(p, std=0.2)
        with torch.no_grad():
            outputs[use_pgm] = [model.backbone(degraded, model.priors(semantic, code))
                                for code in (torch.zeros(1, 128), torch.ones(1, 128))]
    assert torch.equal(*outputs[False])                          # F_l alone: Z has no way in
    assert (outputs[True][0] - outputs[True][1]).abs().max() > 1e-3


def test_w_o_pgm_adds_a_projection_of_the_normalised_f_l_alone():
    projection = PriorProjection(semantic_dim=6, channels=4)
    x, semantic, code = torch.randn(2, 4, 3, 3), torch.randn(2, 6), torch.randn(2, 5)
    with torch.no_grad():
        expected = x + projection.project(F.layer_norm(semantic, (6,)))[:, :, None, None]
        assert torch.allclose(projection(x, torch.cat([semantic, code], dim=1)), expected, atol=1e-6)


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


def pgca_by_hand(C, heads):
    """α (heads) + Q 1×1 (C·C) and its 3×3 depthwise (9C) + K,V 1×1 (2C·C) and depthwise (18C) + proj (C·C)."""
    return heads + C * C + 9 * C + 2 * C * C + 18 * C + C * C


def pgm_by_hand(C, prior=768 + 128):
    """LayerNorm over concat(F_l, Z) (2·896) + the linear map to (γ, β) ∈ R^{2C} (896·2C + 2C)."""
    return 2 * prior + prior * 2 * C + 2 * C


def test_parameter_breakdown_counts_pgm_and_pgca_as_worked_out_by_hand():
    model = PerceiveIR("restormer", "paper")
    breakdown = parameter_breakdown(model)
    # ETBs of the paper config: latent 8 × 384 ch (8 heads), decoder levels 6 × 192 (4), 6 × 96 (2), 4 × 96 (1).
    etbs = [(8, 384, 8), (6, 192, 4), (6, 96, 2), (4, 96, 1)]
    assert breakdown["PGCA (Eq. 7-8)"] == sum(n * pgca_by_hand(C, h) for n, C, h in etbs)
    assert breakdown["PGM (Eq. 6)"] == sum(n * pgm_by_hand(C) for n, C, _ in etbs)
    assert sum(breakdown.values()) == count_parameters(model) == 36_792_116


def test_the_random_tiny_stand_in_is_the_same_in_every_process_and_rebuild():
    from conftest import REPO
    code = ("import torch, guidance; torch.manual_seed({}); sgm = guidance.build_sgm('tiny'); "
            "print(repr(sum(p.double().sum().item() for p in sgm.parameters())))")
    sums = [subprocess.run([sys.executable, "-c", code.format(seed)], capture_output=True, text=True, cwd=REPO,
                           check=True).stdout.strip() for seed in (1, 2)]
    here = repr(sum(p.double().sum().item() for p in build_sgm("tiny").parameters()))
    assert sums[0] == sums[1] == here


# ---------------------------------------------------------------------------------------------
# Restoring any image, and what the model perceives
# ---------------------------------------------------------------------------------------------

def test_restore_image_takes_the_priors_from_the_whole_image_even_when_the_backbone_runs_on_tiles(sgm):
    model = tiny_model(sgm).eval()
    for name, p in model.named_parameters():
        if "to_scale_shift" in name:
            torch.nn.init.normal_(p, std=0.2)
    image = torch.rand(1, 3, 60, 80)
    with torch.no_grad():
        priors = model.priors(sgm(image), model.degradation_code(image))           # whole-image F_l and Z
        expected = tiled_forward(lambda x: model.backbone(x, priors), image, 32, 8).clamp(0, 1)
        assert torch.equal(restore_image(model, sgm, image, tile=32, overlap=8), expected)
        assert torch.allclose(restore_image(model, sgm, image), model(image, sgm(image))[0].clamp(0, 1), atol=1e-6)
        # Beyond prior_size, CFE sees the image resized to prior_size on its long side.
        assert prior_view(image, 40).shape == (1, 3, 30, 40) and prior_view(image, 1024) is image
        small = model.degradation_code(prior_view(image, 40))
        resized = model.backbone(image, model.priors(sgm(image), small)).clamp(0, 1)
        assert torch.allclose(restore_image(model, sgm, image, prior_size=40), resized, atol=1e-6)
        assert not torch.allclose(resized, restore_image(model, sgm, image), atol=1e-4)


def test_steering_turns_z_to_a_task_centroid_keeping_its_length_and_changes_the_restoration(sgm):
    model = tiny_model(sgm).eval()
    for name, p in model.named_parameters():
        if "to_scale_shift" in name:                                        # PGM away from its identity start
            torch.nn.init.normal_(p, std=0.2)
    images = torch.rand(2, 3, 40, 48) * torch.tensor([1.0, 0.2])[:, None, None, None]
    toward = F.normalize(torch.randn(128), dim=0)                              # a task's centroid: a unit vector
    with torch.no_grad():
        code = model.degradation_code(images)
        steered = code.norm(dim=-1, keepdim=True) * toward                     # each image's ‖Z‖, one direction
        expected = model.backbone(images, model.priors(sgm(images), steered)).clamp(0, 1)
        assert torch.allclose(restore_image(model, sgm, images, steer=toward), expected, atol=1e-6)
        assert not torch.allclose(restore_image(model, sgm, images), expected, atol=1e-3)   # Z does steer PGM/PGCA
        own = restore_image(model, sgm, images[:1], steer=F.normalize(code[0], dim=0))    # its own direction: itself
        assert torch.allclose(own, restore_image(model, sgm, images[:1]), atol=1e-5)


def test_the_centroids_count_the_training_images_z_tells_apart_and_say_so_near_chance(sgm):
    # After training, train.py prints how many of the centroids' own images Z names right: a run whose L_cl
    # never trained (codes that all point one way) is then visible at once, not only in a later report.
    model = tiny_model(sgm).eval()
    tasks = {"denoise": lambda g: (g + 0.3 * torch.randn(g.shape, generator=torch.Generator().manual_seed(7))),
             "lowlight": lambda g: 0.1 * g}
    clean = [torch.rand(3, 24, 24, generator=torch.Generator().manual_seed(i)) for i in range(6)]
    images = [(task, make(image).clamp(0, 1)) for task, make in tasks.items() for image in clean]
    lines = []
    found = degradation_centroids(model, iter(images), report=lines.append)
    with torch.no_grad():
        codes = F.normalize(torch.stack([model.cfe(image[None])[0] for _, image in images]), dim=1)
    named = (codes @ found["centroids"].T).argmax(1).tolist()
    right = sum(n == ["denoise", "lowlight"].index(task) for n, (task, _) in zip(named, images))
    assert found["right"] == right / 12 and f"names the task of {right} of 12 training images" in lines[0]
    assert right >= 10 and "hardly" not in lines[0]           # noisy against dark: even random weights see it
    with torch.no_grad():                                     # a collapsed CFE: every Z the same vector
        model.cfe.mlp[-1].weight.zero_()
    collapsed = degradation_centroids(model, iter(images), report=lines.append)
    assert collapsed["right"] == 0.5                           # one centroid wins every image: chance
    assert "(50%; chance 50%); Z hardly tells the tasks apart" in lines[1] and "--cfe-norm instance" in lines[1]


def test_perception_reports_the_nearest_task_centroid_of_z_and_flags_an_unfamiliar_image(sgm):
    model = tiny_model(sgm).eval()
    noise = torch.Generator().manual_seed(0)
    tasks = {"denoise": lambda g: (g + 0.3 * torch.randn(g.shape, generator=noise)).clamp(0, 1),
             "lowlight": lambda g: 0.1 * g}
    clean = [torch.rand(3, 24, 24, generator=torch.Generator().manual_seed(i)) for i in range(6)]
    images = [(task, make(image)) for task, make in tasks.items() for image in clean]
    centroids = degradation_centroids(model, iter(images))
    assert centroids["tasks"] == ["denoise", "lowlight"] and centroids["centroids"].shape == (2, 128)
    with torch.no_grad():
        codes = {t: F.normalize(torch.stack([model.cfe(i[None])[0] for task, i in images if task == t]), dim=1)
                 for t in tasks}
    for i, task in enumerate(tasks):                        # the normalised mean of unit codes Z/‖Z‖
        assert torch.allclose(centroids["centroids"][i], F.normalize(codes[task].mean(0), dim=0), atol=1e-5)
    own = torch.cat([codes[t] @ centroids["centroids"][i] for i, t in enumerate(tasks)])
    assert centroids["threshold"] == pytest.approx(torch.quantile(own, 0.05).item(), abs=1e-6)
    queries = torch.stack([tasks["lowlight"](clean[0]), tasks["denoise"](clean[1])])
    report = perceive(model, centroids, queries)
    with torch.no_grad():
        expected = F.normalize(model.cfe(queries), dim=1) @ centroids["centroids"].T
    assert [r["task"] for r in report] == [["denoise", "lowlight"][int(row.argmax())] for row in expected]
    assert [v for r in report for v in r["similarity"].values()] == pytest.approx(expected.flatten().tolist(), abs=1e-6)
    assert [r["unfamiliar"] for r in report] == [bool(row.max() < centroids["threshold"]) for row in expected]
    unfamiliar = perceive(model, {**centroids, "threshold": 1.01}, queries)      # no code is that close
    assert all(r["unfamiliar"] for r in unfamiliar)
