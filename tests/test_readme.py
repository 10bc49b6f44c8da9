"""The README is the map of the paper: it must not rot as the code changes."""

import ast
import re
from collections import Counter

from conftest import REPO

README = (REPO / "README.md").read_text()
PYTHON_FILES = [*REPO.glob("*.py"), *REPO.glob("networks/*.py")]     # the top level and the other papers' networks


def defined_names(path):
    """Top-level functions, classes and assigned names of a file, and Class.method for methods."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        if isinstance(node, ast.Assign):
            names |= {target.id for target in node.targets if isinstance(target, ast.Name)}
        if isinstance(node, ast.ClassDef):
            names |= {f"{node.name}.{item.name}" for item in node.body if isinstance(item, ast.FunctionDef)}
    return names


def test_every_function_named_in_the_paper_map_exists():
    references = re.findall(r"`((?:networks/)?\w+\.py):([\w.]+)`", README)
    assert len(references) > 40
    missing = [f"{file}:{name}" for file, name in references if name not in defined_names(REPO / file)]
    assert not missing, f"README names code that does not exist: {missing}"


def test_every_test_named_in_the_paper_map_exists():
    references = re.findall(r"`(test_\w+\.py)::(test_\w+)`", README)
    assert len(references) > 40
    missing = [f"{file}::{name}" for file, name in references if name not in defined_names(REPO / "tests" / file)]
    assert not missing, f"README names tests that do not exist: {missing}"


def test_the_paper_map_covers_every_equation_and_table():
    table = README.split("## Paper map")[1].split("## Notation")[0]
    for equation in range(1, 14):
        assert f"Eq. ({equation})" in table, f"Eq. ({equation}) is missing from the paper map"
    cited = set()
    for group in re.findall(r"\| Tables? ([IVX, ]+)", table):
        cited |= {numeral.strip() for numeral in group.split(",")}
    missing = [n for n in "I II III IV V VI VII VIII IX X XI XII XIII XIV XV".split() if n not in cited]
    assert not missing, f"Tables {missing} are missing from the paper map"


def test_the_list_of_differences_matches_the_tags_in_the_code():
    in_code = Counter()
    for path in PYTHON_FILES:
        text = path.read_text()
        name = path.relative_to(REPO).as_posix()                 # "train.py", "networks/grl.py"
        in_code[(name, "DEVIATION")] += len(re.findall(r"\bDEVIATION:", text))
        in_code[(name, "UNSPECIFIED")] += len(re.findall(r"\bUNSPECIFIED:", text))
    in_readme = Counter((file, kind) for kind, file in re.findall(r"^- \*\*(DEVIATION|UNSPECIFIED)\*\* `((?:networks/)?\w+\.py)`",
                                                                  README, re.M))
    in_code = +in_code                                         # drop zero counts
    assert in_readme == in_code, f"README entries {dict(in_readme)} vs tags in the code {dict(in_code)}"


def test_the_readme_starts_with_the_two_commands_and_ci_runs_the_same_test_command():
    first_block = README.split("```bash")[1].split("```")[0]
    assert "pip install -r requirements.txt" in first_block and "python -m pytest -q" in first_block
    assert "python -m pytest -q" in (REPO / ".ci" / "run").read_text()


BACKBONE_COLUMNS = ("restormer", "nafnet", "xrestormer", "grl")          # the columns of the readings table


def readings(backbone):
    """Trainable parameters of Perceive-IR under each reading of Eq. (3) and (6) in the README's table,
    recomputed from the modules themselves: ours, then the native token mixer kept beside PGCA (MDTA;
    NAFBlock's convolutions and SCA; for GRL, whose own attention is already the cross-attention, a PGCA
    added), one PGM per level, the refinement TBs made ETBs (Restormer and X-Restormer have them)."""
    from backbone import MDTA, count_parameters
    from networks.nafnet import NAFBlock
    from guidance import PGCA, GuidedMixer, PerceiveIR

    model = PerceiveIR(backbone, "paper")
    net, ours = model.backbone, count_parameters(model)

    def native_mixer(mixer):
        dim = mixer.modulate.to_scale_shift.out_features // 2                       # PGM maps to (γ, β) ∈ R^2C
        heads = mixer.pgca.attn.window_attn.num_heads if backbone == "grl" else mixer.pgca.num_heads
        if backbone in ("restormer", "xrestormer"):
            return count_parameters(MDTA(dim, heads))
        if backbone == "grl":
            return count_parameters(PGCA(dim, heads))
        plain = NAFBlock(dim)
        return sum(count_parameters(getattr(plain, name)) for name in ("conv1", "conv2", "conv3", "sca")) + dim

    if backbone == "nafnet":
        levels = list(net.decoders)
    elif backbone == "grl":
        levels = [stage.blocks for stage, level in zip(net.layers, net.levels) if level is not None]
    else:
        levels = [net.latent, net.decoder_level3, net.decoder_level2, net.decoder_level1]
    mixers = [[m for m in level.modules() if isinstance(m, GuidedMixer)] for level in levels]
    kept = sum(native_mixer(m) for level in mixers for m in level)
    extra_pgms = sum(count_parameters(m.modulate) for level in mixers for m in level[1:])
    refinement = list(getattr(net, "refinement", []))
    attention = [getattr(b, "attn", None) or b.channel_attn for b in refinement]      # MDTA of each refinement block
    etbs = sum(count_parameters(GuidedMixer(a.qkv.in_channels, a.num_heads, 768)) for a in attention)
    mdtas = sum(count_parameters(a) for a in attention)
    return {"ours": ours, "kept": ours + kept, "per level": ours - extra_pgms,
            "refinement": ours + etbs - mdtas, "kept, per level": ours + kept - extra_pgms,
            "kept, refinement": ours + kept + etbs}


def test_the_parameter_readings_table_is_what_the_modules_count():
    table = README.split("| reading of Eq. (3), (6) |")[1].split("\n\n")[0]
    rows = [line for line in table.splitlines()[2:] if not line.startswith("| the paper")]
    labels = ["ours", "kept", "per level", "refinement", "kept, per level", "kept, refinement"]
    assert len(rows) == len(labels)
    computed = {name: readings(name) for name in BACKBONE_COLUMNS}
    for label, row in zip(labels, rows):
        cells = [int(cell.strip().replace(",", "")) for cell in row.split("|")[2:2 + len(BACKBONE_COLUMNS)]]
        assert cells == [computed[name][label] for name in BACKBONE_COLUMNS], f"{label}: {row}"


TEACHING_FILES = sorted(path.relative_to(REPO).as_posix() for path in PYTHON_FILES)   # every file is read beside the paper
BUDGET = 600                                                              # lines of at most 120 columns


def comment_ratio(path):
    """Lines holding a # comment per 100 code lines (neither blank, comment-only nor docstring)."""
    import io
    import tokenize
    source = path.read_text()
    docstrings = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and ast.get_docstring(node) is not None:
            docstrings |= set(range(node.body[0].lineno, node.body[0].end_lineno + 1))
    commented = {tok.start[0] for tok in tokenize.generate_tokens(io.StringIO(source).readline)
                 if tok.type == tokenize.COMMENT}
    code = [n for n, line in enumerate(source.splitlines(), 1)
            if line.strip() and not line.strip().startswith("#") and n not in docstrings]
    return 100 * len(commented) / len(code)


