"""Claims of Sec. III-D, III-E (Eq. 9-13), Sec. IV-A.4 and Table XI about the training losses."""

import json
import math
from datetime import timedelta

import numpy as np

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from PIL import Image
from torchvision.models import vgg16
from torchvision.models.vgg import cfgs, make_layers

import losses
from losses import (TABLE_XI, PerceiveIRLoss, VGGFeatures, batch_psnr, build_vgg, clip_aware_loss,
                    contrastive_loss, difficulty_adaptive_perceptual_loss, negative_weights,
                    reconstruction_loss)

TAU = 0.1


class StubPerceiver(nn.Module):
    """Stand-in for clip_prompts.QualityPerceiver: a frozen linear map from the mean colour of each
    image to K logits, softmax. `bias` fixes the logits when the weight is 0."""

    def __init__(self, bias, excellent_index, weight_scale=0.0):
        super().__init__()
        self.head = nn.Linear(3, len(bias))
        nn.init.constant_(self.head.weight, weight_scale)
        self.head.bias.data = torch.tensor(bias, dtype=torch.float32)
        self.requires_grad_(False)
        self.levels = ["excellent", "mediocre", "terrible"]
        self.excellent_index = excellent_index
        self.calls = 0

    def forward(self, images):
        self.calls += 1
        return self.head(images.mean(dim=(2, 3))).softmax(dim=-1)


class PowerFeatures:
    """Stand-in for VGGFeatures whose four "taps" are x, x², x³, x⁴ element-wise, so that
    M_i(a, b) = |aⁱ − bⁱ| for constant images; records (batch size, grad enabled) of every call."""

    def __init__(self):
        self.calls = []

    def __call__(self, images):
        self.calls.append((images.shape[0], torch.is_grad_enabled()))
        return [images ** p for p in (1, 2, 3, 4)]


def constant_images(values, P=4):
    """(len(values), 3, P, P) images, image n filled with values[n]."""
    return torch.tensor(values, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 3, P, P).clone()


def codes_at(angles_degrees, lengths, dim=128):
    """Codes in R^dim that lie in the first two coordinates, at the given angles and lengths."""
    codes = torch.zeros(len(angles_degrees), dim)
    for n, (angle, length) in enumerate(zip(angles_degrees, lengths)):
        codes[n, 0] = length * math.cos(math.radians(angle))
        codes[n, 1] = length * math.sin(math.radians(angle))
    return codes


def info_nce_by_hand(positive_cosine, negative_cosines):
    """−log(e^{s⁺/τ} / (e^{s⁺/τ} + Σ e^{s⁻/τ})), written out with math."""
    numerator = math.exp(positive_cosine / TAU)
    return -math.log(numerator / (numerator + sum(math.exp(s / TAU) for s in negative_cosines)))


# --------------------------------------------------------------------------------------------
# L_rec, L_clip (Eq. 9)
# --------------------------------------------------------------------------------------------

def test_reconstruction_loss_is_the_mean_absolute_error():
    restored = torch.full((2, 3, 4, 4), 0.5)
    target = torch.cat([torch.full((1, 3, 4, 4), 0.25), torch.full((1, 3, 4, 4), 1.0)])
    assert reconstruction_loss(restored, target).item() == pytest.approx((0.25 + 0.5) / 2)


@pytest.mark.parametrize("excellent_index", [0, 2])
def test_eq9_clip_loss_is_zero_when_excellent_has_all_the_mass(excellent_index):
    bias = [0.0, 0.0, 0.0]
    bias[excellent_index] = 1000.0                            # softmax → exactly one-hot
    perceiver = StubPerceiver(bias, excellent_index)
    assert clip_aware_loss(perceiver, torch.rand(3, 3, 8, 8)).item() == 0.0


