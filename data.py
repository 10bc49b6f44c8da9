"""Training and test data of Perceive-IR (Sec. IV-A.1, Sec. IV-A.4, Table I, Table IX, Table XIII).

Perceive-IR trains on a mix of degradations and is tested on one at a time (Sec. IV-A.1). Noise is
added on the fly to clean images; haze, rain, blur and low light come as (degraded, clean) pairs,
each task repeated by a resampling ratio (Sec. IV-A.4: Table I's sizes differ a hundredfold).

What is in here:
- `read_image`, `write_image`: PNG, JPEG, WebP, GIF, BMP, TIFF, 8 or 16 bit, as RGB in [0, 1].
- `scan_training_set`: finds each task (three layouts), pairs and checks every file before training.
- `TrainDataset`: resampled flipped crops, L_cl's positive (Eq. 12), L_dpl's negatives (Eq. 11), the probe
  of Eq. (10), decoded images optionally kept in memory (`--cache-mb`); `TripletDataset`: (I_d, I_m, I_g) of
  stage 1 (Eq. 1); `build_test_sets`: Tables II-V, IX, XIII.
- `python data.py --check ROOT`; no argument: a self-check. (The offline demo's data: `demo.py`.)

Layouts, detected per task under `--data-root`:
  generic   {train,test}/<task>/<set>/{input,target}/…   clean sets: {train,test}/denoise/<set>/*
  authors   train/Denoise/gt/…,  train/{Dehaze,Derain,Deblur,Enhance}/{input,gt}/…
  promptir  Train/Denoise/…, Train/Dehaze/{synthetic,original}/…, Train/Derain/{rainy,gt}/…, with
            data_dir/{noisy/denoise.txt, hazy/hazy_outside.txt, rainy/rainTrain.txt} (optional)
An input finds its target by name, or by RESIDE's (0001_0.8_0.2.jpg → 0001.*) or Rain100L's naming.
"""

import argparse
import tempfile
import warnings
import zlib
from collections import defaultdict, namedtuple
from pathlib import Path, PurePosixPath

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.io import ImageReadMode, decode_image, read_file, write_png

from degradations import SYNTHESIS, add_gaussian_noise, quantize   # (data.quantize and data.add_gaussian_noise)

TASKS = ("denoise", "dehaze", "derain", "deblur", "lowlight")       # label = index
TASK_LETTERS = {"N": "denoise", "H": "dehaze", "R": "derain", "B": "deblur", "L": "lowlight"}
SIGMAS = (15, 25, 50)                                               # Sec. IV-A.1
UNSEEN_SIGMAS = (60, 100)                                           # Table IX
RESAMPLE = {"denoise": 3, "dehaze": 1, "derain": 120, "deblur": 5, "lowlight": 200}   # Sec. IV-A.4
TABLE_I = {"denoise": 400 + 4744, "dehaze": 72135, "derain": 200, "deblur": 2103, "lowlight": 485}
TEST_SETS = {"denoise": {"CBSD68": 68, "Urban100": 100, "Kodak24": 24}, "dehaze": {"SOTS": 500},  # Table I,
             "derain": {"Rain100L": 100}, "deblur": {"GoPro": 1111}, "lowlight": {"LOL": 15}}   # testing sets
AUTHORS_NAMES = dict(denoise="Denoise", dehaze="Dehaze", derain="Derain", deblur="Deblur", lowlight="Enhance")
# PromptIR's Train/<Name>: (input folder, target folder, list file); None = clean images only.
PROMPTIR = {"denoise": (None, ".", "noisy/denoise.txt"), "derain": ("rainy", "gt", "rainy/rainTrain.txt"),
            "dehaze": ("synthetic", "original", "hazy/hazy_outside.txt")}
TORCHVISION_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".gif"}
IMAGE_SUFFIXES = TORCHVISION_SUFFIXES | {".bmp", ".tif", ".tiff"}   # BMP/TIFF: torchvision.io fails, PIL reads


def parse_tasks(spec):
    """'N+H+R', 'N+H+R+B+L', 'B+L' (Table XIII) or 'denoise,derain' → task names in TASKS order."""
    names = [TASK_LETTERS.get(p.strip().upper(), p.strip().lower()) for p in spec.replace(",", "+").split("+")]
    if not spec.strip() or any(n not in TASKS for n in names):
        raise ValueError(f"--tasks {spec!r}: expected letters N, H, R, B, L joined by '+' (e.g. N+H+R) "
                         f"or task names separated by commas ({', '.join(TASKS)})")
    return tuple(t for t in TASKS if t in names)


