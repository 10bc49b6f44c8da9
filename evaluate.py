"""Evaluation of Perceive-IR: the protocols of Sec. IV-B..G (Tables II-IX, XV).

PSNR and SSIM per test set and σ, and their average, for the All-in-One settings (Tables II, III),
One-by-One training (Tables IV-V) and unseen σ (Table IX); LPIPS as in Fig. 8 and Tables VI-VIII; any
folder of pairs, or of inputs alone with the no-reference metrics, for the real and unseen degradations
of Tables VI-VIII. The metrics are in `metrics.py`, the tables in `tables.py`: every table names its
convention, and whether images were restored whole or in tiles.

What is in here:
- `Restorer`, `restored_pairs`, `score_into`: a checkpoint on the test sets; `prediction_pairs`: any
  method's restored images (`--pred`); `named_test_sets`: any folder (`--sets`).
- `restore_files`: your own images, and what the model perceived in them.
"""

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torchvision.utils

import clip_prompts
import data
import train
from backbone import count_parameters
from checkpoints import load_checkpoint, output_folder
from data import TASKS
from guidance import build_model, build_sgm, perceive, restore_image
from metrics import CONVENTIONS, LPIPS_NAME, NO_REFERENCE, NR_METRICS, build_lpips, compute_metrics_per_image
from tables import LAYOUTS, ResultTable, table_xiv, table_xv, write_atomic

# --- Restoring the test sets with a trained checkpoint, or scoring another method's outputs ------------------------

# Peak tensor memory of one whole-image pass of the paper config (float32, weights and DINOv2 included), a line
# through 256² and 512² counted on fake tensors by `python tests/benchmark.py --memory` (1024²: 6.47 GB, on the line).
WHOLE_IMAGE_GB = {"base": 0.46, "per_megapixel": 5.73}
# The weights this repository ships: `train.py --preset laptop` (README, "A real restorer in an hour"), exported
# without the optimiser; used when no --checkpoint is given.
SHIPPED_WEIGHTS = Path(__file__).resolve().parent / "weights" / "laptop" / "perceive-ir-laptop.pt"


class Restorer:
    """A trained Perceive-IR rebuilt from its checkpoint's own args, with its frozen DINOv2;
    `restorer(degraded)` restores a (B, 3, H, W) batch in [0, 1] (guidance.restore_image)."""

    def __init__(self, model, sgm, config, tile=None, overlap=32, prior_size=1024, centroids=None, code_crop=0):
        self.model, self.sgm, self.config, self.centroids = model.eval(), sgm, config, centroids
        self.tile, self.overlap, self.prior_size, self.images = tile or None, overlap, prior_size, 0
        self.code_crop = code_crop                # CFE on tiles of this size, Z their mean (guidance.image_code)
        self.as_task = None                       # --as-task: restore as if Z had perceived this task

    def steer(self, task):
        """Restore every image as if perceived as `task`: Z turned to its training centroid (guidance.restore_image).
        None: as perceived again. Only a guided checkpoint with centroids of Z can be steered; a problem ends the
        run in one line."""
        self.as_task = None                                # no --as-task: each image as perceived
        if task is None:
            return
        if not (self.model.guided and self.model.use_cfe) or self.centroids is None:      # no Z, or no centroid
            raise SystemExit(f"evaluate.py: --as-task {task}: this checkpoint has no degradation code Z to steer, "
                             "or no centroids of it (trained with --no-guidance or --no-cfe, or by an older version)")
        if task not in self.centroids["tasks"]:            # a task the checkpoint was not trained on
            raise SystemExit(f"evaluate.py: --as-task {task}: the checkpoint's centroids are of "
                             f"{', '.join(self.centroids['tasks'])} only")
        self.as_task = task

    @classmethod
    def from_checkpoint(cls, path, device="cpu", dino_weights=None, **options):
        checkpoint = load_checkpoint(path, flag="--checkpoint")                         # read once, weights_only
        if checkpoint["stage"] != "restore":
            raise SystemExit(f"--checkpoint {path} is a {checkpoint['stage']!r} checkpoint; pass one of "
                             "`train.py --stage restore` (its restore/last.pt)")
        config = checkpoint["args"]
        model = build_model(config)                                       # rebuilt from the checkpoint's own args
        missing, unexpected = model.load_state_dict(checkpoint["model"], strict=False)
        if missing or unexpected:
            raise SystemExit(f"--checkpoint {path} does not match the model its own args describe "
                             f"(missing {missing[:3]}, unexpected {unexpected[:3]}): it was written by "
                             f"another version of this code; check out its commit ({checkpoint.get('git_commit')})")
        sgm = None                                                                # no DINOv2 for the unguided ablations
        if model.guided and model.use_dino:
            sgm = build_sgm(config["dino"], dino_weights or config.get("dino_weights")).to(device)
        centroids = checkpoint.get("centroids")
        if options.get("code_crop") is None:              # Z seen as the centroids saw it (0: whole images)
            options["code_crop"] = (centroids or {}).get("code_crop", 0)
        return cls(model.to(device), sgm, config, centroids=centroids, **options)

    @property
    def protocol(self):
        code = f"; Z from {self.code_crop} px tiles" if self.code_crop and self.model.guided else ""
        return (f"tiled {self.tile}, overlap {self.overlap}" if self.tile else "whole images") + code

    def __call__(self, degraded):
        self.images += len(degraded)                         # images restored by this process
        steer = self.centroids["centroids"][self.centroids["tasks"].index(self.as_task)] if self.as_task else None
        # (a unit vector: restore_image keeps each image's ‖Z‖ and takes only the centroid's direction)
        return restore_image(self.model, self.sgm, degraded, self.tile, self.overlap, self.prior_size, steer,
                             self.code_crop)


