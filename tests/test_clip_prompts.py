"""Stage 1 (Sec. III-B, Eq. 1, Table XII): prompts, the quality perceiver, medium-image folds."""

import json
import math
import sys
import time
import types
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import open_clip
import pytest
import torch
import torch.nn.functional as F
from torchvision.io import write_png

import clip_prompts as cp

# BPE ids of CLIP's tokenizer (checked by hand against its vocabulary): start/end of text and words.
SOT, EOT = 49406, 49407
WORD_IDS = {"excellent": 4239, "mediocre": 41170, "terrible": 9741, "X": 343}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # The tiny CLIP's ops take microseconds; with 2 cores shared by several jobs, thread hand-offs
    # cost 30x more than the work. One thread, restored afterwards.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def clip_model():
    return cp.load_clip("tiny")


def toy_triplets(count, generator):
    """Smooth synthetic images (clean), + N(0, 0.2²) (medium), + N(0, 0.8²) (degraded): noise
    levels far enough apart that even a random tiny CLIP image tower tells them apart."""
    items = []
    for i in range(count):
        size = 48 + 8 * (i % 3)                                  # full images of different sizes
        clean = 0.4 + 0.3 * F.interpolate(torch.rand(1, 3, 4, 4, generator=generator), size=size,
                                          mode="bicubic")[0]
        noisy = [(clean + s * torch.randn(clean.shape, generator=generator)).clamp(0, 1) for s in (0.2, 0.8)]
        items.append({"target": clean, "medium": noisy[0], "degraded": noisy[1], "task": 0, "key": f"{i}.png"})
    return items


def test_eq1_truncated_text_tower_reproduces_encode_text_for_word_prompts(clip_model):
    for words in (cp.LEVEL_WORDS[3], cp.LEVEL_WORDS[4]):
        learner = cp.PromptLearner(clip_model, words=words, init="fixed")
        sentences = [" ".join(["X"] * (16 - len(w.split())) + [w]) for w in words]
        reference = clip_model.encode_text(open_clip.tokenize(sentences), normalize=True)    # (K, D)
        assert (learner(truncate=False) - reference).abs().max() < 1e-6   # the 77-token path
        assert (learner(truncate=True) - reference).abs().max() < 1e-5   # cut after EOT


def test_table12_fixed_prompts_are_the_word_sentence_and_have_no_trainable_parameters(clip_model):
    learner = cp.PromptLearner(clip_model, init="fixed")
    assert list(learner.parameters()) == []
    table = clip_model.token_embedding.weight
    for k, word in enumerate(["excellent", "mediocre", "terrible"]):
        assert torch.equal(learner.embeddings[k, :15], table[WORD_IDS["X"]].expand(15, -1))
        assert torch.equal(learner.embeddings[k, 15], table[WORD_IDS[word]])


def test_table12_partial_init_puts_the_word_embedding_in_the_last_slot(clip_model):
    table = clip_model.token_embedding.weight
    learner = cp.PromptLearner(clip_model)                              # the paper's default
    assert learner.embeddings.shape == (3, 16, 32) and learner.embeddings.requires_grad
    for k, word in enumerate(["excellent", "mediocre", "terrible"]):
        assert torch.equal(learner.embeddings[k, -1], table[WORD_IDS[word]])
    random_part = learner.embeddings[:, :-1]
    assert abs(random_part.std().item() - 0.02) < 0.003                   # N(0, 0.02²), not "X"
    two_token = cp.PromptLearner(clip_model, words=cp.LEVEL_WORDS[4])
    assert torch.equal(two_token.embeddings[1, -2:], table[open_clip.tokenize(["slightly better"])[0, 1:3]])
    random = cp.PromptLearner(clip_model, init="random")
    assert not any(torch.equal(random.embeddings[k, -1], table[WORD_IDS[w]])
                   for k, w in enumerate(["excellent", "mediocre", "terrible"]))


def test_only_the_prompt_embeddings_receive_gradients(clip_model):
    learner = cp.PromptLearner(clip_model)
    assert [name for name, _ in learner.named_parameters()] == ["embeddings"]
    features = F.normalize(torch.randn(6, 32), dim=-1)
    loss, _ = cp.prompt_loss(learner, features, torch.tensor([0, 1, 2, 0, 1, 2]), 14.0)
    loss.backward()
    assert learner.embeddings.grad is not None and learner.embeddings.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in clip_model.parameters())