def _task_values(spec, flag, example):
    """'task=value,...' → {task: value}; a task that is not one of TASKS is refused (a typo must not pass)."""
    try:
        values = {t.strip(): v.strip() for t, v in (i.split("=") for i in spec.split(","))}
    except ValueError:
        raise ValueError(f"{flag} {spec!r}: expected task=value pairs, e.g. {example}") from None
    for task in values.keys() - set(TASKS):
        raise ValueError(f"{flag} {spec!r}: unknown task {task!r}; the tasks are {', '.join(TASKS)}")
    return values


def parse_resample(spec):
    """--resample 'denoise=3,derain=120,...' → {task: ratio} (Sec. IV-A.4), or None (the paper's ratios)."""
    ratios = {} if spec is None else _task_values(spec, "--resample", "denoise=3,derain=120")
    for task, ratio in ratios.items():                 # a typo or a fraction must not change the data silently
        if not ratio.isdigit() or int(ratio) < 1:
            raise ValueError(f"--resample {spec!r}: {task}={ratio} is not a whole number of repeats ≥ 1 "
                             "(to leave a task out, drop it from --tasks)")
    return {t: int(r) for t, r in ratios.items()} if spec is not None else None


def parse_sets(spec):
    """--train-sets 'denoise=CBSD432,derain=A+B' → {task: (set, ...)}: a task trains on these of its sets alone."""
    named = _task_values(spec, "--train-sets", "denoise=CBSD432") if spec else {}
    return {task: tuple(sets.split("+")) for task, sets in named.items()}


def stratum(task, sigma=0):
    """The avgPSNR stratum of a training patch (Eq. 10): its task, and σ for noise added on the fly."""
    return f"{task}_sigma{sigma:g}" if sigma else task


def _rng(*parts):
    """A numpy generator seeded through crc32, the same in every process (Python's hash() is not)."""
    return np.random.default_rng([zlib.crc32(str(p).encode()) for p in parts])


# --- Image I/O --------------------------------------------------------------------------------------------------------

def read_image(path):
    """An image file → float32 (3, H, W) in [0, 1]; grayscale → RGB, alpha dropped, 16 bit scaled."""
    path = Path(path)
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise ValueError(f"{path}: unsupported image type {path.suffix!r}; convert it to {sorted(IMAGE_SUFFIXES)}")
    try:
        with Image.open(path):                 # the header alone: PIL refuses a decompression bomb before decoding
            pass
        if path.suffix.lower() in TORCHVISION_SUFFIXES:   # (torchvision 0.29 flags this API as deprecated)
            image = decode_image(read_file(str(path)), mode=ImageReadMode.RGB)
            image = image[0] if image.dim() == 4 else image              # animated GIF: frame 1
            return image.float() / (65535.0 if image.dtype == torch.uint16 else 255.0)
        with Image.open(path) as pil:                                    # "I;16": 16-bit grayscale
            wide = pil.mode.startswith("I")
            array = np.asarray(pil if wide else pil.convert("RGB"), np.float32) / (65535.0 if wide else 255.0)
    except (RuntimeError, OSError, ValueError, SyntaxError, MemoryError, Image.DecompressionBombError) as error:
        raise ValueError(f"cannot read image {path}: {error}. Replace or remove the file.") from error
    image = torch.from_numpy(array.clip(0, 1))
    return image.expand(3, -1, -1).contiguous() if wide else image.permute(2, 0, 1).contiguous()