def test_eq9_clip_loss_is_two_thirds_when_the_three_prompts_tie():
    perceiver = StubPerceiver([0.3, 0.3, 0.3], excellent_index=0)
    assert clip_aware_loss(perceiver, torch.rand(4, 3, 8, 8)).item() == pytest.approx(1 - 1 / 3)


# --------------------------------------------------------------------------------------------
# L_cl (Eq. 12)
# --------------------------------------------------------------------------------------------

def test_eq12_contrastive_loss_of_a_three_task_batch_equals_the_hand_computed_infonce():
    anchor_angles, positive_offsets = [0.0, 30.0, 70.0], [40.0, -50.0, 35.0]
    code = codes_at(anchor_angles, lengths=[2.0, 0.5, 3.0])  # lengths ≠ 1: S must be the cosine
    code_positive = codes_at([a + d for a, d in zip(anchor_angles, positive_offsets)], [1.5, 4.0, 0.2])
    loss, valid_fraction = contrastive_loss(code, code_positive, torch.tensor([0, 1, 2]), tau=TAU)
    cos = lambda degrees: math.cos(math.radians(degrees))
    expected = [info_nce_by_hand(cos(positive_offsets[a]),
                                 [cos(anchor_angles[a] - anchor_angles[n]) for n in range(3) if n != a])
                for a in range(3)]
    assert loss.item() == pytest.approx(sum(expected) / 3, rel=1e-5)
    assert valid_fraction.item() == 1.0


def test_eq12_same_task_samples_are_neither_positives_nor_negatives():
    # Samples 0 and 1 share task 3 and lie 10° apart: counted as negatives they would dominate.
    code = codes_at([0.0, 10.0, 50.0], [1.0, 1.0, 1.0])
    code_positive = codes_at([30.0, 45.0, 20.0], [1.0, 1.0, 1.0])
    loss, valid_fraction = contrastive_loss(code, code_positive, torch.tensor([3, 3, 1]), tau=TAU)
    cos = lambda degrees: math.cos(math.radians(degrees))
    expected = [info_nce_by_hand(cos(30.0), [cos(50.0)]),           # sample 1 (same task) left out
                info_nce_by_hand(cos(35.0), [cos(40.0)]),           # sample 0 left out
                info_nce_by_hand(cos(30.0), [cos(50.0), cos(40.0)])]
    assert loss.item() == pytest.approx(sum(expected) / 3, rel=1e-5)
    assert valid_fraction.item() == 1.0


def test_eq12_samples_without_any_negative_are_masked_out_and_counted():
    code = torch.randn(4, 128, requires_grad=True)
    code_positive = torch.randn(4, 128, requires_grad=True)
    loss, valid_fraction = contrastive_loss(code, code_positive, torch.tensor([2, 2, 2, 2]))
    assert loss.item() == 0.0 and valid_fraction.item() == 0.0
    assert isinstance(valid_fraction, torch.Tensor) and valid_fraction.dim() == 0
    loss.backward()                                           # no NaN from the all −∞ negatives
    assert torch.isfinite(code.grad).all() and code.grad.abs().sum() == 0