def test_the_teaching_files_keep_their_reading_budgets():
    assert len(TEACHING_FILES) >= 13
    for name in TEACHING_FILES:
        lines = (REPO / name).read_text().splitlines()
        assert len(lines) <= BUDGET, f"{name} has {len(lines)} lines, over its budget of {BUDGET}"
        wide = [n for n, line in enumerate(lines, 1) if len(line) > 120]
        assert not wide, f"{name}: lines over 120 columns: {wide}"
    for name in ("train.py", "evaluate.py"):
        assert comment_ratio(REPO / name) >= 20, f"{name}: fewer than 20 comment lines per 100 code lines"


def test_every_flag_of_train_and_evaluate_is_in_a_readme_recipe_or_a_test():
    tests = "".join(path.read_text() for path in (REPO / "tests").glob("*.py"))
    for name in ("train.py", "evaluate.py"):
        flags = set(re.findall(r'\badd(?:_argument)?\(\s*"(--[\w-]+)"', (REPO / name).read_text()))
        assert len(flags) > 10
        named = set(re.findall(r"--[\w-]+", README + tests))
        unused = sorted(flag for flag in flags if flag not in named and "--no-" + flag[2:] not in named)
        assert not unused, f"{name} flags neither in the README nor in a test: {unused}"


def test_nothing_refers_to_notes_or_files_outside_the_repository():
    pattern = re.compile(r"FACTS\.md|\bissue #?\d+|\.\./shared", re.I)
    for path in [REPO / "README.md", *PYTHON_FILES]:
        hits = [n for n, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
        assert not hits, f"{path.name} refers outside the repository on lines {hits}"