def auto_layout(tasks, sigmas):
    if set(sigmas) <= {60, 100}:                                                        # Table IX: σ 60 and 100 only
        return "unseen-noise"
    layouts = {("denoise", "dehaze", "derain"): "N+H+R", tuple(TASKS): "N+H+R+B+L"}
    return layouts.get(tuple(tasks), "one-by-one" if len(tasks) == 1 else None)


def score_into(tables, test_set, pairs, run, lpips=None):
    """Score (name, restored, target) pairs of one test set in every convention (and LPIPS), and with the
    no-reference metrics if `tables` has their table, and add them to `tables`; a set without targets (target
    None) gets the no-reference metrics alone. Under torchrun each rank scores its share; shares are gathered."""
    rows = []                                                                           # one row per image of this rank
    for name, restored, target in pairs:
        row = {"name": name}                                                            # {table: {metric: value}}
        distance = lpips(restored.clamp(0, 1), target).item() if lpips and target is not None else None
        for convention, table in tables.items():                            # every convention from the same restoration
            if convention == NO_REFERENCE:                                              # the restored image alone
                row[convention] = {m: NR_METRICS[m](restored.clamp(0, 1))[0] for m in table.metrics}
            elif target is not None:
                metrics = compute_metrics_per_image(restored, target, convention)
                row[convention] = {"psnr": metrics["psnr"][0], "ssim": metrics["ssim"][0], "lpips": distance}
        rows.append(row)
    if run.distributed:                                      # every rank's images, on every rank
        shares = [None] * run.world                                                     # one share per rank
        dist.all_gather_object(shares, rows)
        rows = [row for share in shares for row in share]
    for convention, table in tables.items():             # a rank may have had no image; a set may have no target
        if rows and convention in rows[0]:
            values = {m: [row[convention][m] for row in rows] for m in table.metrics}
            table.add(test_set.name, test_set.task, test_set.sigma, values, [row["name"] for row in rows])


