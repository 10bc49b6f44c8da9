"""Claims of Sec. IV-A (Table I, Table IX, Table XIII) about the data: layouts, resampling, crops,
test protocols, bad input, and the built-in demo degradations."""

import math
import pickle
import re
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import data
import demo
from data import (RESAMPLE, TASKS, Sample, TrainDataset, TripletDataset, build_test_sets, load_pair, parse_tasks,
                  read_image, scan_training_set, write_image)
from degradations import motion_kernel
from demo import make_demo_data


# torchvision 0.29 marks its image codecs deprecated (in favour of torchcodec) on every call.
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: a second thread only contends on the shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def save(path, array):
    """Write a uint8 / uint16 array with PIL (independent of data.write_image)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def coded_image(height, width, offset=0):
    """R = 4x, G = 4y, B = 100 (+ offset): every pixel tells where it came from."""
    y, x = np.mgrid[0:height, 0:width]
    return (np.stack([4 * x, 4 * y, np.full_like(x, 100)], -1) + offset).astype(np.uint8)


def psnr(a, b):
    return 10 * math.log10(1 / ((a - b) ** 2).mean().item())


# ---------------------------------------------------------------------------------------------
# Settings and layouts (Sec. IV-A.1, Table I, Table XIII)
# ---------------------------------------------------------------------------------------------

def test_settings_of_sec_iv_a1_and_the_subsets_of_table_xiii_parse_to_task_names():
    assert parse_tasks("N+H+R") == ("denoise", "dehaze", "derain")
    assert parse_tasks("N+H+R+B+L") == TASKS
    assert parse_tasks("B+L") == ("deblur", "lowlight")
    assert parse_tasks("H+N") == ("denoise", "dehaze")                 # label order is TASKS order
    assert parse_tasks("derain,denoise") == ("denoise", "derain")
    for bad in ("N+X", "", "snow"):
        with pytest.raises(ValueError, match="--tasks"):
            parse_tasks(bad)


def test_generic_layout_pairs_identical_names_and_keeps_denoising_sets_clean(tmp_path):
    save(tmp_path / "train/denoise/BSD/a.png", coded_image(8, 8))
    save(tmp_path / "train/denoise/WED/b.bmp", coded_image(8, 8))
    save(tmp_path / "train/derain/R100/input/1.png", coded_image(8, 9))
    save(tmp_path / "train/derain/R100/target/1.png", coded_image(8, 9, 10))
    samples, report = scan_training_set(tmp_path, ("denoise", "derain"))
    assert [(s.task, s.key, s.input_path) for s in samples[:2]] == [("denoise", "BSD/a.png", None),
                                                                    ("denoise", "WED/b.bmp", None)]
    assert samples[2].key == "R100/1.png" and samples[2].target_path == tmp_path / "train/derain/R100/target/1.png"
    assert {t: (f["layout"], f["pairs"]) for t, f in report["found"].items()} == {
        "denoise": ("generic", 2), "derain": ("generic", 1)}


def test_authors_layout_maps_reside_and_rain100l_names_to_their_targets(tmp_path):
    root = tmp_path / "train"
    save(root / "Denoise/gt/x.png", coded_image(8, 8))
    for task, source, target in (("Dehaze", "0001_0.8_0.2.jpg", "0001.png"),
                                 ("Derain", "rain-7.png", "norain-7.png"),
                                 ("Deblur", "GOPR_1.png", "GOPR_1.png"), ("Enhance", "low.png", "low.png")):
        save(root / task / "input" / source, coded_image(8, 8))
        save(root / task / "gt" / target, coded_image(8, 8))
    samples, report = scan_training_set(tmp_path, TASKS)
    assert {s.task: (s.key, s.target_path.name) for s in samples} == {
        "denoise": ("x.png", "x.png"), "dehaze": ("0001_0.8_0.2.jpg", "0001.png"),
        "derain": ("rain-7.png", "norain-7.png"), "deblur": ("GOPR_1.png", "GOPR_1.png"),
        "lowlight": ("low.png", "low.png")}
    assert {f["layout"] for f in report["found"].values()} == {"authors"}


def test_promptir_layout_trains_on_the_files_in_its_data_dir_lists(tmp_path):
    root = tmp_path / "data"                         # PromptIR: data/Train/... next to data_dir/
    for name in ("00012.bmp", "a8143.jpg", "unlisted.png"):
        save(root / "Train/Denoise" / name, coded_image(8, 8))
    save(root / "Train/Dehaze/synthetic/part1/0025_0.8_0.04.jpg", coded_image(8, 8))
    save(root / "Train/Dehaze/original/0025.jpg", coded_image(8, 8))
    for n in (1, 2):
        save(root / f"Train/Derain/rainy/rain-{n}.png", coded_image(8, 8))
        save(root / f"Train/Derain/gt/norain-{n}.png", coded_image(8, 8))
    lists = {"noisy/denoise.txt": "00012.bmp\na8143.jpg\n", "rainy/rainTrain.txt": "rainy/rain-1.png\n",
             "hazy/hazy_outside.txt": "synthetic/part1/0025_0.8_0.04.jpg\n"}
    for name, text in lists.items():
        (tmp_path / "data_dir" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "data_dir" / name).write_text(text)
    samples, report = scan_training_set(root, ("denoise", "dehaze", "derain"))
    assert [(s.task, s.key) for s in samples] == [("denoise", "00012.bmp"), ("denoise", "a8143.jpg"),
                                                  ("dehaze", "part1/0025_0.8_0.04.jpg"), ("derain", "rain-1.png")]
    assert samples[2].target_path.name == "0025.jpg" and samples[3].target_path.name == "norain-1.png"
    assert {f["layout"] for f in report["found"].values()} == {"promptir (lists)"}


def test_resampling_ratios_of_sec_iv_a4_set_how_often_each_task_appears_per_epoch(tmp_path):
    counts = {"denoise": 2, "dehaze": 3, "derain": 1, "deblur": 1, "lowlight": 1}
    samples = [Sample(t, f"{t}{i}.png", None, tmp_path / "x.png") for t, n in counts.items() for i in range(n)]
    assert RESAMPLE == {"denoise": 3, "dehaze": 1, "derain": 120, "deblur": 5, "lowlight": 200}
    dataset = TrainDataset(samples)
    assert len(dataset) == 2 * 3 + 3 * 1 + 1 * 120 + 1 * 5 + 1 * 200          # = 334
    per_task = {t: sum(samples[i].task == t for i in dataset.sample_index) for t in counts}
    assert per_task == {"denoise": 6, "dehaze": 3, "derain": 120, "deblur": 5, "lowlight": 200}
    custom = {"denoise": 1, "dehaze": 2, "derain": 1, "deblur": 1, "lowlight": 1}
    assert len(TrainDataset(samples, resample=custom)) == 2 + 3 * 2 + 1 + 1 + 1


# ---------------------------------------------------------------------------------------------
# Training patches: crops, flips, positives, negatives, randomness (Sec. IV-A.4, Eq. 11-12)
# ---------------------------------------------------------------------------------------------

def test_crops_and_flips_align_input_target_and_negatives_pixel_for_pixel(tmp_path):
    for name, offset in (("a", 0), ("b", 3)):
        save(tmp_path / f"train/derain/S/input/{name}.png", coded_image(40, 50, offset))
        target = save(tmp_path / f"train/derain/S/target/{name}.png", coded_image(40, 50, offset + 40))   # +40
        save(tmp_path / f"neg/derain/S/{name}.png", 255 - np.asarray(Image.open(target)))         # N = 1 − target
    save(tmp_path / "partial/derain/S/b.png", coded_image(40, 50))                                 # b only
    samples, _ = scan_training_set(tmp_path, ("derain",))
    dataset = TrainDataset(samples, patch_size=16, negative_dirs=[tmp_path / "neg", tmp_path / "partial"])
    assert dataset.coverage() == [(tmp_path / "neg", 2), (tmp_path / "partial", 1)]
    flips, shifted = set(), False
    for index in range(40):                                           # copies of a.png (ratio 120)
        item = dataset[index]
        degraded, positive, target_patch = item["degraded"], item["positive"], item["target"]
        assert torch.allclose(target_patch - degraded, torch.full_like(degraded, 40 / 255), atol=1e-6)
        assert torch.allclose(item["negatives"][0], 1 - target_patch, atol=1e-6)
        assert item["negative_mask"].tolist() == [True, False] and not item["negatives"][1].any()   # masked
        for patch in (degraded, positive):                            # R = 4x, G = 4y: where it came from
            columns, rows = (patch[0] * 255 / 4).round(), (patch[1] * 255 / 4).round()
            assert (columns.diff(dim=1).abs() == 1).all() and (rows.diff(dim=0).abs() == 1).all()   # contiguous
        flips.add((bool(columns[0, 0] > columns[0, -1]), bool(rows[0, 0] > rows[-1, 0])))
        shifted |= not torch.equal(degraded, positive)
    assert flips == {(False, False), (True, False), (False, True), (True, True)}
    assert shifted
    assert item["task"].item() == TASKS.index("derain") and item["sigma"].item() == 0 and item["key"] == "S/a.png"
    assert dataset[120]["negative_mask"].tolist() == [True, True]     # b.png has both negatives


def test_a_negatives_folder_that_covers_no_training_image_names_itself_and_the_layout(tmp_path):
    save(tmp_path / "train/derain/S/input/a.png", coded_image(8, 8))
    save(tmp_path / "train/derain/S/target/a.png", coded_image(8, 8))
    save(tmp_path / "flat/a.png", coded_image(8, 8))                  # not <folder>/<task>/<key>.png
    samples, _ = scan_training_set(tmp_path, ("derain",))
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "flat")) + ".*<folder>/<task>/<key>.png"):
        TrainDataset(samples, 8, negative_dirs=[tmp_path / "flat"])


def test_eq10_probe_has_the_same_number_of_fixed_training_patches_per_task_and_sigma(tmp_path):
    for name in ("a", "b", "c"):
        save(tmp_path / f"train/denoise/S/{name}.png", np.full((20, 20, 3), 128, np.uint8))
    for name in ("a", "b"):
        save(tmp_path / f"train/derain/S/input/{name}.png", coded_image(20, 20))
        save(tmp_path / f"train/derain/S/target/{name}.png", coded_image(20, 20, 10))
    dataset = TrainDataset(scan_training_set(tmp_path, ("denoise", "derain"))[0], patch_size=8)
    assert dataset.strata == ["denoise_sigma15", "denoise_sigma25", "denoise_sigma50", "derain"]
    probe = dataset.probe(per_stratum=5, seed=0)
    assert list(probe) == dataset.strata and all(d.shape == t.shape == (5, 3, 8, 8) for d, t in probe.values())
    for sigma in (15, 25, 50):                                        # noise of the stratum's own σ
        degraded, target = probe[f"denoise_sigma{sigma}"]
        assert abs(((degraded - target) * 255).std().item() - sigma) < 0.15 * sigma
    assert torch.allclose(probe["derain"][1] - probe["derain"][0], torch.full((5, 3, 8, 8), 10 / 255), atol=1e-6)
    again = dataset.probe(per_stratum=5, seed=0)
    assert all(torch.equal(probe[k][0], again[k][0]) for k in probe)   # fixed: the same at every epoch
    dataset.set_epoch(3)
    assert all(torch.equal(probe[k][0], dataset.probe(5, 0)[k][0]) for k in probe)
    for index in range(len(dataset)):                                 # each item names its stratum
        item = dataset[index]
        expected = f"denoise_sigma{item['sigma'].item():g}" if item["task"] == 0 else "derain"
        assert dataset.strata[item["stratum"]] == expected


def test_positive_is_another_crop_of_the_same_noise_realisation(tmp_path):
    P = 32
    save(tmp_path / "train/denoise/S/flat.png", np.full((P + 2, P, 3), 128, np.uint8))   # crops at rows 0, 1, 2
    samples, _ = scan_training_set(tmp_path, ("denoise",))
    dataset = TrainDataset(samples, patch_size=P)
    shifts = []
    for epoch, index in ((e, i) for e in range(4) for i in range(3)):  # the 3 copies of Sec. IV-A.4
        dataset.set_epoch(epoch)
        item = dataset[index]
        degraded, positive, sigma = item["degraded"], item["positive"], item["sigma"].item()
        matches = [s for s in range(-2, 3) if torch.equal(degraded[:, max(s, 0):P + min(s, 0)],
                                                          positive[:, max(-s, 0):P + min(-s, 0)])]
        assert len(matches) == 1                   # i.i.d. noise cannot match at a wrong offset
        shifts.append(matches[0])
        noise_std = ((degraded - 128 / 255) * 255).std().item()
        assert abs(noise_std - sigma) < 0.1 * sigma
        assert torch.equal(item["target"], torch.full_like(degraded, 128 / 255))
    assert sorted(dataset[i]["sigma"].item() for i in range(3)) == [15, 25, 50]   # each σ once an epoch
    assert any(shifts)


def test_augmentation_is_reproducible_and_differs_per_epoch_index_and_seed_even_in_persistent_workers(tmp_path):
    save(tmp_path / "train/denoise/S/a.png", coded_image(40, 50))
    samples, _ = scan_training_set(tmp_path, ("denoise",))
    first, again = TrainDataset(samples, 16), TrainDataset(samples, 16)
    other_seed = TrainDataset(samples, 16, seed=1)
    assert torch.equal(first[0]["degraded"], again[0]["degraded"])
    assert not torch.equal(first[0]["degraded"], other_seed[0]["degraded"])
    assert not torch.equal(first[0]["degraded"], first[1]["degraded"])      # copies of one image differ
    epoch0 = first[0]["degraded"]
    first.set_epoch(1)
    assert not torch.equal(epoch0, first[0]["degraded"])
    first.set_epoch(0)
    loader = torch.utils.data.DataLoader(first, batch_size=3, num_workers=2, persistent_workers=True)
    for epoch in (0, 1):
        first.set_epoch(epoch)
        batch = next(iter(loader))
        expected = [first[i]["degraded"] for i in range(3)]          # same epoch, main process
        assert all(torch.equal(batch["degraded"][i], expected[i]) for i in range(3))
    assert batch["degraded"].shape == (3, 3, 16, 16) and batch["negatives"].shape == (3, 0, 3, 16, 16)
    assert batch["sigma"].dtype == torch.float32 and batch["task"].dtype == torch.long


def test_train_sets_keep_the_named_sets_of_a_task_and_the_synthesized_tasks_take_denoises(tmp_path):
    """--train-sets denoise=B: noise, and haze and blur made from clean images, come from set B alone; the other
    tasks keep all their sets; a set that is not there is one problem naming the sets there are, said once."""
    for name in ("A/grey.png", "B/colour.png", "B/more.png"):
        save(tmp_path / "train/denoise" / name, coded_image(40, 50))
    for name in ("S", "T"):
        save(tmp_path / f"train/derain/{name}/input/r.png", coded_image(40, 50, offset=2))
        save(tmp_path / f"train/derain/{name}/target/r.png", coded_image(40, 50))
    tasks = ("denoise", "dehaze", "derain", "deblur")
    made = ("dehaze", "deblur")
    kept, report = scan_training_set(tmp_path, tasks, synthesize=made, sets=data.parse_sets("denoise=B"))
    keys = {task: sorted(s.key for s in kept if s.task == task) for task in tasks}
    assert keys == {"denoise": ["B/colour.png", "B/more.png"], "dehaze": ["B/colour.png", "B/more.png"],
                    "deblur": ["B/colour.png", "B/more.png"], "derain": ["S/r.png", "T/r.png"]}
    assert {t: f["pairs"] for t, f in report["found"].items()} == {"denoise": 2, "dehaze": 2, "derain": 2, "deblur": 2}
    everything, _ = scan_training_set(tmp_path, tasks, synthesize=made)
    assert len(everything) == 3 + 3 + 2 + 3
    just_t, _ = scan_training_set(tmp_path, ("derain",), sets=data.parse_sets("derain=T+S"))
    assert sorted(s.key for s in just_t) == ["S/r.png", "T/r.png"]
    assert data.parse_sets("derain=T+S,denoise=B") == {"derain": ("T", "S"), "denoise": ("B",)}
    assert data.parse_sets(None) == data.parse_sets("") == {}
    _, report = scan_training_set(tmp_path, tasks, strict=False, synthesize=made, sets={"denoise": ("C",)})
    missing = [p for p in report["problems"] if "--train-sets" in p]
    assert missing == [f"--train-sets: no set 'C' in {tmp_path / 'train/denoise'} (its sets: A, B)"]
    with pytest.raises(ValueError, match="--train-sets names derain, which is not in --tasks"):
        scan_training_set(tmp_path, ("denoise",), sets={"derain": ("S",)})
    assert len(scan_training_set(tmp_path, ("dehaze",), synthesize=("dehaze",), sets={"denoise": ("A",)})[0]) == 1


def test_image_cache_gives_the_same_items_without_the_files_and_stops_at_its_limit(tmp_path):
    """--cache-mb: items are bit-identical to uncached ones (8-bit kept as uint8, 16-bit as float32), later
    reads need no file, and the cache never grows past its limit (the rest is read from the files)."""
    save(tmp_path / "train/derain/S/input/a.png", coded_image(40, 50, offset=7))
    save(tmp_path / "train/derain/S/target/a.png", coded_image(40, 50))
    wide = (np.arange(40 * 50, dtype=np.uint16).reshape(40, 50) * 31)                # 16 bit, grayscale
    save(tmp_path / "train/denoise/S/w.png", wide)
    save(tmp_path / "train/deblur/S/input/b.png", coded_image(40, 50, offset=3))
    save(tmp_path / "train/deblur/S/target/b.png", coded_image(40, 50, offset=1))
    samples, _ = scan_training_set(tmp_path, ("denoise", "derain", "deblur"))
    ratios = {"denoise": 3, "derain": 2, "deblur": 1}                             # 3 σ, 2 copies, 1
    plain, cached = TrainDataset(samples, 16, resample=ratios, seed=3), TrainDataset(samples, 16, resample=ratios,
                                                                                     seed=3, cache_mb=1)
    items = {}
    for epoch in (0, 1):                                  # the uncached items of two epochs, from the files
        plain.set_epoch(epoch)
        items[epoch] = [plain[i] for i in range(len(plain))]
    first = [cached[i] for i in range(len(cached))]       # epoch 0 fills the cache
    kinds = sorted(str(image.dtype) for image in cached.cache.values())
    assert kinds == ["torch.float32"] + ["torch.uint8"] * 4                        # the 16-bit image stays float
    assert cached.cache_bytes == 4 * 3 * 40 * 50 + 3 * 40 * 50 * 4
    for path in tmp_path.rglob("*.png"):                                           # every later read: the cache
        path.unlink()
    cached.set_epoch(1)
    later = [cached[i] for i in range(len(cached))]
    for want, got in zip(items[0] + items[1], first + later):
        assert all(torch.equal(want[k], got[k]) for k in ("degraded", "positive", "target"))
    assert len(first + later) == 2 * len(plain) == 2 * 6
    with pytest.raises(ValueError, match="cannot read image"):                     # uncached: the files are gone
        plain[0]
    copy = pickle.loads(pickle.dumps(cached))                # what a spawned worker gets: no cache, no files
    assert copy.cache == {} and copy.cache_bytes == 0 and cached.cache_bytes > 0
    with pytest.raises(ValueError, match="cannot read image"):
        copy[0]
    # A limit of one and a half images: the first image read is kept, the second would pass the limit.
    save(tmp_path / "train/derain/S/input/a.png", coded_image(40, 50, offset=7))
    save(tmp_path / "train/derain/S/target/a.png", coded_image(40, 50))
    small = TrainDataset(scan_training_set(tmp_path, ("derain",))[0], 16, cache_mb=1.5 * 3 * 40 * 50 / 2 ** 20)
    small[0]
    assert len(small.cache) == 1 and small.cache_bytes == 3 * 40 * 50


def test_images_smaller_than_the_patch_are_reflect_padded_with_one_warning_naming_the_file(tmp_path):
    save(tmp_path / "train/deblur/S/input/s.png", coded_image(20, 24))
    save(tmp_path / "train/deblur/S/target/s.png", coded_image(20, 24))
    dataset = TrainDataset(scan_training_set(tmp_path, ("deblur",))[0], patch_size=32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        items = [dataset[i] for i in range(3)]
    caught = [w for w in caught if w.category is UserWarning]
    assert len(caught) == 1 and "s.png is 24x20, smaller than the 32x32 patch" in str(caught[0].message)
    # Padded by 4 columns and 6 rows on each side, mirrored about the edge pixel (replicating it
    # would repeat 0 and 23): x = 4 3 2 1 0 1 … 23 22 21 20 19, y = 6 5 … 0 1 … 19 18 … 13.
    columns = list(range(4, 0, -1)) + list(range(24)) + list(range(22, 18, -1))
    rows = list(range(6, 0, -1)) + list(range(20)) + list(range(18, 12, -1))
    for item in items:
        x, y = ((item["degraded"][c] * 255 / 4).round() for c in (0, 1))
        assert x[0].tolist() in (columns, columns[::-1]) and y[:, 0].tolist() in (rows, rows[::-1])


def test_stage1_triplets_see_the_same_noisy_input_as_the_rendered_medium_image(tmp_path):
    from clip_prompts import render_medium_images
    save(tmp_path / "train/denoise/S/a.png", np.full((24, 24, 3), 128, np.uint8))
    save(tmp_path / "train/denoise/S/b.png", np.full((24, 24, 3), 128, np.uint8))
    samples, _ = scan_training_set(tmp_path, ("denoise",))
    noisy, clean, sigma = load_pair(samples[0])
    assert torch.equal(noisy, load_pair(samples[0])[0]) and not torch.equal(noisy, load_pair(samples[1])[0])
    assert sigma in (15, 25, 50) and abs(((noisy - clean) * 255).std().item() - sigma) < 0.15 * sigma
    missing = re.escape(str(tmp_path / "medium/denoise/S/a.png"))
    with pytest.raises(FileNotFoundError, match="--medium-dir .*" + missing):
        TripletDataset(samples, tmp_path / "medium")
    render_medium_images(lambda x: 1 - x, samples, tmp_path / "medium", data.SIGMAS)   # a pointwise "restorer"
    for index, sample in enumerate(samples):
        item = TripletDataset(samples, tmp_path / "medium")[index]
        # I_m was rendered from exactly the noisy input the triplet holds: I_m = 1 − I_d, pixel for pixel.
        assert torch.allclose(item["medium"], 1 - item["degraded"], atol=1e-6)
        assert torch.equal(item["target"], clean) and item["key"] == sample.key and item["task"].item() == 0


# ---------------------------------------------------------------------------------------------
# Test protocols (Tables II-V, IX)
# ---------------------------------------------------------------------------------------------

def test_test_noise_depends_on_the_file_name_and_sigma_not_on_the_listing_order(tmp_path):
    image = np.full((16, 16, 3), 128, np.uint8)
    for name in ("a.png", "b.png"):
        save(tmp_path / "one/test/denoise/Set" / name, image)
    for name in ("0.png", "1.png", "b.png"):                          # b.png is at another index here
        save(tmp_path / "two/test/denoise/Set" / name, image)
    first, second = build_test_sets(tmp_path / "one", ("denoise",)), build_test_sets(tmp_path / "two", ("denoise",))
    assert [(s.name, s.sigma, len(s)) for s in first] == [("Set", 15, 2), ("Set", 25, 2), ("Set", 50, 2)]
    for set_one, set_two in zip(first, second):
        item_one, item_two = set_one[1], set_two[2]
        assert item_one["name"] == item_two["name"] == "b.png"
        assert torch.equal(item_one["degraded"], item_two["degraded"])
        assert torch.equal(item_one["degraded"] * 255, (item_one["degraded"] * 255).round())   # 8-bit levels
        assert abs(((item_one["degraded"] - 128 / 255) * 255).std().item() - set_one.sigma) < 0.15 * set_one.sigma
    assert not torch.equal(first[0][0]["degraded"], first[0][1]["degraded"])            # a.png ≠ b.png noise
    unseen = build_test_sets(tmp_path / "one", ("denoise",), sigmas=data.UNSEEN_SIGMAS)     # Table IX
    assert [s.sigma for s in unseen] == [60, 100]


def test_paired_test_sets_are_centre_cropped_to_a_multiple_of_16(tmp_path):
    source = coded_image(50, 37)
    save(tmp_path / "test/derain/Rain/input/1.png", source)
    save(tmp_path / "test/derain/Rain/target/1.png", source)
    (test_set,) = build_test_sets(tmp_path, ("derain",), crop_multiple=16)
    item = test_set[0]
    # 50 = 3·16 + 2 → rows 1..48; 37 = 2·16 + 5 → columns 2..33
    assert item["degraded"].shape == (3, 48, 32)
    assert torch.equal(item["degraded"], torch.from_numpy(source[1:49, 2:34]).permute(2, 0, 1).float() / 255)
    assert test_set.sigma is None and item["name"] == "1.png"


# ---------------------------------------------------------------------------------------------
# Bad input: every error names the file or the flag
# ---------------------------------------------------------------------------------------------

def paired_set(root, task="derain"):
    for folder in ("input", "target"):
        save(root / f"train/{task}/S/{folder}/1.png", coded_image(8, 8))
    return root / f"train/{task}/S"


def test_a_corrupt_or_truncated_file_is_found_by_the_scan_and_named(tmp_path):
    folder = paired_set(tmp_path)
    (folder / "input/1.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=re.escape(str(folder / "input/1.png")) + ".*corrupt"):
        scan_training_set(tmp_path, ("derain",))
    with pytest.raises(ValueError, match="cannot read image .*1.png"):
        read_image(folder / "input/1.png")
    folder = paired_set(tmp_path / "cut")
    whole = (folder / "target/1.png").read_bytes()
    (folder / "target/1.png").write_bytes(whole[:len(whole) - 20])    # IEND and part of IDAT lost
    with pytest.raises(ValueError, match=re.escape(str(folder / "target/1.png"))):
        scan_training_set(tmp_path / "cut", ("derain",))


def test_a_missing_target_and_a_size_mismatch_name_the_files(tmp_path):
    folder = paired_set(tmp_path)
    save(folder / "input/2.png", coded_image(8, 8))
    with pytest.raises(ValueError, match=re.escape(str(folder / "input/2.png")) + ": missing target"):
        scan_training_set(tmp_path, ("derain",))
    save(folder / "target/2.png", coded_image(8, 10))
    with pytest.raises(ValueError, match=f"size mismatch: {re.escape(str(folder / 'input/2.png'))} is 8x8 "
                                         f"but its target {re.escape(str(folder / 'target/2.png'))} is 10x8"):
        scan_training_set(tmp_path, ("derain",))


def test_an_empty_or_missing_task_folder_names_the_tasks_flag(tmp_path):
    paired_set(tmp_path)
    (tmp_path / "train/deblur").mkdir()
    with pytest.raises(ValueError, match="'deblur': no usable images .* drop B from --tasks"):
        scan_training_set(tmp_path, ("derain", "deblur"))
    with pytest.raises(ValueError, match="'lowlight': no .* drop L from --tasks"):
        scan_training_set(tmp_path, ("derain", "lowlight"))
    _, report = scan_training_set(tmp_path, ("derain", "deblur", "lowlight"), strict=False)
    assert len(report["problems"]) == 2 and report["found"]["derain"]["pairs"] == 1


def test_unsupported_files_and_missing_listed_files_are_problems(tmp_path):
    folder = paired_set(tmp_path)
    (folder / "input/scan.heic").write_bytes(b"\0")
    (folder / "input/notes.txt").write_text("ignored")
    with pytest.raises(ValueError, match=re.escape(str(folder / "input/scan.heic")) + ": unsupported file type"):
        scan_training_set(tmp_path, ("derain",))
    with pytest.raises(ValueError, match="unsupported image type '.heic'"):
        read_image(folder / "input/scan.heic")
    save(tmp_path / "p/Train/Derain/rainy/rain-1.png", coded_image(8, 8))
    save(tmp_path / "p/Train/Derain/gt/norain-1.png", coded_image(8, 8))
    (tmp_path / "p/data_dir/rainy").mkdir(parents=True)
    (tmp_path / "p/data_dir/rainy/rainTrain.txt").write_text("rainy/rain-1.png\nrainy/rain-9.png\n")
    with pytest.raises(ValueError, match=r"rainy/rain-9.png: in .*rainTrain.txt but missing"):
        scan_training_set(tmp_path / "p", ("derain",))


def test_a_negative_of_another_size_names_both_files(tmp_path):
    folder = paired_set(tmp_path)
    save(tmp_path / "neg/derain/S/1.png", coded_image(8, 9))
    samples, _ = scan_training_set(tmp_path, ("derain",))
    dataset = TrainDataset(samples, patch_size=4, negative_dirs=[tmp_path / "neg"])
    with pytest.raises(ValueError, match=f"{re.escape(str(tmp_path / 'neg/derain/S/1.png'))} is 9x8 but "
                                         f"{re.escape(str(folder / 'target/1.png'))} is 8x8"):
        dataset[0]


def test_check_prints_both_splits_next_to_table_i_and_every_problem(tmp_path, capsys):
    paired_set(tmp_path)
    for name in ("1.png", "2.png"):
        save(tmp_path / f"test/derain/Rain100L/input/{name}", coded_image(8, 8))
    save(tmp_path / "test/derain/Rain100L/target/1.png", coded_image(8, 8))     # 2.png has no target
    save(tmp_path / "test/derain/Mine/input/1.png", coded_image(8, 8))
    save(tmp_path / "test/derain/Mine/target/1.png", coded_image(8, 9))        # size mismatch
    save(tmp_path / "test/derain/Mine/target/3.png", coded_image(8, 8))
    (tmp_path / "test/derain/Mine/input/3.png").write_bytes(b"not a png")      # unreadable
    assert data.check(tmp_path, ("denoise", "derain")) == 5
    out = capsys.readouterr().out
    assert re.search(r"derain +generic +1 +120 +120 +200", out)              # pairs, ratio, resampled, Table I
    assert "setting N+R: 1 pairs (Table I: 5344), 120 resampled" in out       # 400 + 4744 + 200
    assert "PROBLEM: task 'denoise'" in out and "drop N from --tasks" in out
    assert re.search(r"derain +Rain100L +1 +Rain100L \(Table I: 100 images\)", out)
    assert re.search(r"derain +Mine +0 +no Table I test set", out)
    assert "2.png: missing target" in out and "size mismatch" in out and "3.png: unreadable or corrupt" in out
    assert "no test folder for 'denoise'" in out


# ---------------------------------------------------------------------------------------------
# Image I/O
# ---------------------------------------------------------------------------------------------

def test_read_image_handles_bmp_tiff_16_bit_grayscale_and_alpha(tmp_path):
    rgb = coded_image(6, 7)
    expected = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255
    for name in ("a.bmp", "a.tif", "a.png", "a.webp"):
        Image.fromarray(rgb).save(tmp_path / name, **({"lossless": True} if name.endswith("webp") else {}))
        assert torch.equal(read_image(tmp_path / name), expected), name
    wide = np.array([[0, 65535, 32768]], np.uint16)
    for name in ("g16.png", "g16.tif"):
        Image.fromarray(wide).save(tmp_path / name)
        image = read_image(tmp_path / name)
        assert image.shape == (3, 1, 3) and torch.allclose(image[1], torch.tensor([[0, 1, 32768 / 65535]]))
    save(tmp_path / "gray.png", np.array([[0, 51, 255]], np.uint8))
    assert torch.equal(read_image(tmp_path / "gray.png"), torch.tensor([[[0, 0.2, 1.0]]]).expand(3, 1, 3))
    rgba = np.concatenate([rgb, np.zeros((6, 7, 1), np.uint8)], -1)           # fully transparent
    save(tmp_path / "alpha.png", rgba)
    assert torch.equal(read_image(tmp_path / "alpha.png"), expected)
    levels = torch.tensor([[[0.2, 0.2 + 0.4 / 255, 0.2 + 0.6 / 255]]]).expand(3, 1, 3)    # 51, 51.4, 51.6
    write_image(tmp_path / "new/dir/out.png", levels)
    assert np.asarray(Image.open(tmp_path / "new/dir/out.png"))[0, :, 0].tolist() == [51, 51, 52]


# ---------------------------------------------------------------------------------------------
# Built-in demo data
# ---------------------------------------------------------------------------------------------

# Input PSNR bands (dB) around the real sets' inputs: SOTS 14-18, Rain100L 25.5 (RGB), GoPro ~26, LOL ~8.
DEMO_PSNR = {"dehaze": (8, 19), "derain": (15, 28), "deblur": (14, 30), "lowlight": (4, 13)}


@pytest.mark.parametrize("task", list(DEMO_PSNR))
def test_demo_degradations_are_deterministic_and_lower_psnr_by_a_sensible_amount(task):
    synthesis, values = demo.SYNTHESIS[task], []
    for seed in range(4):
        clean = demo.synthetic_clean_image(np.random.default_rng(seed), 96, 112)
        degraded = synthesis(clean, np.random.default_rng(seed))
        assert torch.equal(degraded, synthesis(clean, np.random.default_rng(seed)))
        assert not torch.equal(degraded, synthesis(clean, np.random.default_rng(seed + 10)))
        assert degraded.shape == clean.shape and 0 <= degraded.min() and degraded.max() <= 1
        values.append(psnr(degraded, clean))
    low, high = DEMO_PSNR[task]
    assert all(low < v < high for v in values), values


def test_gaussian_noise_of_sigma_25_on_mid_grey_gives_20_17_db():
    clean = torch.full((3, 96, 96), 128 / 255)                        # 128 ± 5σ: nothing is clipped
    noisy = data.add_gaussian_noise(clean, 25, np.random.default_rng(0))
    # MSE = 25² + 1/12 (8-bit rounding) in 8-bit units → PSNR = 10·log10(255² / 625.08) = 20.17 dB
    assert abs(psnr(noisy, clean) - 10 * math.log10(255 ** 2 / (625 + 1 / 12))) < 0.1


def test_motion_kernels_are_normalised_and_a_zero_turn_kernel_is_a_straight_line():
    kernel = motion_kernel(np.random.default_rng(0), 13, 0.3, 0.35)
    assert kernel.shape == (13, 13) and abs(kernel.sum() - 1) < 1e-6
    vertical = motion_kernel(np.random.default_rng(0), 9, math.pi / 2, 0.0)
    assert (vertical[:, 4] > 0).all() and vertical[:, :4].sum() == vertical[:, 5:].sum() == 0


def test_demo_data_has_all_five_tasks_in_the_generic_layout_and_is_deterministic(tmp_path):
    for run in ("a", "b"):
        make_demo_data(tmp_path / run, seed=3, train_count=2, test_count=1, size_range=(40, 48))
    samples, report = scan_training_set(tmp_path / "a", TASKS)
    assert {t: (f["layout"], f["pairs"]) for t, f in report["found"].items()} == {t: ("generic", 2) for t in TASKS}
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.png"))
    assert len(files) == 2 + 1 + 4 * 2 * 2 + 4 * 1 * 2          # clean train + test, then pairs of files
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    labels = [(s.task, s.sigma, len(s)) for s in build_test_sets(tmp_path / "a", TASKS)]
    assert labels == [("denoise", 15, 1), ("denoise", 25, 1), ("denoise", 50, 1), ("dehaze", None, 1),
                      ("derain", None, 1), ("deblur", None, 1), ("lowlight", None, 1)]


# ---------------------------------------------------------------------------------------------
# The real benchmark images in ../shared/data
# ---------------------------------------------------------------------------------------------

def test_shared_test_sets_are_found_and_their_input_psnr_matches_the_readme(shared_dir):
    root = shared_dir / "data"
    test_sets = {(s.name, s.sigma): s for s in build_test_sets(root, TASKS)}
    assert {k: len(s) for k, s in test_sets.items()} == {
        ("CBSD68", 15): 68, ("CBSD68", 25): 68, ("CBSD68", 50): 68, ("SOTS-indoor-mini", None): 2,
        ("SOTS-outdoor-RESIDE6K", None): 10, ("SOTS-outdoor-mini", None): 2, ("Rain100L", None): 100,
        ("GoPro-derived", None): 10, ("LOL-eval15", None): 15}
    # README: clipped, unquantised noise gives 24.84 / 20.53 / 15.00 dB; 8-bit rounding adds 1/12 LSB²
    # of error variance (≤ 0.002 dB) and another noise draw moves the 68-image mean by ~0.001 dB.
    for sigma, expected in ((15, 24.84), (25, 20.53), (50, 15.00)):
        values = [psnr(item["degraded"], item["target"]) for item in test_sets[("CBSD68", sigma)]]
        assert abs(np.mean(values) - expected) < 0.03, (sigma, np.mean(values))
    rain = [psnr(item["degraded"], item["target"]) for item in test_sets[("Rain100L", None)]]
    assert abs(np.mean(rain) - 25.52) < 0.01                          # README: RGB mean 25.52 dB
    for name, expected in (("LOL-eval15", 7.77), ("SOTS-outdoor-RESIDE6K", 16.22)):    # README: RGB means
        values = [psnr(item["degraded"], item["target"]) for item in test_sets[(name, None)]]
        assert abs(np.mean(values) - expected) < 0.01, (name, np.mean(values))


def test_shared_training_sets_scan_and_grayscale_bsd400_becomes_rgb(shared_dir):
    samples, report = scan_training_set(shared_dir / "data", ("denoise", "derain", "lowlight"))
    # BSD400 (grey) + CBSD432 (colour JPEG); 70 RainTrainL pairs; 36 LOL pairs (README of the shared data)
    assert {t: f["pairs"] for t, f in report["found"].items()} == {"denoise": 832, "derain": 70, "lowlight": 36}
    bsd = next(s for s in samples if s.key == "BSD400/test_001.png")
    clean = read_image(bsd.target_path)
    assert clean.shape == (3, 180, 180) and torch.equal(clean[0], clean[2])
    item = TrainDataset(samples)[0]
    assert item["degraded"].shape == (3, 128, 128) and item["sigma"].item() in (15, 25, 50)
    colour, _ = scan_training_set(shared_dir / "data", ("denoise", "dehaze", "deblur"), synthesize=("dehaze", "deblur"),
                                  sets={"denoise": ("CBSD432",)})        # --train-sets denoise=CBSD432: colour alone
    assert len(colour) == 3 * 432 and {s.key.split("/")[0] for s in colour} == {"CBSD432"}


def test_check_of_a_missing_root_or_unknown_task_ends_in_one_line(tmp_path):
    for argv, message in ((["--check", str(tmp_path / "nowhere")], "does not exist"),
                          (["--check", str(tmp_path), "--tasks", "N+X"], "expected letters N, H, R, B, L")):
        with pytest.raises(SystemExit, match=message) as refused:
            data.main(argv)
        assert "\n" not in str(refused.value)


@pytest.mark.parametrize("spec, message", [("derian=3", "unknown task 'derian'"),
                                           ("derain=2.5", "not a whole number of repeats"),
                                           ("lowlight=0", "not a whole number of repeats")])
def test_resample_refuses_typos_fractions_and_zeros_that_would_change_the_data_silently(spec, message):
    with pytest.raises(ValueError, match=message):
        data.parse_resample(spec)
    assert data.parse_resample("denoise=3,derain=120") == {"denoise": 3, "derain": 120}
