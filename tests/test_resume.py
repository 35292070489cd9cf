"""Preemption safety, for each model family: SIGKILL at a chosen step then rerun == uninterrupted run, bit for
bit; SIGTERM -> 143."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
import torch
from conftest import FAMILY_ARCHS, cli_env, draw_subject, run_cli, spawn_cli, start_at_fault, tiny_manifest
from safetensors.torch import load_file

from dbbatch.models.builtin import BUILTIN_VERSION

STEPS, EVERY = 12, 4


# The text encoders a subject with train_text_encoder trains, per family (SDXL: both, sdxl.train_text_encoder_2;
# train_te "first": SDXL's first alone, the second frozen beside it).
TEXT_ENCODERS = {"sd": ("text_encoder",), "sdxl": ("text_encoder", "text_encoder_2")}


def _encoders(family: str, train_te) -> tuple[str, ...]:
    return TEXT_ENCODERS[family][:1] if train_te == "first" else TEXT_ENCODERS[family] if train_te else ()


def _manifest(tmp: Path, name: str, train_text_encoder=False, every: int = EVERY, family: str = "sd", **train) -> Path:
    if not (tmp / "imgs" / "rex").exists():
        draw_subject(tmp / "imgs" / "rex")  # 3 images: an epoch is 3 steps, so kills land mid-epoch
    defaults = {"resolution": 32,
                "train": {"max_steps": STEPS, "checkpoint_every": every, "learning_rate": 1e-4,
                          "train_text_encoder": bool(train_text_encoder), **train},
                "priors": {"num_images": 2, "steps": 2, "batch_size": 2},
                "samples": {"prompts": ["a photo of {token} {class_noun}"], "seeds": [0], "steps": 2}}
    if family == "sdxl" and train_text_encoder is True:
        defaults["sdxl"] = {"train_text_encoder_2": True}
    return tiny_manifest(tmp / f"{name}.yaml", name, [{"id": "rex", "token": "sks", "class_noun": "dog", "images": "imgs/rex/"}],
                         defaults=defaults, base_model=f"builtin:{FAMILY_ARCHS[family]}")


def _trained(out: Path, component: str = "unet") -> dict[str, torch.Tensor]:
    name = "diffusion_pytorch_model.safetensors" if component == "unet" else "model.safetensors"
    return load_file(str(out / "rex" / "model" / component / name))


def _losses(out: Path) -> list[float]:
    return json.loads((out / "rex" / "metrics.json").read_text())["loss_curve"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Reference runs without interruption, per (train_te, family), each made when a test first asks for it."""
    tmp = tmp_path_factory.mktemp("reference")
    outs: dict[tuple, Path] = {}

    def reference(te, family: str = "sd") -> Path:
        if (te, family) not in outs:
            name = f"ref-{family}-te{te}"
            proc = run_cli("run", str(_manifest(tmp, name, te, family=family)), env=cli_env(DBBATCH_WORK_DIR=str(tmp / f"w-{name}")))
            assert proc.returncode == 0, proc.stderr
            outs[(te, family)] = tmp / name
        return outs[(te, family)]

    return reference


# An epoch is 3 steps (3 instance images): step 4 and 8 checkpoints are mid-epoch, step 6 one is at an epoch's end.
@pytest.mark.parametrize("family,kill_step,every,train_te", [("sd", 5, 4, False), ("sd", 7, 3, False), ("sd", 10, 4, True),
                                                            ("sdxl", 10, 4, True), ("sdxl", 5, 4, "first")])
def test_sigkill_then_rerun_is_bitwise_identical(tmp_path: Path, uninterrupted, family: str, kill_step: int, every: int,
                                                 train_te):
    m = _manifest(tmp_path, "killed", train_te, every=every, family=family)
    proc, _ = start_at_fault(m, tmp_path / "pod1", f"pause_at_step={kill_step}")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    stored = sorted(p.name for p in (tmp_path / "killed" / "rex" / "checkpoints").glob("*.ckpt"))
    last = kill_step // every * every
    assert stored == [f"step-{last:07d}.ckpt"], stored  # checkpoints_keep=1: older ones pruned
    assert not (tmp_path / "killed" / "rex" / "_SUCCESS").exists()

    # a new pod: fresh local work dir, everything comes from the output store
    rerun = run_cli("run", str(m), env=cli_env(DBBATCH_WORK_DIR=str(tmp_path / "pod2")))
    assert rerun.returncode == 0, rerun.stderr
    assert f"resuming from {tmp_path / 'killed' / 'rex' / 'checkpoints' / f'step-{last:07d}.ckpt'}" in rerun.stderr
    assert "generating" not in rerun.stderr  # priors were stored before the kill
    ref, got = uninterrupted(train_te, family), tmp_path / "killed"
    for component in ("unet", *_encoders(family, train_te)):
        a, b = _trained(ref, component), _trained(got, component)
        assert a.keys() == b.keys()
        differing = [k for k in a if not torch.equal(a[k], b[k])]
        assert not differing, f"{len(differing)} {component} tensors differ, e.g. {differing[:3]}"
    cached = tmp_path / "pod2" / "cache" / "models" / f"builtin-{FAMILY_ARCHS[family]}-v{BUILTIN_VERSION}"
    for name in TEXT_ENCODERS[family]:  # the text encoders that train really were trained, the others not at all
        base = load_file(str(cached / name / "model.safetensors"))
        changed = any(not torch.equal(base[k], _trained(got, name)[k]) for k in base)
        assert changed == (name in _encoders(family, train_te)), name
    assert _losses(got) == _losses(ref)
    assert json.loads((got / "rex" / "metrics.json").read_text())["resumed_from_step"] == last