def restored_pairs(restorer, test_set, run, save_dir=None):
    """(name, I_r, I_g) of this rank's share of a test set, each image restored whole unless --tile."""
    for index in range(run.rank, len(test_set), run.world):                  # every world-th image: ranks share the set
        item = test_set[index]
        degraded, target = (None if item[k] is None else item[k][None].to(run.device) for k in ("degraded", "target"))
        try:
            restored = restorer(degraded)                                               # whole, unless --tile
        except torch.cuda.OutOfMemoryError:
            H, W = degraded.shape[-2:]
            raise SystemExit(f"{test_set.name}/{item['name']} ({W}×{H}) does not fit in GPU memory as a whole "
                             "image (the paper's protocol): pass --tile 512, and the tables will say "
                             "'tiled 512, overlap 32'") from None
        if save_dir:                                         # the layout --pred reads back
            data.write_image(Path(save_dir) / prediction_folder(test_set) / f"{Path(item['name']).stem}.png",
                             restored[0])
        yield item["name"], restored, target


def prediction_folder(test_set):
    return f"{test_set.task}_{test_set.name}" + (f"_sigma{test_set.sigma:g}" if test_set.sigma else "")


def prediction_pairs(folder, test_set, problems):
    """(name, prediction, target) for every image of a test set that has a prediction in `folder`,
    matched by stem through data.py's name rules (a RESIDE 0001_0.8_0.2.png scores against 0001).
    Missing, extra and size-mismatched files are named in `problems`; nothing is skipped silently."""
    if not folder.is_dir():
        return problems.append(f"{folder}: missing; expected the {len(test_set)} restored images of {test_set.name}")
    lookup, matched = {}, {}                                  # input and target stems → test image
    for index, (source, target) in enumerate(test_set.pairs):                   # stems of inputs and targets both match
        lookup.update({p.stem: lookup.get(p.stem, index) for p in (source, target) if p is not None})
    for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in data.IMAGE_SUFFIXES):
        index = next((lookup[s] for s in data.target_stems(path.stem) if s in lookup), None)
        if index is None or index in matched:
            problems.append(f"{path}: {'no test image of this name' if index is None else 'a second prediction'} "
                            f"in {test_set.name}")
        else:
            matched[index] = path
    for index, (source, target) in enumerate(test_set.pairs):                           # every test image must have one
        if index not in matched:
            problems.append(f"{folder}: no prediction for {(source or target).name}")
            continue
        try:                                                  # one bad file must not cost the others
            prediction = data.read_image(matched[index])
            target_image = None if target is None else test_set.target(index)
        except ValueError as error:
            problems.append(str(error))
            continue
        if target is None:                                                    # a set without targets (--sets)
            yield matched[index].name, prediction[None], None
            continue
        if prediction.shape != target_image.shape:
            (h, w), (th, tw) = prediction.shape[-2:], target_image.shape[-2:]           # (H, W) of both
            problems.append(f"size mismatch: {matched[index]} is {w}x{h}, its target {tw}x{th} "
                            "(outputs of PromptIR's protocol need --crop-multiple 16)")
            continue
        yield matched[index].name, prediction[None], target_image[None]


def named_test_sets(root, folders, crop_multiple=None, problems=None):
    """--sets: any folders (under --data-root, or absolute), e.g. test/underwater/UIEB (Tables VI-VIII): with
    input/ and target/ a set is scored like the paper's, with input/ alone (C60, RTTS) by the no-reference
    metrics. Each is named by its folder and labelled with its parent's name as the task ("UIEB", "underwater")."""
    test_sets, strict = [], problems is None               # restoring: any problem stops; scoring (--pred): named
    problems = [] if strict else problems
    for folder in folders:
        path = Path(root or ".") / folder                                   # an absolute folder stays itself
        target = next((path / n for n in ("target", "gt", "GT") if (path / n).is_dir()), None)
        if not (path / "input").is_dir():
            raise SystemExit(f"evaluate.py: --sets {folder}: no input/ folder in {path} (input/ and target/ for "
                             "pairs, input/ alone for a set without targets)")
        inputs = sorted(p for p in (path / "input").iterdir() if p.suffix.lower() in data.IMAGE_SUFFIXES)  # images
        pairs = (data.pair_folder(inputs, path / "input", target, problems, {}) if target
                 else [(p, None) for p in inputs])                   # no target: the no-reference metrics alone
        test_sets.append(data.TestSet(path.name, path.parent.name, pairs, None, crop_multiple))   # set, task labels
    if strict and problems:
        raise SystemExit("evaluate.py: --sets: " + "; ".join(problems[:5]))
    return test_sets


