"""The course kit: the README's exercises, defined once, as starter code and as grading (not a test file).

    python tests/exercises.py list                       # the exercises, their functions, tests and equations
    python tests/exercises.py handout 1 3 --out DIR      # a copy of the repository with those functions blank
    python tests/exercises.py grade DIR [1 3]            # this repository's grading tests on a student's copy
    python tests/exercises.py check                      # every exercise grades: passes here, fails blanked

A handout is built from the tracked files (`git ls-files`), so `.git`, caches and run outputs stay out.
In it, each named function keeps its signature, docstring and comment lines; its code lines become one
`raise NotImplementedError("Exercise N: <title>, see README")`. Grading copies the student's files and
this repository's tests into a fresh folder, so an edited test in the handout changes nothing.
"""

import argparse
import ast
import os
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"            # the benchmark images the grading tests read, when present
TIMEOUT = 600                              # seconds per exercise when grading


@dataclass
class Exercise:
    number: int
    title: str
    paper: str                             # the equations and sections it covers
    functions: list = field(default_factory=list)      # "file.py:name" or "file.py:Class.method"
    tests: list = field(default_factory=list)          # pytest node IDs that grade it
    breaks: list = field(default_factory=list)         # other tests that fail while the functions are blank
    task: str = ""                                     # what to do, for experiments without a function


def nodes(file, *names):
    return [f"tests/{file}::{name}" for name in names]


# The training runs of test_train.py restore end to end, so they fail while any loss, avgPSNR or PGCA is blank.
TRAINING_RUNS = nodes(
    "test_train.py", "test_a_non_finite_loss_stops_the_run_naming_the_step_and_keeps_the_last_good_checkpoint",
    "test_an_existing_run_is_never_overwritten_without_resume",
    "test_an_instance_normalised_cfe_trains_and_its_centroids_see_z_in_training_size_tiles",
    "test_checkpoint_is_one_plain_dict_loadable_with_weights_only",
    "test_eq10_when_a_tasks_avgpsnr_rises_past_its_negatives_they_flip_from_1_minus_to_1_plus_gamma",
    "test_missing_clip_weights_end_with_one_line_naming_the_flag_not_a_traceback",
    "test_paper_preset_defaults_of_sec_iv_a4_reach_the_loss_and_adamw",
    "test_readme_recipe_a_nafnet_medium_stage_makes_a_second_set_of_proxy_negatives",
    "test_resume_rejects_a_checkpoint_of_another_stage_and_one_with_a_single_avgpsnr",
    "test_resuming_gives_the_same_weights_as_training_straight_through",
    "test_sigterm_to_the_process_group_with_loader_workers_writes_a_checkpoint_and_exits_cleanly",
    "test_snapshots_keep_the_newest_n_and_keep_0_keeps_them_all",
    "test_stage1_restores_every_training_image_once_by_the_model_of_the_other_fold",
    "test_the_medium_and_prompt_stages_resume_bit_for_bit",
    "test_the_negatives_are_announced_with_their_coverage_and_i_m_can_be_left_out",
    "test_the_offline_demo_restores_better_than_its_inputs",
    "test_two_gloo_processes_match_one_process_and_log_the_mean_over_both",
    "test_the_table_xv_backbones_train_in_the_restore_stage_and_evaluate_rebuilds_them",
    "test_init_fine_tunes_from_a_restore_checkpoints_weights_and_refuses_another_network",
    "test_resume_from_another_checkpoint_never_overwrites_the_run_already_in_out",
    "test_resuming_into_another_network_says_so_in_one_line") + nodes(
    "test_table_xiv.py", "test_the_restorer_behind_the_prompts_is_recorded_through_to_the_restore_checkpoint") + nodes(
    "test_gpu_path.py", "test_amp_bf16_keeps_every_loss_term_in_float32_close_to_fp32_and_l_cl_is_not_quantised",
    "test_compile_trains_resumes_and_its_checkpoint_loads_strictly_into_a_plain_model")
