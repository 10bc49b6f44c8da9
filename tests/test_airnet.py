"""Claims about AirNet (Li et al., CVPR 2022), a stage-1 restorer of Table XIV: the official network, its deformable
convolution, its released checkpoints and its two-phase contrastive training."""

import types
import zlib

import pytest
import torch
import torch.nn.functional as F

from backbone import count_parameters
from networks.airnet import DCN, AirNet, load_official, medium_step

TINY = AirNet.CONFIGS["tiny"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # 2 cores shared by several jobs: with 2 threads every op waits for the descheduled one (10x slower here).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def vector():
    from conftest import SHARED                               # the module-scoped twin of the shared_dir fixture
    path = SHARED / "reference" / "airnet_tiny_vector.pt"
    if not path.is_file():
        pytest.skip(f"reference vector not found at {path}")
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="module")
def official_state(vector):
    """The vector's weights, rebuilt key by key from `shapes`, `buffers` and `recipe` (reference README)."""
    seed, std = vector["recipe"]["seed"], vector["recipe"]["std"]
    state = {}
    for key, shape in vector["shapes"]:
        if key in vector["buffers"]:
            state[key] = vector["buffers"][key]
            continue
        generator = torch.Generator().manual_seed(seed + zlib.crc32(key.encode()))
        if key.endswith("running_var"):
            state[key] = 0.5 + torch.rand(shape, generator=generator)
        elif key.endswith("running_mean"):
            state[key] = 0.1 * torch.randn(shape, generator=generator)
        else:
            scale = std * 20 if "conv_offset_mask" in key else std            # offsets of about a pixel
            shift = 1.0 if len(shape) == 1 and key.endswith("weight") else 0.0
            state[key] = scale * torch.randn(shape, generator=generator) + shift
    return state


def batch_of_two_crops(size=8):
    generator = torch.Generator().manual_seed(3)
    return {name: torch.rand(2, 3, size, size, generator=generator) for name in ("degraded", "positive", "target")}


def contrastive_loss_by_hand(model, batch, queue):
    """L_contrast = −log softmax([q·k⁺, q·queue] / 0.07)₀ from the two encoders as they now are."""
    moco = model.E.E
    q = F.normalize(moco.encoder_q(batch["degraded"])[1], dim=1)               # (B, 256)
    k = F.normalize(moco.encoder_k(batch["positive"])[1], dim=1)
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue], dim=1) / 0.07     # (B, 1 + K)
    return (torch.logsumexp(logits, dim=1) - logits[:, 0]).mean(), k


def test_airnet_reproduces_the_official_output_of_the_tiny_reference_vector(shared_dir, vector, official_state):
    model = AirNet(**vector["kwargs"]).eval()                 # the official opt: batch_size 2, a queue of 512 keys
    model.load_state_dict(official_state, strict=True)
    with torch.no_grad():
        output = model(vector["input"], vector["input"])      # the official eval call net(x, x)
    assert (output - vector["input"]).abs().max().item() > 0.1                # the blocks do change the image
    assert (output - vector["output"]).abs().max().item() < 1e-5   # swapped (Δx, Δy) offsets would be 4.7e-3 off


def test_a_plain_build_has_exactly_the_official_state_dict_keys_and_shapes_in_order(shared_dir, vector):
    state = AirNet(**TINY).state_dict()
    assert [(k, tuple(v.shape)) for k, v in state.items()] == [(k, tuple(s)) for k, s in vector["shapes"]]


def test_a_fresh_dcn_is_half_a_plain_convolution_its_offsets_zero_and_masks_sigmoid_0():
    dcn = DCN(8, 8, kernel_size=3, padding=1)                 # the official initialisation
    x, inter = torch.rand(2, 8, 7, 9), torch.rand(2, 8, 7, 9)
    assert torch.allclose(dcn(x, inter), 0.5 * F.conv2d(x, dcn.weight, padding=1), atol=1e-6)