def write_tables(tables, args, tasks, run):
    layout = args.layout or (None if args.sets else auto_layout(tasks, args.sigmas))   # the paper's, for its sets
    for table in tables.values():
        try:                                              # sets that are not the paper's: one column each
            if layout and not any(result for _, result in table.columns(layout)):
                layout = None
        except ValueError:
            layout = None
        if run.master:                                                                  # one writer
            print(table.markdown(layout))
            table.write(args.results, layout)
    run.print0(f"tables written to {args.results}/")


def largest_image_note(test_sets, config):
    """Print the largest test image and what a whole-image pass of it needs: a CPU that runs out of
    memory is killed without a message, so say it before the first image."""
    from PIL import Image
    sizes = [(Image.open(target or source).size, s.name, (target or source).name)     # no target: the input's
             for s in test_sets for source, target in s.pairs]
    (W, H), set_name, name = max(sizes, key=lambda size: size[0][0] * size[0][1], default=((0, 0), "", ""))
    need = WHOLE_IMAGE_GB["base"] + WHOLE_IMAGE_GB["per_megapixel"] * W * H / 1e6      # a line in the pixels
    scale = "paper config" if config.get("backbone_config") == "paper" else "paper config; this smaller one needs less"
    print(f"largest test image: {set_name}/{name}, {W}×{H}; a whole-image pass needs about {need:.1f} GB of tensors "
          f"({scale}; add the CUDA context and the allocator's cache; running out names the image and --tile)")


# --- Your own images, and what the model perceived in them (Sec. III-C.2, Eq. 9) -----------------------------------

def output_names(paths):
    """{input: output file name}: the stem, or stem_suffix where inputs share a stem (img.bmp and
    img.tif → img_bmp.png, img_tif.png). Names that would still collide are refused up front."""
    stems = [p.stem for p in paths]                                                     # stems of all inputs
    names = {p: f"{p.stem}.png" if stems.count(p.stem) == 1 else f"{p.stem}_{p.suffix[1:].lower()}.png" for p in paths}
    if len(set(names.values())) < len(names):
        raise SystemExit(f"--input: {len(names) - len(set(names.values()))} output name(s) would collide "
                         f"({sorted(names.values())}); rename the inputs. Nothing was restored.")
    return names