# One restore step (every loss and PGCA, no avgPSNR) on other devices.
RESTORE_STEP = nodes("test_gpu_path.py", "test_the_restore_step_and_evaluation_keep_every_tensor_on_the_device")
LOSS_GRADIENTS = nodes("test_losses.py", "test_i_r_and_the_restorer_get_gradients_while_vgg_and_clip_get_none")
TABLE_XI = nodes("test_losses.py", "test_table_xi_rows_switch_terms_off_and_a_term_off_costs_nothing")


EXERCISES = [
    Exercise(1, "The contrastive degradation loss", "Eq. (12), Sec. III-E", ["losses.py:contrastive_loss"], nodes(
        "test_losses.py", "test_eq12_contrastive_loss_of_a_three_task_batch_equals_the_hand_computed_infonce",
        "test_eq12_same_task_samples_are_neither_positives_nor_negatives",
        "test_eq12_samples_without_any_negative_are_masked_out_and_counted",
        "test_eq12_two_gloo_ranks_holding_half_the_batch_give_the_single_process_loss_and_gradients"),
        breaks=TRAINING_RUNS + RESTORE_STEP + LOSS_GRADIENTS + TABLE_XI + nodes(
            "test_guidance.py", "test_l_cl_on_four_crops_a_step_teaches_the_cfe_to_tell_the_degradations_apart")),
    Exercise(2, "The CLIP-aware loss and its temperature", "Eq. (9), Eq. (1), Sec. III-D.1",
             ["losses.py:clip_aware_loss", "clip_prompts.py:prompt_logits"],
             nodes("test_losses.py", "test_eq9_clip_loss_is_zero_when_excellent_has_all_the_mass",
                   "test_eq9_clip_loss_is_two_thirds_when_the_three_prompts_tie")
             + nodes("test_clip_prompts.py", "test_eq1_cross_entropy_over_scaled_cosines_matches_a_hand_computation",
                     "test_the_perceiver_multiplies_the_cosines_by_clips_logit_scale"),
             breaks=[node for node in TRAINING_RUNS if "eq10" not in node] + RESTORE_STEP + LOSS_GRADIENTS + TABLE_XI
             + nodes(
                 "test_clip_prompts.py", "test_eq1_prompts_learn_to_rank_three_noise_levels_with_a_tiny_clip",
                 "test_only_the_prompt_embeddings_receive_gradients",
                 "test_prompt_checkpoint_round_trips_with_weights_only",
                 "test_perceiver_probabilities_sum_to_one_and_gradients_reach_the_image_not_clip",
                 "test_score_command_prints_one_line_per_image",
                 "test_score_names_an_unreadable_image_scores_the_others_and_exits_non_zero")
             + nodes("test_evaluate.py", "test_perception_json_names_the_nearest_task_and_p_excellent_with_prompts")
             + nodes("test_train.py", "test_the_perceiver_is_measured_on_crops_of_held_out_triplets")),
    Exercise(3, "Prior guidance cross attention", "Eq. (3), (7), (8), Sec. III-C.3",
             ["guidance.py:PGCA.forward", "guidance.py:GuidedMixer.forward"],
             nodes("test_guidance.py", "test_eq7_pgca_takes_the_query_from_y_and_key_value_from_x",
                   "test_eq8_the_residual_of_the_etb_mixer_is_y",
                   "test_eq3_an_etb_is_gdfn_after_the_guided_mixer_which_takes_the_place_of_mdta"),
             breaks=TRAINING_RUNS + RESTORE_STEP + nodes(
                 "test_guidance.py", "test_each_table_x_ablation_builds_and_trains",
                 "test_every_trainable_parameter_gets_a_gradient_and_no_dinov2_parameter_does",
                 "test_output_shape_equals_input_shape_for_odd_sizes",
                 "test_positive_crop_code_equals_the_code_of_a_separate_pass",
                 "test_restore_image_takes_the_priors_from_the_whole_image_even_when_the_backbone_runs_on_tiles",
                 "test_the_guidance_keeps_every_feature_shape_of_the_plain_backbone",
                 "test_without_pgm_the_guidance_ignores_z_and_with_pgm_it_does_not",
                 "test_steering_turns_z_to_a_task_centroid_keeping_its_length_and_changes_the_restoration")
             + nodes("test_evaluate.py", "test_a_checkpoint_without_centroids_still_restores_with_a_message",
                     "test_any_folder_is_a_test_set_and_one_without_targets_gets_the_no_reference_metrics",
                     "test_an_unreadable_file_is_named_and_skipped_and_the_others_are_restored",
                     "test_benchmark_images_are_restored_whole_unless_tiles_are_asked_for",
                     "test_end_to_end_evaluation_scores_each_restored_test_image",
                     "test_perception_json_names_the_nearest_task_and_p_excellent_with_prompts",
                     "test_profile_reports_the_parameter_counts_of_the_model_and_its_frozen_dinov2",
                     "test_tiled_restoration_matches_the_whole_image_within_a_stated_tolerance",
                     "test_two_ranks_shard_the_test_images_and_give_the_one_process_table",
                     "test_your_own_images_in_any_format_come_back_as_png_and_colliding_names_keep_their_suffix",
                     "test_a_second_run_into_the_same_output_keeps_the_first_runs_perception_entries",
                     "test_a_decompression_bomb_is_named_and_skipped_and_the_others_are_restored",
                     "test_as_task_restores_as_if_perceived_as_that_task_and_says_so")
             + nodes("test_laptop.py",
                     "test_with_no_checkpoint_evaluate_restores_a_real_low_light_image_with_the_shipped_weights",
                     "test_in_the_shipped_weights_z_switches_low_light_enhancement_on_and_off")),
    Exercise(4, "How many prompts?", "Table XII, Sec. IV-F.3", task=(
        "train stage 1 with `--prompt-words excellent terrible`, the default three words and four words, "
        "and compare the held-out accuracy each prompts.pt records")),
    Exercise(5, "The total loss and its ablations", "Eq. (13), Table XI", ["losses.py:PerceiveIRLoss.loss_terms"],
             TABLE_XI + nodes("test_losses.py",
                              "test_eq10_each_image_counts_its_non_easy_negatives_and_those_weighted_1_minus_gamma"),
             breaks=TRAINING_RUNS + RESTORE_STEP + LOSS_GRADIENTS + nodes(
                 "test_losses.py", "test_a_term_switched_on_without_its_network_is_a_clear_error") + nodes(
                 "test_table_xiv.py", "test_promptir_trains_as_the_plain_baseline_and_evaluate_rebuilds_it")),
    Exercise(6, "Swap the backbone", "Table XV, Sec. III-C.1", task=(
        "add a fifth backbone to guidance.py:BACKBONES that honours the guided_attention interface and add it "
        "to the parametrisations of the guided-level and odd-size tests")),
    Exercise(7, "Difficulty-adaptive weights and the perceptual loss", "Eq. (10), (11), Sec. III-D.2",
             ["losses.py:negative_weights", "losses.py:difficulty_adaptive_perceptual_loss"], nodes(
                 "test_losses.py", "test_eq10_hard_negatives_weigh_one_plus_gamma_and_very_hard_ones_one_minus_gamma",
                 "test_eq10_before_any_psnr_is_measured_every_negative_counts_as_very_hard",
                 "test_eq11_dpl_equals_the_hand_computed_ratio_with_a_missing_negative",
                 "test_eq11_dpl_with_no_non_easy_negatives_uses_the_easy_negative_alone"),
             breaks=TRAINING_RUNS + RESTORE_STEP + LOSS_GRADIENTS + TABLE_XI + nodes(
                 "test_losses.py",
                 "test_eq10_each_image_counts_its_non_easy_negatives_and_those_weighted_1_minus_gamma")),
    Exercise(8, "avgPSNR per task", "Eq. (10), Sec. III-D.2", ["losses.py:average_psnr"], nodes(
        "test_losses.py", "test_eq10_avgpsnr_is_measured_per_stratum_and_each_task_averages_its_sigmas"),
        breaks=TRAINING_RUNS),
]


