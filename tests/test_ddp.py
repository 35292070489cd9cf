"""train.devices > 1: DDP over 2 CPU processes (gloo) matches one process training the same samples.

2 ranks x batch_size 1 and 1 process x batch_size 2 train the same examples per step with the same noise
(each sample's noise is keyed by its position in the epoch, not by rank), and DDP averages the two ranks'
gradients, which is the gradient of the one-process mean loss. Only the summation order differs (float noise).
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from conftest import REPO, cli_env, draw_subject, run_cli, spawn_cli, tiny_manifest

UNET = "model/unet/diffusion_pytorch_model.safetensors"


def _manifest(tmp_path: Path, name: str, devices: int, batch_size: int) -> Path:
    return tiny_manifest(tmp_path / f"{name}.yaml", f"out-{name}", [
        {"id": "rex", "token": "sks", "class_noun": "dog", "images": "imgs/rex/",
         "train": {"devices": devices, "batch_size": batch_size, "max_steps": 4, "checkpoint_every": 2}},
    ])


def _unet(path: Path):
    from safetensors.torch import load_file

    return load_file(str(path))


def test_two_cpu_ranks_match_one_process(tmp_path: Path, work_env):
    draw_subject(tmp_path / "imgs" / "rex", n=2)  # 2 instance x 2 prior images: one step is one epoch
    ddp = run_cli("run", str(_manifest(tmp_path, "ddp", devices=2, batch_size=1)), env=work_env)
    assert ddp.returncode == 0, ddp.stderr
    one = run_cli("run", str(_manifest(tmp_path, "one", devices=1, batch_size=2)), env=work_env)
    assert one.returncode == 0, one.stderr

    m_ddp = json.loads((tmp_path / "out-ddp" / "rex" / "metrics.json").read_text())
    m_one = json.loads((tmp_path / "out-one" / "rex" / "metrics.json").read_text())
    assert m_ddp["steps"] == m_one["steps"] == 4
    assert len(m_ddp["checkpoint_seconds"]) == 1  # rank 0 stored step 2 (step 4 is the end: no checkpoint)
    for a, b in zip(m_ddp["loss_curve"], m_one["loss_curve"]):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(b)), (m_ddp["loss_curve"], m_one["loss_curve"])

    import torch

    from dbbatch.models.builtin import build_builtin

    base = build_builtin("tiny-sd")["unet"].state_dict()
    w_ddp, w_one = _unet(tmp_path / "out-ddp" / "rex" / UNET), _unet(tmp_path / "out-one" / "rex" / UNET)
    diff = torch.cat([(w_ddp[k] - w_one[k]).flatten() for k in w_one]).abs()
    moved = torch.cat([(w_one[k] - base[k]).flatten() for k in w_one]).abs()
    print(f"|ddp - one|: max {diff.max():.3g}, mean {diff.mean():.3g}, > 1e-6: {(diff > 1e-6).float().mean():.2%}; "
          f"|one - base|: max {moved.max():.3g}, mean {moved.mean():.3g}")
    # AdamW divides each gradient element by its own running RMS, so an element whose gradient is ~0 moves by up
    # to ~lr per step either way: float-rounding noise there (the all-reduce sums in another order) shows as a
    # difference below lr (1e-4), in a small fraction of the elements; training moved weights ~4 x lr.
    assert diff.max() < 1e-4 and (diff > 1e-6).float().mean() < 0.01
    assert moved.mean() > 100 * diff.mean()


def test_sigterm_during_ddp_training_stores_checkpoint_and_exits_143(tmp_path: Path):
    draw_subject(tmp_path / "imgs" / "rex", n=2)
    marker = tmp_path / "paused"
    env = cli_env(DBBATCH_WORK_DIR=str(tmp_path / "work"), DBBATCH_FAULTS="pause_at_step=2",
                  DBBATCH_FAULT_MARKER=str(marker))
    m = _manifest(tmp_path, "ddp", devices=2, batch_size=1)
    proc = spawn_cli("run", str(m), env=env, cwd=REPO)
    deadline = time.monotonic() + 120
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert marker.exists(), proc.communicate()[1]
    os.kill(proc.pid, signal.SIGTERM)  # the main process only, as the kubelet signals PID 1
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    ckpts = sorted(p.name for p in (tmp_path / "out-ddp" / "rex" / "checkpoints").glob("*.ckpt"))
    # the paused step (3) finishes on both ranks, then they agree to stop and rank 0 stores it (step 2 pruned)
    assert ckpts == ["step-0000003.ckpt"], (ckpts, err)
    assert "checkpoint at step 3 stored" in err


def test_ddp_ranks_stop_when_the_subject_lease_is_lost(tmp_path: Path):
    """The ranks cannot hold the lease (the main process renews it): when it is taken over while they train,
    the main process sees it and every rank stops at the next step boundary, writing nothing more: no checkpoint
    after the loss (before the fence, rank 0 went on storing them, and the ranks trained to the end)."""
    draw_subject(tmp_path / "imgs" / "rex", n=2)
    marker = tmp_path / "paused"
    env = cli_env(DBBATCH_WORK_DIR=str(tmp_path / "work"), DBBATCH_FAULTS="pause_at_step=3",
                  DBBATCH_FAULT_MARKER=str(marker), DBBATCH_LEASE_SECONDS="6")
    m = tiny_manifest(tmp_path / "fenced.yaml", "out-fenced", [
        {"id": "rex", "token": "sks", "class_noun": "dog", "images": "imgs/rex/",
         "train": {"devices": 2, "batch_size": 1, "max_steps": 12, "checkpoint_every": 2}}])
    proc = spawn_cli("run", str(m), env=env, cwd=REPO)
    deadline = time.monotonic() + 120
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert marker.exists(), proc.communicate()[1]
    leases = tmp_path / "out-fenced" / "_leases" / "rex"
    (held,) = sorted(leases.glob("*.json"))
    doc = json.loads(held.read_text())
    taker = {**doc, "generation": doc["generation"] + 1, "token": "another-worker", "holder": {**doc["holder"], "pid": 1}}
    (leases / f"{doc['generation'] + 1:08d}.json").write_text(json.dumps(taker))  # another worker took it over
    # The holder's renewal (every ttl/3 = 2 s) finds the newer generation, its fence watcher (every 1 s) follows.
    # 7 s is past the 6 s ttl: even with no renewal at all under load, the lease has expired by the holder's clock.
    time.sleep(7)
    Path(f"{marker}.continue").write_text("")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err[-3000:]
    assert "lease lost" in err and "stopping the training processes" in err, err[-3000:]
    ckpts = sorted(p.name for p in (tmp_path / "out-fenced" / "rex" / "checkpoints").glob("*.ckpt"))
    assert ckpts == ["step-0000002.ckpt"], (ckpts, err[-3000:])  # step 4's would have come after the loss
    assert not (tmp_path / "out-fenced" / "rex" / "_SUCCESS").exists()
    report = json.loads(next((tmp_path / "out-fenced" / "_runs").glob("*.json")).read_text())
    assert (report["subjects"][0]["status"], report["subjects"][0]["error_class"]) == ("failed", "LeaseLost")