def write_image(path, image):
    """(3, H, W) in [0, 1] → 8-bit PNG (rounded); creates the parent folders."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_png((image.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8), str(path))


# --- Finding and checking the images (Table I) ---------------------------------------------------------------------

# One training image: its task, its key (POSIX path below the task's input folder, the name of its I_m
# and negatives), and its files; input_path is None for a clean image degraded on the fly: noise added for
# denoising, haze or blur synthesized for a task of `--synthesize` (degradations.SYNTHESIS).
Sample = namedtuple("Sample", "task key input_path target_path")


def noised(sample):
    """A clean denoising image: its noise is added on the fly, at a σ of its own (a stratum of Eq. 10 per σ)."""
    return sample.input_path is None and sample.task == "denoise"


def spread(samples, per_task):
    """At most `per_task` samples of each task, evenly spread over its sorted list (all of them if 0)."""
    chosen = []
    for task in TASKS:
        of_task = [s for s in samples if s.task == task]
        chosen += of_task[::max(1, -(-len(of_task) // per_task))] if per_task else of_task
    return chosen


def _images(folder, problems):
    """Image files below `folder`, sorted; other files are problems, except notes and dotfiles."""
    notes = {".txt", ".md", ".json", ".csv"}
    paths = sorted(p for p in Path(folder).rglob("*") if p.is_file() and not p.name.startswith("."))
    problems += [f"{p}: unsupported file type {p.suffix!r} (remove it or convert it to PNG)"
                 for p in paths if p.suffix.lower() not in IMAGE_SUFFIXES | notes]
    return [p for p in paths if p.suffix.lower() in IMAGE_SUFFIXES]


def _probe(path, problems, sizes):
    """Header check, no decoding: PIL reads the size and verify() passes (PNG: every chunk's CRC). < 0.3 ms."""
    if path not in sizes:
        try:
            with Image.open(path) as pil:
                sizes[path] = pil.size
                pil.verify()
        except Exception as error:                    # PIL raises many types for broken files
            problems.append(f"{path}: unreadable or corrupt image ({type(error).__name__}: {error}); replace it")
            sizes[path] = None
    return sizes[path]


def target_stems(stem):
    """An input's (or prediction's) possible target names: its own, rain-N → norain-N, <id>_<A>_<β> → <id>."""
    return [stem] + ["no" + stem] * stem.startswith("rain-") + [stem.split("_")[0]] * ("_" in stem)


def pair_folder(inputs, input_dir, target_dir, problems, sizes):
    """[(input, target)] for the input files, with their sizes checked."""
    by_relative, by_stem = {}, defaultdict(list)
    for target in _images(target_dir, problems):
        by_relative[target.relative_to(target_dir).with_suffix("").as_posix()] = target
        by_stem[target.stem].append(target)
    pairs = []
    for source in inputs:
        stems, parent = target_stems(source.stem), source.relative_to(input_dir).parent
        target = next((t for s in stems if (t := by_relative.get((parent / s).as_posix())
                                            or (by_stem[s][0] if len(by_stem.get(s, ())) == 1 else None))), None)
        if target is None:
            problems.append(f"{source}: missing target (no {' or '.join(stems)}.* in {target_dir})")
            continue
        size_in, size_out = _probe(source, problems, sizes), _probe(target, problems, sizes)
        if size_in and size_out and size_in != size_out:
            problems.append(f"size mismatch: {source} is {size_in[0]}x{size_in[1]} but its target "
                            f"{target} is {size_out[0]}x{size_out[1]}: crop one to match the other")
        elif size_in and size_out:
            pairs.append((source, target))
    return pairs


def _set_folders(folder, task):
    """[(set name, input dir or None, target dir)] if `folder` is one image set, else []."""
    target = next((folder / n for n in ("target", "gt", "GT") if (folder / n).is_dir()), None)
    if target and (folder / "input").is_dir():
        return [(folder.name, folder / "input", target)]
    if task == "denoise" and (target or any(p.suffix.lower() in IMAGE_SUFFIXES for p in folder.iterdir())):
        return [(folder.name, None, target or folder)]
    return []


def _sets_below(folder, task, problems):
    """The image sets in the subfolders of a task folder; a subfolder that is none is a problem."""
    subfolders = sorted(p for p in folder.iterdir() if p.is_dir())
    problems += [f"{d}: not an image set (needs input/ and target/{' or images' * (task == 'denoise')})"
                 for d in subfolders if not _set_folders(d, task)]
    return [s for d in subfolders for s in _set_folders(d, task)]


def _locate(root, split, task, problems):
    """(layout, task folder, [(key prefix, input dir, target dir, list file)]) or None."""
    name, folder = AUTHORS_NAMES[task], root / "Train" / AUTHORS_NAMES[task]
    if split == "train" and task in PROMPTIR and folder.is_dir():
        input_name, target_name, list_name = PROMPTIR[task]
        flat = _set_folders(folder, task) == [(name, None, folder)]          # images right in the folder
        if (folder / input_name).is_dir() if input_name else flat:
            list_file = next((d / "data_dir" / list_name for d in (root, root.parent)
                              if (d / "data_dir" / list_name).is_file()), None)
            return "promptir", folder, [("", input_name and folder / input_name, folder / target_name, list_file)]
    folder = root / split / name
    if folder.is_dir() and (sets := _set_folders(folder, task)):
        return "authors", folder, [("", i, t, None) for _, i, t in sets]
    folder = root / split / task
    if folder.is_dir():
        return "generic", folder, [(f"{n}/", i, t, None) for n, i, t in _sets_below(folder, task, problems)]
    return None


def _raise(problems, where):
    shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
    raise ValueError(f"{len(problems)} problem(s) in the images under {where} "
                     f"(`python data.py --check ROOT` lists them all):\n  {shown}")


def scan_training_set(root, tasks, split="train", strict=True, synthesize=(), sets=None):
    """Find, pair and check the images of `tasks` → (samples, {"found": {task: ...}, "problems": [...]}): before
    training, corrupt or unsupported files, missing targets, size mismatches, missing listed files, empty or
    missing task folders. strict=True raises them as one ValueError. A task in `synthesize` (dehaze, deblur)
    takes the clean images of the denoising sets instead of pairs of its own: its degraded images are made
    on the fly (degradations.SYNTHESIS). `sets` ({task: set names}, `--train-sets`) keeps those sets of a task
    alone (a set: a subfolder of the generic layout, else the task folder); the synthesized tasks take denoise's."""
    root, sets = Path(root), sets or {}
    if not root.is_dir():
        raise FileNotFoundError(f"--data-root {root} does not exist")
    samples, sizes = [], {}
    problems = [f"--train-sets names {t}, which is not in --tasks" for t in sets if t not in tasks
                and not (t == "denoise" and set(synthesize) & set(tasks))]
    report = {"found": {}, "problems": problems}
    for task in synthesize:
        if task not in SYNTHESIS:
            raise ValueError(f"--synthesize: cannot make {task} pairs; only {' and '.join(SYNTHESIS)} can be made")
    for task in tasks:
        letter = next(k for k, v in TASK_LETTERS.items() if v == task)
        located = _locate(root, split, "denoise" if task in synthesize else task, problems)
        if located is None:
            problems.append(f"task {task!r}: no {split}/{task}/<set>/, {split}/{AUTHORS_NAMES[task]}/ or Train/"
                            f"{AUTHORS_NAMES[task]}/ under {root}: add the data or drop {letter} from --tasks")
            continue
        layout, folder, sources = located
        if wanted := sets.get("denoise" if task in synthesize else task):
            names = [prefix.rstrip("/") or folder.name for prefix, *_ in sources]
            for missing in (n for n in wanted if n not in names):        # once, though H and B read denoise's
                problem = f"--train-sets: no set {missing!r} in {folder} (its sets: {', '.join(names)})"
                problems += [problem] * (problem not in problems)
            sources = [source for source, name in zip(sources, names) if name in wanted]
        layout, found = f"synthesized from {layout} denoise" if task in synthesize else layout, []
        for prefix, input_dir, target_dir, list_file in sources:
            inputs = _images(input_dir or target_dir, problems)
            if list_file is not None:                      # PromptIR trains on the listed files only
                listed = {line.strip() for line in list_file.read_text().splitlines() if line.strip()}
                relative = {p.relative_to(folder).as_posix(): p for p in inputs}
                problems += [f"{folder / e}: in {list_file} but missing" for e in sorted(listed - set(relative))]
                inputs, layout = [p for r, p in relative.items() if r in listed], layout + " (lists)"
            if input_dir is None:               # clean images: denoising, or a task synthesized from them
                found += [Sample(task, prefix + p.relative_to(target_dir).as_posix(), None, p)
                          for p in inputs if _probe(p, problems, sizes)]
            else:
                found += [Sample(task, prefix + s.relative_to(input_dir).as_posix(), s, t)
                          for s, t in pair_folder(inputs, input_dir, target_dir, problems, sizes)]
        if not found:
            problems.append(f"task {task!r}: no usable images in {folder}: add them or drop {letter} from --tasks")
        report["found"][task] = {"layout": layout, "folder": str(folder), "pairs": len(found)}
        samples += found
    if strict and problems:
        _raise(problems, root)
    return samples, report


def keyed_path(folder, task, key):
    """`<folder>/<task>/<key with suffix .png>`: medium images and proxy negatives."""
    return Path(folder) / task / PurePosixPath(key).with_suffix(".png")


def _same_size(image, target, path, target_path):
    if target is not None and image.shape != target.shape:                # (no target: nothing to compare)
        (h, w), (th, tw) = image.shape[1:], target.shape[1:]
        raise ValueError(f"size mismatch: {path} is {w}x{h} but {target_path} is {tw}x{th}")


def load_pair(sample, sigmas=SIGMAS):
    """Whole (degraded, target, σ); the noise, haze or blur of a clean image is fixed by its key (I_m and the
    triplets share it)."""
    target = read_image(sample.target_path)
    if sample.input_path is not None:
        degraded = read_image(sample.input_path)
        _same_size(degraded, target, sample.input_path, sample.target_path)
        return degraded, target, 0
    if not noised(sample):                                                  # --synthesize: haze or blur
        return SYNTHESIS[sample.task](target, _rng(sample.task, sample.key)), target, 0
    # UNSPECIFIED: which σ the medium-quality image of a clean denoising image is made at; we give
    # each image one σ of {15, 25, 50}, fixed by its key, so the three levels are equally common.
    sigma = sigmas[zlib.crc32(sample.key.encode()) % len(sigmas)]
    return add_gaussian_noise(target, sigma, _rng(sample.task, sample.key, sigma)), target, sigma


# --- Training patches (Sec. IV-A.4) and stage-1 triplets (Sec. III-B) ----------------------------------------------

def _pad_to(images, size, path, warned):
    """Reflect-pad equally sized (3, H, W) images to at least size × size; warn once per file."""
    H, W = images[0].shape[-2:]
    if H >= size and W >= size:
        return images
    if path not in warned:
        warned.add(path)
        warnings.warn(f"{path} is {W}x{H}, smaller than the {size}x{size} patch: reflect-padded")
    pad_h, pad_w = max(size - H, 0), max(size - W, 0)
    mode = "reflect" if (pad_h + 1) // 2 < H and (pad_w + 1) // 2 < W else "replicate"   # reflection < side
    return list(F.pad(torch.stack(images), (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), mode))


class TrainDataset(torch.utils.data.Dataset):
    """Resampled training patches of the restoration stage (Sec. IV-A.4). Item: "degraded" I_d, "positive"
    (another crop of the same degraded image: L_cl's Z⁺, Eq. 12), "target" I_g, "negatives" (Q, 3, P, P)
    N_q of Eq. (11) from `<dir>/<task>/<key>.png`, cropped alike, "negative_mask" (Q,), "task", "sigma",
    "stratum", "key". Randomness comes from (seed, epoch, index) only: the same in any worker or process."""

    def __init__(self, samples, patch_size=128, negative_dirs=(), resample=None, sigmas=SIGMAS, seed=0, cache_mb=0):
        self.samples, self.patch_size, self.sigmas = list(samples), patch_size, tuple(sigmas)
        self.negative_dirs, self.seed = [Path(d) for d in negative_dirs], seed
        # Decoded images kept in memory, up to cache_mb MB per process (each loader worker has its own): a crop
        # then costs no file decoding. 8-bit images are kept as uint8, exactly (k/255 → k → k/255), others as read.
        self.cache, self.cache_bytes, self.cache_limit = {}, 0, cache_mb * 2 ** 20
        self.resample, self.padded = RESAMPLE if resample is None else resample, set()
        self._epoch = torch.zeros((), dtype=torch.long).share_memory_()   # seen by persistent workers
        # Sec. IV-A.4: each sample of task t appears resample[t] times per epoch (copies 0..r-1).
        ratios = [int(self.resample.get(s.task, 1)) for s in self.samples]
        self.sample_index = np.repeat(np.arange(len(self.samples)), ratios)
        self.copy_index = np.concatenate([np.arange(r) for r in ratios]) if ratios else np.zeros(0, int)
        # Eq. (10) compares each negative with the avgPSNR of its own stratum: a task, or denoising at one σ.
        strata = {(TASKS.index(s.task), sig) for s in self.samples
                  for sig in (self.sigmas if noised(s) else (0,))}
        self.strata = [stratum(TASKS[t], sig) for t, sig in sorted(strata)]             # in TASKS order, then σ
        # Which images have a non-easy negative in each folder (Eq. 11); missing ones are masked out.
        self.negative_mask = np.array([[keyed_path(d, s.task, s.key).is_file() for d in self.negative_dirs]
                                       for s in self.samples], dtype=bool).reshape(len(self.samples), -1)
        empty = [str(d) for d, covered in self.coverage() if covered == 0]
        if empty:
            raise ValueError(f"negatives folder {empty[0]}: no negative for any training image. Expected layout: "
                             "<folder>/<task>/<key>.png, key = the image's path below its task's input folder "
                             "(e.g. <folder>/derain/Rain100L/1.png), as --stage medium writes it")

    def set_epoch(self, epoch):
        self._epoch.fill_(epoch)

    def __getstate__(self):             # a spawned loader worker gets the dataset pickled: without the cache
        return {**self.__dict__, "cache": {}, "cache_bytes": 0}

    def read(self, path):
        """read_image(path), from the cache when it holds it; the same float32 tensor either way."""
        cached = self.cache.get(path)
        if cached is not None:
            return cached.float() / 255.0 if cached.dtype == torch.uint8 else cached.clone()
        image = read_image(path)
        if self.cache_bytes + image.numel() <= self.cache_limit:   # fits as uint8 at least: bounded, fill-once
            byte = (image * 255.0).round().to(torch.uint8)
            kept = byte if torch.equal(byte.float() / 255.0, image) else image.clone()   # 16 bit: float32, as read
            size = kept.numel() * kept.element_size()
            if self.cache_bytes + size <= self.cache_limit:
                self.cache[path], self.cache_bytes = kept, self.cache_bytes + size
        return image

    def __len__(self):
        return len(self.sample_index)

    def __getitem__(self, index):
        sample, copy, epoch = self.samples[self.sample_index[index]], int(self.copy_index[index]), int(self._epoch)
        sigma = 0
        if noised(sample):
            # UNSPECIFIED: how σ is drawn (paper: ratio 3, σ ∈ {15, 25, 50}; PromptIR code: 3 copies per σ);
            # copy c gets σ[(c + epoch + crc(key)) mod 3], so each image sees every σ once per epoch.
            sigma = self.sigmas[(copy + epoch + zlib.crc32(sample.key.encode())) % len(self.sigmas)]
        return self.crop(self.sample_index[index], sigma, _rng(self.seed, epoch, index))

    def crop(self, sample_index, sigma, rng):
        """One training item of sample `sample_index`, noised at σ (clean images), drawn with `rng`."""
        sample, P = self.samples[sample_index], self.patch_size
        target = self.read(sample.target_path)
        if sample.input_path is not None:
            images = [self.read(sample.input_path), target]
        else:               # noise comes below, on the crops; synthesized haze or blur on the whole image, here
            images = [target if noised(sample) else SYNTHESIS[sample.task](target, rng), target]
        _same_size(images[0], target, sample.input_path or sample.target_path, sample.target_path)
        mask = self.negative_mask[sample_index].tolist()
        for folder in (d for d, present in zip(self.negative_dirs, mask) if present):
            path = keyed_path(folder, sample.task, sample.key)
            images.append(self.read(path))
            _same_size(images[-1], target, path, sample.target_path)
        degraded, target, *negatives = _pad_to(images, P, sample.input_path or sample.target_path, self.padded)
        H, W = target.shape[-2:]
        (y, x), (y2, x2) = rng.integers(0, [H - P + 1, W - P + 1], size=(2, 2))   # crop, positive crop
        top, left = 0, 0
        if noised(sample):
            # Noise the region holding both crops once, so the positive shares the realisation.
            top, left = min(y, y2), min(x, x2)
            degraded = add_gaussian_noise(target[:, top:max(y, y2) + P, left:max(x, x2) + P], sigma, rng)
        boxes = [(degraded, y - top, x - left), (degraded, y2 - top, x2 - left)]      # I_d, Z⁺ (same image)
        boxes += [(image, y, x) for image in [target] + negatives]                  # I_g, N_q: aligned with I_d
        patches = [image[:, a:a + P, b:b + P] for image, a, b in boxes]
        flips = [d for d, flip in zip((-1, -2), rng.random(2) < 0.5) if flip]   # horizontal, vertical
        patches = [p.flip(flips) if flips else p.clone() for p in patches]
        stack = torch.zeros(len(mask), 3, P, P)         # missing negatives stay zero, mask False
        if any(mask):
            stack[torch.tensor(mask)] = torch.stack(patches[3:])
        return {"degraded": patches[0], "positive": patches[1], "target": patches[2], "negatives": stack,
                "negative_mask": torch.tensor(mask, dtype=torch.bool), "sigma": torch.tensor(float(sigma)),
                "task": torch.tensor(TASKS.index(sample.task)), "key": sample.key,
                "stratum": torch.tensor(self.strata.index(stratum(sample.task, sigma)))}

    def probe(self, per_stratum, seed=0):
        """Eq. (10)'s fixed probe: {stratum: (I_d, I_g)} of (per_stratum, 3, P, P) training patches."""
        probe = {}
        for name in self.strata:
            task, sigma = name.split("_sigma")[0], float(name.split("_sigma")[1]) if "_sigma" in name else 0
            indices = [i for i, s in enumerate(self.samples)               # clean images for a σ stratum
                       if s.task == task and noised(s) == (sigma > 0)]
            order = _rng(seed, "probe", name).permutation(indices)       # cycles when a task has few images
            items = [self.crop(order[n % len(order)], sigma, _rng(seed, "probe", name, n))
                     for n in range(per_stratum)]
            probe[name] = tuple(torch.stack([item[k] for item in items]) for k in ("degraded", "target"))
        return probe

    def coverage(self):
        """[(folder, training images with a negative in it)] for the non-easy negatives N_q."""
        return [(folder, int(covered)) for folder, covered in zip(self.negative_dirs, self.negative_mask.sum(0))]


class TripletDataset(torch.utils.data.Dataset):
    """(I_d, I_m, I_g) triplets of stage 1 (Sec. III-B, Eq. 1), whole images; I_m is `<medium_dir>/<task>/<key>.png`."""

    def __init__(self, samples, medium_dir, sigmas=SIGMAS):
        self.samples, self.sigmas = list(samples), tuple(sigmas)
        self.medium = [keyed_path(medium_dir, s.task, s.key) for s in self.samples]
        missing = [str(p) for p in self.medium if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} medium-quality image(s) missing under --medium-dir "
                                    f"{medium_dir}, e.g. {missing[0]}: render them with stage 1 first")

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        sample = self.samples[index]
        degraded, target, _ = load_pair(sample, self.sigmas)
        return {"degraded": degraded, "medium": read_image(self.medium[index]), "target": target,
                "task": torch.tensor(TASKS.index(sample.task)), "key": sample.key}