def restore_files(restorer, inputs, output_dir, grid=False, perceiver=None, device="cpu"):
    """Restore a file or a folder's images into `output_dir` as PNG, and write perception.json: per image, the
    nearest task centroid of Z, the similarity to each, an unfamiliar flag, P(excellent) (--prompts).
    Unreadable files are named and skipped; returns how many."""
    inputs, output_dir = Path(inputs), Path(output_dir)
    if not inputs.exists():                                                    # a clear error before anything is loaded
        raise SystemExit(f"--input {inputs}: no such file or folder")
    paths = [inputs] if inputs.is_file() else sorted(p for p in inputs.iterdir()
                                                     if p.suffix.lower() in data.IMAGE_SUFFIXES)
    if not paths:
        raise SystemExit(f"--input {inputs}: no PNG, JPEG, WebP, BMP or TIFF images in it")
    names, report, skipped = output_names(paths), {}, []
    inside = output_dir.resolve() == inputs.resolve() or inputs.resolve() in output_dir.resolve().parents
    overwritten = {(output_dir / name).resolve() for name in names.values()} & {p.resolve() for p in paths}
    if inputs.is_dir() and inside or overwritten:
        raise SystemExit(f"--output {output_dir}: the same folder as --input {inputs}, or inside it: the originals "
                         "would be overwritten or read back as inputs; choose another --output. Nothing was restored.")
    previous = output_dir / "perception.json"                  # an earlier run into this folder: merged, never dropped
    try:
        report = json.loads(previous.read_text()) if previous.is_file() else {}
    except (OSError, ValueError) as error:
        raise SystemExit(f"--output {output_dir}: its perception.json cannot be read ({error}), and a new one would "
                         "replace it: move it away or choose another --output. Nothing was restored.") from None
    if restorer.centroids is None:                                             # --no-cfe / --no-guidance runs have none
        print("perception: this checkpoint holds no centroids of Z (trained with --no-cfe or --no-guidance, or "
              "by an older version): images are restored, but no degradation type is reported")
    for path in paths:                                                                  # one at a time: any size fits
        try:
            degraded = data.read_image(path)[None].to(device)
        except ValueError as error:                           # one bad file must not cost the others
            print(f"SKIPPED {path.name}: {error}")
            skipped.append(path.name)
            continue
        start = time.perf_counter()                                                     # time of this image alone
        restored = restorer(degraded)
        data.write_image(output_dir / names[path], restored[0])
        if grid:                                             # input | output, side by side
            grid_path = output_dir / f"{Path(names[path]).stem}_grid.png"
            torchvision.utils.save_image(torch.cat([degraded, restored], dim=-1), grid_path)
        entry = {"output": names[path]}                                                # what perception.json says of it
        line = f"{path.name}: {degraded.shape[-1]}x{degraded.shape[-2]} restored in {time.perf_counter() - start:.1f} s"
        if restorer.centroids is not None:                   # the type of degradation it perceived
            entry.update(perceive(restorer.model, restorer.centroids, degraded)[0])
            line += f" | perceived: {entry['task']}" + (" (unfamiliar)" if entry["unfamiliar"] else "")
        if restorer.as_task:                                 # --as-task: what it was told, beside what it perceived
            entry["restored_as"] = restorer.as_task
            line += f" | restored as {restorer.as_task}"
        if perceiver is not None:                            # the stage-1 quality perceiver
            with torch.no_grad():                                                       # P(excellent) of Eq. (9)
                before, after = (perceiver(x)[0, perceiver.excellent_index].item() for x in (degraded, restored))
            entry["p_excellent"] = {"input": before, "output": after}
            line += f" | P(excellent) {before:.3f} -> {after:.3f}"
        report[path.name] = entry                            # (an image restored before is updated)
        print(line, flush=True)
    output_dir.mkdir(parents=True, exist_ok=True)                                     # also when every file was skipped
    write_atomic(output_dir / "perception.json", json.dumps(report, indent=1) + "\n")
    print(f"restored {len(paths) - len(skipped)} image(s) into {output_dir}; skipped {len(skipped)}"
          + (f": {', '.join(skipped)}" if skipped else ""))
    return len(skipped)


# --- Command line --------------------------------------------------------------------------------------------------