def test_offset_channels_come_in_dy_dx_pairs_per_tap_so_ones_on_the_even_channels_sample_one_row_down():
    dcn = DCN(4, 4, kernel_size=3, padding=1)
    with torch.no_grad():                                     # offsets and masks from the bias alone
        dcn.conv_offset_mask.bias[0:18:2] = 1.0               # Δy = 1 for all 9 taps: channels 0, 2, ..., 16
        dcn.conv_offset_mask.bias[18:] = 30.0                 # masks sigmoid(30) = 1
    x = torch.rand(1, 4, 6, 5)
    # Output row i sees rows i, i + 1, i + 2 instead of i − 1, i, i + 1: no zero row above, two below.
    expected = F.conv2d(F.pad(x, (1, 1, 0, 2)), dcn.weight)
    assert torch.allclose(dcn(x, torch.rand(1, 4, 6, 5)), expected, atol=1e-5)


def test_every_released_config_has_8930313_parameters_7610377_trainable_and_its_own_queue():
    queues = {"paper": 1280, "denoise": 768, "derain": 256, "dehaze": 256}     # test.py: batch_size × 256 keys
    for name, keys in queues.items():
        model = AirNet(**AirNet.CONFIGS[name])
        assert count_parameters(model) == 7_610_377, name
        assert count_parameters(model) + count_parameters(model, trainable=False) == 8_930_313, name
        assert not any(p.requires_grad for p in model.E.E.encoder_k.parameters())   # MoCo's key encoder: a copy
        assert model.E.E.queue.shape == (256, keys)
        assert AirNet.size_multiple(AirNet.CONFIGS[name]) == 1
    official_form = AirNet(types.SimpleNamespace(batch_size=3))                # the official AirNet(opt)
    assert official_form.E.E.queue.shape == (256, 768)


def test_restore_takes_any_size_whole_and_returns_the_eval_forward():
    model = AirNet(batch_size=1).eval()                       # a non-default config: Derain.pth's queue
    for size in [(13, 19), (5, 3)]:
        image = torch.rand(2, 3, *size)
        with torch.no_grad():
            restored = model.restore(image)
            assert restored.shape == image.shape
            assert torch.equal(restored, model(image, torch.rand_like(image)))     # x_key unused at test time


def test_restore_refuses_training_mode_and_bad_input():
    model = AirNet(**TINY)
    with pytest.raises(RuntimeError, match="model.eval"):     # the training forward would write the queue
        model.restore(torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError, match="3 input channels"):
        model.eval().restore(torch.rand(1, 1, 8, 8))


def test_load_official_reads_a_plain_and_a_dataparallel_state_dict_and_reproduces_the_vector(
        shared_dir, tmp_path, vector, official_state):
    torch.save(official_state, tmp_path / "All.pth")          # train.py: torch.save(net.state_dict(), ...)
    torch.save({"module." + k: v for k, v in official_state.items()}, tmp_path / "parallel.pth")
    model = load_official(AirNet(**TINY), tmp_path / "All.pth").eval()
    with torch.no_grad():
        output = model.restore(vector["input"])
        assert (output - vector["output"]).abs().max().item() < 1e-5
        for param in model.parameters():
            param.zero_()
    load_official(model, tmp_path / "parallel.pth")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in official_state.items())


def test_load_official_says_in_one_line_which_file_does_not_fit_and_how(tmp_path, official_state):
    torch.save(dict(official_state, **{"E.E.queue": torch.zeros(256, 768)}), tmp_path / "Denoise.pth")
    with pytest.raises(ValueError, match=r"Denoise.pth .*E.E.queue: checkpoint \(256, 768\), model \(256, 512\).*"
                                         r"batch_size=3"):
        load_official(AirNet(**TINY), tmp_path / "Denoise.pth")
    torch.save({"conv.weight": torch.zeros(8, 3, 3, 3)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="other.pth is not an AirNet checkpoint: 584 keys missing"):
        load_official(AirNet(**TINY), tmp_path / "other.pth")
    (tmp_path / "broken.pth").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="broken.pth is not a readable checkpoint"):
        load_official(AirNet(**TINY), tmp_path / "broken.pth")
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_official(AirNet(**TINY), tmp_path / "missing.pth")


def test_guided_attention_is_refused_with_the_no_guidance_hint():
    with pytest.raises(ValueError, match="no guided blocks.*--no-guidance"):
        AirNet(**TINY, guided_attention=lambda level, channels, heads: None)