def test_eq1_cross_entropy_over_scaled_cosines_matches_a_hand_computation():
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])                        # T_e, T_t
    images = torch.tensor([[3.0, 0.0], [1.0, 2.0]])                      # cos: (1, 0), (1/√5, 2/√5)
    logits = cp.prompt_logits(images, text, 2.0)
    assert torch.allclose(logits, torch.tensor([[2.0, 0.0], [2 / math.sqrt(5), 4 / math.sqrt(5)]]))
    # both labelled T_t: −½ [log(e⁰/(e²+e⁰)) + log(e^{4/√5}/(e^{2/√5}+e^{4/√5}))]
    loss, accuracy = cp.prompt_loss(lambda truncate=True: text, images, torch.tensor([1, 1]), 2.0)
    expected = 0.5 * (math.log(1 + math.exp(2)) + math.log(1 + math.exp(-2 / math.sqrt(5))))
    assert abs(loss.item() - expected) < 1e-6
    assert accuracy.item() == 0.5                                       # only the second is right


def test_eq1_prompts_learn_to_rank_three_noise_levels_with_a_tiny_clip(clip_model):
    items = toy_triplets(24, torch.Generator().manual_seed(0))
    features, labels = cp.build_embedding_bank(clip_model, items, batch_size=32)             # whole images
    assert features.shape == (72, 32) and labels.tolist()[:6] == [0, 1, 2, 0, 1, 2]
    learner = cp.PromptLearner(clip_model)
    logit_scale = clip_model.logit_scale.exp()
    with torch.no_grad():
        loss_before, accuracy_before = cp.prompt_loss(learner, features, labels, logit_scale)
    optimizer = torch.optim.AdamW(learner.parameters(), lr=1e-2)       # tiny model: a larger lr
    generator = torch.Generator().manual_seed(0)
    for _ in range(120):                                               # batches of 16 random triplets, all 3 tiers
        rows = (torch.randint(24, (16, 1), generator=generator) * 3 + torch.arange(3)).flatten()
        loss, _ = cp.prompt_loss(learner, features[rows], labels[rows], logit_scale)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        loss_after, accuracy_after = cp.prompt_loss(learner, features, labels, logit_scale)
    assert loss_after < 0.5 * loss_before
    assert accuracy_after >= 0.8 and accuracy_after > accuracy_before + 0.2   # chance is 1/3


@pytest.fixture(scope="module")
def eval_transform():
    """open_clip's own preprocessing of a PIL image (resize, centre crop, tensor, normalise)."""
    return open_clip.create_model_and_transforms("ViT-B-32-quickgelu", pretrained=None, **cp.CLIP_CONFIGS["tiny"])[2]


@pytest.mark.parametrize("view", ["crop", "whole"])
def test_cached_features_are_those_open_clips_own_eval_transform_gives_for_each_view(clip_model, eval_transform, view):
    from PIL import Image
    items = toy_triplets(3, torch.Generator().manual_seed(1))
    views = lambda item: cp.quality_views(item, 3, view=view, crops=2, patch_size=32, seed=5)   # noqa: E731
    features, labels = cp.build_embedding_bank(clip_model, items, views, batch_size=4)    # batches split views
    assert features.shape == (3 * (2 if view == "crop" else 1) * 3, 32) and labels.tolist()[:6] == [0, 1, 2] * 2
    # Uncached, independently: each view as an 8-bit PIL image through open_clip's transform.
    images = [image for item in items for image in views(item)]
    as_pil = [Image.fromarray((image.permute(1, 2, 0) * 255).round().byte().numpy()) for image in images]
    with torch.no_grad():
        reference = clip_model.encode_image(torch.stack([eval_transform(p) for p in as_pil]), normalize=True)
    # Stated tolerance: PIL resizes the 8-bit image and rounds again, the cache resizes the float one.
    assert (features - reference).abs().max() < 0.01                  # measured: 0.005
    assert (features - reference.roll(1, 0)).abs().max() > 0.1          # a different image is far off


