"""The result tables of Sec. IV-B..G in the paper's layouts: Tables II-V and IX per set, VI-VIII for any set, XIV-XV.

A table holds one method's per-image values of every test set in one metric convention (`metrics.py`) and writes
them as markdown, CSV and JSON. A layout picks and orders the columns of a paper table; the averages say what they
average. `table_xiv` and `table_xv` gather several runs' JSON files into the comparisons of Tables XIV and XV.

What is in here:
- `LAYOUTS`: the columns of Tables II (N+H+R), III (N+H+R+B+L), IV-V (One-by-One) and IX (unseen σ).
- `ResultTable`: per-set PSNR/SSIM (and LPIPS) in one convention, or the no-reference metrics of Tables VI-VII.
- `table_xiv`: Table XIV's rows (one per stage-1 restorer: MPRNet, AirNet, PromptIR, Restormer), Rain100L.
- `table_xv`: Table XV's rows (one per backbone and patch size) from the JSON files of several evaluations.
"""

import csv
import io
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from metrics import CONVENTIONS, LPIPS_NAME, NO_REFERENCE

# --- The layouts of Tables II, III, IV-V and IX ------------------------------------------------------------------

def _denoise(benchmark, sigmas):
    return [(benchmark, "denoise", sigma) for sigma in sigmas]


PAIRED = [("SOTS", "dehaze", None), ("Rain100L", "derain", None), ("GoPro", "deblur", None), ("LOL", "lowlight", None)]
LAYOUTS = {                                      # layout → (paper table, columns as (benchmark, task, σ))
    "N+H+R": ("Table II", _denoise("CBSD68", (15, 25, 50)) + PAIRED[:2]),
    "N+H+R+B+L": ("Table III", _denoise("CBSD68", (25,)) + PAIRED),
    "one-by-one": ("Tables IV-V", [c for s in ("CBSD68", "Urban100", "Kodak24") for c in _denoise(s, (15, 25, 50))]
                   + PAIRED),
    "unseen-noise": ("Table IX", _denoise("CBSD68", (60, 100)) + _denoise("Urban100", (60, 100))),
}
AVERAGE_OF_SETS = "Average (mean of set means)"
AVERAGE_OF_IMAGES = "Average (all images pooled)"


@dataclass
class SetResult:
    """One test set at one noise level σ (denoising with synthetic noise only): one column of a table."""
    set_name: str
    task: str
    sigma: float | None = None
    psnr: list = field(default_factory=list)      # per image, dB
    ssim: list = field(default_factory=list)      # per image
    lpips: list = field(default_factory=list)     # per image, with --lpips
    uciqe: list = field(default_factory=list)     # per image, no-reference (--nr-metrics)
    uiqm: list = field(default_factory=list)      # per image, no-reference (--nr-metrics)
    names: list = field(default_factory=list)     # the images, in the order of the values

    def count(self, metric="psnr"):                  # images scored with `metric`
        return len(getattr(self, metric))

    def mean(self, metric):
        values = getattr(self, metric)                                                  # a list of per-image values
        return sum(values) / len(values)

    def heading(self, benchmark=None):
        name = self.set_name if benchmark in (None, self.set_name) else f"{benchmark} ({self.set_name})"
        return name if self.sigma is None else f"{name} σ={self.sigma:g}"


def _cell(means):
    return "/".join(f"{means[m]:{'.2f' if m == 'psnr' else '.4f'}}" for m in means)   # PSNR/SSIM[/LPIPS]


def write_atomic(path, text):
    tmp = path.with_name(path.name + ".tmp")                                            # written whole or not at all
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


