"""The course kit (tests/exercises.py): handouts keep what a student reads, grading tells a blank
function from a written one, bad input is refused with the reason, and the README lists the same
exercises as the kit."""

import ast
import importlib.util
import re
import subprocess
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "tests"))
import exercises  # noqa: E402

README = (REPO / "README.md").read_text()
COURSE = README.split("## Course kit")[1]


def test_the_readme_course_section_names_the_kits_exercises_functions_and_tests():
    items = re.split(r"^(?=\d+\. \*\*)", COURSE, flags=re.M)[1:]
    assert [int(item.split(".")[0]) for item in items] == [e.number for e in exercises.EXERCISES]
    for item, exercise in zip(items, exercises.EXERCISES):
        assert item.startswith(f"{exercise.number}. **{exercise.title}** ({exercise.paper}")
        assert ("an experiment" in item) == (not exercise.functions)
        named_code = re.findall(r"`(\w+\.py:[\w.]+)`", item)
        named_tests = {f"tests/{file}::{name}" for file, name in re.findall(r"`(test_\w+\.py)::(test_\w+)`", item)}
        assert set(exercise.functions) <= set(named_code), f"exercise {exercise.number}: {named_code}"
        assert named_tests == set(exercise.tests), f"exercise {exercise.number}: {named_tests}"


def test_every_function_and_test_the_kit_names_exists():
    for exercise in exercises.EXERCISES:
        for spec in exercise.functions:
            path, qualname = spec.split(":")
            exercises.blank((REPO / path).read_text(), qualname, "check")      # raises SystemExit if absent
        for node in exercise.tests + exercise.breaks:
            path, name = node.split("::")
            tree = ast.parse((REPO / path).read_text())
            names = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
            assert name.split("[")[0] in names, f"exercise {exercise.number}: {node} does not exist"


def test_a_blank_function_keeps_signature_docstring_and_comments_and_raises_with_the_exercise(tmp_path):
    source = (REPO / "losses.py").read_text()
    message = "Exercise 2: The CLIP-aware loss and its temperature, see README"
    blanked = exercises.blank(source, "clip_aware_loss", message)
    original, handed = (next(n for n in ast.parse(text).body if getattr(n, "name", "") == "clip_aware_loss")
                        for text in (source, blanked))
    assert ast.dump(original.args) == ast.dump(handed.args)
    assert ast.get_docstring(original) == ast.get_docstring(handed)
    body = source.splitlines()[original.lineno - 1:original.end_lineno]
    comments = [line for line in body if line.strip().startswith("#")]          # the Eq. (9) and DEVIATION notes
    assert len(comments) > 3 and all(line in blanked.splitlines() for line in comments)
    assert [type(n) for n in handed.body] == [ast.Expr, ast.Raise]             # docstring, then only the raise
    (tmp_path / "losses.py").write_text(blanked)                                # the module still imports
    spec = importlib.util.spec_from_file_location("handout_losses", tmp_path / "losses.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(NotImplementedError, match=message):
        module.clip_aware_loss(None, None)
    assert module.PerceiveIRLoss is not None and source.count("\n") > blanked.count("\n")


def test_bad_input_is_refused_with_the_reason(tmp_path):
    with pytest.raises(SystemExit, match="no exercise 42; the exercises are 1 "):
        exercises.find([42])
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "homework.py").write_text("# a student's work\n")
    with pytest.raises(SystemExit, match="not empty; never written over"):
        exercises.handout([8], tmp_path / "full")
    assert (tmp_path / "full" / "homework.py").read_text() == "# a student's work\n"
    with pytest.raises(SystemExit, match="is not a handout: .*train.py"):
        exercises.grade(tmp_path / "full", [8])
    with pytest.raises(SystemExit, match="experiments, with no function"):
        exercises.handout([4, 6], tmp_path / "new")
    with pytest.raises(SystemExit, match="not defined .*update EXERCISES"):
        exercises.blank("def f():\n    return 1\n", "g", "x")


def test_grading_fails_the_blank_handout_and_passes_the_written_function(tmp_path, capsys):
    exercises.handout([8], tmp_path / "hw")
    assert "Exercise 8: avgPSNR per task" in (tmp_path / "hw" / "losses.py").read_text()
    assert exercises.grade(tmp_path / "hw", [8]) == 1
    report = capsys.readouterr().out
    assert "exercise 8 (avgPSNR per task): FAIL (0/1 tests)" in report and "NotImplementedError" in report
    (tmp_path / "hw" / "losses.py").write_text((REPO / "losses.py").read_text())      # the student's answer
    (tmp_path / "hw" / "tests" / "test_losses.py").write_text("def test_eq10_avgpsnr_is_measured_per_stratum_"
                                                              "and_each_task_averages_its_sigmas():\n    assert False\n")
    assert exercises.grade(tmp_path / "hw", [8]) == 0               # graded by this repository's tests, not the copy's
    assert "exercise 8 (avgPSNR per task): pass (1/1 tests)" in capsys.readouterr().out


def test_the_command_line_lists_the_exercises():
    out = subprocess.run([sys.executable, "tests/exercises.py", "list"], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout
    for exercise in exercises.EXERCISES:
        assert f"{exercise.number}. {exercise.title} ({exercise.paper})" in out


@pytest.mark.slow
def test_every_exercise_grades_and_a_handout_of_all_of_them_fails_only_the_listed_tests(capsys):
    assert exercises.check() == 0, capsys.readouterr().out
