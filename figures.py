"""The paper's figures from your own runs: visual comparisons (Figs. 6, 7, 9, 10), metric charts (Figs. 2, 8, 11),
what the model perceived (Sec. III-C.2: type and severity) and training curves.

    python figures.py compare --data-root DATA --set derain_Rain100L --images 1.png 7.png \\
        --methods Ours=restored/ PromptIR=promptir/ --out fig6.png          # Figs. 6, 7, 9, 10
    python figures.py tasks A/results_N+H+R+B+L_rgb.json B/results_N+H+R+B+L_rgb.json --out fig2.png    # Fig. 2
    python figures.py methods A/results_all_rgb.json B/results_all_rgb.json --metric lpips --out fig8.png  # Fig. 8
    python figures.py sweep r0.json r1.json r2.json --values 0 0.05 0.1 --name "λ2" --out fig11.png       # Fig. 11
    python figures.py perceived --checkpoint CKPT --data-root DATA --tasks N+H+R+B+L --out perceived.png
    python figures.py curves runs/laptop/restore/log.jsonl --out curves.png       # also while the run goes on

What is in here:
- `comparison_panels`, `compare`: rows of input | methods | target from images evaluate.py saved (the --pred layout),
  each with the same box and its crop enlarged, PSNR/SSIM under it; the box given or where the methods differ most.
- `chart_tasks`, `chart_methods`, `chart_sweep`: bars and lines from the results JSONs evaluate.py writes.
- `perceived`: the degradation codes Z of test images in 2-D (PCA), coloured by task and shaded by severity, the
  training centroids marked; and the quality perceiver's P(excellent) against input PSNR.
- `curves`: a log.jsonl's losses, avgPSNR per task (Eq. 10), very-hard share and learning rate against steps.
Every command writes a PNG and the same figure as PDF (matplotlib's Agg backend: no display needed).
"""

import argparse
import json
from pathlib import Path

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F

matplotlib.use("Agg")                                  # files only: works on machines without a display
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

import data  # noqa: E402
from metrics import compute_metrics_per_image, psnr  # noqa: E402

AVERAGE = "Average (mean of set means)"                 # the paper's "Average" column (tables.py)
TASK_COLOURS = {"denoise": "Blues", "dehaze": "Greys", "derain": "Greens", "deblur": "Oranges", "lowlight": "Purples"}


def save(figure, out):
    """`out` as PNG and the same figure as PDF beside it; returns both paths."""
    out = Path(out).with_suffix(".png")
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=150, bbox_inches="tight")
    figure.savefig(out.with_suffix(".pdf"), bbox_inches="tight")
    plt.close(figure)
    print(f"wrote {out} and {out.with_suffix('.pdf')}")
    return out, out.with_suffix(".pdf")


# --- Visual comparisons (Figs. 6, 7, 9, 10) ------------------------------------------------------------------------

def find_test_set(data_root, name):
    """The test set whose --pred folder is `name` (`derain_Rain100L`, `denoise_CBSD68_sigma25`), or any folder
    with input/ (and target/) given by path."""
    import evaluate
    folder = Path(name)
    if (folder / "input").is_dir() or (Path(data_root or ".") / folder / "input").is_dir():
        return evaluate.named_test_sets(data_root, [name])[0]
    sigmas = [float(name.split("_sigma")[1])] if "_sigma" in name else [25]
    sets = data.build_test_sets(data_root, data.TASKS, sigmas=sigmas, problems=[])
    chosen = [s for s in sets if evaluate.prediction_folder(s) == name]
    if not chosen:
        raise SystemExit(f"figures.py: --set {name}: no such test set under {data_root}; one of "
                         f"{sorted({evaluate.prediction_folder(s) for s in sets})} or a folder with input/")
    return chosen[0]