class ResultTable:
    """Per-set values of one method in one metric convention, in the paper's layouts: PSNR/SSIM (and LPIPS) in
    "rgb", "rgb-gaussian" or "y", or the no-reference metrics (`nr_metrics`, e.g. UCIQE and UIQM) in NO_REFERENCE.
    `add(...)` appends values of a set and σ (per set or per batch). A layout column (benchmark, task, σ)
    takes the set of that task and σ whose name, up to its first "-", is the benchmark's: "SOTS-outdoor-mini"
    fills SOTS. `layout=None`: one column per set. `protocol`: "whole images" or "tiled 512, overlap 32"."""

    def __init__(self, convention, method="Perceive-IR", protocol="whole images", lpips=False, nr_metrics=(),
                 about=None):
        if convention not in CONVENTIONS and convention != NO_REFERENCE:  # a typo would silently change the numbers
            raise ValueError(f"unknown metric convention {convention!r}; choose one of {list(CONVENTIONS)}")
        self.convention, self.method, self.protocol, self.sets = convention, method, protocol, []
        self.about = dict(about or {})                  # the run behind the numbers (backbone, patch, parameters)
        if convention == NO_REFERENCE:                   # the columns of every cell
            self.metrics = tuple(nr_metrics)
        else:
            self.metrics = ("psnr", "ssim", "lpips") if lpips else ("psnr", "ssim")

    @property
    def header(self):
        if self.convention == NO_REFERENCE:
            return "No-reference: " + " · ".join(self.metrics).upper()
        return CONVENTIONS[self.convention] + (f" · {LPIPS_NAME}" if "lpips" in self.metrics else "")

    def add(self, set_name, task, sigma, values, names=None):
        """values: {metric: one value per image} for exactly this table's metrics."""
        if sigma is not None and task != "denoise":                                 # σ: denoising alone
            raise ValueError(f"{set_name}: σ is given for {task}, but only denoising adds noise (σ {sigma})")
        given = {m: len(v) for m, v in values.items()}
        values = {m: [float(v) for v in values.get(m) or []] for m in self.metrics}
        counts = {len(v) for v in values.values()}
        if set(given) != set(self.metrics) or len(counts) != 1 or 0 in counts:        # one value per image of each
            raise ValueError(f"{set_name}: need one value per image of each of {list(self.metrics)}, at least one; "
                             f"got {given}")
        sigma = None if sigma is None else float(sigma)                                 # 15 and 15.0 are one column
        result = next((r for r in self.sets if (r.set_name, r.task, r.sigma) == (set_name, task, sigma)), None)
        if result is None:
            result = SetResult(set_name, task, sigma)
            self.sets.append(result)
        for name, new in {**values, "names": list(names or [])}.items():               # the metrics, then names
            getattr(result, name).extend(new)
        return result

    def columns(self, layout=None):
        """[(heading, SetResult or None)] in the layout's order; None marks a set not evaluated."""
        if layout is None:                                                              # one column per set, in order
            return [(f"{result.heading()} ({result.task})", result) for result in self.sets]
        if layout not in LAYOUTS:
            raise ValueError(f"unknown table layout {layout!r}; choose one of {list(LAYOUTS)} or None")
        columns = LAYOUTS[layout][1]
        if layout == "one-by-one":   # a One-by-One model covers one task: keep the tasks evaluated
            columns = [c for c in columns if any(r.task == c[1] for r in self.sets)]
        out = []                                                             # (heading, result or None) in layout order
        for benchmark, task, sigma in columns:
            found = [r for r in self.sets if r.task == task and r.sigma == sigma
                     and r.set_name.split("-")[0].lower() == benchmark.lower()]
            if len(found) > 1:
                raise ValueError(f"layout {layout!r} has one {benchmark} column but results for "
                                 f"{[r.set_name for r in found]}; use layout=None to list them all")
            out.append((found[0].heading(benchmark), found[0]) if found
                       else (SetResult(benchmark, task, sigma).heading(), None))
        return out

    def averages(self, layout=None):
        """Both averages over the evaluated columns: {label: ({metric: mean}, count)}, or {} if none."""
        evaluated = [r for _, r in self.columns(layout) if r is not None]               # columns that were evaluated
        if not evaluated:
            return {}
        of_sets = {m: sum(r.mean(m) for r in evaluated) / len(evaluated) for m in self.metrics}
        pooled = {m: [v for r in evaluated for v in getattr(r, m)] for m in self.metrics}
        of_images = {m: sum(values) / len(values) for m, values in pooled.items()}
        return {AVERAGE_OF_SETS: (of_sets, len(evaluated)),
                AVERAGE_OF_IMAGES: (of_images, len(pooled[self.metrics[0]]))}

    def markdown(self, layout=None):
        columns, averages = self.columns(layout), self.averages(layout)
        header = [self.header] + [h for h, _ in columns] + list(averages)               # convention (and LPIPS) first
        scores = [self.method] + [_cell({m: r.mean(m) for m in self.metrics}) if r else "-" for _, r in columns]
        counts = ["images"] + [str(r.count(self.metrics[0])) if r else "-" for _, r in columns]
        for label, (means, n) in averages.items():
            scores.append(_cell(means))
            counts.append(f"{n} sets" if label == AVERAGE_OF_SETS else str(n))
        source = "every set evaluated" if layout is None else f"{layout}, layout of {LAYOUTS[layout][0]}"
        lines = [f"**{self.method}: {source}; {self.protocol}**", ""]
        lines += ["| " + " | ".join(row) + " |" for row in (header, ["---"] * len(header), scores, counts)]
        missing = sum(r is None for _, r in columns)                               # columns of the layout not evaluated
        if missing:
            lines += ["", f"'-': not evaluated; the averages cover the {len(columns) - missing} "
                          f"evaluated columns of {len(columns)}."]
        return "\n".join(lines) + "\n"

    def csv(self, layout=None):
        """One row per column, then the two averages; '-' where a set was not evaluated."""
        buffer = io.StringIO()                                                       # CSV in memory, written atomically
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["column", "set", "task", "sigma", "images", *self.metrics, "convention", "protocol"])
        for heading, r in self.columns(layout):
            values = ([r.count(self.metrics[0]), *(r.mean(m) for m in self.metrics)] if r
                      else ["-"] * (1 + len(self.metrics)))                             # images, then the metrics
            writer.writerow([heading, r.set_name if r else "-", r.task if r else "-",
                             "" if r is None or r.sigma is None else f"{r.sigma:g}", *values, self.header,
                             self.protocol])
        for label, (means, n) in self.averages(layout).items():
            writer.writerow([label, "", "", "", n, *means.values(), self.header, self.protocol])
        return buffer.getvalue()

    def to_json(self, layout=None):
        """Everything, per-image values (and names) included."""
        return {"method": self.method, "convention": self.convention, "header": self.header,
                "protocol": self.protocol, "layout": layout, **self.about,
                "averages": {label: {**means, "count": n} for label, (means, n) in self.averages(layout).items()},
                "sets": [asdict(r) for r in self.sets]}

    def write(self, directory, layout=None, stem=None):
        """Write <stem>.md, .csv and .json (per-image values included) atomically; return the paths."""
        directory = Path(directory)                                                     # created if absent
        directory.mkdir(parents=True, exist_ok=True)
        stem = stem or f"results_{layout or 'all'}_{self.convention}"
        paths = [directory / f"{stem}.{suffix}" for suffix in ("md", "csv", "json")]
        texts = [self.markdown(layout), self.csv(layout), json.dumps(self.to_json(layout), indent=1) + "\n"]
        for path, text in zip(paths, texts):
            write_atomic(path, text)
        return paths


