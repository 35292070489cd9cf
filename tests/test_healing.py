"""Self-healing stored state and resume that checks what it resumes (issue 10, findings 3-7).

Real CLI processes, killed with SIGKILL at chosen moments (faults.py), real files on disk; each case checks
the one line a user sees and what is left in the output and the scratch folder afterwards.
"""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from conftest import cli_env, draw_subject, run_cli, start_at_fault, tiny_manifest
from safetensors.torch import load_file
from test_hostile_inputs import record  # scripts/hostile_corpus.py lists these cases too

STEPS, EVERY = 12, 4
UNET = "model/unet/diffusion_pytorch_model.safetensors"


def _manifest(tmp: Path, name: str, resolution: int = 32, **train) -> Path:
    if not (tmp / "imgs" / "rex").exists():
        draw_subject(tmp / "imgs" / "rex")  # 3 images: an epoch is 3 steps
    return tiny_manifest(tmp / f"{name}.yaml", name, [{"id": "rex", "token": "sks", "class_noun": "dog", "images": "imgs/rex/"}],
                         defaults={"resolution": resolution,
                                   "train": {"max_steps": STEPS, "checkpoint_every": EVERY, "learning_rate": 1e-4,
                                             "checkpoints_keep": 2, **train},
                                   "priors": {"num_images": 2, "steps": 2, "batch_size": 2},
                                   "samples": {"prompts": ["a photo of {token} {class_noun}"], "seeds": [0], "steps": 2}})


def _kill_at_step(manifest: Path, work: Path, step: int, *args: str) -> None:
    proc, _ = start_at_fault(manifest, work, f"pause_at_step={step}", *args)
    proc.kill()
    proc.wait()