def test_warm_up_is_the_contrastive_loss_alone_and_an_optimizer_step_moves_only_the_encoder():
    model, batch = AirNet(**TINY).train(), batch_of_two_crops()
    queue = model.E.E.queue.clone()
    before = {k: v.clone() for k, v in model.named_parameters()}
    loss, parts = medium_step(model, batch, {"step": 4}, warmup_steps=5)
    assert set(parts) == {"loss_contrast"}
    with torch.no_grad():                                     # the key encoder is still encoder_q's copy
        expected, k = contrastive_loss_by_hand(model, batch, queue)
    assert torch.allclose(loss, expected, atol=1e-5) and torch.equal(parts["loss_contrast"], loss.detach())
    assert int(model.E.E.queue_ptr) == 2                      # this batch's keys were enqueued at the front
    assert torch.allclose(model.E.E.queue[:, :2], k.T, atol=1e-6)
    assert torch.equal(model.E.E.queue[:, 2:], queue[:, 2:])
    loss.backward()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    optimizer.step()
    for name, param in model.named_parameters():              # (the key encoder moves by momentum alone)
        if name.startswith("R."):                             # the restorer gets no gradient: untouched
            assert torch.equal(param, before[name]), name
        elif name.startswith("E.E.encoder_q."):
            assert not torch.equal(param, before[name]), name


def test_after_warm_up_the_loss_is_l1_plus_a_tenth_of_the_contrastive_loss_and_trains_both_halves():
    model, batch = AirNet(**TINY).train(), batch_of_two_crops()
    moco = model.E.E
    with torch.no_grad():                                     # a query encoder that has left its copy
        for param in moco.encoder_q.parameters():
            param.add_(0.01 * torch.randn_like(param))
    key_before = [p.clone() for p in moco.encoder_k.parameters()]
    queue = moco.queue.clone()
    loss, parts = medium_step(model, batch, {"step": 5}, warmup_steps=5)
    for param_k, old, param_q in zip(moco.encoder_k.parameters(), key_before, moco.encoder_q.parameters()):
        assert torch.allclose(param_k, 0.999 * old + 0.001 * param_q, atol=1e-7)   # θ_k ← mθ_k + (1 − m)θ_q
    with torch.no_grad():
        loss_contrast, k = contrastive_loss_by_hand(model, batch, queue)
        restored = model.R(batch["degraded"], moco.encoder_q(batch["degraded"])[2])
        loss_rec = (restored - batch["target"]).abs().mean()
    assert torch.allclose(parts["loss_rec"], loss_rec, atol=1e-6)
    assert torch.allclose(parts["loss_contrast"], loss_contrast, atol=1e-5)
    assert torch.allclose(loss, loss_rec + 0.1 * loss_contrast, atol=1e-5)
    assert torch.allclose(moco.queue[:, :2], k.T, atol=1e-6) and int(moco.queue_ptr) == 2
    loss.backward()
    for name, param in model.named_parameters():              # every trainable parameter learns, no frozen one
        assert (param.grad is not None) == param.requires_grad == (".encoder_k." not in name), name


def test_the_queue_is_a_ring_any_batch_wraps_around_and_only_a_batch_larger_than_the_queue_is_refused():
    model = AirNet(batch_size=1).train()                      # 256 keys: batches of 100 wrap around at 256
    for _ in range(3):                                        # keys 0-99, 100-199, then 200-255 and 0-43
        _, _, _, _ = model(torch.rand(100, 3, 8, 8), torch.rand(100, 3, 8, 8), encoder_only=True)
    assert int(model.E.E.queue_ptr) == 300 % 256
    with torch.no_grad():
        model.E.E._dequeue_and_enqueue(torch.eye(256)[:20])   # rows e_0..e_19 as keys, written at 44..63
    assert torch.equal(model.E.E.queue[:, 44:64], torch.eye(256)[:, :20])
    with pytest.raises(ValueError, match="256 keys, fewer than a batch of 300"):
        model(torch.rand(300, 3, 8, 8), torch.rand(300, 3, 8, 8), encoder_only=True)