def find(numbers):
    """The exercises of `numbers` (all with a function to write when empty); unknown numbers are refused."""
    known = {e.number: e for e in EXERCISES}
    unknown = [n for n in numbers if n not in known]
    if unknown:
        raise SystemExit(f"exercises.py: no exercise {unknown[0]}; the exercises are "
                         + ", ".join(f"{e.number} ({e.title})" for e in EXERCISES))
    return [known[n] for n in numbers] if numbers else [e for e in EXERCISES if e.functions]


def blank(source, qualname, message):
    """The source with the body of function `qualname` replaced by `raise NotImplementedError(message)`,
    keeping its signature, docstring and comment lines. Line ranges come from ast (ast.unparse drops comments)."""
    tree, lines = ast.parse(source), source.splitlines(keepends=True)
    node, scope = None, tree.body
    for part in qualname.split("."):
        node = next((n for n in scope if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == part), None)
        if node is None:
            raise SystemExit(f"exercises.py: {qualname} is not defined (a renamed function? update EXERCISES)")
        scope = node.body
    body = node.body[1:] if ast.get_docstring(node) is not None else node.body
    first = body[0].lineno if body else node.body[0].end_lineno + 1
    indent = " " * body[0].col_offset if body else " " * (node.col_offset + 4)
    kept = [line for line in lines[first - 1:node.end_lineno] if line.strip().startswith("#")]
    stub = kept + [f"{indent}raise NotImplementedError({message!r})\n"]
    return "".join(lines[:first - 1] + stub + lines[node.end_lineno:])