def test_stage1_crops_are_at_the_same_place_in_the_three_tiers_and_fixed_by_seed_and_key():
    clean = torch.rand(3, 40, 50)
    item = {"target": clean, "medium": clean / 2, "degraded": clean / 4, "task": torch.tensor(2), "key": "a.png"}
    views = cp.quality_views(item, 3, view="crop", crops=4, patch_size=16, seed=0)
    assert len(views) == 12 and all(v.shape == (3, 16, 16) for v in views)
    for n in range(4):                                                   # view-major, tiers e, m, t
        target, medium, degraded = views[3 * n: 3 * n + 3]
        assert torch.equal(medium, target / 2) and torch.equal(degraded, target / 4)
        assert any(torch.equal(target, clean[:, y:y + 16, x:x + 16]) for y in range(25) for x in range(35))
    again = cp.quality_views(item, 3, view="crop", crops=4, patch_size=16, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(views, again))
    other_key = cp.quality_views({**item, "key": "b.png"}, 3, view="crop", crops=4, patch_size=16, seed=0)
    assert not all(torch.equal(a, b) for a, b in zip(views, other_key))
    assert [v.shape for v in cp.quality_views(item, 3, view="whole")] == [(3, 40, 50)] * 3


def test_a_fixed_tenth_of_each_tasks_triplets_is_held_out_from_prompt_training():
    samples = samples_under("/data", {"denoise": 30, "derain": 12, "dehaze": 4})
    held_out = cp.held_out_split(samples)
    assert sorted(t for t, _ in held_out) == ["denoise"] * 3 + ["derain"]   # 10% rounded; none of 4
    assert cp.held_out_split(samples_under("/elsewhere", {"denoise": 30, "derain": 12, "dehaze": 4})[::-1]) == held_out


def test_the_perceiver_multiplies_the_cosines_by_clips_logit_scale(clip_model):
    learner = cp.PromptLearner(clip_model)
    text = learner().detach()
    perceiver = cp.QualityPerceiver(clip_model, text, learner.words)
    image = torch.rand(2, 3, 40, 40)
    with torch.no_grad():
        cosine = F.normalize(clip_model.encode_image(cp.clip_preprocess(image)), dim=-1) @ text.T     # S(·,·)
        scale = clip_model.logit_scale.exp()
        assert scale > 10                                               # 1/0.07 at initialisation
        assert torch.allclose(perceiver(image), (scale * cosine).softmax(-1), atol=1e-5)
        assert not torch.allclose(perceiver(image), cosine.softmax(-1), atol=1e-3)


def test_table12_two_levels_drop_medium_images_and_four_levels_add_a_blend():
    item = {"target": torch.ones(3, 2, 2), "medium": torch.full((3, 2, 2), 0.5), "degraded": torch.zeros(3, 2, 2)}
    assert [t.mean().item() for t in cp.quality_tiers(item, 2)] == [1.0, 0.0]
    assert [t.mean().item() for t in cp.quality_tiers(item, 3)] == [1.0, 0.5, 0.0]
    assert [t.mean().item() for t in cp.quality_tiers(item, 4)] == [1.0, 0.5, 0.25, 0.0]


def test_clip_preprocess_resizes_the_short_side_and_centre_crops_to_224():
    image = torch.zeros(1, 3, 100, 200)                          # → 224 × 448, keep columns 112-335
    image[:, :, 50:, :] = 1.0                                    # bottom half white
    image[:, :, :, :30] = 0.5                                    # a grey stripe that the crop drops
    x = cp.clip_preprocess(image)
    assert x.shape == (1, 3, 224, 224)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD)
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN)
    assert torch.allclose(x[0, :, 0, 0], -mean / std, atol=1e-4)           # black → −mean/std
    assert torch.allclose(x[0, :, -1, 0], (1 - mean) / std, atol=1e-4)     # white → (1−mean)/std


def test_perceiver_probabilities_sum_to_one_and_gradients_reach_the_image_not_clip(clip_model):
    learner = cp.PromptLearner(clip_model)
    perceiver = cp.QualityPerceiver(clip_model, learner().detach(), learner.words)
    perceiver.train()
    assert not perceiver.training and list(p for p in perceiver.parameters() if p.requires_grad) == []
    assert perceiver.levels == ["excellent", "mediocre", "terrible"] and perceiver.excellent_index == 0
    image = torch.rand(2, 3, 50, 70, requires_grad=True)
    probabilities = perceiver(image)
    assert probabilities.shape == (2, 3)
    assert torch.allclose(probabilities.sum(-1), torch.ones(2))
    (1 - probabilities[:, perceiver.excellent_index]).mean().backward()        # L_clip, Eq. (9)
    assert image.grad is not None and image.grad.abs().sum() > 0
    assert all(p.grad is None for p in clip_model.parameters())


