"""W&B and MLflow export, for real: W&B in offline mode (its run file read back record by record) and MLflow on a
local SQLite store (read back with its client), from a gate run of the plugin with and without xdist."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path
from typing import Any

import pytest
from gateproject import BASE_CONFIG, make_project

from pytest_llmgate.report import trackers

# MLflow's store on SQLAlchemy 2.1 warns about its own use of a deprecated loader when the test reads it back.
pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated:DeprecationWarning")

wandb = pytest.importorskip("wandb")
mlflow = pytest.importorskip("mlflow")


@pytest.fixture
def project(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return make_project(pytester, monkeypatch)


# --- W&B's offline run file: a LevelDB-style log of protobuf records (32 KiB blocks, 7-byte headers) -------------

BLOCK = 32768
HEADER = 7  # crc32 (4), length (2), type (1); the file starts with ":W&B", magic (2), version (1)
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def wandb_records(path: Path) -> list[Any]:
    """Every record of a ``run-*.wandb`` file, parsed with W&B's own protobuf classes; checksums verified."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", "not a W&B run file"
    seeds = {kind: zlib.crc32(bytes([kind])) for kind in (FULL, FIRST, MIDDLE, LAST)}
    records, pending, at = [], b"", HEADER
    while at + HEADER <= len(data):
        if BLOCK - at % BLOCK < HEADER:  # the tail of a block too short for a header is zero padding
            at += BLOCK - at % BLOCK
            continue
        checksum, length, kind = struct.unpack("<IHB", data[at : at + HEADER])
        if length == 0 and kind == 0:
            break
        chunk = data[at + HEADER : at + HEADER + length]
        assert zlib.crc32(chunk, seeds[kind]) & 0xFFFFFFFF == checksum, "corrupt record"
        at += HEADER + length
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def _put(into: dict[str, Any], item: Any) -> None:
    """One record item into ``into``: a media value comes as nested keys (``[name, "path"]``), rebuilt as a dict."""
    keys = [item.key] if item.key else list(item.nested_key)
    for key in keys[:-1]:
        into = into.setdefault(key, {})
    into[keys[-1]] = json.loads(item.value_json)


def read_wandb_run(folder: Path) -> tuple[dict[str, Any], dict[str, Any], Path]:
    """(logged history values, config, run folder) of the one offline run under ``folder``."""
    runs = sorted(folder.glob("wandb/offline-run-*"))
    assert len(runs) == 1, runs
    (run_file,) = runs[0].glob("run-*.wandb")
    history: dict[str, Any] = {}
    config: dict[str, Any] = {}
    for record in wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            for item in record.history.item:
                _put(history, item)
        elif kind in ("run", "config"):  # the config given to wandb.init rides on the run record
            update = record.run.config.update if kind == "run" else record.config.update
            for item in update:
                _put(config, item)
    return history, config, runs[0]


def test_wandb_offline_run_holds_every_figure_the_table_and_the_chart(project):
    project.config(BASE_CONFIG + '\n[tool.llmgate.wandb]\nproject = "gate"\nmode = "offline"\ndir = "wb"\n')
    result = project.run("--stage=all", "--llmgate-report=r.json", "--llmgate-no-speed")
    assert result.ret == 0, result.stdout.str()
    result.stdout.fnmatch_lines(["llmgate wandb: offline run in *wb/wandb/offline-run-*"])
    report = project.report("r.json")
    history, config, run = read_wandb_run(project.path / "wb")

    for stage in ("mild", "harsh"):
        entry = report["stages"][stage]["tasks"]["arc_challenge"]
        assert history[f"{stage}/arc_challenge"] == pytest.approx(entry["candidate"]["score"])
        assert history[f"{stage}/retention/arc_challenge"] == pytest.approx(entry["retention"])
        assert history[f"{stage}/wins/arc_challenge"] == entry["wins"]
        # A backend of one's own has no size on disk: unknown figures are left out, not logged as 0
        # (sizes of real GGUF models: test_llama_cpp.py's ladder logs them to MLflow).
        assert report["models"][stage]["size_bytes"] is None and f"{stage}/model_size_mb" not in history
    assert history["mild/overall_passed"] == 1.0 and history["harsh/overall_passed"] == 0.0
    assert history["baseline/arc_challenge"] == pytest.approx(report["tasks"]["arc_challenge"]["baseline"]["score"])
    assert config["stage"] == "all" and config["selected_stage"] == "mild"
    assert config["exit_code"] == str(report["exit_code"]) and config["model/mild"] == "good"

    # The comparison table and the chart are media files the run points at.
    table_ref = history[trackers.TABLE_KEY]
    table = json.loads((run / "files" / table_ref["path"]).read_text())
    columns, rows = trackers.comparison_table(report)
    assert table["columns"] == columns and table["data"] == json.loads(json.dumps(rows))
    chart = run / "files" / history[trackers.CHART_KEY]["path"]
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and chart.stat().st_size > 5000