def ddp_contrastive_worker(rank, world_size, init_file, out_dir, code, code_positive, task, weight):
    """One rank of the gloo run: half of the batch, codes from a shared linear "CFE"."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=60))              # a failing rank must not hang the suite
    n = code.shape[0] // world_size
    local = slice(rank * n, (rank + 1) * n)
    cfe = nn.Linear(code.shape[1], 16, bias=False)
    cfe.weight.data.copy_(weight)
    code_local = code[local].clone().requires_grad_()
    code_positive_local = code_positive[local].clone().requires_grad_()
    loss, valid_fraction = contrastive_loss(cfe(code_local), cfe(code_positive_local), task[local])
    loss.backward()
    dist.all_reduce(cfe.weight.grad)                          # what DDP does: the mean over ranks
    cfe.weight.grad /= world_size
    torch.save(dict(loss=loss.detach(), valid_fraction=valid_fraction, grad_code=code_local.grad,
                    grad_code_positive=code_positive_local.grad, grad_weight=cfe.weight.grad),
               out_dir / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="this torch build has no torch.distributed")
def test_eq12_two_gloo_ranks_holding_half_the_batch_give_the_single_process_loss_and_gradients(tmp_path):
    # Rank 0 holds only task 0: alone it would have no negatives; the gathered batch gives it some.
    task = torch.tensor([0, 0, 0, 1, 2, 0])
    code, code_positive = torch.randn(6, 8), torch.randn(6, 8)
    weight = torch.randn(16, 8)
    # fork: the children start with this process's imports (spawn would re-import torch twice)
    mp.start_processes(ddp_contrastive_worker, nprocs=2, join=True, start_method="fork",
                       args=(2, tmp_path / "init", tmp_path, code, code_positive, task, weight))

    cfe = nn.Linear(8, 16, bias=False)
    cfe.weight.data.copy_(weight)
    code_single, code_positive_single = code.clone().requires_grad_(), code_positive.clone().requires_grad_()
    loss, valid_fraction = contrastive_loss(cfe(code_single), cfe(code_positive_single), task)
    loss.backward()
    for rank in range(2):
        out = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        local = slice(3 * rank, 3 * rank + 3)
        assert torch.allclose(out["loss"], loss.detach(), atol=1e-6)
        assert out["valid_fraction"].item() == valid_fraction.item() == 1.0
        # A rank's gradient is W × its share, like the per-rank mean of L_rec; DDP divides by W.
        assert torch.allclose(out["grad_code"] / 2, code_single.grad[local], atol=1e-6)
        assert torch.allclose(out["grad_code_positive"] / 2, code_positive_single.grad[local], atol=1e-6)
        assert torch.allclose(out["grad_weight"], cfe.weight.grad, atol=1e-6)


# --------------------------------------------------------------------------------------------
# O_k (Eq. 10), PSNR, L_dpl (Eq. 11)
# --------------------------------------------------------------------------------------------

def test_eq10_hard_negatives_weigh_one_plus_gamma_and_very_hard_ones_one_minus_gamma():
    negative_psnr = torch.tensor([[29.9, 30.0], [30.1, 35.0]])
    weights = negative_weights(30.0, negative_psnr, gamma=0.25)
    # avgPSNR ≥ PSNR(N_q) → hard → 1.25 (equality included); otherwise very hard → 0.75.
    assert weights.tolist() == [[1.25, 1.25], [0.75, 0.75]]
    assert negative_weights(30.0, negative_psnr, gamma=0.5).tolist() == [[1.5, 1.5], [0.5, 0.5]]
    per_image_average = torch.tensor([[29.0], [36.0]])      # e.g. one avgPSNR per task, broadcast over q
    assert negative_weights(per_image_average, negative_psnr).tolist() == [[0.75, 0.75], [1.25, 1.25]]


def test_eq10_before_any_psnr_is_measured_every_negative_counts_as_very_hard():
    assert negative_weights(None, torch.tensor([[10.0, 40.0]]), gamma=0.25).tolist() == [[0.75, 0.75]]


def test_eq10_avgpsnr_is_measured_per_stratum_and_each_task_averages_its_sigmas():
    # An identity "network": avgPSNR is the probe's own PSNR. Constant errors e give −20·log10(e) dB.
    target = torch.full((2, 3, 4, 4), 0.5)
    offsets = {"denoise_sigma15": [0.1, 0.1], "denoise_sigma25": [0.01, 0.01], "derain": [0.1, 0.01]}
    probe = {name: (target + torch.tensor(e).view(2, 1, 1, 1), target) for name, e in offsets.items()}
    measured = losses.average_psnr(lambda degraded: degraded, probe, "cpu")
    # derain: the mean of its images' PSNRs (20 and 40 dB), not the PSNR of their mean error (23 dB);
    # denoise: the mean of its σ strata, listed before them.
    assert list(measured) == ["denoise", "denoise_sigma15", "denoise_sigma25", "derain"]
    assert list(measured.values()) == pytest.approx([30.0, 20.0, 40.0, 30.0], abs=1e-3)


def test_psnr_of_a_constant_error_of_0_1_is_20_db():
    x = torch.full((2, 3, 5, 5), 0.5)
    assert batch_psnr(x, x + 0.1).tolist() == pytest.approx([20.0, 20.0], abs=1e-4)


def test_psnr_matches_skimage_on_real_rain100l_pairs(shared_dir):
    reference = json.loads((shared_dir / "reference" / "metrics_reference.json").read_text())
    pairs = reference["pairs"][:3]
    read = lambda p: torch.from_numpy(np.array(Image.open(shared_dir / p).convert("RGB"))).permute(2, 0, 1) / 255
    for pair in pairs:
        psnr = batch_psnr(read(pair["input"])[None], read(pair["target"])[None])
        assert psnr.item() == pytest.approx(pair["psnr_rgb"], abs=1e-3)


def dpl_batch(Q):
    """Two images of constant values; image 1's second negative is missing (mask False)."""
    restored = constant_images([0.55, 0.4]).requires_grad_()
    target, degraded = constant_images([0.6, 0.8]), constant_images([0.1, 0.2])
    # PSNR vs target: 0.5 and 0.7 are 0.1 away (20 dB), 0.3 is 0.3 away (10.46 dB).
    negatives = torch.stack([constant_images([0.5, 0.7]), constant_images([0.3, 0.9])], dim=1)[:, :Q]
    mask = torch.tensor([[True, True], [True, False]])[:, :Q]
    return restored, target, degraded, negatives, mask