def test_prompt_checkpoint_round_trips_with_weights_only(clip_model, tmp_path):
    learner = cp.PromptLearner(clip_model)
    path = tmp_path / "prompts.pt"
    cp.save_prompts(path, learner, clip_model.clip_info, {"lr": 4e-5, "words": "excellent,mediocre,terrible"}, 7)
    raw = torch.load(path, weights_only=True)
    assert raw["step"] == 7 and raw["levels"] == learner.words and raw["clip"]["name"] == "tiny"
    assert torch.equal(raw["embeddings"], learner.embeddings.detach())
    assert not (tmp_path / "prompts.pt.tmp").exists()
    image = torch.rand(1, 3, 40, 40)
    expected = cp.QualityPerceiver(clip_model, learner().detach(), learner.words)(image)
    rebuilt = cp.QualityPerceiver.from_checkpoint(path)            # rebuilds the seeded tiny CLIP
    assert torch.allclose(rebuilt(image), expected, atol=1e-6)
    torch.save({"model": torch.zeros(1)}, tmp_path / "foreign.pt")
    (tmp_path / "corrupt.pt").write_bytes(b"not a checkpoint")
    for name in ("foreign.pt", "corrupt.pt"):
        with pytest.raises(ValueError, match=name):
            cp.QualityPerceiver.from_checkpoint(tmp_path / name)
    with pytest.raises(FileNotFoundError, match="--prompts"):
        cp.load_prompts(tmp_path / "missing.pt")


def test_a_clip_weight_file_written_by_the_test_loads_through_open_clip(clip_model, tmp_path):
    with torch.random.fork_rng():
        torch.manual_seed(123)
        other = open_clip.model.CLIP(**cp.CLIP_CONFIGS["tiny"], quick_gelu=True)   # not seed 0's weights
    weights = tmp_path / "clip.bin"
    torch.save(other.state_dict(), weights)
    loaded = cp.load_clip("tiny", weights=str(weights))
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in other.state_dict().items())
    assert not torch.equal(loaded.token_embedding.weight, clip_model.token_embedding.weight)
    assert loaded.clip_info["weights"] == str(weights) and not loaded.training
    # Prompts trained on these weights remember the file; a moved file is found by --clip-weights.
    learner = cp.PromptLearner(loaded)
    cp.save_prompts(tmp_path / "prompts.pt", learner, loaded.clip_info, {}, 1)
    moved = weights.rename(tmp_path / "moved.bin")
    with pytest.raises(FileNotFoundError, match="--clip-weights"):
        cp.QualityPerceiver.from_checkpoint(tmp_path / "prompts.pt")
    cp.QualityPerceiver.from_checkpoint(tmp_path / "prompts.pt", clip_weights=str(moved))
    with pytest.raises(ValueError, match="--clip-weights"):            # prompts need their own CLIP
        cp.QualityPerceiver.from_checkpoint(tmp_path / "prompts.pt", clip_weights=str(_seed0_weights(tmp_path)))
    torch.save({"visual.proj": torch.zeros(2)}, tmp_path / "wrong.bin")
    with pytest.raises(ValueError, match="--clip-weights"):
        cp.load_clip("tiny", weights=str(tmp_path / "wrong.bin"))


def _seed0_weights(tmp_path):
    path = tmp_path / "seed0.bin"
    torch.save(cp.load_clip("tiny").state_dict(), path)
    return path


def test_unavailable_clip_weights_raise_an_error_naming_the_clip_weights_flag(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable at import; patch its constants too, and an empty cache.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match="--clip-weights"):
        cp.load_clip("ViT-B-32", pretrained="openai")
    assert time.perf_counter() - start < 10
    with pytest.raises(FileNotFoundError, match="--clip-weights"):
        cp.load_clip("ViT-B-32", weights=str(tmp_path / "missing.bin"))


def samples_under(root, counts):
    return [SimpleNamespace(task=task, key=f"set/{i}.png", input_path=Path(root) / task / "input" / f"set/{i}.png",
                            target_path=Path(root) / task / "target" / f"set/{i}.png")
            for task, count in counts.items() for i in range(count)]


def test_two_fold_split_covers_every_sample_once_balanced_and_stable_under_moving_the_data():
    counts = {"denoise": 7, "derain": 9, "dehaze": 4}
    samples = samples_under("/data/one", counts)
    fold_a, fold_b = cp.two_fold_split(samples)
    names = lambda fold: sorted((s.task, s.key) for s in fold)
    assert sorted(names(fold_a) + names(fold_b)) == sorted((s.task, s.key) for s in samples)
    assert not set(names(fold_a)) & set(names(fold_b))
    assert abs(len(fold_a) - len(fold_b)) <= 1
    for task in counts:
        assert abs(sum(s.task == task for s in fold_a) - sum(s.task == task for s in fold_b)) <= 1
    moved = samples_under("/elsewhere/two", counts)[::-1]                # new root, other order
    moved_a, moved_b = cp.two_fold_split(moved)
    assert names(moved_a) == names(fold_a) and names(moved_b) == names(fold_b)


