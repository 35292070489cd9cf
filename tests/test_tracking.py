"""Experiment tracking for real, without a network: W&B in offline mode (its run files read back), MLflow with
its local SQLite store and with a local `mlflow server` on 127.0.0.1; a service that is down; a SIGKILLed
subject that continues its runs; credentials that never reach a file."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import cli_env, draw_subject, free_port, run_cli, start_at_fault, tiny_manifest
from tracking_files import mlflow_series, series, tensorboard_scalars, wandb_runs

pytestmark = pytest.mark.slow
WANDB_SECRET, MLFLOW_SECRET = "wandb-key-7f3c91d2e8", "mlflow-pass-c0ffee42"
EVAL = {"clip": "builtin:toy-clip", "dino": "builtin:toy-clip", "every": 3, "seeds": [0]}


def _manifest(tmp: Path, subjects: list[dict], tracking: dict, **extra) -> Path:
    return tiny_manifest(tmp / "m.yaml", str(tmp / "out"), subjects, tracking=tracking, **extra)


def _env(tmp: Path, **extra: str) -> dict[str, str]:
    return cli_env(DBBATCH_WORK_DIR=str(tmp / "work"), WANDB_API_KEY=WANDB_SECRET, MLFLOW_TRACKING_USERNAME="ci",
                   MLFLOW_TRACKING_PASSWORD=MLFLOW_SECRET, **extra)


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _ids(out: Path, sid: str) -> dict:
    return json.loads((out / sid / "_tracking.json").read_text())


def _metrics(out: Path, sid: str) -> dict:
    return json.loads((out / sid / "metrics.json").read_text())


def _secret_files(root: Path) -> list[str]:
    hits = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            hits += [f"{path}: {s}" for s in (WANDB_SECRET, MLFLOW_SECRET) if s.encode() in data]
    return hits


def test_wandb_offline_and_mlflow_store_track_each_subject(tmp_path: Path):
    """A solo subject and two packed ones: each its own W&B and MLflow run with its settings, its own loss per
    step (a packed member's is its own, not its cohort's), the evaluation points, the grid and the output."""
    photos = [draw_subject(tmp_path / n, color=c) for n, c in (("rex", (220, 30, 30)), ("a", (30, 30, 220)), ("b", (30, 200, 30)))]
    m = _manifest(tmp_path, [
        {"id": "rex", "token": "sks", "class_noun": "dog", "images": str(photos[0]), "evaluation": EVAL},
        {"id": "a", "token": "sks", "class_noun": "cat", "images": str(photos[1]), "train": {"method": "lora"}},
        {"id": "b", "token": "zwx", "class_noun": "cat", "images": str(photos[2]), "train": {"method": "lora"}},
    ], {"wandb": {"project": "avatars", "mode": "offline", "tags": ["nightly"], "dir": str(tmp_path / "wandb")},
        "mlflow": {"experiment": "avatars"}}, packing={"subjects_per_step": 2})
    proc = run_cli("run", str(m), env=_env(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tracking." not in proc.stderr  # no service failed
    out = tmp_path / "out"
    client = _client(f"sqlite:///{out / '_mlflow' / 'mlflow.db'}")
    curves = {}
    for sid in ("rex", "a", "b"):
        metrics, ids = _metrics(out, sid), _ids(out, sid)
        batch = metrics["run_id"]
        curves[sid] = metrics["loss_curve"]
        # W&B: the offline run file, read back
        (run,) = wandb_runs(tmp_path / "wandb", ids["wandb"]["id"])
        assert (run["name"], run["group"]) == (sid, batch)
        assert {"nightly", f"batch:{batch}"} <= set(run["tags"])
        assert run["config"]["subject"]["train"]["max_steps"] == 6 and run["config"]["subject"]["id"] == sid
        loss = series(run["history"], "loss")
        assert len(loss) == 6 and list(loss.values()) == pytest.approx(curves[sid], rel=1e-5)
        assert len(series(run["history"], "lr")) == 6
        assert run["summary"]["output"] == str(out / sid) and run["exit_code"] == 0
        assert any("samples/grid" in k for row in run["history"] for k in row)
        # MLflow: the run in the local store beside the output
        r = client.get_run(ids["mlflow"]["run_id"])
        assert (r.info.run_name, r.info.status, r.data.tags["dbbatch.batch_run_id"]) == (sid, "FINISHED", batch)
        assert r.data.params["subject.train.method"] == ("full" if sid == "rex" else "lora")
        assert list(mlflow_series(client, r.info.run_id, "loss").values()) == pytest.approx(curves[sid], rel=1e-5)
        assert r.data.tags["dbbatch.output"] == str(out / sid)
        assert [a.path for a in client.list_artifacts(r.info.run_id, "samples")] == ["samples/grid.png"]
        assert (out / sid / "logs").is_dir()  # the TensorBoard log is still written and uploaded
    assert curves["a"] != curves["b"]  # the routing above is tested: the two members' curves differ
    points = _metrics(out, "rex")["evaluation"]["points"]
    (run,) = wandb_runs(tmp_path / "wandb", _ids(out, "rex")["wandb"]["id"])
    dino = series(run["history"], "eval/dino")
    assert {p["step"]: p["dino"] for p in points}.items() <= dino.items() and 0 in dino  # the base model at step 0
    assert mlflow_series(client, _ids(out, "rex")["mlflow"]["run_id"], "eval/dino") == pytest.approx(dino)
    assert len(client.search_runs([client.get_experiment_by_name("avatars").experiment_id])) == 3
    assert _secret_files(tmp_path) == []


def test_killed_subject_continues_its_runs(tmp_path: Path):
    """SIGKILL mid-training, rerun: the same W&B run and MLflow run go on (their ids are in the subject's stored
    state), and MLflow's loss covers every step. --force (the stored state removed) starts new runs: the control."""
    m = _manifest(tmp_path, [{"id": "rex", "token": "sks", "class_noun": "dog", "images": str(draw_subject(tmp_path / "p"))}],
                  {"wandb": {"project": "avatars", "mode": "offline", "dir": str(tmp_path / "wandb")},
                   "mlflow": {"experiment": "avatars"}})
    env = _env(tmp_path)
    proc, _ = start_at_fault(m, tmp_path / "work", "pause_at_step=4")
    ids = _ids(tmp_path / "out", "rex")  # written when the runs started, before any checkpoint
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    rerun = run_cli("run", str(m), env=env)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming from" in rerun.stderr
    out = tmp_path / "out"
    assert _ids(out, "rex") == ids
    attempts = wandb_runs(tmp_path / "wandb", ids["wandb"]["id"])
    # one offline run folder per attempt, both of the same run (`wandb sync` merges them); the killed attempt's
    # file may end anywhere, the second one is whole and has the steps after the checkpoint (3)
    assert len(attempts) == 2 and attempts[-1]["id"] == ids["wandb"]["id"] and attempts[-1]["exit_code"] == 0
    assert {4, 5, 6} <= set(series(attempts[-1]["history"], "loss")) or len(series(attempts[-1]["history"], "loss")) == 3
    client = _client(f"sqlite:///{out / '_mlflow' / 'mlflow.db'}")
    run = client.get_run(ids["mlflow"]["run_id"])
    assert run.info.status == "FINISHED" and "dbbatch.resumed_by" in run.data.tags
    assert len(mlflow_series(client, run.info.run_id, "loss")) == 6
    assert len(client.search_runs([run.info.experiment_id])) == 1
    forced = run_cli("run", str(m), "--force", env=env)
    assert forced.returncode == 0, forced.stderr[-3000:]
    new = _ids(out, "rex")
    assert new["wandb"]["id"] != ids["wandb"]["id"] and new["mlflow"]["run_id"] != ids["mlflow"]["run_id"]
    assert len(client.search_runs([run.info.experiment_id])) == 2