@pytest.mark.parametrize("family", list(FAMILY_ARCHS))
def test_sigterm_stores_a_checkpoint_and_exits_143(tmp_path: Path, uninterrupted, family: str):
    m = _manifest(tmp_path, "termed", family=family)
    proc, _ = start_at_fault(m, tmp_path / "pod1", "pause_at_step=7")
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    took = time.monotonic() - sent
    assert proc.returncode == 143, stderr
    assert "SIGTERM to exit took" in stderr
    assert took < 30
    stored = sorted(p.name for p in (tmp_path / "termed" / "rex" / "checkpoints").glob("*.ckpt"))
    # SIGTERM came during step 8: that step is finished, then checkpointed (the periodic one, step 4, is pruned)
    assert stored == ["step-0000008.ckpt"]
    report = json.loads(next((tmp_path / "termed" / "_runs").glob("*.json")).read_text())
    assert report["preempted"] is True and report["subjects"][0]["status"] == "preempted"

    rerun = run_cli("run", str(m), env=cli_env(DBBATCH_WORK_DIR=str(tmp_path / "pod2")))
    assert rerun.returncode == 0, rerun.stderr
    assert "step-0000008.ckpt" in rerun.stderr
    a, b = _trained(uninterrupted(False, family)), _trained(tmp_path / "termed")
    assert all(torch.equal(a[k], b[k]) for k in a)


# A stop signal that lands while a checkpoint is written or uploaded came between the step-boundary check and
# Lightning's own: Lightning then ended `fit` with its SIGTERMException, a SystemExit, and the run exited 0 with
# the subject unfinished (issue 28; before the fix both cases here exited 0).
@pytest.mark.parametrize("fault", ["sigterm_at_checkpoint=4", "pause_at_upload=step-0000004.ckpt"])
def test_sigterm_while_a_checkpoint_is_written_or_uploaded_exits_143_and_resumes_exactly(tmp_path: Path, uninterrupted,
                                                                                         fault: str):
    m = _manifest(tmp_path, "termed")
    if fault.startswith("sigterm_at_checkpoint"):  # the process signals itself mid-write
        proc = spawn_cli("run", str(m), env=cli_env(DBBATCH_WORK_DIR=str(tmp_path / "pod1"), DBBATCH_FAULTS=fault))
    else:  # paused mid-upload of the checkpoint to the output store
        proc, _ = start_at_fault(m, tmp_path / "pod1", fault)
        proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr[-3000:]
    assert "rex: SIGTERM received; checkpoint at step 4 stored" in stderr
    assert sorted(p.name for p in (tmp_path / "termed" / "rex" / "checkpoints").glob("*.ckpt")) == ["step-0000004.ckpt"]
    report = json.loads(next((tmp_path / "termed" / "_runs").glob("*.json")).read_text())
    assert report["preempted"] is True and report["subjects"][0]["status"] == "preempted"

    rerun = run_cli("run", str(m), env=cli_env(DBBATCH_WORK_DIR=str(tmp_path / "pod2")))
    assert rerun.returncode == 0, rerun.stderr
    assert "step-0000004.ckpt" in rerun.stderr
    a, b = _trained(uninterrupted(False)), _trained(tmp_path / "termed")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("fault", ["pause_at_publish=success", "pause_at_upload=index.html"])  # _SUCCESS; the report
def test_sigterm_after_the_last_subject_is_published_still_exits_143(tmp_path: Path, fault: str):
    """Exit 0 would tell Kubernetes the index succeeded: whenever a stop signal came, the exit says so, even
    once the subject is published or while the batch report is written. The published subject stays
    published; the rerun Kubernetes makes skips it."""
    m = _manifest(tmp_path, "late", max_steps=4)
    proc, _ = start_at_fault(m, tmp_path / "pod1", fault)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr[-3000:]
    assert (tmp_path / "late" / "rex" / "_SUCCESS").exists()
    rerun = run_cli("run", str(m), env=cli_env(DBBATCH_WORK_DIR=str(tmp_path / "pod2")))
    assert rerun.returncode == 0 and "rex: already done" in rerun.stderr, rerun.stderr