def test_eq11_dpl_equals_the_hand_computed_ratio_with_a_missing_negative():
    restored, target, degraded, negatives, mask = dpl_batch(Q=2)
    features = PowerFeatures()
    loss = difficulty_adaptive_perceptual_loss(features, restored, target, degraded, negatives, mask,
                                               avg_psnr=15.0, lam=2.0, gamma=0.25)
    xi = [1 / 12, 1 / 6, 1 / 3, 1.0]
    M = lambda a, b, p: abs(a ** p - b ** p)
    expected = 0.0
    for i, p in enumerate((1, 2, 3, 4)):
        # image 0: N_1 at 20 dB > 15 → 1 − γ = 0.75; N_2 at 10.46 dB ≤ 15 → 1 + γ = 1.25
        ratio0 = M(0.6, 0.55, p) / (2 * M(0.1, 0.55, p) + 0.75 * M(0.5, 0.55, p) + 1.25 * M(0.3, 0.55, p))
        # image 1: N_1 at 20 dB → 0.75; N_2 missing → weight 0
        ratio1 = M(0.8, 0.4, p) / (2 * M(0.2, 0.4, p) + 0.75 * M(0.7, 0.4, p))
        expected += xi[i] * (ratio0 + ratio1) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # I_g, I_d and both N_q of both images in one call without a graph, then I_r with one.
    assert features.calls == [(2 * (2 + 2), False), (2, True)]


def test_eq11_dpl_with_no_non_easy_negatives_uses_the_easy_negative_alone():
    restored, target, degraded, negatives, mask = dpl_batch(Q=0)
    assert negatives.shape == (2, 0, 3, 4, 4) and mask.shape == (2, 0)
    loss = difficulty_adaptive_perceptual_loss(PowerFeatures(), restored, target, degraded, negatives,
                                               mask, avg_psnr=None)
    xi = [1 / 12, 1 / 6, 1 / 3, 1.0]
    expected = sum(x * ((abs(0.6 ** p - 0.55 ** p) / (2 * abs(0.1 ** p - 0.55 ** p))
                         + abs(0.8 ** p - 0.4 ** p) / (2 * abs(0.2 ** p - 0.4 ** p))) / 2)
                   for x, p in zip(xi, (1, 2, 3, 4)))
    assert loss.item() == pytest.approx(expected, rel=1e-5)