def get_args(argv=None):
    parser = argparse.ArgumentParser(description="Evaluate Perceive-IR on the paper's test sets, score any method's "
                                     "restored images, or restore your own images.",
                                     usage="python evaluate.py (--checkpoint CKPT | --pred DIR) [options]")
    add = parser.add_argument
    add("--checkpoint", help="a restore-stage checkpoint (train.py --stage restore: restore/last.pt); default: "
        "the shipped laptop weights, weights/laptop/perceive-ir-laptop.pt")
    add("--pred", help="score this folder of restored images instead (any method; no checkpoint)")
    add("--target", help="with --pred: a folder of targets, scored as one set (else the test sets of --data-root)")
    add("--method", help="the method's name in the tables (default: Perceive-IR, or the --pred folder)")
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    # --- test sets and metrics (Sec. IV-A.1-2, Tables II-IX, XIII) ---
    add("--data-root", help="root holding test/<task>/<set>/... (data.py layouts)")
    add("--tasks", default="N+H+R", help="test sets to run: N+H+R (Table II), N+H+R+B+L (Table III), one task")
    add("--sigmas", type=float, nargs="+", default=[15, 25, 50], help="denoising σ; 60 100 for Table IX")
    add("--conventions", nargs="+", choices=sorted(CONVENTIONS), default=["rgb", "y"], help="metric conventions")
    add("--lpips", action="store_true", help=f"add {LPIPS_NAME} (Fig. 8, Tables VI-VIII)")
    add("--lpips-weights", help="LPIPS v0.1 calibration weights (else from the installed lpips package)")
    add("--vgg-weights", help="local VGG-16 state-dict file for --lpips (else torchvision's)")
    add("--sets", nargs="+", help="score these folders instead of --tasks' sets: input/ + target/, or input/ alone "
        "with --nr-metrics (Tables VI-VIII; e.g. test/underwater/UIEB)")
    add("--nr-metrics", nargs="+", choices=sorted(NR_METRICS), default=[], help="no-reference metrics of the "
        "restored images (Table VII: uciqe uiqm)")
    add("--layout", choices=sorted(LAYOUTS), default=None, help="table layout (default: from --tasks)")
    add("--table-xiv", nargs="+", metavar="JSON", help="Table XIV: Rain100L of several runs whose prompts were "
        "learnt on different stage-1 restorers (train.py --medium-backbone)")
    add("--table-xv", nargs="+", metavar="JSON", help="Table XV: compare the results_<layout>_<convention>.json "
        "of several runs (backbones, patch sizes), N+H+R and N+H+R+B+L")
    add("--crop-multiple", type=int, default=0, help="centre-crop test images to a multiple (PromptIR: 16)")
    add("--results", default="results", help="folder for the tables (md, csv, json)")
    add("--save-images", default=None, help="also write the restored test images here (the --pred layout)")
    add("--score-inputs", action="store_true", help="score the degraded inputs themselves (the 'Input' row)")
    # --- your own images ---
    add("--input", help="an image or a folder of images (PNG, JPEG, WebP, BMP, TIFF)")
    add("--output", default="restored", help="folder for the restored PNGs and perception.json")
    add("--grid", action="store_true", help="also write input | output side by side")
    add("--prompts", help="stage-1 prompts: P(excellent) of input and output in perception.json")
    add("--clip-weights", help="local CLIP weights for --prompts")
    # --- inference ---
    add("--tile", type=int, default=None, help="restore in tiles of this size: test sets are whole images unless "
        "given (the paper's protocol); --input uses 512 unless given; 0 = whole")
    add("--tile-overlap", type=int, default=32, help="overlap between tiles, blended linearly")
    add("--prior-size", type=int, default=1024, help="CFE sees the whole image, resized above this long side")
    add("--code-crop", type=int, default=None, help="Z: the mean of CFE's codes of tiles of this size, 0 = of the "
        "whole image (default: as the checkpoint's centroids of Z were computed, else 0)")
    add("--dino-weights", help="local DINOv2 weights (default: those the checkpoint was trained with)")
    add("--as-task", choices=data.TASKS, help="restore as if every image were perceived as this task: Z turned to "
        "its training centroid, its length kept (your photo's known degradation, or does Z steer the restoration?)")
    args = parser.parse_args(argv)                                                      # no parsing at import time
    try:                                                  # bad values: one line, before anything is loaded
        args.task_names = data.parse_tasks(args.tasks)
    except ValueError as error:
        raise SystemExit(f"evaluate.py: {error}") from None
    for flag in ("output", "save_images", "results"):                          # folders, not existing files
        output_folder(getattr(args, flag), "--" + flag.replace("_", "-"))
    numbers = ((args.tile or 0) < 0, "--tile must be ≥ 0 (0 = whole images)"), \
        (not 0 <= args.tile_overlap < (args.tile or 512), "--tile-overlap must be ≥ 0 and below --tile"), \
        (args.prior_size <= 0, "--prior-size must be > 0"), ((args.code_crop or 0) < 0, "--code-crop must be ≥ 0"), \
        (args.crop_multiple < 0, "--crop-multiple must be ≥ 0"), \
        (min(args.sigmas) <= 0, "--sigmas must be > 0")
    for wrong, message in (*numbers, (args.pred and args.checkpoint, "--pred scores restored images, --checkpoint "
                            "restores: pass one of them"), (args.target and not args.pred, "--target goes with --pred"),
                           (args.pred and args.input, "--pred scores restored images, --input restores your own: one"),
                           (args.score_inputs and (args.checkpoint or args.input or args.pred or not args.data_root),
                            "--score-inputs scores the inputs of --data-root's test sets: no --checkpoint, --input "
                            "or --pred"),
                           (args.input and args.data_root, "--input restores your own images, --data-root the test "
                            "sets: pass one of them"), (args.pred and not (args.data_root or args.target),
                            "--pred needs targets: --data-root (its test sets) or --target FOLDER"),
                           (args.pred and not Path(args.pred or ".").is_dir(), f"--pred {args.pred}: no such folder"),
                           (not re.fullmatch(r"cpu|cuda(:\d+)?", args.device), f"--device {args.device}: use cpu, "
                            "cuda or cuda:N"),
                           (args.target and args.sets, "--target scores one pair of folders, --sets several: one"),
                           (args.as_task and (args.pred or args.score_inputs), "--as-task steers a checkpoint's "
                            "restoration: not with --pred or --score-inputs, which restore nothing"),
                           (args.target and len(args.task_names) != 1, "--target scores one set: name its --tasks"),
                           (args.device.startswith("cuda") and not torch.cuda.is_available(),
                            f"--device {args.device}: no CUDA device here; use --device cpu")):
        if wrong:
            raise SystemExit(f"evaluate.py: {message}")
    return args