def _run(manifest: Path, work: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return run_cli("run", str(manifest), *args, env=cli_env(DBBATCH_WORK_DIR=str(work), **env))


def _warnings(stderr: str) -> list[str]:
    return [line.split(" WARNING ", 1)[1] for line in stderr.splitlines() if " WARNING " in line]


def _metrics(out: Path) -> dict:
    return json.loads((out / "rex" / "metrics.json").read_text())


def _differing(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(a[k], b[k])]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """An uninterrupted run (the bitwise reference) and its process."""
    tmp = tmp_path_factory.mktemp("healing-ref")
    proc = _run(_manifest(tmp, "ref"), tmp / "work")
    assert proc.returncode == 0, proc.stderr
    return tmp / "ref", proc


# -- finding 3: resume checks what it resumes -------------------------------------------------------------------


def test_fingerprint_names_what_decides_the_result_and_ignores_what_does_not(tmp_path: Path):
    from dbbatch.config.resolve import resolve_subjects
    from dbbatch.models.defaults import load_manifest
    from dbbatch.store.fingerprints import changes, images_digest, stage_fingerprint, subject_fingerprint
    from dbbatch.train.checkpoints import RESUME_SETTINGS

    def subject(tmp: Path, **train):
        m, base = load_manifest(_manifest(tmp, "fp", **train))
        return resolve_subjects(m, base)[0]

    tmp = tmp_path
    photos = images_digest([b"a", b"b"])
    base = subject_fingerprint(subject(tmp), 32, "model-a", photos, RESUME_SETTINGS)
    assert base == subject_fingerprint(subject(tmp, checkpoint_every=7, checkpoints_keep=3, learning_rate=3e-4,
                                               max_steps=99), 32, "model-a", photos, RESUME_SETTINGS)
    assert changes(base, subject_fingerprint(subject(tmp), 40, "model-b", images_digest([b"b", b"a"]), RESUME_SETTINGS)) == [
        "base_model (model-a -> model-b)", f"instance_images ({photos} -> {images_digest([b'b', b'a'])})",
        "resolution (32 -> 40)"]
    assert changes(base, subject_fingerprint(subject(tmp, train_text_encoder=True), 32, "model-a", photos, RESUME_SETTINGS)) == [
        "train.train_text_encoder (False -> True)"]
    stage = stage_fingerprint(subject(tmp), 32, "model-a", photos, "fp32", "full")
    assert changes(stage, stage_fingerprint(subject(tmp, max_steps=16), 32, "model-a", photos, "fp16", "full")) == [
        "output_dtype (fp32 -> fp16)", "train.max_steps (12 -> 16)"]


def test_stale_local_checkpoint_is_not_used(tmp_path: Path, reference):
    """A local copy of step 4 from an earlier attempt (lr 2e-4) stays in the work dir; the subject is then
    redone with --force at lr 1e-4 and killed after step 4 again. The rerun must resume the stored step 4,
    not the stale local copy of the same name."""
    work = tmp_path / "work"
    old = _manifest(tmp_path, "out", learning_rate=2e-4)
    _kill_at_step(old, work, 5)  # stores step 4 (lr 2e-4)
    _kill_at_step(old, work, 5)  # resumes it: its local copy now lies in the killed worker's scratch
    assert list(work.glob("scratch/*/subjects/rex/resume/step-0000004.ckpt"))
    new = _manifest(tmp_path, "out")
    _kill_at_step(new, work, 5, "--force")  # a fresh step 4 (lr 1e-4) under the same name
    rerun = _run(new, work)
    assert rerun.returncode == 0, rerun.stderr
    assert f"resuming from {tmp_path / 'out' / 'rex' / 'checkpoints' / 'step-0000004.ckpt'}" in rerun.stderr
    assert "changed since the checkpoint" not in rerun.stderr, "the stale local copy (lr 2e-4) was resumed"
    assert not _differing(load_file(str(reference[0] / "rex" / UNET)), load_file(str(tmp_path / "out" / "rex" / UNET)))


@pytest.mark.parametrize("change", ["images", "resolution"])
def test_changed_input_restarts_from_step_0_with_one_warning(tmp_path: Path, change: str):
    work = tmp_path / "work"
    m = _manifest(tmp_path, "out")
    _kill_at_step(m, work, 5)
    if change == "images":
        draw_subject(tmp_path / "imgs" / "rex", color=(30, 30, 220))  # same names, other photos
        what = "instance_images ("
    else:
        m = _manifest(tmp_path, "out", resolution=40)
        what = "resolution (32 -> 40)"
    rerun = _run(m, work)
    assert rerun.returncode == 0, rerun.stderr
    warned = [w for w in _warnings(rerun.stderr) if "not resuming" in w]
    assert len(warned) == 1, rerun.stderr
    assert warned[0].startswith(f"rex: not resuming checkpoint {tmp_path / 'out' / 'rex' / 'checkpoints' / 'step-0000004.ckpt'}: "
                                f"changed since it was written: {what}")
    assert warned[0].endswith("training restarts from step 0 (the stored checkpoints of rex are removed)")
    record(f"resume/changed {change} (warning, trained from step 0)", warned[0].replace(str(tmp_path), "<dir>"))
    assert "resuming from" not in rerun.stderr
    metrics = _metrics(tmp_path / "out")
    assert (metrics["resumed_from_step"], metrics["steps"]) == (None, STEPS)


def test_max_steps_below_the_checkpoint_restarts_from_step_0(tmp_path: Path):
    """The documented policy: a checkpoint past the new max_steps is not resumed; training restarts, so the
    published model is trained for exactly the max_steps that config.yaml and metrics.json state."""
    work = tmp_path / "work"
    _kill_at_step(_manifest(tmp_path, "out"), work, 9)  # stores steps 4 and 8
    rerun = _run(_manifest(tmp_path, "out", max_steps=6), work)
    assert rerun.returncode == 0, rerun.stderr
    assert f"rex: not resuming checkpoint {tmp_path / 'out' / 'rex' / 'checkpoints' / 'step-0000008.ckpt'}: " \
           "train.max_steps is 6 now, below its step 8; training restarts from step 0" in rerun.stderr
    metrics = _metrics(tmp_path / "out")
    assert (metrics["resumed_from_step"], metrics["steps"], len(metrics["loss_curve"])) == (None, 6, 6)
    record("resume/max_steps below the checkpoint (warning, trained from step 0)",
           next(w for w in _warnings(rerun.stderr) if "not resuming" in w).replace(str(tmp_path), "<dir>"))
    assert yaml.safe_load((tmp_path / "out" / "rex" / "config.yaml").read_text())["subject"]["train"]["max_steps"] == 6


def test_raised_max_steps_after_the_model_was_stored_trains_again(tmp_path: Path):
    work = tmp_path / "work"
    proc, _ = start_at_fault(_manifest(tmp_path, "out"), work, "pause_at_publish=config")  # model and _stage.json stored
    proc.kill()
    proc.wait()
    stored_unet = load_file(str(tmp_path / "out" / "rex" / UNET))
    rerun = _run(_manifest(tmp_path, "out", max_steps=16), work)
    assert rerun.returncode == 0, rerun.stderr
    assert "rex: the stored model was trained with other settings: train.max_steps (12 -> 16); training again" in rerun.stderr
    record("stage/raised max_steps after the model was stored (warning, trained again)",
           next(w for w in _warnings(rerun.stderr) if "stored model" in w))
    assert "loading it instead of training" not in rerun.stderr
    metrics = _metrics(tmp_path / "out")
    assert metrics["steps"] == 16 and len(metrics["loss_curve"]) == 16
    assert _differing(stored_unet, load_file(str(tmp_path / "out" / "rex" / UNET))), "the old model was republished"


# -- finding 4: a corrupt or partial checkpoint ------------------------------------------------------------------


def test_truncated_newest_checkpoint_falls_back_to_the_older_one_bitwise(tmp_path: Path, reference):
    _kill_at_step(_manifest(tmp_path, "out"), tmp_path / "pod1", 9)
    ckpts = tmp_path / "out" / "rex" / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("*.ckpt")) == ["step-0000004.ckpt", "step-0000008.ckpt"]
    newest = ckpts / "step-0000008.ckpt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # a partial upload

    rerun = _run(_manifest(tmp_path, "out"), tmp_path / "pod2")
    assert rerun.returncode == 0, rerun.stderr
    assert f"rex: checkpoint {newest} cannot be read (RuntimeError); removing it and trying the next older checkpoint" \
           in _warnings(rerun.stderr)
    assert f"rex: fell back to the older checkpoint {ckpts / 'step-0000004.ckpt'} (step 4)" in _warnings(rerun.stderr)
    for line in _warnings(rerun.stderr):
        record("resume/truncated newest checkpoint (warning, older one resumed)", line.replace(str(tmp_path), "<dir>"))
    assert _metrics(tmp_path / "out")["resumed_from_step"] == 4
    ref, got = load_file(str(reference[0] / "rex" / UNET)), load_file(str(tmp_path / "out" / "rex" / UNET))
    assert not _differing(ref, got), "the fallback resume is not bitwise the uninterrupted run"
    # negative control: the comparison catches a change of one ulp in one weight
    key = next(iter(got))
    nudged = dict(got, **{key: got[key].clone()})
    nudged[key].view(-1)[0] = torch.nextafter(nudged[key].view(-1)[0], torch.tensor(float("inf")))
    assert _differing(ref, nudged) == [key]


