"""pytest-xdist: whole shards per worker, one model load per worker, same results, crash safety."""

from __future__ import annotations

from collections import Counter, defaultdict

import pytest
from doubles import CRASH_ENV, LOADS_ENV
from gateproject import make_project


@pytest.fixture
def project(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch):
    return make_project(pytester, monkeypatch, items=40, good_skill=0.8)


def _results(side):
    return {k: v for k, v in side.items() if k != "spend"}  # spend: the item's share of this run's time


def _sides(report):
    return {(i["task"], i["doc_id"]): (_results(i["baseline"]), _results(i["candidate"])) for i in report["items"]}


def test_n2_gives_the_same_items_as_no_xdist(project):
    plain = project.run("--stage=mild", "-p", "no:xdist", "--llmgate-no-cache", "--llmgate-report=plain.json")
    assert plain.ret == 0
    dist = project.run("--stage=mild", "-n", "2", "--llmgate-no-cache", "--llmgate-report=dist.json",
                       subprocess=True)
    assert dist.ret == 0, dist.stdout.str()
    plain_report, dist_report = project.report("plain.json"), project.report("dist.json")

    def strip(side):
        return {k: v for k, v in side.items() if k != "cached"}

    assert {k: (strip(b), strip(c)) for k, (b, c) in _sides(plain_report).items()} == \
        {k: (strip(b), strip(c)) for k, (b, c) in _sides(dist_report).items()}
    assert plain_report["tasks"] == dist_report["tasks"]
    assert plain_report["rules"] == dist_report["rules"]
    # Both workers did work, and the outcome counts match on the final line.
    assert set(dist_report["workers"]) == {"gw0", "gw1"}
    assert dist.parseoutcomes() == plain.parseoutcomes()


def test_whole_shards_go_to_one_worker_and_each_model_loads_once_per_worker(project, tmp_path, monkeypatch):
    loads_file = tmp_path / "loads.txt"
    monkeypatch.setenv(LOADS_ENV, str(loads_file))
    result = project.run("--stage=mild", "-n", "2", "--llmgate-report=report.json", subprocess=True)
    assert result.ret == 0, result.stdout.str()
    report = project.report()
    workers_by_shard = defaultdict(set)
    for item in report["items"]:
        workers_by_shard[item["doc_id"] // 4].add(item["worker"])
    assert len(workers_by_shard) == 10 and all(len(w) == 1 for w in workers_by_shard.values())
    assert set().union(*workers_by_shard.values()) == {"gw0", "gw1"}
    loads = Counter(tuple(line.split()) for line in loads_file.read_text().splitlines())
    assert loads and set(loads.values()) == {1}, loads  # (pid, model) pairs: each loaded once
    assert len({pid for pid, _ in loads}) == 2
    assert report["workers"]["gw0"] == {"base": 1, "good": 1}
    assert report["workers"]["gw1"] == {"base": 1, "good": 1}


def test_shard_membership_is_one_worker(project):
    result = project.run("--stage=mild", "-n", "2", "-v", subprocess=True)
    assert result.ret == 0
    worker_of = {}
    for line in result.outlines:
        if line.startswith("[gw") and "test_arc[test-" in line:
            worker = line.split("]")[0][1:]
            doc_id = int(line.split("test_arc[test-")[1].split("]")[0])
            worker_of[doc_id] = worker
    assert len(worker_of) == 40
    for shard in range(10):
        assert len({worker_of[d] for d in range(shard * 4, shard * 4 + 4)}) == 1


def test_a_crashed_worker_loses_no_finished_shard(project, monkeypatch, tmp_path):
    # The first worker to pass 40 candidate requests (its 3rd shard) dies hard, mid-shard.
    monkeypatch.setenv(CRASH_ENV, f"good:40:{tmp_path / 'crashed'}")
    crashed = project.run("--stage=mild", "-n", "2", "--llmgate-report=report.json", subprocess=True)
    assert crashed.ret == 1
    crashed.stdout.fnmatch_lines(["*node down*", "*replacing crashed worker*", "*1 failed*"])
    # The run went on: xdist replaced the worker and re-ran the unfinished shard, so every item
    # still has an outcome (the crash itself stays a failure: exit 1).
    assert len(project.report()["items"]) == 40
    monkeypatch.delenv(CRASH_ENV)
    rerun = project.run("--stage=mild", "--llmgate-report=report.json")
    assert rerun.ret == 0
    models = project.report()["models"]
    # Every shard finished before or after the crash was stored: nothing is evaluated twice.
    assert models["mild"]["evaluated"] == 0 and models["baseline"]["evaluated"] == 0


def test_shard_size_does_not_change_any_item(project):
    small = project.run("--stage=mild", "--llmgate-no-cache", "--llmgate-set", "shard_size=3",
                        "--llmgate-report=small.json")
    large = project.run("--stage=mild", "--llmgate-no-cache", "--llmgate-set", "shard_size=40",
                        "--llmgate-report=large.json")
    assert small.ret == large.ret == 0
    assert _sides(project.report("small.json")) == _sides(project.report("large.json"))


def test_each_xdist_worker_gets_its_own_gpu(monkeypatch):
    import torch

    from pytest_llmgate.models import pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert [pick_device("auto", worker) for worker in (0, 1, 5, None)] == ["cuda:0", "cuda:1", "cuda:1", "cuda:0"]
    assert pick_device("cuda:3", 0) == "cuda:3" and pick_device("cpu", 2) == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto", 1) == "cpu"