@pytest.fixture
def mlflow_server(tmp_path: Path):
    """`mlflow server` on 127.0.0.1 with its own SQLite store and artifact folder, stopped after the test."""
    import urllib.request

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                             "--artifacts-destination", str(tmp_path / "server-artifacts"), "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tmp_path)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        try:
            if urllib.request.urlopen(f"{url}/health", timeout=2).status == 200:
                break
        except OSError:
            pass
        assert time.monotonic() < deadline, "mlflow server did not start"
        time.sleep(0.5)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def test_mlflow_server_on_loopback(tmp_path: Path, mlflow_server: str):
    """A server on 127.0.0.1. The subject's stored state names a run this server does not have (it was tracked
    elsewhere): a new run starts here, with a line saying so."""
    m = _manifest(tmp_path, [{"id": "rex", "token": "sks", "class_noun": "dog", "images": str(draw_subject(tmp_path / "p")),
                              "train": {"method": "lora"}}],
                  {"mlflow": {"experiment": "avatars", "tracking_uri": mlflow_server}})
    (tmp_path / "out" / "rex").mkdir(parents=True)
    (tmp_path / "out" / "rex" / "_tracking.json").write_text(json.dumps({"mlflow": {"run_id": "0" * 32, "experiment_id": "7"}}))
    proc = run_cli("run", str(m), env=_env(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"rex: MLflow run {'0' * 32} is not in {mlflow_server}; starting a new run" in proc.stderr
    client = _client(mlflow_server)
    run = client.get_run(_ids(tmp_path / "out", "rex")["mlflow"]["run_id"])
    assert run.info.run_id != "0" * 32
    assert (run.info.run_name, run.info.status) == ("rex", "FINISHED")
    assert list(mlflow_series(client, run.info.run_id, "loss").values()) == pytest.approx(_metrics(tmp_path / "out", "rex")["loss_curve"], rel=1e-5)
    assert [a.path for a in client.list_artifacts(run.info.run_id, "samples")] == ["samples/grid.png"]
    assert not (tmp_path / "out" / "_mlflow").exists()  # a server given: no local store
    assert _secret_files(tmp_path / "out") == []


def test_a_tracking_service_that_is_down_never_fails_a_subject(tmp_path: Path):
    """Nothing listens at the MLflow URI: one warning, the subject succeeds, TensorBoard's log is complete."""
    m = _manifest(tmp_path, [{"id": "rex", "token": "sks", "class_noun": "dog", "images": str(draw_subject(tmp_path / "p")),
                              "train": {"method": "lora"}}],
                  {"mlflow": {"experiment": "avatars", "tracking_uri": f"http://127.0.0.1:{free_port()}"}})
    proc = run_cli("run", str(m), env=_env(tmp_path))  # dbbatch's own MLflow retry settings (tracking.MLFLOW_PATIENCE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [line for line in proc.stderr.splitlines() if "tracking.mlflow failed" in line]
    assert len(warnings) == 1 and "training goes on without it" in warnings[0], proc.stderr[-3000:]
    out = tmp_path / "out" / "rex"
    assert (out / "_SUCCESS").exists() and not (out / "_tracking.json").exists()
    assert len(tensorboard_scalars(out / "logs", "loss")) == 6


def test_validate_names_the_missing_extra(tmp_path: Path):
    m = _manifest(tmp_path, [{"id": "rex", "token": "sks", "class_noun": "dog", "images": str(draw_subject(tmp_path / "p"))}],
                  {"wandb": {"project": "avatars", "mode": "offline"}})
    code = ("import sys; sys.modules['wandb'] = None; from dbbatch.cli import main; "
            f"sys.argv = ['dbbatch', 'validate', {str(m)!r}, '--no-check-remote']; main()")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env())
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if "tracking.wandb" in line]
    assert len(lines) == 1 and "pip install 'dbbatch[wandb]'" in lines[0], proc.stderr
    ok = run_cli("validate", str(m), "--no-check-remote")  # installed here: the same manifest is fine
    assert ok.returncode == 0, ok.stderr
    assert yaml.safe_load(m.read_text())["tracking"]["wandb"]["project"] == "avatars"


def test_ddp_subject_logs_its_loss_curve_when_training_ends(tmp_path: Path):
    """train.devices 2 (two CPU ranks): the ranks do not log to tracking services; the loss curve goes to MLflow
    when training ends, one point per step, with TensorBoard off (no logger in the Trainer at all)."""
    m = _manifest(tmp_path, [{"id": "rex", "token": "sks", "class_noun": "dog", "images": str(draw_subject(tmp_path / "p", n=2)),
                              "train": {"devices": 2, "max_steps": 4, "checkpoint_every": 2}}],
                  {"tensorboard": False, "mlflow": {"experiment": "avatars"}})
    proc = run_cli("run", str(m), env=_env(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "out"
    client = _client(f"sqlite:///{out / '_mlflow' / 'mlflow.db'}")
    run = client.get_run(_ids(out, "rex")["mlflow"]["run_id"])
    loss = mlflow_series(client, run.info.run_id, "loss")
    assert sorted(loss) == [1, 2, 3, 4] and list(loss.values()) == pytest.approx(_metrics(out, "rex")["loss_curve"], rel=1e-5)
    assert run.info.status == "FINISHED" and not (out / "rex" / "logs").exists()