# --------------------------------------------------------------------------------------------
# VGG-16 features
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def random_vgg16_file(tmp_path_factory):
    """A randomly initialised torchvision vgg16 and its state_dict saved to a file (built once)."""
    with torch.random.fork_rng():
        torch.manual_seed(1)
        model = vgg16(weights=None).eval()
    path = tmp_path_factory.mktemp("vgg") / "vgg16_random.pth"
    torch.save(model.state_dict(), path)
    return model, path


def reference_taps(model, images):
    """torchvision's own features run layer by layer, cloning at 3, 7, 11, 15 (before any in-place ReLU)."""
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x, taps = (images - mean) / std, []
    with torch.no_grad():
        for index, layer in enumerate(model.features):
            x = layer(x)
            if index in (3, 7, 11, 15):
                taps.append(x.clone())
            if index == 15:
                return taps


def test_a_vgg_weight_file_loads_through_the_real_path_and_sets_the_features(random_vgg16_file):
    model, path = random_vgg16_file
    vgg = build_vgg(weights=path)
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        features = vgg(images)
    for ours, reference in zip(features, reference_taps(model, images)):
        assert torch.allclose(ours, reference, atol=1e-5)
    with torch.random.fork_rng():
        torch.manual_seed(2)
        other = VGGFeatures(make_layers(cfgs["D"]), "another random init")   # what a file not loaded would give
    with torch.no_grad():
        assert not torch.allclose(other(images)[-1], features[-1], atol=1e-3)
    assert str(path) in vgg.description


def test_a_features_only_vgg_file_loads_too(random_vgg16_file, tmp_path):
    model, _ = random_vgg16_file
    path = tmp_path / "vgg16_features.pth"
    images = torch.rand(1, 3, 16, 16)
    for state in ({k: v for k, v in model.state_dict().items() if k.startswith("features.")},
                  model.features.state_dict()):
        torch.save(state, path)
        with torch.no_grad():
            assert torch.allclose(build_vgg(weights=path)(images)[1], reference_taps(model, images)[1], atol=1e-5)


def test_vgg_taps_are_relu1_2_conv2_2_relu3_1_relu3_3_and_survive_the_inplace_relus(random_vgg16_file):
    _, path = random_vgg16_file
    vgg = build_vgg(weights=path)
    assert len(vgg.layers) == 16                              # stops at the deepest tap
    assert [type(vgg.layers[i]) for i in (3, 7, 11, 15)] == [nn.ReLU, nn.Conv2d, nn.ReLU, nn.ReLU]
    assert not any(getattr(layer, "inplace", False) for layer in vgg.layers)
    with torch.no_grad():
        features = vgg(torch.rand(1, 3, 32, 32))
    assert [tuple(f.shape[1:]) for f in features] == [(64, 32, 32), (128, 16, 16), (256, 8, 8), (256, 8, 8)]
    assert (features[1] < 0).any()                            # conv2_2 kept its negative values
    assert all((f >= 0).all() for f in (features[0], features[2], features[3]))
    assert all(not p.requires_grad for p in vgg.parameters()) and not vgg.training


def test_unavailable_vgg_weights_raise_an_error_naming_the_flag(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_network(*args, **kwargs):
        raise OSError("network unreachable (test)")
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)   # offline, also on machines with a network
    with pytest.raises(RuntimeError, match="--vgg-weights"):
        build_vgg()
    with pytest.raises(FileNotFoundError, match="--vgg-weights"):
        build_vgg(weights=tmp_path / "missing.pth")
    bad = tmp_path / "not_vgg.pth"
    torch.save({"weight": torch.zeros(3)}, bad)
    with pytest.raises(ValueError, match="--vgg-weights .*not_vgg.pth"):
        build_vgg(weights=bad)
    with pytest.raises(ValueError, match="tiny"):
        build_vgg(variant="vgg19")


