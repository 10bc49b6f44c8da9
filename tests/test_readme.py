"""The README is the map of the paper: it must not rot as the code changes."""

import ast
import re
from collections import Counter

from conftest import REPO

README = (REPO / "README.md").read_text()


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
    references = re.findall(r"`(\w+\.py):([\w.]+)`", README)
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
    for path in REPO.glob("*.py"):
        text = path.read_text()
        in_code[(path.name, "DEVIATION")] += len(re.findall(r"\bDEVIATION:", text))
        in_code[(path.name, "UNSPECIFIED")] += len(re.findall(r"\bUNSPECIFIED:", text))
    in_readme = Counter((file, kind) for kind, file in re.findall(r"^- \*\*(DEVIATION|UNSPECIFIED)\*\* `(\w+\.py)`",
                                                                  README, re.M))
    in_code = +in_code                                         # drop zero counts
    assert in_readme == in_code, f"README entries {dict(in_readme)} vs tags in the code {dict(in_code)}"


def test_the_readme_starts_with_the_two_commands_and_ci_runs_the_same_test_command():
    first_block = README.split("```bash")[1].split("```")[0]
    assert "pip install -r requirements.txt" in first_block and "python -m pytest -q" in first_block
    assert "python -m pytest -q" in (REPO / ".ci" / "run").read_text()