def copy_tracked(out):
    """Copy the files git tracks (no .git, caches, virtualenvs or run outputs) to `out`; returns their names."""
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for name in tracked:
        (Path(out) / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, Path(out) / name)
    return tracked


def handout(numbers, out):
    """Copy the tracked files to `out`, with the functions of the chosen exercises blank."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"exercises.py: --out {out} exists and is not empty; never written over: choose a new folder")
    exercises = find(numbers)
    if not any(e.functions for e in exercises):
        raise SystemExit("exercises.py: these exercises are experiments, with no function to hand out")
    tracked = copy_tracked(out)
    for exercise in exercises:
        for spec in exercise.functions:
            path, qualname = spec.split(":")
            message = f"Exercise {exercise.number}: {exercise.title}, see README"
            (out / path).write_text(blank((out / path).read_text(), qualname, message))
    print(f"handout of exercise(s) {', '.join(str(e.number) for e in exercises)} written to {out} "
          f"({len(tracked)} files)")
    return exercises


def run_tests(code_dir, node_ids, timeout=TIMEOUT, marks="slow or not slow"):
    """Run `node_ids` from this repository's tests against the code in `code_dir`; returns {node: message or
    None} with None for a pass. A skipped test counts as a failure; so does a timeout."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "copy"
        shutil.copytree(Path(code_dir), work, ignore=shutil.ignore_patterns(
            "tests", ".git", "runs", "results", "*venv*", "__pycache__", ".pytest_cache"))
        shutil.copytree(REPO / "tests", work / "tests", ignore=shutil.ignore_patterns("__pycache__"))
        report = Path(tmp) / "report.xml"
        env = {**os.environ, "PERCEIVE_IR_SHARED": str(SHARED)}
        try:
            subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", marks,
                            f"--junitxml={report}", *node_ids], cwd=work, env=env, capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {node: f"timed out after {timeout} s" for node in node_ids}
        results = {}
        for case in ElementTree.parse(report).iter("testcase"):          # classname "tests.test_losses"
            name = f"{case.get('classname').replace('.', '/')}.py::{case.get('name')}"
            problem = next(iter(case.findall("failure") + case.findall("error") + case.findall("skipped")), None)
            # the whole report, traceback included: a failure in a spawned process names the exercise there
            results[name] = problem if problem is None else f"{problem.tag}: {problem.get('message')}\n{problem.text}"
        return results