def test_the_tiny_vgg_says_plainly_that_it_is_not_vgg16_and_has_the_same_taps():
    vgg = build_vgg(variant="tiny")
    assert "NOT pretrained VGG-16" in vgg.description
    assert [type(vgg.layers[i]) for i in (3, 7, 11, 15)] == [nn.ReLU, nn.Conv2d, nn.ReLU, nn.ReLU]
    assert len(vgg(torch.rand(1, 3, 16, 16))) == 4
    assert torch.equal(build_vgg(variant="tiny").layers[0].weight, vgg.layers[0].weight)   # reproducible


# --------------------------------------------------------------------------------------------
# L_total (Eq. 13), Table XI, gradient reachability
# --------------------------------------------------------------------------------------------

class TinyRestorer(nn.Module):
    """I_r = I_d + conv(I_d), and a code Z from the mean colour (a stand-in for CFE)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.code_head = nn.Linear(3, 128)

    def forward(self, degraded):
        return degraded + self.conv(degraded), self.code_head(degraded.mean(dim=(2, 3)))


def training_batch(B=4, Q=2, P=16):
    target = torch.rand(B, 3, P, P)
    return dict(target=target, degraded=(target + 0.2 * torch.randn_like(target)).clamp(0, 1),
                positive=torch.rand(B, 3, P, P),
                negatives=(target[:, None] + 0.05 * torch.randn(B, Q, 3, P, P)).clamp(0, 1),
                negative_mask=torch.tensor([[True, True], [True, False], [False, False], [True, True]]),
                task=torch.tensor([0, 1, 1, 2]))


def tiny_perceiver():
    """The real QualityPerceiver on the tiny random CLIP, with prompts of its own text tower."""
    import clip_prompts
    clip_model = clip_prompts.load_clip("tiny")
    learner = clip_prompts.PromptLearner(clip_model)
    return clip_model, clip_prompts.QualityPerceiver(clip_model, learner().detach(), learner.words)


def test_i_r_and_the_restorer_get_gradients_while_vgg_and_clip_get_none():
    model, batch = TinyRestorer(), training_batch()
    vgg = build_vgg(variant="tiny")
    clip_model, perceiver = tiny_perceiver()
    restored, code = model(batch["degraded"])
    restored.retain_grad()
    _, code_positive = model(batch["positive"])
    total, parts = PerceiveIRLoss(vgg, perceiver)(restored, batch, code, code_positive, avg_psnr=25.0)
    total.backward()
    assert restored.grad is not None and restored.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    frozen = [*vgg.parameters(), *perceiver.parameters(), *clip_model.parameters()]
    assert len(frozen) > 50 and all(p.grad is None and not p.requires_grad for p in frozen)
    assert all(not v.requires_grad for v in parts.values())
    assert all(parts[k].dim() == 0 for k in ("loss_rec", "loss_cl", "loss_clip", "loss_dpl", "cl_valid_fraction"))


@pytest.mark.parametrize("row", sorted(TABLE_XI))
def test_table_xi_rows_switch_terms_off_and_a_term_off_costs_nothing(row):
    switches = TABLE_XI[row]
    features, perceiver = PowerFeatures(), StubPerceiver([0.1, 0.2, 0.3], excellent_index=0, weight_scale=0.5)
    model, batch = TinyRestorer(), training_batch()
    restored, code = model(batch["degraded"])
    _, code_positive = model(batch["positive"])
    criterion = PerceiveIRLoss(features, perceiver, **switches)
    total, parts = criterion(restored, batch, code, code_positive, avg_psnr=25.0)
    assert (perceiver.calls > 0) == switches["use_clip"]      # a switched-off term costs nothing
    assert (len(features.calls) > 0) == switches["use_dpl"]
    # Eq. (13) from terms computed here, each by its own function (tested by hand above):
    # λ1, λ2, λ3 = 0.1, 0.05, 0.1 (Sec. IV-A.4).
    with torch.no_grad():
        rec = (restored - batch["target"]).abs().mean()
        cl = contrastive_loss(code, code_positive, batch["task"])[0]
        clip = 1 - perceiver(restored)[:, 0].mean()
        dpl = difficulty_adaptive_perceptual_loss(PowerFeatures(), restored, batch["target"], batch["degraded"],
                                                  batch["negatives"], batch["negative_mask"], 25.0)
    expected = (rec + 0.1 * cl * switches["use_cl"] + 0.05 * clip * switches["use_clip"]
                + 0.1 * dpl * switches["use_dpl"])
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    assert min(cl, clip, dpl) > 0.05                          # each term would move the total
    assert parts["cl_valid_fraction"].item() == (1.0 if switches["use_cl"] else 0.0)


def test_table_xi_has_the_eight_rows_of_the_paper():
    # Table XI: (a) L_rec alone, then L_clip, L_dpl, L_cl alone, in pairs, and all three (h).
    assert TABLE_XI == {
        "a": dict(use_clip=False, use_dpl=False, use_cl=False), "b": dict(use_clip=True, use_dpl=False, use_cl=False),
        "c": dict(use_clip=False, use_dpl=True, use_cl=False), "d": dict(use_clip=False, use_dpl=False, use_cl=True),
        "e": dict(use_clip=False, use_dpl=True, use_cl=True), "f": dict(use_clip=True, use_dpl=True, use_cl=False),
        "g": dict(use_clip=True, use_dpl=False, use_cl=True), "h": dict(use_clip=True, use_dpl=True, use_cl=True)}


def test_eq10_each_image_counts_its_non_easy_negatives_and_those_weighted_1_minus_gamma():
    restored, target, degraded, negatives, mask = dpl_batch(Q=2)
    # Per-image avgPSNR (B, 1): image 0's task at 15 dB, image 1's at 25 dB.
    # Image 0: N_1 20 dB > 15 → very hard; N_2 10.46 dB → hard. Image 1: N_1 20 dB < 25 → hard; N_2 missing.
    _, very_hard = difficulty_adaptive_perceptual_loss(PowerFeatures(), restored, target, degraded, negatives, mask,
                                                       torch.tensor([[15.0], [25.0]]), return_very_hard=True)
    assert very_hard.tolist() == [[True, False], [False, False]]
    batch = dict(target=target, degraded=degraded, negatives=negatives, negative_mask=mask)
    _, parts = PerceiveIRLoss(PowerFeatures(), use_clip=False, use_cl=False)(restored, batch,
                                                                            avg_psnr=torch.tensor([[15.0], [25.0]]))
    assert parts["non_easy_count"].tolist() == [2, 1] and parts["very_hard_count"].tolist() == [1, 0]


def test_a_term_switched_on_without_its_network_is_a_clear_error():
    with pytest.raises(ValueError, match="perceiver"):
        PerceiveIRLoss(vgg=PowerFeatures(), perceiver=None)
    with pytest.raises(ValueError, match="vgg-weights"):
        PerceiveIRLoss(vgg=None, perceiver=None, use_clip=False)
    criterion = PerceiveIRLoss(use_clip=False, use_dpl=False)
    with pytest.raises(ValueError, match="L_cl"):
        criterion(torch.rand(1, 3, 4, 4), dict(target=torch.rand(1, 3, 4, 4), task=torch.tensor([0])))


def test_the_loss_module_imports_no_project_file():
    source = open(losses.__file__).read()
    assert not any(f"import {name}" in source or f"from {name}" in source
                   for name in ("backbone", "guidance", "clip_prompts", "data", "train"))