def score_predictions(args, run, lpips):
    """--pred: another method's restored images, scored as Perceive-IR's are; returns the problem count."""
    tables = result_tables(args, args.method or Path(args.pred).name, "predictions as given", lpips)
    problems, crop = [], args.crop_multiple or None                            # PromptIR's protocol: --crop-multiple 16
    if args.target:                                           # one pair of folders: predictions → targets
        pred = Path(args.pred)                               # data.py's name rules pair them
        pairs = data.pair_folder(sorted(p for p in pred.iterdir() if p.suffix.lower() in data.IMAGE_SUFFIXES),
                                 pred, Path(args.target), problems, {})
        test_set = data.TestSet(Path(args.target).absolute().parent.name, args.task_names[0], pairs, None, crop)
        pairs = ((item["name"], item["degraded"][None], item["target"][None]) for item in test_set)   # I_r = input
        score_into(tables, test_set, pairs, run, lpips)
    else:
        for test_set in test_sets(args, problems):
            score_into(tables, test_set, prediction_pairs(Path(args.pred) / prediction_folder(test_set), test_set,
                                                          problems), run, lpips)
    for problem in problems:                                                            # nothing is skipped silently
        run.print0(f"PROBLEM: {problem}")
    if any(table.sets for table in tables.values()):
        write_tables(tables, args, args.task_names, run)
    run.print0(f"{len(problems)} problem(s)" + (": the tables cover the matched images only" if problems else ""))
    return len(problems)


def result_tables(args, method, protocol, lpips, about=None):
    """One table per metric convention, and one of the no-reference metrics with --nr-metrics."""
    tables = {c: ResultTable(c, method, protocol, lpips is not None, about=about) for c in args.conventions}
    if args.nr_metrics:                                   # the restored images alone: every set, targets or not
        tables[NO_REFERENCE] = ResultTable(NO_REFERENCE, method, protocol, nr_metrics=args.nr_metrics, about=about)
    return tables


def test_sets(args, problems=None):
    """--sets, or the test sets of --tasks; a set without targets needs --nr-metrics. Problems (a missing root,
    a wrong layout, missing or unreadable targets, sizes that differ) end the run in one line."""
    if not args.sets:                                     # the paper's sets of --tasks (data.py's layouts)
        try:
            return data.build_test_sets(args.data_root, args.task_names, args.sigmas, args.crop_multiple or None,
                                        problems)
        except ValueError as error:
            raise SystemExit(f"evaluate.py: --data-root {args.data_root}: {error}") from None
    sets = named_test_sets(args.data_root, args.sets, args.crop_multiple or None, problems)
    for test_set in sets:                                 # no target, no PSNR: say so before restoring anything
        if test_set.pairs and test_set.pairs[0][1] is None and not args.nr_metrics:
            raise SystemExit(f"evaluate.py: --sets: {test_set.name} has no target/ folder: score it with "
                             f"--nr-metrics ({' '.join(sorted(NR_METRICS))})")
    return sets