# --- Test protocols (Tables II-V, IX, XIII) ------------------------------------------------------------------------

class TestSet(torch.utils.data.Dataset):
    """One test set at one σ (denoising) or as stored (pairs or inputs alone); items {"degraded", "target", "name"}."""
    __test__ = False                                           # not a pytest class, despite the name

    def __init__(self, name, task, pairs, sigma=None, crop_multiple=None):
        self.name, self.task, self.pairs = name, task, pairs     # pairs: [(input or None, target)]
        self.sigma, self.crop_multiple = sigma, crop_multiple

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, index):
        source, target_path = self.pairs[index]                    # target None: a set without targets (C60)
        name = (source or target_path).name
        target = target_path and read_image(target_path)
        if self.sigma is None:
            degraded = read_image(source)
            _same_size(degraded, target, source, target_path)
        else:   # UNSPECIFIED: the test noise seed; ours is the file name and σ, never the listing order
            degraded = add_gaussian_noise(target, self.sigma, _rng("test", name, self.sigma))
        return {"degraded": self.crop(degraded), "target": target_path and self.crop(target), "name": name}

    def target(self, index):       # the target alone, cropped as in an item: scoring outputs reads no input
        return self.crop(read_image(self.pairs[index][1]))

    def crop(self, image):         # UNSPECIFIED in the paper; PromptIR-family protocol: centre crop to k · m
        (H, W), m = image.shape[-2:], self.crop_multiple or 1
        return image[:, H % m // 2:H % m // 2 + H // m * m, W % m // 2:W % m // 2 + W // m * m]


def build_test_sets(root, tasks, sigmas=SIGMAS, crop_multiple=None, problems=None):
    """Every test set of `tasks` under `root/test` (or `root`): one TestSet per (set, σ) of clean images (Table IX:
    σ = 60, 100), one per paired set. Problems raise one ValueError, or are appended to a `problems` list."""
    root = Path(root)
    base = next((root / s for s in ("test", "Test") if (root / s).is_dir()), root)
    test_sets, strict, sizes = [], problems is None, {}
    problems = [] if strict else problems
    for task in tasks:
        names = (task, AUTHORS_NAMES[task], task.capitalize())
        folder = next((base / n for n in names if (base / n).is_dir()), None)
        if folder is None:
            problems.append(f"no test folder for {task!r} under {base} (tried {', '.join(names)}): "
                            "add it or drop the task from --tasks")
            continue
        for name, input_dir, target_dir in _set_folders(folder, task) or _sets_below(folder, task, problems):
            if input_dir is None:
                clean = [(None, p) for p in _images(target_dir, problems) if _probe(p, problems, sizes)]
                test_sets += [TestSet(name, task, clean, sigma, crop_multiple) for sigma in sigmas]
            else:
                pairs = pair_folder(_images(input_dir, problems), input_dir, target_dir, problems, sizes)
                test_sets.append(TestSet(name, task, pairs, None, crop_multiple))
    if strict and problems:
        _raise(problems, base)
    return test_sets


# --- Command line: --check and a self-check ------------------------------------------------------------------------

def check(root, tasks):
    """Print both splits next to Table I (counts, the paper's set each test folder stands for) and every problem."""
    _, report = scan_training_set(root, tasks, strict=False)
    found, problems = report["found"], report["problems"]
    print(f"{'train':9s} {'layout':17s} {'pairs':>6s} {'ratio':>5s} {'resampled':>9s} {'Table I':>7s}  folder")
    for task, f in found.items():
        print(f"{task:9s} {f['layout']:17s} {f['pairs']:6d} {RESAMPLE[task]:5d} {f['pairs'] * RESAMPLE[task]:9d} "
              f"{TABLE_I[task]:7d}  {f['folder']}")
    print(f"setting {'+'.join(k for k, v in TASK_LETTERS.items() if v in tasks)}: "
          f"{sum(f['pairs'] for f in found.values())} pairs (Table I: {sum(TABLE_I[t] for t in tasks)}), "
          f"{sum(f['pairs'] * RESAMPLE[t] for t, f in found.items())} resampled samples per epoch (Sec. IV-A.4)")
    print(f"\n{'test':9s} {'set':24s} {'images':>6s}  stands for")
    for test_set in build_test_sets(root, tasks, sigmas=SIGMAS[:1], problems=problems):
        paper = [(n, c) for n, c in TEST_SETS[test_set.task].items()      # its name up to "-": SOTS-x → SOTS
                 if test_set.name.split("-")[0].lower() == n.lower()]
        stands_for = f"{paper[0][0]} (Table I: {paper[0][1]} images)" if paper else "no Table I test set"
        print(f"{test_set.task:9s} {test_set.name:24s} {len(test_set):6d}  {stands_for}")
    print("".join(f"PROBLEM: {p}\n" for p in problems) + f"{len(problems)} problem(s)")
    return len(problems)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Perceive-IR data: check a dataset (Sec. IV-A, Table I)")
    parser.add_argument("--check", metavar="ROOT", help="scan ROOT's train and test splits: counts and problems")
    parser.add_argument("--tasks", default="N+H+R+B+L", help="N+H+R or N+H+R+B+L (Sec. IV-A.1), or a subset")
    args = parser.parse_args(argv)
    try:
        tasks = parse_tasks(args.tasks)
    except ValueError as error:
        raise SystemExit(f"data.py: {error}") from None
    if args.check:
        try:
            raise SystemExit(1 if check(args.check, tasks) else 0)
        except (OSError, ValueError) as error:                          # a missing root, an unreadable folder
            raise SystemExit(f"data.py --check: {error}") from None
    with tempfile.TemporaryDirectory() as tmp:    # no argument: a self-check on random images, generic layout
        for split, task in ((s, t) for s in ("train", "test") for t in tasks):
            for folder in ("",) if task == "denoise" else ("input/", "target/"):
                write_image(Path(tmp) / split / task / "random" / folder / "0.png", torch.rand(3, 48, 64))
        check(tmp, tasks)
        print("an item:", {k: tuple(v.shape) for k, v in TrainDataset(scan_training_set(tmp, tasks)[0])[0].items()
                           if k != "key"})


if __name__ == "__main__":
    main()