def busiest_box(images, size):
    """(top, left, size, size): the square where the methods' outputs differ most (their per-pixel spread)."""
    spread = torch.stack(images).mean(1).std(0)[None, None]                   # (1, 1, H, W) across methods
    stride = max(1, size // 4)
    density = F.avg_pool2d(spread, size, stride=stride)[0, 0]                 # mean spread per window
    row, column = divmod(int(density.argmax()), density.shape[1])
    return row * stride, column * stride, size, size


def panel(image, box, zoom_width):
    """(3, H, W) image → an (h, W, 3) array: the image with the box drawn, above its crop enlarged to the same width."""
    top, left, height, width = box
    full = image.permute(1, 2, 0).numpy().copy()
    colour, thickness = np.array([1.0, 0.1, 0.1]), max(1, min(full.shape[:2]) // 80)   # survives the downscale
    for rows, columns in ((slice(top, top + thickness), slice(left, left + width)),
                          (slice(top + height - thickness, top + height), slice(left, left + width)),
                          (slice(top, top + height), slice(left, left + thickness)),
                          (slice(top, top + height), slice(left + width - thickness, left + width))):
        full[rows, columns] = colour
    crop = image[:, top:top + height, left:left + width].permute(1, 2, 0).numpy()
    factor = max(1, zoom_width // width)                                         # whole-pixel nearest enlargement
    zoom = np.repeat(np.repeat(crop, factor, 0), factor, 1)
    pad = full.shape[1] - zoom.shape[1]                                           # centred under the full view
    zoom = np.pad(zoom, ((0, 0), (pad // 2, pad - pad // 2), (0, 0)), constant_values=1.0)
    return np.concatenate([full, np.ones((thickness * 3, full.shape[1], 3)), zoom])


def comparison_panels(test_set, images, methods, box=None, box_size=None):
    """For each image name: the columns [(label, panel array, caption)] of input, each method, target.
    `methods` is [(name, folder in the --pred layout)]; a missing file is named, with its method."""
    import evaluate
    by_name = {(source or target).name: i for i, (source, target) in enumerate(test_set.pairs)}
    rows = []
    for name in images:
        if name not in by_name:
            raise SystemExit(f"figures.py: {name} is not an image of {test_set.name}: one of {sorted(by_name)[:8]}")
        item = test_set[by_name[name]]
        degraded, target = item["degraded"], item["target"]
        outputs = []
        for method, folder in methods:
            path = Path(folder) / evaluate.prediction_folder(test_set) / f"{Path(name).stem}.png"
            if not path.is_file():
                raise SystemExit(f"figures.py: method {method}: no restored image {path} (evaluate.py "
                                 "--save-images writes this layout)")
            outputs.append(data.read_image(path))
        H, W = degraded.shape[-2:]
        size = box_size or max(16, min(H, W) // 5)
        chosen = tuple(box) if box else busiest_box(outputs, size)
        if chosen[0] + chosen[2] > H or chosen[1] + chosen[3] > W:
            raise SystemExit(f"figures.py: --box {chosen} does not fit {name} ({W}×{H})")
        columns = [("Input", degraded)] + [(m, o) for (m, _), o in zip(methods, outputs)]
        columns += [("Target", target)] if target is not None else []             # Fig. 9: inputs without targets
        row = []
        for label, image in columns:
            caption = ""
            if target is not None and label != "Target":
                metrics = compute_metrics_per_image(image[None], target[None], "rgb")
                caption = f"{metrics['psnr'][0]:.2f} dB / {metrics['ssim'][0]:.4f}"
            row.append((label, panel(image, chosen, W), caption))
        rows.append((name, chosen, row))
    return rows


def compare(args):
    test_set = find_test_set(args.data_root, args.set)
    methods = []
    for spec in args.methods:
        if "=" not in spec:
            raise SystemExit(f"figures.py: --methods {spec}: expected NAME=FOLDER (the --pred layout)")
        methods.append(tuple(spec.split("=", 1)))
    box = args.box and (args.box[1], args.box[0], args.box[3], args.box[2])        # X Y W H → top, left, h, w
    rows = comparison_panels(test_set, args.images, methods, box, args.box_size)
    columns = len(rows[0][2])
    aspects = [row[2][0][1].shape[0] / row[2][0][1].shape[1] for row in rows]          # each row keeps its own
    figure, axes = plt.subplots(len(rows), columns, squeeze=False, gridspec_kw=dict(height_ratios=aspects),
                                figsize=(2.2 * columns, 2.2 * sum(aspects) + 0.3 * len(rows) + 0.5))
    for r, (name, _, row) in enumerate(rows):
        for c, (label, image, caption) in enumerate(row):
            axis = axes[r, c]
            axis.imshow(image.clip(0, 1), interpolation="antialiased")
            axis.set_xticks([]), axis.set_yticks([])
            axis.set_xlabel(caption, fontsize=7)
            if r == 0:
                axis.set_title(label, fontsize=8)
            if c == 0:
                axis.set_ylabel(name, fontsize=7)
    figure.suptitle(f"{test_set.name}" + (f", σ={test_set.sigma:g}" if test_set.sigma else "")
                    + " (PSNR / SSIM, rgb convention)", fontsize=9)
    return save(figure, args.out)


# --- Charts from evaluate.py's results JSONs (Figs. 2, 8, 11) -----------------------------------------------------

def read_results(paths):
    results = []
    for path in paths:
        try:
            result = json.loads(Path(path).read_text())
        except (OSError, ValueError) as error:
            raise SystemExit(f"figures.py: {path}: not a results JSON of evaluate.py ({error})") from None
        if "sets" not in result or "averages" not in result:
            raise SystemExit(f"figures.py: {path}: no 'sets' and 'averages': pass evaluate.py's results_*.json")
        results.append(result)
    return results


def set_label(entry):
    return entry["set_name"] + (f" σ{entry['sigma']:g}" if entry.get("sigma") else "")


def chart_tasks(results, metric="psnr"):
    """Fig. 2: per test set (and σ) the mean `metric` of each method, as grouped bars. → (labels, {method: values})."""
    labels = list(dict.fromkeys(set_label(e) for r in results for e in r["sets"]))
    values = {}
    for result in results:
        means = {set_label(e): float(np.mean(e[metric])) for e in result["sets"] if e.get(metric)}
        values[result["method"]] = [means.get(label, np.nan) for label in labels]
    figure, axis = plt.subplots(figsize=(max(5, 1.1 * len(labels)), 3))
    width = 0.8 / len(values)
    for i, (method, heights) in enumerate(values.items()):
        axis.bar(np.arange(len(labels)) + i * width - 0.4 + width / 2, heights, width, label=method)
    axis.set_xticks(np.arange(len(labels)), labels, rotation=20, fontsize=8)
    axis.set_ylabel(f"{metric.upper()} ({results[0]['convention']})")
    finite = [v for heights in values.values() for v in heights if np.isfinite(v)]
    if metric == "psnr" and finite:
        axis.set_ylim(min(finite) - 2, max(finite) + 1)
    axis.legend(fontsize=7)
    return figure, labels, values


def chart_methods(results, metric):
    """Fig. 8: each method's average `metric` (LPIPS, a no-reference metric, PSNR, SSIM) as one bar."""
    values = {}
    for result in results:
        average = result["averages"].get(AVERAGE, {})
        if metric not in average:
            raise SystemExit(f"figures.py: {result['method']}'s results have no {metric!r} (evaluate.py --lpips, "
                             "--nr-metrics)")
        values[result["method"]] = average[metric]
    figure, axis = plt.subplots(figsize=(max(3, 0.9 * len(values)), 3))
    axis.bar(list(values), list(values.values()), color="tab:blue")
    axis.set_ylabel(f"{metric} ({AVERAGE.lower()})")
    axis.tick_params(axis="x", labelrotation=20, labelsize=8)
    return figure, values


def chart_sweep(results, values, name, metric="psnr"):
    """Fig. 11: the average `metric` against a swept setting (one results JSON per value)."""
    if len(values) != len(results):
        raise SystemExit(f"figures.py: {len(results)} results JSONs but {len(values)} --values: one value each")
    averages = [r["averages"][AVERAGE][metric] for r in results]
    figure, axis = plt.subplots(figsize=(4, 3))
    axis.plot(values, averages, "o-")
    axis.set_xlabel(name)
    axis.set_ylabel(f"{metric.upper()} ({AVERAGE.lower()})")
    return figure, averages


# --- What the model perceived (Sec. III-C.2: type and severity) ---------------------------------------------------

@torch.no_grad()
def perceived_codes(restorer, test_sets, perceiver=None):
    """Per test image: task, severity (σ, or the input's PSNR in dB), Z/‖Z‖ as guidance.perceive computes it, and
    P(excellent) of the input when a perceiver is given."""
    from guidance import query_code
    rows = []
    for test_set in test_sets:
        for item in test_set:
            degraded = item["degraded"][None]
            code = query_code(restorer.model, degraded, restorer.centroids, restorer.prior_size)[0]
            input_psnr = (psnr(degraded, item["target"][None], 1.0).item()          # severity: PSNR alone, no SSIM
                          if item["target"] is not None else float("nan"))
            p_excellent = perceiver(degraded)[0, perceiver.excellent_index].item() if perceiver else None
            rows.append(dict(task=test_set.task, sigma=test_set.sigma, input_psnr=input_psnr, code=code,
                             p_excellent=p_excellent, name=item["name"]))
    return rows


def pca(codes, basis_of=None):
    """2-D principal components of (N, D) codes; `basis_of` (M, D) is projected on the same axes."""
    mean = codes.mean(0)
    _, _, vectors = torch.linalg.svd(codes - mean, full_matrices=False)              # rows: principal axes
    project = lambda x: ((x - mean) @ vectors[:2].T).numpy()                          # noqa: E731
    return project(codes), (project(basis_of) if basis_of is not None else None)


def perceived(rows, centroids=None):
    """The PCA plot of Z (and P(excellent) against input PSNR when rows have it) → (figure, points)."""
    codes = torch.stack([r["code"] for r in rows])
    trained = centroids["centroids"] if centroids else None
    points, centre_points = pca(codes, trained)
    with_quality = rows[0]["p_excellent"] is not None
    figure, axes = plt.subplots(1, 2 if with_quality else 1, figsize=(9 if with_quality else 5, 4), squeeze=False)
    axis = axes[0, 0]
    for task in dict.fromkeys(r["task"] for r in rows):
        index = [i for i, r in enumerate(rows) if r["task"] == task]
        # Severity: σ for noise, else how far the input is from its target (lower input PSNR = more severe).
        severity = np.array([rows[i]["sigma"] or -rows[i]["input_psnr"] for i in index], dtype=float)
        severity = np.nan_to_num(severity, nan=0.0)
        shade = (severity - severity.min()) / (np.ptp(severity) or 1)                # 0 mild … 1 severe
        colours = plt.get_cmap(TASK_COLOURS.get(task, "viridis"))(0.35 + 0.6 * shade)
        axis.scatter(points[index, 0], points[index, 1], c=colours, s=14, label=task, edgecolors="none")
    if centre_points is not None:                                          # the checkpoint's training centroids
        for task, (x, y) in zip(centroids["tasks"], centre_points):
            axis.scatter([x], [y], marker="*", s=180, c="gold", edgecolors="black", zorder=3)
            axis.annotate(task, (x, y), fontsize=7, xytext=(4, 4), textcoords="offset points")
    axis.set_title("degradation code Z (PCA); darker = more severe; ★ training centroids", fontsize=8)
    axis.legend(fontsize=7, markerscale=1.5)
    if with_quality:
        axis = axes[0, 1]
        for task in dict.fromkeys(r["task"] for r in rows):
            chosen = [r for r in rows if r["task"] == task]
            axis.scatter([r["input_psnr"] for r in chosen], [r["p_excellent"] for r in chosen], s=12, label=task,
                         color=plt.get_cmap(TASK_COLOURS.get(task, "viridis"))(0.7))
        axis.set_xlabel("input PSNR (dB, rgb)")
        axis.set_ylabel("P(excellent) of the input (Eq. 9)")
        axis.legend(fontsize=7)
    return figure, points


# --- Training curves -------------------------------------------------------------------------------------------------

def curves(log_path):
    """Four panels from a log.jsonl (any stage; a run still writing it too) → (figure, {series: (steps, values)})."""
    try:
        lines = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()]
    except (OSError, ValueError) as error:
        raise SystemExit(f"figures.py: {log_path}: not a train.py log.jsonl ({error})") from None
    if not lines:
        raise SystemExit(f"figures.py: {log_path} has no logged step yet")
    steps, series = [line["step"] for line in lines], {}
    for key in lines[0]:
        if key.startswith("loss_") or key == "total":
            series[key] = (steps, [line[key] for line in lines])
    for line in lines:                                   # nested: {task: dB} and {"all", task: share}
        for group, prefix in (("avg_psnr", "avgPSNR "), ("very_hard_fraction", "very hard ")):
            for name, value in (line.get(group) or {}).items():
                if "_sigma" not in name:
                    series.setdefault(prefix + name, ([], []))
                    series[prefix + name][0].append(line["step"])
                    series[prefix + name][1].append(value)
    series["lr"] = (steps, [line["lr"] for line in lines])
    figure, axes = plt.subplots(1, 4, figsize=(16, 3.2))
    panels = (("losses", lambda k: k.startswith("loss_") or k == "total"), ("avgPSNR per task (dB, Eq. 10)",
              lambda k: k.startswith("avgPSNR")), ("share weighted 1 − γ (Eq. 10)", lambda k: k.startswith("very")),
              ("learning rate", lambda k: k == "lr"))
    for axis, (title, chosen) in zip(axes, panels):
        shown = [k for k in series if chosen(k)]
        for key in shown:
            axis.plot(*series[key], label=key.replace("avgPSNR ", "").replace("very hard ", ""), lw=1.2)
        axis.set_title(title, fontsize=9)
        axis.set_xlabel("step")
        if shown and title != "learning rate":
            axis.legend(fontsize=6)
        elif not shown:
            axis.text(0.5, 0.5, "not logged by this stage", ha="center", transform=axis.transAxes, fontsize=8)
    return figure, series


# --- Command line ----------------------------------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description="The paper's figures from your own runs (PNG and PDF).")
    commands = parser.add_subparsers(dest="command", required=True)
    c = commands.add_parser("compare", help="Figs. 6, 7, 9, 10: input | methods | target, zoomed insets")
    c.add_argument("--data-root", help="the test sets' root (evaluate.py's --data-root)")
    c.add_argument("--set", required=True, help="a --pred folder name (derain_Rain100L, denoise_CBSD68_sigma25) "
                   "or a folder with input/ (and target/)")
    c.add_argument("--images", nargs="+", required=True, help="file names of the test images, one row each")
    c.add_argument("--methods", nargs="+", required=True, help="NAME=FOLDER, each in the --pred layout")
    c.add_argument("--box", type=int, nargs=4, metavar=("X", "Y", "W", "H"), help="inset (default: where the "
                   "methods differ most)")
    c.add_argument("--box-size", type=int, help="side of the automatic inset (default: a fifth of the image)")
    for name, text in (("tasks", "Fig. 2: per-set PSNR of several methods"), ("methods", "Fig. 8: each method's "
                       "average of a metric"), ("sweep", "Fig. 11: a metric against a swept setting")):
        p = commands.add_parser(name, help=text)
        p.add_argument("results", nargs="+", help="results_<layout>_<convention>.json of evaluate.py, one per method")
        p.add_argument("--metric", default="psnr", help="psnr, ssim, lpips, uciqe, uiqm")
        if name == "sweep":
            p.add_argument("--values", type=float, nargs="+", required=True, help="the setting of each JSON")
            p.add_argument("--name", default="setting", help="the setting's name, e.g. λ2")
    p = commands.add_parser("perceived", help="Z of the test images in 2-D, by task and severity; P(excellent)")
    p.add_argument("--checkpoint", help="a restore checkpoint (default: the shipped laptop weights)")
    p.add_argument("--data-root", required=True)
    p.add_argument("--tasks", default="N+H+R+B+L")
    p.add_argument("--sigmas", type=float, nargs="+", default=[15, 25, 50])
    p.add_argument("--per-set", type=int, default=20, help="test images per set and σ, evenly spread (0: all)")
    p.add_argument("--prompts", help="stage-1 prompts: also plot P(excellent) against input PSNR")
    p = commands.add_parser("curves", help="losses, avgPSNR, very-hard share and LR against steps")
    p.add_argument("log", help="a stage's log.jsonl")
    for p in commands.choices.values():
        p.add_argument("--out", required=True, help="the PNG to write (a PDF is written beside it)")
    args = parser.parse_args(argv)
    if args.command == "compare":
        return compare(args)
    if args.command == "curves":
        return save(curves(args.log)[0], args.out)
    if args.command == "perceived":
        return save(perceived_command(args), args.out)
    results = read_results(args.results)
    if args.command == "tasks":
        return save(chart_tasks(results, args.metric)[0], args.out)
    if args.command == "methods":
        return save(chart_methods(results, args.metric)[0], args.out)
    return save(chart_sweep(results, args.values, args.name, args.metric)[0], args.out)


def perceived_command(args):
    import clip_prompts
    import evaluate
    restorer = evaluate.Restorer.from_checkpoint(args.checkpoint or evaluate.SHIPPED_WEIGHTS)
    if restorer.centroids is None:
        raise SystemExit("figures.py: this checkpoint has no CFE (--no-cfe, --no-guidance): there is no Z to plot")
    sets = data.build_test_sets(args.data_root, data.parse_tasks(args.tasks), args.sigmas, problems=[])
    for test_set in sets:                                  # evenly spread, so a figure takes seconds, not minutes
        test_set.pairs = test_set.pairs[::max(1, -(-len(test_set.pairs) // (args.per_set or len(test_set.pairs))))]
    perceiver = clip_prompts.QualityPerceiver.from_checkpoint(args.prompts) if args.prompts else None
    rows = perceived_codes(restorer, sets, perceiver)
    print(perception_report(rows, restorer.centroids))
    return perceived(rows, restorer.centroids)[0]


def perception_report(rows, centroids):
    """Per task of the test images: how many were perceived as it (the nearest training centroid of Z, as
    guidance.perceive decides), and what the others were taken for."""
    nearest = [centroids["tasks"][int((row["code"] @ centroids["centroids"].T).argmax())] for row in rows]
    lines = ["type perceived (nearest centroid of Z) per task of the test images:"]
    for task in dict.fromkeys(row["task"] for row in rows):
        taken = [n for row, n in zip(rows, nearest) if row["task"] == task]
        others = {t: taken.count(t) for t in dict.fromkeys(taken) if t != task}
        lines.append(f"  {task:9s} {taken.count(task):3d}/{len(taken):<3d} right" +
                     (f"; taken for {', '.join(f'{t} {n}' for t, n in others.items())}" if others else ""))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