# --- Table XIV: the restoration model behind stage 1's prompts ----------------------------------------------------

def read_results(path, flag):
    """One results JSON of evaluate.py, or one line naming the file and the flag."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise SystemExit(f"{flag} {path}: not a results JSON of evaluate.py ({error})") from None


def table_xiv(paths, set_name="Rain100L"):
    """Table XIV's layout: a row per run, named by the restorer that made its stage-1 medium-quality images
    (`train.py --medium-backbone`, recorded in the checkpoint), with PSNR/SSIM on `set_name` (the paper's
    Rain100L). Files of one convention only; each must hold the set and name its stage-1 restorer."""
    rows, headers = {}, set()
    for path in paths:
        result = read_results(path, "--table-xiv")
        found = [s for s in result.get("sets", []) if s["set_name"] == set_name]
        if not found or not result.get("medium_backbone"):
            raise SystemExit(f"--table-xiv {path}: needs {set_name} scored by evaluate.py from a checkpoint "
                             f"(its stage-1 restorer is recorded there); this file has "
                             f"{[s['set_name'] for s in result.get('sets', [])]}")
        headers.add(result["header"])
        label = f"{result['method']} ({result['medium_backbone']})"              # "Perceive-IR (mprnet)"
        if label in rows:                                                            # one row per restorer
            raise SystemExit(f"--table-xiv {path}: a second file for {label}; pass one per stage-1 restorer")
        rows[label] = {m: sum(found[0][m]) / len(found[0][m]) for m in ("psnr", "ssim")}
    if len(headers) > 1:
        raise SystemExit(f"--table-xiv: the files mix metric conventions ({sorted(headers)}); compare one at a time")
    lines = [f"**Table XIV layout: {set_name}, {headers.pop()}; rows by stage 1's restoration model**", "",
             "| method | PSNR | SSIM |", "|---|---|---|"]
    lines += [f"| {label} | {row['psnr']:.2f} | {row['ssim']:.3f} |" for label, row in rows.items()]
    return "\n".join(lines) + "\n"


# --- Table XV: Perceive-IR on four backbones -----------------------------------------------------------------------

TABLE_XV_SETTINGS = ("N+H+R", "N+H+R+B+L")


def table_xv(paths):
    """Table XV's layout from the JSON files of several evaluations (one per run and setting): a row per method,
    backbone and training patch size, the average PSNR/SSIM (mean of set means, as Tables II-III) under N+H+R and
    N+H+R+B+L, and the trainable parameters. Files of one convention only; a setting not evaluated shows '-'."""
    rows, headers = {}, set()
    for path in paths:
        result = read_results(path, "--table-xv")
        if result.get("layout") not in TABLE_XV_SETTINGS or "backbone" not in result:
            raise SystemExit(f"--table-xv {path}: Table XV compares checkpoints' {' and '.join(TABLE_XV_SETTINGS)} "
                             f"tables (results_N+H+R_<convention>.json), not layout {result.get('layout')!r}")
        headers.add(result["header"])
        label = f"{result['method']} {result['backbone']}-{result['patch_size']}"      # "Perceive-IR nafnet-128"
        rows.setdefault(label, {"parameters": result["parameters"]})[result["layout"]] = result["averages"]
    if len(headers) > 1:
        raise SystemExit(f"--table-xv: the files mix metric conventions ({sorted(headers)}); compare one at a time")
    lines = [f"**Table XV layout: {headers.pop()}; {AVERAGE_OF_SETS}**", "",
             "| method | N+H+R PSNR | N+H+R SSIM | N+H+R+B+L PSNR | N+H+R+B+L SSIM | Params (M) |", "|---" * 6 + "|"]
    for label, row in rows.items():
        cells = [f"{row[s][AVERAGE_OF_SETS][m]:{'.2f' if m == 'psnr' else '.3f'}}" if s in row else "-"
                 for s in TABLE_XV_SETTINGS for m in ("psnr", "ssim")]
        lines.append(f"| {label} | {' | '.join(cells)} | {row['parameters'] / 1e6:.2f} |")
    return "\n".join(lines) + "\n"