def main(args):
    for name, table in (("table_xiv", table_xiv), ("table_xv", table_xv)):   # from earlier evaluations: no model
        if getattr(args, name):
            text = table(getattr(args, name))
            print(text)
            Path(args.results).mkdir(parents=True, exist_ok=True)
            write_atomic(Path(args.results) / f"{name}.md", text)
            return 0
    run = train.Run(args.device)                                                        # honours --device (cpu, cuda)
    lpips = build_lpips(args.vgg_weights, args.lpips_weights).to(run.device) if args.lpips else None
    try:
        if args.pred:
            return 1 if score_predictions(args, run, lpips) else 0
        if not (args.input or args.data_root):
            raise SystemExit("evaluate.py: pass --data-root with test sets, or --input with your own images")
        sets = None if args.input else test_sets(args)           # every problem of the test sets before the model
        if args.score_inputs:                                 # the "Input" row, what a method must beat: no model
            tables = result_tables(args, "Input", "the degraded inputs, unrestored", lpips)
            for test_set in sets:
                score_into(tables, test_set, restored_pairs(lambda degraded: degraded, test_set, run), run, lpips)
            write_tables(tables, args, args.task_names, run)
            return 0
        if not args.checkpoint:                               # the shipped weights: one line says so
            if not SHIPPED_WEIGHTS.is_file():
                raise SystemExit(f"evaluate.py: no --checkpoint given and no shipped weights at {SHIPPED_WEIGHTS}: "
                                 "pass --checkpoint (a restore-stage checkpoint) or --pred DIR")
            args.checkpoint = str(SHIPPED_WEIGHTS)
            run.print0(f"evaluate.py: no --checkpoint: using the shipped laptop weights "
                       f"{SHIPPED_WEIGHTS.relative_to(Path(__file__).resolve().parent)} (train.py --preset laptop: an "
                       "hour on 2 CPU cores, README)")
        restorer = Restorer.from_checkpoint(args.checkpoint, run.device, args.dino_weights, overlap=args.tile_overlap,
                                            prior_size=args.prior_size, code_crop=args.code_crop)
        restorer.steer(args.as_task)
        if args.input:                                        # your own images: tiles above 512 px by default
            restorer.tile = 512 if args.tile is None else args.tile or None
            try:                                              # a missing or foreign --prompts file: one line
                perceiver = (clip_prompts.QualityPerceiver.from_checkpoint(args.prompts, args.clip_weights, run.device)
                             if args.prompts else None)
            except (OSError, ValueError) as error:
                raise SystemExit(f"evaluate.py: {error}") from None
            return 1 if restore_files(restorer, args.input, args.output, args.grid, perceiver, run.device) else 0
        restorer.tile = args.tile or None                      # test sets: whole images, the paper's protocol
        if run.master:                                                                 # the note before the first image
            largest_image_note(sets, restorer.config)
        config = restorer.config                        # what Tables XIV-XV compare: backbone, patch, size, stage 1
        about = dict(backbone=config["backbone"], patch_size=config["patch_size"],
                     parameters=count_parameters(restorer.model), medium_backbone=config.get("medium_backbone"))
        method = args.method or "Perceive-IR" + (f", Z as {args.as_task}" if args.as_task else "")   # steered: named
        tables = result_tables(args, method, restorer.protocol, lpips, about)
        for test_set in sets:                                                           # each set, then its tables
            score_into(tables, test_set, restored_pairs(restorer, test_set, run, args.save_images), run, lpips)
        if run.distributed:                                    # each rank restored its share only
            print(f"rank {run.rank}: restored {restorer.images} of {sum(len(s) for s in sets)} test images",
                  flush=True)
        write_tables(tables, args, args.task_names, run)                                # rank 0 prints and writes
        run.print0(f"checkpoint {args.checkpoint}; {restorer.protocol}")
        return 0
    finally:
        if run.distributed:
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main(get_args()))