def _mlflow_runs(uri: str, experiment: str) -> list[Any]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no experiment {experiment!r} in {uri}"
    return client.search_runs([found.experiment_id])


@pytest.mark.parametrize("workers", [None, "2"])
def test_mlflow_local_store_holds_every_figure_the_table_and_the_chart(project, workers):
    uri = f"sqlite:///{project.path / 'mlflow.db'}"
    project.config(BASE_CONFIG + f'\n[tool.llmgate.mlflow]\ntracking_uri = "{uri}"\nexperiment = "gate"\n'
                   'run_name = "nightly"\ntags = {team = "compression"}\n')  # fmt: skip
    args = ["--stage=all", "--llmgate-report=r.json", "--llmgate-no-speed", *(["-n", workers] if workers else [])]
    result = project.run(*args, subprocess=bool(workers))  # xdist workers import the double backend from PYTHONPATH
    assert result.ret == 0, result.stdout.str()
    result.stdout.fnmatch_lines(["llmgate mlflow: run * in experiment 'gate' at sqlite:*"])
    report = project.report("r.json")

    runs = _mlflow_runs(uri, "gate")
    assert len(runs) == 1, "the controller logs one run; xdist workers log nothing"
    run = runs[0]
    assert run.info.run_name == "nightly" and run.info.status == "FINISHED"
    assert run.data.tags["team"] == "compression" and run.data.tags["llmgate.verdict"] == report["verdict"]
    assert run.data.metrics == pytest.approx(trackers.tracker_metrics(report))
    assert run.data.metrics["mild/retention/arc_challenge"] == pytest.approx(
        report["stages"]["mild"]["tasks"]["arc_challenge"]["retention"]
    )
    assert run.data.metrics["harsh/overall_passed"] == 0.0
    assert run.data.params["selected_stage"] == "mild" and run.data.params["model/mild"] == "good"

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "llmgate")}
    assert artifacts == {f"{trackers.TABLE_KEY}.json", f"{trackers.CHART_KEY}.png", "llmgate/summary.md"}
    table = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/{trackers.TABLE_KEY}.json")
    assert table["columns"][:4] == ["task", "metric", "n", "baseline"]
    assert table["data"][0][0] == "arc_challenge"
    assert table["columns"][-4] == "retention (mild)"


def test_the_flag_switches_a_tracker_on_with_its_defaults(project, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project.path / 'env.db'}")
    result = project.run("--stage=mild", "--llmgate-no-speed", "--llmgate-mlflow")
    assert result.ret == 0, result.stdout.str()
    (run,) = _mlflow_runs(f"sqlite:///{project.path / 'env.db'}", "llmgate")
    assert run.info.run_name.startswith("llmgate-mild-")
    assert "mild/arc_challenge" in run.data.metrics


def test_a_tracker_that_fails_is_named_and_the_verdict_stands(project):
    # MLflow 3 refuses a plain folder as its store (the file store is in maintenance mode) and says why.
    project.config(BASE_CONFIG + '\n[tool.llmgate.mlflow]\ntracking_uri = "mlruns"\n')
    result = project.run("--stage=mild", "--llmgate-report=r.json", "--llmgate-no-speed")
    assert result.ret == 0, result.stdout.str()
    result.stdout.fnmatch_lines(["llmgate: could not log to mlflow: MlflowException: *sqlite:///mlflow.db*"])
    assert project.report("r.json")["verdict"] == "pass"


def test_a_tracker_without_its_package_is_a_usage_error_before_evaluating(project, monkeypatch):
    monkeypatch.setitem(trackers.EXTRAS, "wandb", "wandb_is_not_installed_here")
    result = project.run("--stage=mild", "--llmgate-wandb")
    assert result.ret == 4
    assert ("[tool.llmgate.wandb] is on but the wandb_is_not_installed_here package is not installed; pip install "
            "'pytest-llmgate[wandb]', or set enabled = false in that table") in result.stderr.str()  # fmt: skip
    result.stdout.no_fnmatch_line("*passed*")


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('mode = "sometimes"', "[tool.llmgate.wandb].mode: expected one of online, offline, disabled, got 'sometimes'"),
        ("projekt = 'x'", "[tool.llmgate.wandb].projekt: unknown key; did you mean 'project'?"),
        ("enabled = 'yes'", "[tool.llmgate.wandb].enabled: expected true or false, got 'yes'"),
    ],
)
def test_bad_tracker_settings_are_usage_errors(project, table, message):
    project.config(BASE_CONFIG + f"\n[tool.llmgate.wandb]\n{table}\n")
    result = project.run("--stage=mild")
    assert result.ret == 4
    assert message in result.stderr.str()


def test_a_disabled_tracker_logs_nothing(project):
    project.config(BASE_CONFIG + '\n[tool.llmgate.wandb]\nenabled = false\nmode = "offline"\ndir = "wb"\n')
    result = project.run("--stage=mild", "--llmgate-no-speed")
    assert result.ret == 0
    assert not (project.path / "wb").exists()
    result.stdout.no_fnmatch_line("llmgate wandb*")