def test_no_medium_image_is_restored_by_a_model_that_trained_on_it(tmp_path):
    samples = samples_under("/data", {"denoise": 5, "derain": 6})
    rounds = cp.cross_validation_rounds(samples)
    restored = []
    for round_ in rounds:
        trained_on = {(s.task, s.key) for s in round_["train"]}
        assert not trained_on & {(s.task, s.key) for s in round_["restore"]}
        restored += [dict(task=s.task, key=s.key, fold="b" if round_["model"] == "a" else "a",
                          restored_by=round_["model"]) for s in round_["restore"]]
    assert sorted((e["task"], e["key"]) for e in restored) == sorted((s.task, s.key) for s in samples)
    cp.write_medium_manifest(tmp_path, restored, {"restorer": "restormer", "config": "tiny"})
    manifest = cp.read_medium_manifest(tmp_path)
    assert manifest["restorer"]["restorer"] == "restormer" and len(manifest["entries"]) == 11
    assert {e["path"] for e in manifest["entries"]} >= {"derain/set/0.png", "denoise/set/4.png"}
    assert cp.medium_path(tmp_path, "derain", "Rain100L/1.jpg") == tmp_path / "derain" / "Rain100L" / "1.png"
    with pytest.raises(ValueError, match="other fold"):
        cp.write_medium_manifest(tmp_path, [dict(task="derain", key="1.png", fold="a", restored_by="a")], {})
    with pytest.raises(FileNotFoundError, match="--medium-dir"):
        cp.read_medium_manifest(tmp_path / "nowhere")
    (tmp_path / "manifest.json").write_text("{ not json")
    with pytest.raises(ValueError, match="--medium-dir"):
        cp.read_medium_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ValueError, match="--medium-dir"):
        cp.read_medium_manifest(tmp_path)


def test_score_command_prints_one_line_per_image(clip_model, tmp_path, monkeypatch, capsys):
    import numpy as np
    from PIL import Image
    cp.save_prompts(tmp_path / "prompts.pt", cp.PromptLearner(clip_model), clip_model.clip_info, {}, 1)
    paths = []
    for i in range(3):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (30 + i, 40, 3), dtype=np.uint8)).save(paths[-1])
    # data.py owns image reading; stand in for it so this test does not depend on it.
    stub = types.SimpleNamespace(
        read_image=lambda path: torch.from_numpy(np.asarray(Image.open(path), dtype=np.float32) / 255).permute(2, 0, 1))
    monkeypatch.setitem(sys.modules, "data", stub)
    cp.main(["score", "--prompts", str(tmp_path / "prompts.pt"), *paths])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith(path) for line, path in zip(lines, paths))
    fields = [field.split("=") for field in lines[0].split("\t")[1].split()]
    assert [name for name, _ in fields] == ["excellent", "mediocre", "terrible"]
    assert abs(sum(float(value) for _, value in fields) - 1) < 1e-3


def test_score_names_an_unreadable_image_scores_the_others_and_exits_non_zero(tmp_path, capsys):
    clip_model = cp.load_clip("tiny")
    cp.save_prompts(tmp_path / "prompts.pt", cp.PromptLearner(clip_model), clip_model.clip_info,
                              {}, 1)
    write_png((torch.rand(3, 20, 24) * 255).to(torch.uint8), str(tmp_path / "good.png"))
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(SystemExit, match="scored 1 image\\(s\\); skipped 1"):
        cp.main(["score", "--prompts", str(tmp_path / "prompts.pt"), str(tmp_path / "bad.png"),
                           str(tmp_path / "good.png")])
    out = capsys.readouterr().out
    assert "SKIPPED" in out and "bad.png: cannot read image" in out and "good.png\texcellent=" in out
    with pytest.raises(SystemExit, match="is not a readable checkpoint") as refused:    # a wrong --prompts file
        cp.main(["score", "--prompts", str(tmp_path / "good.png"), str(tmp_path / "good.png")])
    assert "\n" not in str(refused.value)