def grade(code_dir, numbers):
    """One pass/fail line per exercise; returns the number of exercises that failed."""
    code_dir = Path(code_dir)
    missing = [name for name in ("backbone.py", "guidance.py", "clip_prompts.py", "losses.py", "data.py", "metrics.py",
                                 "tables.py", "checkpoints.py", "demo.py", "train.py", "evaluate.py")
               if not (code_dir / name).is_file()]
    if missing:
        raise SystemExit(f"exercises.py: {code_dir} is not a handout: {', '.join(missing)} missing")
    failed = 0
    for exercise in find(numbers):
        if not exercise.functions:
            print(f"exercise {exercise.number} ({exercise.title}): an experiment, graded by reading it")
            continue
        results = run_tests(code_dir, exercise.tests)
        bad = {node: message for node, message in results.items() if message} or \
            ({"(no test ran)": "pytest collected none of the grading tests"} if not results else {})
        failed += bool(bad)
        print(f"exercise {exercise.number} ({exercise.title}): {'FAIL' if bad else 'pass'} "
              f"({len(results) - len(bad)}/{len(results)} tests)")
        for node, message in bad.items():
            print(f"    {node}: {message[:300]}")
    return failed


def check():
    """Show that every exercise grades: its tests pass on this repository and fail on its handout because
    of the blanked function; and that on a handout of every exercise only the listed tests fail."""
    problems = []
    reference = tempfile.TemporaryDirectory()
    copy_tracked(reference.name)
    for exercise in find([]):
        on_reference = run_tests(reference.name, exercise.tests)
        problems += [f"exercise {exercise.number}: {node} fails on the reference: {m[:300]}"
                     for node, m in on_reference.items() if m]
        with tempfile.TemporaryDirectory() as tmp:
            handout([exercise.number], Path(tmp) / "handout")
            on_handout = run_tests(Path(tmp) / "handout", exercise.tests)
        marker = f"Exercise {exercise.number}:"
        problems += [f"exercise {exercise.number}: {node} does not fail for its blank function: {(m or 'passes')[:300]}"
                     for node, m in on_handout.items() if not m or marker not in m]
        print(f"exercise {exercise.number}: {len(on_reference)} grading tests pass on the reference, "
              f"{sum(bool(m) and marker in m for m in on_handout.values())} fail on the handout")
    with tempfile.TemporaryDirectory() as tmp:          # every exercise blank: the rest of the default suite passes
        handout([], Path(tmp) / "all")
        # (the kit's own tests are about this repository, a git checkout, not about a handout)
        results = run_tests(Path(tmp) / "all", ["tests", "--ignore=tests/test_course.py"], 3 * TIMEOUT, "not slow")
    reference.cleanup()
    expected = {node for e in EXERCISES for node in e.tests + e.breaks}
    unexpected = [node for node, m in results.items() if m and node.split("[")[0] not in expected]
    problems += [f"{node} fails on the handout of every exercise, but no exercise lists it" for node in unexpected]
    print("\n".join(problems) or "every exercise grades: its tests pass here and fail for its blank function")
    return len(problems)


def describe():
    for e in EXERCISES:
        print(f"{e.number}. {e.title} ({e.paper})")
        if e.functions:
            print("   write:  " + ", ".join(e.functions))
            print("   graded: " + "\n           ".join(e.tests))
            print(f"   while blank, {len(e.breaks)} other tests fail too:")
            print("".join(f"           {node}\n" for node in e.breaks), end="")
        else:
            print(f"   an experiment, no function to write: {e.task}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="the exercises")
    make = commands.add_parser("handout", help="a copy of the repository with the exercises' functions blank")
    make.add_argument("numbers", type=int, nargs="*", help="exercises (default: every one with a function)")
    make.add_argument("--out", required=True, help="a new or empty folder")
    marker = commands.add_parser("grade", help="grade a handout with this repository's tests")
    marker.add_argument("folder")
    marker.add_argument("numbers", type=int, nargs="*", help="exercises (default: every one with a function)")
    commands.add_parser("check", help="show that every exercise's tests grade (several minutes)")
    args = parser.parse_args(argv)
    if args.command == "list":
        return describe()
    if args.command == "handout":
        return handout(args.numbers, args.out) and 0
    if args.command == "grade":
        raise SystemExit(1 if grade(args.folder, args.numbers) else 0)
    raise SystemExit(1 if check() else 0)


if __name__ == "__main__":
    main()