# -- finding 5: corrupted class-prior images ---------------------------------------------------------------------


def test_corrupted_prior_images_are_reported_by_name_and_regenerated(tmp_path: Path):
    from PIL import Image

    m = _manifest(tmp_path, "out", max_steps=2)
    first = _run(m, tmp_path / "work")
    assert first.returncode == 0, first.stderr
    (folder,) = [p for p in (tmp_path / "out" / "_priors").iterdir() if p.is_dir()]
    original = {n: (folder / n).read_bytes() for n in ("000000.png", "000001.png")}
    (folder / "000000.png").write_bytes(original["000000.png"][:200])  # truncated
    Image.new("RGB", (64, 64), (9, 9, 9)).save(folder / "000001.png")  # another size

    again = _run(m, tmp_path / "work", "--force")
    assert again.returncode == 0, again.stderr
    warned = [w for w in _warnings(again.stderr) if "class image" in w]
    assert warned[0].startswith(f"rex class image {folder / '000000.png'} cannot be decoded (")
    assert warned[0].endswith("; regenerating it")
    assert warned[1] == f"rex class image {folder / '000001.png'} is 64x64, not 32x32; regenerating it"
    assert len(warned) == 2
    for line in warned:
        record("priors/corrupted class image (warning, regenerated)", line.replace(str(tmp_path), "<dir>"))
    assert {n: (folder / n).read_bytes() for n in original} == original  # image i is a pure function of seed + i


