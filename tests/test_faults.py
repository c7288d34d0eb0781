"""Fault injection: bad input and faults against the whole plugin, each with its exit code and message.

Every case asserts three things: the exit code, the first line a user reads about it, and that nothing
already computed was lost (the cache, the report). A deployment gate must never exit 0 on what it did
not check, nor lose a verdict it reached.

With ``LLMGATE_FAULT_TABLE=FILE`` set, each case also appends ``case<TAB>exit<TAB>first message line`` to
FILE before asserting, which is how the before/after table of the issue was made (README, "Failure modes").
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from doubles import CRASH_ENV, INTERRUPT_ENV
from gateproject import BENCHMARK, make_project

from pytest_llmgate import EXIT_BREACH, EXIT_CRITICAL, EXIT_UNCHECKED

USAGE, COLLECTION, HARNESS, NO_TESTS = 4, 2, 1, 5
# What a user reads first about a run, most telling first: an error, the gate's headline, a cache note,
# then a harness error's own line.
MESSAGE_MARKERS = (("ERROR: llmgate", "error: argument", "INTERNALERROR", "Traceback", "llmgate: task"),
                   ("llmgate: INCOMPLETE", "llmgate: stage '", "llmgate: ladder", "llmgate: could not"),
                   ("llmgate cache",), ("llmgate harness error", "ERROR:"))


def _first_message(result: pytest.RunResult) -> str:
    """The first line that tells the user what happened (not the report header)."""
    lines = [*result.outlines, *result.errlines]
    for markers in MESSAGE_MARKERS:
        for line in lines:
            if any(marker in line for marker in markers) and "usage:" not in line:
                return line.strip()[:160]
    return next((line.strip()[:160] for line in lines if line.startswith("E   ")), "(no message)")


@pytest.fixture
def fault(request: pytest.FixtureRequest):
    """``fault(result, exit_code, *patterns)``: record the case (see the module docstring), then assert."""

    def check(result: pytest.RunResult, exit_code: int, *patterns: str) -> None:
        table = os.environ.get("LLMGATE_FAULT_TABLE")
        if table:
            with open(table, "a", encoding="utf-8") as handle:
                handle.write(f"{request.node.name}\t{result.ret}\t{_first_message(result)}\n")
        output = "\n".join([*result.outlines, *result.errlines])
        assert result.ret == exit_code, output[-3000:]
        assert "Traceback" not in output and "INTERNALERROR" not in output, output[-3000:]
        for pattern in patterns:
            assert any(_fnmatch(line, pattern) for line in [*result.outlines, *result.errlines]), \
                f"no line matches {pattern!r}:\n{output[-3000:]}"

    return check


def _fnmatch(line: str, pattern: str) -> bool:
    import fnmatch

    return fnmatch.fnmatch(line, pattern)


@pytest.fixture
def project(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch):
    return make_project(pytester, monkeypatch)


def _edit(project, old: str, new: str) -> None:
    path = project.path / "pyproject.toml"
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new, 1))


def _add_model(project, body: str) -> None:
    """A model 'real' of the built-in transformers backend, and stage 'mild' pointed at it."""
    _edit(project, "[tool.llmgate.models.good]", f"[tool.llmgate.models.real]\n{body}\n\n[tool.llmgate.models.good]")
    _edit(project, 'name = "mild"\nmodel = "good"', 'name = "mild"\nmodel = "real"')


def _strict_json(path: Path) -> dict:
    """Parse as a strict JSON reader would: NaN and Infinity are errors."""

    def refuse(constant: str) -> None:
        raise AssertionError(f"{path} holds {constant}, which is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


# --- configuration and options: exit 4 before anything is evaluated --------------------------------------


def test_empty_stage_option(project, fault):
    fault(project.run("--stage="), USAGE, "*argument --stage*got nothing*")


def test_unknown_stage(project, fault):
    fault(project.run("--stage=nosuch"), USAGE, "*no stage named 'nosuch'*choose one of baseline, mild, harsh, all*")


def test_limit_zero_names_the_option(project, fault):
    fault(project.run("--stage=mild", "--llmgate-limit=0"), USAGE,
          "*argument --llmgate-limit: expected a positive integer*got '0'*")


def test_limit_not_a_number(project, fault):
    fault(project.run("--stage=mild", "--llmgate-limit=many"), USAGE, "*argument --llmgate-limit*'many'*")


def test_plan_drop_out_of_range_names_the_option(project, fault):
    fault(project.run("--stage=mild", "--llmgate-plan", "--llmgate-plan-drop=1.5"), USAGE,
          "*argument --llmgate-plan-drop: expected a number strictly between 0 and 1*")


def test_set_on_one_stage_of_the_array_is_validated(project, fault):
    fault(project.run("--stage=mild", "--llmgate-set", "stages.mild.min_retention=1.5"), USAGE,
          "*stage 'mild'.min_retention: 1.5 is outside [[]0, 1[]]*")


def test_set_on_one_stage_of_the_array_takes_effect(project, fault):
    # The same override with a legal value gates with it: a model that passes the 0.90 floor misses 0.999.
    project.weights("good", skill=0.9, seed=1)
    assert project.run("--stage=mild").ret == 0
    fault(project.run("--stage=mild", "--llmgate-set", "stages.mild.min_retention=0.999"),
          EXIT_BREACH, "*FAILED arc_challenge: retention >= 1.00*")


def test_set_on_a_stage_that_does_not_exist(project, fault):
    fault(project.run("--stage=mild", "--llmgate-set", "stages.nosuch.min_retention=0.9"), USAGE,
          "*--llmgate-set: stages.nosuch.min_retention: no entry named 'nosuch' in stages (mild, harsh)*")


def test_set_on_the_whole_array(project, fault):
    fault(project.run("--stage=mild", "--llmgate-set", "stages.min_retention=0.9"), USAGE,
          "*'stages' is an array of tables; name an entry, e.g. stages.<name>.min_retention*")


def test_set_limit_zero(project, fault):
    fault(project.run("--stage=mild", "--llmgate-set", "limit=0"), USAGE,
          "*[[]tool.llmgate[]].limit: expected a positive integer, got 0*")


def test_misspelt_key(project, fault):
    _edit(project, "min_retention = 0.90", "min_retension = 0.90")
    fault(project.run("--stage=mild"), USAGE,
          "*stage 'mild'.min_retension: unknown key; did you mean 'min_retention'?*")


def test_invalid_toml(project, fault):
    _edit(project, "[tool.llmgate]\n", "[tool.llmgate\n")
    fault(project.run("--stage=mild"), USAGE, "*pyproject.toml: Expected ']' at the end of a table declaration*")


def test_config_not_utf8(project, fault):
    (project.path / "pyproject.toml").write_text("[tool.pytest.ini_options]\n")
    (project.path / "llmgate.toml").write_bytes(b'baseline = "base"\n# caf\xe9\n')
    fault(project.run("--stage=mild"), USAGE, "*llmgate.toml:2: not UTF-8 (byte 0xe9)*re-save the file as UTF-8*")


def test_llmgate_toml_with_both_forms(project, fault):
    (project.path / "pyproject.toml").write_text("[tool.pytest.ini_options]\n")
    (project.path / "llmgate.toml").write_text('limit = 5\n\n[tool.llmgate]\nbaseline = "smollm2"\n')
    fault(project.run("--stage=baseline"), USAGE,
          "*llmgate.toml: has both [[]tool.llmgate[]] and top-level keys (limit)*")


def test_config_file_option_missing(project, fault):
    fault(project.run("--stage=mild", "--llmgate-config=nowhere.toml"), USAGE,
          "*--llmgate-config: nowhere.toml does not exist*")


def test_model_path_does_not_exist(project, fault):
    _add_model(project, 'path = "./models/nowhere"')
    fault(project.run("--stage=mild"), USAGE, "*models.real*.path: */models/nowhere does not exist*")


def test_gguf_file_not_in_the_folder(project, fault):
    (project.path / "models" / "q").mkdir(parents=True)
    (project.path / "models" / "q" / "model.Q8_0.gguf").write_bytes(b"GGUF")
    _add_model(project, 'path = "./models/q"\ngguf_file = "model.Q4_K_M.gguf"')
    fault(project.run("--stage=mild"), USAGE,
          "*gguf_file: model.Q4_K_M.gguf is not in*(GGUF files there: model.Q8_0.gguf)*")


def test_rtn_one_bit(project, fault):
    _add_model(project, 'transform = { method = "rtn", bits = 1 }')
    fault(project.run("--stage=mild"), USAGE, "*transform.bits: expected an integer from 2 to 16*got 1*")


def test_rtn_group_size_zero(project, fault):
    _add_model(project, 'transform = { method = "rtn", bits = 4, group_size = 0 }')
    fault(project.run("--stage=mild"), USAGE, "*transform.group_size: expected a positive number*got 0*")


def test_vptq_eight_bits(project, fault):
    _add_model(project, 'transform = { method = "vptq", bits = 8 }')
    fault(project.run("--stage=mild"), USAGE, "*transform.bits: bits x vector_len = 8 x 4 = 32*use bits <= 4*")


def test_data_dir_missing(project, fault):
    _edit(project, 'data_dir = "data"', 'data_dir = "no-such-data"')
    fault(project.run("--stage=mild"), USAGE, "*[[]tool.llmgate[]].data_dir: */no-such-data is not a folder*")


def test_unknown_task_option(project, fault):
    fault(project.run("--stage=mild", "--llmgate-tasks=arc_challenge,nosuch"), USAGE,
          "*--llmgate-tasks: unknown task 'nosuch'*")


def test_undefined_baseline_model(project, fault):
    _edit(project, 'baseline = "base"', 'baseline = "nosuch"')
    fault(project.run("--stage=mild"), USAGE, "*baseline: model 'nosuch' is not in [[]tool.llmgate.models[]]*")


def test_adaptive_without_a_stage(project, fault):
    fault(project.run("--llmgate-adaptive"), USAGE, "*--llmgate-adaptive gates one stage*")


def test_report_path_is_a_folder(project, fault):
    (project.path / "out").mkdir()
    fault(project.run("--stage=mild", "--llmgate-report=out"), USAGE, "*--llmgate-report */out is a folder*")
    assert not list(project.path.glob("out*.tmp")) and not (project.path / ".llmgate").exists()


def test_report_path_under_a_file(project, fault):
    (project.path / "afile").write_text("x")
    fault(project.run("--stage=mild", "--llmgate-report=afile/report.json"), USAGE,
          "*--llmgate-report */afile/report.json: */afile is a file*")


def test_cache_file_is_garbage(project, fault):
    cache = project.path / ".llmgate" / "cache.sqlite"
    cache.parent.mkdir()
    cache.write_bytes(b"not a database " * 100)
    fault(project.run("--stage=mild"), USAGE,
          "*llmgate cache */cache.sqlite: it is not a SQLite database*--llmgate-no-cache*")
    assert cache.read_bytes() == b"not a database " * 100  # the user's file is left as it was


def test_cache_path_is_a_folder(project, fault):
    (project.path / "cachedir").mkdir()
    fault(project.run("--stage=mild", "--llmgate-cache=cachedir"), USAGE,
          "*llmgate cache */cachedir: is a folder, not a file*")


# --- nothing (or not everything) checked: never exit 0 -------------------------------------------------------


@pytest.fixture
def with_unit_test(project):
    project.pytester.makepyfile(test_unit="def test_unit():\n    assert True\n")
    return project


def test_k_deselects_every_benchmark_item(with_unit_test, fault):
    result = with_unit_test.run("--stage=mild", "-k", "unit", "--llmgate-report=report.json")
    fault(result, EXIT_UNCHECKED, "*llmgate: INCOMPLETE - no benchmark item ran*nothing was checked*(exit 12)*")
    report = _strict_json(with_unit_test.path / "report.json")
    assert report["verdict"] == "incomplete" and report["complete"] is False and report["exit_code"] == 12


def test_m_deselects_every_benchmark_item(with_unit_test, fault):
    fault(with_unit_test.run("--stage=mild", "-m", "not arc_challenge"), EXIT_UNCHECKED,
          "*INCOMPLETE - no benchmark item ran*")


def test_path_without_benchmark_module(with_unit_test, fault):
    fault(with_unit_test.run("test_unit.py", "--stage=mild"), EXIT_UNCHECKED, "*INCOMPLETE - no benchmark item ran*")


def test_baseline_recording_nothing(with_unit_test, fault):
    fault(with_unit_test.run("test_unit.py", "--stage=baseline"), EXIT_UNCHECKED,
          "*INCOMPLETE - no benchmark item ran*")


def test_with_xdist_nothing_checked(with_unit_test, fault):
    fault(with_unit_test.run("--stage=mild", "-k", "unit", "-n", "2", subprocess=True), EXIT_UNCHECKED,
          "*INCOMPLETE - no benchmark item ran*")


def test_only_benchmark_items_deselected_is_pytest_5(project, fault):
    # Nothing at all ran: pytest's own "no tests" code, which is not a pass either.
    result = project.run("--stage=mild", "-m", "not arc_challenge", "--llmgate-report=report.json")
    fault(result, NO_TESTS, "*INCOMPLETE - no benchmark item ran*")
    assert _strict_json(project.path / "report.json")["complete"] is False


def test_tasks_option_names_a_task_no_module_declares(project, fault):
    fault(project.run("--stage=mild", "--llmgate-tasks=hellaswag"), EXIT_UNCHECKED,
          "*hellaswag not checked: no item ran, but --llmgate-tasks needs it*")


def test_configured_task_without_a_module(project, fault):
    _edit(project, 'tasks = ["arc_challenge"]', 'tasks = ["arc_challenge", "hellaswag"]')
    result = project.run("--stage=mild", "--llmgate-report=report.json")
    fault(result, EXIT_UNCHECKED, "*hellaswag not checked: no item ran, but [[]tool.llmgate[]].tasks needs it*",
          "*llmgate: INCOMPLETE - hellaswag not checked*(exit 12)*")
    report = _strict_json(project.path / "report.json")
    assert report["gate_verdict"] == "pass" and report["verdict"] == "incomplete"
    assert report["unchecked"] and "hellaswag" in report["unchecked"][0]


def test_critical_rule_on_a_task_that_did_not_run(project, fault):
    (project.path / "pyproject.toml").write_text((project.path / "pyproject.toml").read_text() + (
        '\n[[tool.llmgate.critical]]\nrule = "combined_drop"\ntasks = ["mmlu", "gsm8k"]\nmax_drop = 0.2\n'))
    fault(project.run("--stage=mild"), EXIT_UNCHECKED,
          "*mmlu not checked: no item ran, but the rule 'critical: combined drop of mmlu + gsm8k above 20%' needs it*")


def test_collect_only_is_not_a_gate_run(project, fault):
    fault(project.run("--stage=mild", "--collect-only", "-q"), 0)


def test_every_item_erroring_is_not_a_pass(project, fault):
    project.weights("good", skill=0.9, seed=1, fail_on="Synthetic question")
    result = project.run("--stage=mild", "--llmgate-report=report.json")
    fault(result, HARNESS, "*INCOMPLETE - 20 item(s) hit harness errors (and 2 more); nothing was checked*")
    report = _strict_json(project.path / "report.json")
    assert report["verdict"] == "incomplete" and report["complete"] is False and report["harness_errors"] == 20


def test_model_that_cannot_load(project, fault):
    (project.path / "weights" / "good.json").write_text("{not json")
    result = project.run("--stage=mild", "--llmgate-report=report.json")
    fault(result, HARNESS, "*model 'good' could not be loaded: JSONDecodeError*",
          "*INCOMPLETE - 20 item(s) hit harness errors*")
    report = _strict_json(project.path / "report.json")
    assert report["verdict"] == "incomplete" and report["harness_errors"] == 20
    # The baseline was evaluated before the candidate failed to load: it is in the cache.
    again = project.run("--stage=baseline", "--llmgate-report=report.json")
    assert again.ret == 0 and _strict_json(project.path / "report.json")["models"]["baseline"]["cached"] == 20


# --- reports ---------------------------------------------------------------------------------------------------


def test_small_run_report_is_valid_json(pytester, monkeypatch, fault):
    # A baseline right on few of 4 items: its retention interval is unbounded above (the bootstrap of
    # earlier versions made that Infinity, which is not JSON, and lost the report).
    small = make_project(pytester, monkeypatch, items=4, base_skill=0.3, good_skill=1.0)
    result = small.run("--stage=mild", "--llmgate-report=report.json")
    fault(result, 0, "*llmgate: stage 'mild' PASS (exit 0)*")
    report = _strict_json(small.path / "report.json")
    task = report["tasks"]["arc_challenge"]
    assert task["n"] == 4 and report["complete"] is True
    lo, hi = task["retention_ci"]
    assert lo is not None and lo <= task["retention"] and (hi is None or hi >= task["retention"])
    assert (hi is None) == ("unbounded" in (task["retention_ci_note"] or ""))


def test_report_that_cannot_be_written_at_the_end(project, fault):
    # The report's path turns into a folder while the run goes on (another job, a race): the verdict stands.
    project.pytester.makeconftest(
        "import os\n"
        "def pytest_runtest_call(item):\n"
        "    os.makedirs('late-report.json', exist_ok=True)\n")
    result = project.run("--stage=mild", "--llmgate-report=late-report.json")
    fault(result, 0,
          "*llmgate: could not write the JSON report to */late-report.json: *the verdict above stands (exit 0)*",
          "*llmgate: stage 'mild' PASS (exit 0)*")
    assert not list(project.path.glob("*.tmp"))


def test_interrupted_run_is_not_complete_and_keeps_finished_shards(project, fault, monkeypatch):
    monkeypatch.setenv(INTERRUPT_ENV, "good:Synthetic question 13?")
    result = project.run("--stage=mild", "--llmgate-report=report.json", subprocess=True)
    fault(result, COLLECTION, "*INCOMPLETE - the run was stopped before every selected item ran*")
    report = _strict_json(project.path / "report.json")
    assert report["complete"] is False and report["verdict"] == "incomplete"
    assert len(report["items"]) == 12  # shards 0-2 finished before the interrupt in shard 3
    monkeypatch.delenv(INTERRUPT_ENV)
    rerun = project.run("--stage=mild", "--llmgate-report=report.json")
    assert rerun.ret == 0
    # Every shard that finished is in the cache: the baseline of shards 0-3 (its half of shard 3 ran before
    # the candidate's was interrupted) and the candidate of shards 0-2; only the rest is evaluated now.
    models = project.report()["models"]
    assert models["baseline"]["evaluated"] == 4 and models["mild"]["evaluated"] == 8


def test_maxfail_stop_is_not_complete(project, fault):
    project.weights("good", skill=0.97, seed=1, fail_on="Synthetic question 5?")
    result = project.run("--stage=mild", "-x", "--llmgate-report=report.json")
    fault(result, HARNESS, "*INCOMPLETE - 1 item(s) hit harness errors*")
    report = _strict_json(project.path / "report.json")
    assert report["complete"] is False
    assert any("stopped before every selected item ran" in p for p in report["problems"])


def test_backend_returning_nan(project, fault):
    project.weights("good", skill=0.97, seed=1, nan_on="Synthetic question 6?")
    result = project.run("--stage=mild", "--llmgate-report=report.json")
    fault(result, HARNESS, "*backend returned the log-likelihood nan*try dtype = 'float32'*")
    report = _strict_json(project.path / "report.json")
    assert len(report["items"]) == 19 and report["harness_errors"] == 1


# --- the result cache --------------------------------------------------------------------------------------------


@pytest.fixture
def immutable():
    """chattr +i a file (even root cannot write it), undone at teardown."""
    if shutil.which("chattr") is None:
        pytest.fail("chattr (e2fsprogs) is needed for the read-only cache test")
    made: list[Path] = []

    def make(path: Path) -> None:
        subprocess.run(["chattr", "+i", str(path)], check=True)
        made.append(path)

    yield make
    for path in made:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def test_read_only_cache_is_read_and_the_run_says_nothing_new_is_stored(project, fault, immutable):
    assert project.run("--stage=baseline").ret == 0
    cache = project.path / ".llmgate" / "cache.sqlite"
    assert project.run("--stage=baseline").ret == 0  # checkpoint the WAL into the file
    immutable(cache)
    result = project.run("--stage=mild", "--llmgate-report=report.json")
    fault(result, 0, "*llmgate cache */cache.sqlite is read-only: results are read from it, but this run's results "
                     "are not stored*", "*llmgate: stage 'mild' PASS (exit 0)*")
    report = _strict_json(project.path / "report.json")
    assert report["models"]["baseline"]["cached"] == 20 and report["models"]["mild"]["evaluated"] == 20
    assert report["models"]["mild"]["stored"] == 0 and report["cache_notes"]


def test_cache_deleted_during_the_run(project, fault):
    project.pytester.makeconftest(
        "import os\n"
        "def pytest_runtest_setup(item):\n"
        "    if item.name == 'test_arc[test-9]':\n"
        "        os.remove('.llmgate/cache.sqlite')\n")
    result = project.run("--stage=baseline", "--llmgate-report=report.json")
    fault(result, 0, "*llmgate cache */cache.sqlite was deleted or replaced during the run*",
          "*baseline evaluated: 20 items, but the cache had trouble (see above)*")
    (project.path / "conftest.py").unlink()
    again = project.run("--stage=baseline", "--llmgate-report=report.json")
    assert again.ret == 0
    # Shards 3 and 4 (items 12-19) went to the new file; the rest was lost with the deleted one and said so.
    assert project.report()["models"]["baseline"] == {**project.report()["models"]["baseline"],
                                                       "cached": 8, "evaluated": 12}


# --- crashed workers ---------------------------------------------------------------------------------------------


def test_killed_xdist_worker_is_explained(pytester, monkeypatch, tmp_path, fault):
    project = make_project(pytester, monkeypatch, items=40, good_skill=0.8)
    monkeypatch.setenv(CRASH_ENV, f"good:40:{tmp_path / 'crashed'}")
    result = project.run("--stage=mild", "-n", "2", "--llmgate-report=report.json", subprocess=True)
    fault(result, HARNESS, "*an xdist worker died while running test_bench.py::test_arc*pytest counts that item as "
                           "failed*", "*llmgate: INCOMPLETE - an xdist worker died while running*(exit 1)*")
    report = _strict_json(project.path / "report.json")
    assert report["complete"] is False and report["verdict"] == "incomplete"


# --- data ------------------------------------------------------------------------------------------------------


def _data(project) -> Path:
    return project.path / "data" / "arc_challenge" / "test.jsonl"


def test_data_not_utf8(project, fault):
    lines = _data(project).read_bytes().splitlines()
    lines[2] = lines[2].replace(b"Synthetic", b"Synth\xe9tic")
    _data(project).write_bytes(b"\n".join(lines) + b"\n")
    fault(project.run("--stage=mild"), COLLECTION, "*test.jsonl:3: not UTF-8 (byte 0xe9 at column *re-encode the file*",
          "*llmgate: INCOMPLETE - 1 module(s) failed to collect*nothing was checked*(exit 2)*")


def test_data_line_not_json(project, fault):
    with _data(project).open("a") as handle:
        handle.write("{broken\n")
    fault(project.run("--stage=mild"), COLLECTION, "*test.jsonl:21: not valid JSON*fix or remove the line*")


def test_data_file_empty(project, fault):
    _data(project).write_text("")
    fault(project.run("--stage=mild"), COLLECTION, "*test.jsonl: the split is empty*")


def test_data_parquet_garbage(project, fault):
    _data(project).unlink()
    (_data(project).parent / "test.parquet").write_bytes(b"PAR1 garbage")
    fault(project.run("--stage=mild"), COLLECTION, "*test.parquet: not a readable Parquet file*")


def test_data_row_missing_its_answer(project, fault):
    lines = _data(project).read_text().splitlines()
    row = json.loads(lines[4])
    del row["answerKey"]
    lines[4] = json.dumps(row)
    _data(project).write_text("\n".join(lines) + "\n")
    result = project.run("--stage=mild", "--llmgate-report=report.json")
    fault(result, HARNESS, "*INCOMPLETE - 1 item(s) hit harness errors*")
    assert len(_strict_json(project.path / "report.json")["items"]) == 19


def test_critical_and_breach_still_decide_when_everything_ran(project, fault):
    # The control case: the same project, nothing wrong, and a model that fails a critical rule.
    project.weights("bad", skill=0.3, seed=1)
    fault(project.run("--stage=harsh"), EXIT_CRITICAL, "*llmgate: stage 'harsh' CRITICAL (exit 11)*")


def test_benchmark_module_that_names_no_task(project, fault):
    project.pytester.makepyfile(test_bench=BENCHMARK.replace('llmgate("arc_challenge")', "llmgate"))
    fault(project.run("--stage=mild"), COLLECTION, "*@pytest.mark.llmgate needs a task name*")