@pytest.mark.parametrize("family", list(FAMILY_ARCHS))
def test_checkpoint_holds_only_trainable_weights(tmp_path: Path, family: str):
    for te in (False, True):
        m = _manifest(tmp_path, f"ck{int(te)}", te, family=family)
        proc, _ = start_at_fault(m, tmp_path / f"pod{int(te)}", "pause_at_step=5")
        proc.kill()
        proc.wait()
        ckpt_path = next((tmp_path / f"ck{int(te)}" / "rex" / "checkpoints").glob("*.ckpt"))
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)  # nothing unpickled
        prefixes = {k.split(".", 1)[0] for k in ckpt["state_dict"]}
        assert prefixes == {"unet", *_encoders(family, te)}
        assert ckpt["optimizer_states"] and ckpt["lr_schedulers"]
        assert set(ckpt["dbbatch"]["rng"]) == {"torch", "numpy", "python"}
        assert "combined_loader" in json.dumps(list(ckpt["loops"]["fit_loop"]["state_dict"].keys()))
        model_dir = tmp_path / f"pod{int(te)}" / "cache" / "models" / f"builtin-{FAMILY_ARCHS[family]}-v{BUILTIN_VERSION}"
        unet_bytes = (model_dir / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size
        te_bytes = sum((model_dir / name / "model.safetensors").stat().st_size for name in _encoders(family, te))
        trainable = unet_bytes + te_bytes
        # weights + two Adam moments, about 3x the trainable weights; no frozen VAE or text encoder inside
        assert 2.5 * trainable < ckpt_path.stat().st_size < 3.3 * trainable


def test_resume_warns_on_changed_settings_and_restarts_for_another_base_model(tmp_path: Path, tiny_model_dir: Path):
    m = _manifest(tmp_path, "changed")
    proc, _ = start_at_fault(m, tmp_path / "pod1", "pause_at_step=5")
    proc.kill()
    proc.wait()
    changed = _manifest(tmp_path, "changed", learning_rate=2e-4)
    rerun = run_cli("run", str(changed), env=cli_env(DBBATCH_WORK_DIR=str(tmp_path / "pod2"), DBBATCH_FAULTS="pause_at_step=999"))
    assert rerun.returncode == 0, rerun.stderr
    assert "train.learning_rate changed since the checkpoint (0.0001 -> 0.0002); the checkpoint" in rerun.stderr

    other = _manifest(tmp_path, "other")
    proc, _ = start_at_fault(other, tmp_path / "pod3", "pause_at_step=5")
    proc.kill()
    proc.wait()
    text = other.read_text().replace("builtin:tiny-sd", str(tiny_model_dir))
    other.write_text(text)
    restarted = run_cli("run", str(other), env=cli_env(DBBATCH_WORK_DIR=str(tmp_path / "pod4")))
    assert restarted.returncode == 0, restarted.stderr
    ckpt = tmp_path / "other" / "rex" / "checkpoints" / "step-0000004.ckpt"
    assert (f"rex: not resuming checkpoint {ckpt}: changed since it was written: base_model "
            f"(builtin:tiny-sd:v{BUILTIN_VERSION}:seed1234 -> ") in restarted.stderr
    assert "training restarts from step 0" in restarted.stderr and "resuming from" not in restarted.stderr
    assert json.loads((tmp_path / "other" / "rex" / "metrics.json").read_text())["resumed_from_step"] is None
    assert "Traceback" not in restarted.stderr


@pytest.mark.parametrize("family", list(FAMILY_ARCHS))
def test_killed_pod_resumes_from_the_bucket(tmp_path: Path, s3, uninterrupted, family: str):
    """Output on the moto S3 endpoint: SIGKILL, then a new pod (empty work dir) resumes from the bucket."""
    m = _manifest(tmp_path, "on-s3", family=family)
    m.write_text(m.read_text().replace("output: on-s3", f"output: {s3.url('out')}"))
    marker = tmp_path / "paused"
    env = s3.env(DBBATCH_WORK_DIR=str(tmp_path / "pod1"), DBBATCH_FAULTS="pause_at_step=6", DBBATCH_FAULT_MARKER=str(marker))
    proc = spawn_cli("run", str(m), env=env)
    while not marker.exists():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert s3.keys("out", "rex") == {"checkpoints/step-0000004.ckpt", "photos.png"}  # photos.png: stored with the inputs
    rerun = run_cli("run", str(m), env=s3.env(DBBATCH_WORK_DIR=str(tmp_path / "pod2")))
    assert rerun.returncode == 0, rerun.stderr
    assert f"resuming from {s3.url('out', 'rex', 'checkpoints', 'step-0000004.ckpt')}" in rerun.stderr
    got = tmp_path / "got"
    got.mkdir()
    (got / "model.safetensors").write_bytes(s3.read("out", "rex", "model", "unet", "diffusion_pytorch_model.safetensors"))
    a, b = _trained(uninterrupted(False, family)), load_file(str(got / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not any("checkpoints" in k for k in s3.keys("out", "rex")), "checkpoints are removed once the subject is done"