# -- finding 6: exit codes ---------------------------------------------------------------------------------------


def test_sigint_stores_a_checkpoint_and_the_report_and_exits_130(tmp_path: Path):
    m = _manifest(tmp_path, "out")
    proc, _ = start_at_fault(m, tmp_path / "work", "pause_at_step=5")
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "rex: SIGINT received; checkpoint at step 6 stored" in stderr
    assert "preempted: SIGINT to exit took" in stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    assert sorted(p.name for p in (tmp_path / "out" / "rex" / "checkpoints").glob("*.ckpt"))[-1] == "step-0000006.ckpt"
    report = json.loads(next((tmp_path / "out" / "_runs").glob("*.json")).read_text())
    assert (report["preempted"], report["stop_signal"], report["subjects"][0]["status"]) == (True, "SIGINT", "preempted")


# -- finding 7: disk full, partial uploads, scratch --------------------------------------------------------------


def test_full_disk_while_writing_the_model_is_one_line_and_leaves_no_scratch_copies(tmp_path: Path):
    work = tmp_path / "work"
    m = _manifest(tmp_path, "out", max_steps=6, checkpoint_every=3)
    failed = _run(m, work, DBBATCH_FAULTS="disk_full_model=rex")
    assert failed.returncode == 1, failed.stderr
    report = json.loads(next((tmp_path / "out" / "_runs").glob("*.json")).read_text())
    scratch = Path(report["scratch"]) / "subjects" / "rex"  # this worker's scratch, removed when its batch ended
    line = (f"rex: failed: cannot write the fine-tuned model to {scratch / 'model.tmp'}: no space left on device; free "
            "space in the work dir or pass a larger one with --work-dir (or $DBBATCH_WORK_DIR), then rerun")
    assert [e.split(" ERROR ", 1)[1] for e in failed.stderr.splitlines() if " ERROR " in e][0] == line
    assert "Traceback" not in failed.stderr and "SafetensorError" not in failed.stderr
    assert not list(work.rglob("model.tmp")) and not list(work.rglob("*.ckpt")), "no scratch copies stay behind"
    again = _run(m, work)
    assert again.returncode == 0, again.stderr
    assert _metrics(tmp_path / "out")["resumed_from_step"] == 3


def test_sigkill_during_an_upload_leaves_no_partial_file_in_the_published_folder(tmp_path: Path):
    m = _manifest(tmp_path, "out", max_steps=2)
    proc, marker = start_at_fault(m, tmp_path / "work", "pause_at_upload=diffusion_pytorch_model.safetensors")
    proc.kill()
    proc.wait()
    unet_dir = tmp_path / "out" / "rex" / "model" / "unet"
    assert [p.name for p in unet_dir.iterdir() if p.name.endswith(".part")], "the kill left no partial upload to clean"
    again = _run(m, tmp_path / "work")
    assert again.returncode == 0, again.stderr
    partial = [str(p) for p in (tmp_path / "out").rglob("*.part")]
    assert not partial and (tmp_path / "out" / "rex" / "_SUCCESS").is_file(), partial


def test_scratch_is_removed_when_the_subject_is_skipped_as_done(tmp_path: Path):
    m = _manifest(tmp_path, "out", max_steps=2)
    proc, _ = start_at_fault(m, tmp_path / "work", "pause_at_publish=success")  # killed right after _SUCCESS
    proc.kill()
    proc.wait()
    assert (tmp_path / "out" / "rex" / "_SUCCESS").is_file() and list((tmp_path / "work").glob("scratch/*/subjects/rex"))
    again = _run(m, tmp_path / "work")
    assert again.returncode == 0, again.stderr
    assert "rex: already done" in again.stderr
    assert not list((tmp_path / "work" / "scratch").iterdir()), "the killed worker's scratch is removed"


# -- third-party chatter -----------------------------------------------------------------------------------------


def test_lightning_tip_and_accelerator_banner_do_not_reach_the_log(reference):
    stderr = reference[1].stderr
    assert "rex train" in stderr  # the log is the training one
    for chatter in ("litlogger", "Tip:", "GPU available", "TPU available", "HPU available"):
        assert chatter not in stderr, stderr
