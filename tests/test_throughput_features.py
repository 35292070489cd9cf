"""Throughput features do what they say: mixed precision, gradient checkpointing, SDPA attention, the 8-bit
optimizer's validation, fp16 and delta outputs, the built-in architectures' sizes, and the benchmark script.

Training runs go through the worker in this process (`Batch`, as `dbbatch run` drives it), so a test can look
at the live model between subjects."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, cli_env, draw_subject, run_cli

STEPS = 3
DEFAULTS = {
    "resolution": 32,
    "train": {"max_steps": STEPS, "learning_rate": 1e-3, "checkpoint_every": 1000},
    "priors": {"num_images": 2, "steps": 2, "batch_size": 2},
    "samples": {"prompts": ["a photo of {token} {class_noun}"], "seeds": [0], "steps": 2, "include_class_prompt": False},
}


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Subject photos and a work dir whose model cache the module's runs share (the tiny model is written once)."""
    root = tmp_path_factory.mktemp("throughput")
    return {"images": draw_subject(root / "rex"), "work": root / "work", "root": root}


def run_batch(shared: dict[str, Path], name: str, subjects: list[dict], per_subject=None, **manifest_keys):
    """Run a manifest through the worker in-process; `per_subject(batch, subject)` is called before each one."""
    from dbbatch.batch.batch import Batch
    from dbbatch.batch.results import RunOptions
    from dbbatch.batch.validation import locations
    from dbbatch.config.resolve import resolve_subjects
    from dbbatch.models.defaults import load_manifest
    from dbbatch.store.storage import Storage

    folder = shared["root"] / name
    folder.mkdir()
    doc = {"version": 1, "base_model": "builtin:tiny-sd", "output": "out", "defaults": DEFAULTS,
           "subjects": [{"token": "sks", "class_noun": "dog", "images": str(shared["images"]) + "/", **s} for s in subjects],
           **manifest_keys}
    (folder / "m.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    manifest, base_dir = load_manifest(folder / "m.yaml")
    out, cache = locations(manifest, base_dir, None)
    batch = Batch(manifest, base_dir, Storage(), RunOptions(output=out, prior_cache=cache, work_dir=shared["work"]), reporter=None)
    results = []
    for subject in resolve_subjects(manifest, base_dir):
        if per_subject is not None:
            per_subject(batch, subject)
        results.append(batch.run_one(subject))
    assert [r.status for r in results] == ["succeeded"] * len(subjects), [r.message for r in results]
    return batch, Path(out)


def losses(out: Path, sid: str) -> list[float]:
    return json.loads((out / sid / "metrics.json").read_text())["loss_curve"]


def test_mixed_precision_and_gradient_checkpointing_really_apply(shared, caplog):
    """Same data and seed for each subject: only the setting under test differs, so differences are its doing."""
    import torch

    calls = {"n": 0}
    counts: dict[str, int] = {}

    def before(batch, subject):
        if not counts:
            # Count one ResNet block's forwards with grad on: training forwards and checkpoint recomputes
            # (sampling runs without grad). Wrapped, not hooked: PyTorch skips module hooks when it recomputes.
            block = batch.model.unet.down_blocks[0].resnets[0]
            forward = block.forward

            def counted(*args, **kwargs):
                calls["n"] += torch.is_grad_enabled()
                return forward(*args, **kwargs)

            block.forward = counted
        counts[subject.id] = calls["n"]

    caplog.set_level(logging.WARNING, logger="dbbatch")
    # checkpointed first: the next subject must find it switched off again
    batch, out = run_batch(shared, "precision", [
        {"id": "ckpt", "train": {"gradient_checkpointing": True}},
        {"id": "fp32"},
        {"id": "bf16", "train": {"mixed_precision": "bf16"}},
        {"id": "fp16", "train": {"mixed_precision": "fp16"}},
    ], per_subject=before)
    counts["end"] = calls["n"]
    ids = ["ckpt", "fp32", "bf16", "fp16", "end"]
    forwards = {sid: counts[nxt] - counts[sid] for sid, nxt in zip(ids, ids[1:])}

    # gradient checkpointing: each checkpointed block runs again in backward, and the result is unchanged
    assert forwards["fp32"] == STEPS and forwards["ckpt"] == 2 * STEPS, forwards
    assert losses(out, "ckpt") == pytest.approx(losses(out, "fp32"), rel=1e-6)
    assert not batch.model.unet.is_gradient_checkpointing
    # training's gradients are freed when it ends, not carried through sampling into the next subject
    assert all(p.grad is None for p in batch.model.unet.parameters())
    # bf16 autocast: the same training, rounded differently
    fp32, bf16 = losses(out, "fp32"), losses(out, "bf16")
    assert bf16 != fp32 and bf16 == pytest.approx(fp32, rel=0.05)
    # fp16 on a CPU: Lightning trains in bf16 instead; the log says so rather than pretending
    if not torch.cuda.is_available():
        assert losses(out, "fp16") == bf16
        assert any("fp16" in r.getMessage() and "bf16" in r.getMessage() for r in caplog.records), caplog.text


def test_unet_uses_scaled_dot_product_attention(shared):
    from diffusers.models.attention_processor import AttnProcessor2_0

    from dbbatch.models.loading import load_base_model

    model = load_base_model("builtin:tiny-sd", None, shared["work"] / "cache", None)
    processors = model.unet.attn_processors
    assert processors and all(isinstance(p, AttnProcessor2_0) for p in processors.values()), set(map(type, processors.values()))


def _tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    (path,) = folder.glob("*.safetensors")
    return load_file(str(path))


def test_fp16_and_delta_outputs(shared):
    """full fp32 vs delta vs full fp16 from the same training (CPU training is deterministic)."""
    import torch

    from dbbatch.models.loading import load_base_model, load_pipeline

    _, full = run_batch(shared, "full", [{"id": "rex"}])
    _, delta = run_batch(shared, "delta", [{"id": "rex"}], model_format="delta")
    batch, half = run_batch(shared, "half", [{"id": "rex"}, {"id": "rex2"}], output_dtype="fp16")

    # delta: only what training changed, plus the base reference; the documented call loads it whole
    delta_model = delta / "rex" / "model"
    assert sorted(p.name for p in delta_model.iterdir()) == ["dbbatch_delta.json", "unet"]
    pipe_full = load_pipeline(str(full / "rex" / "model"))
    pipe_delta = load_pipeline(str(delta_model), cache_dir=shared["work"] / "cache")
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(pipe_full, name).state_dict(), getattr(pipe_delta, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"{name} differs"
    assert _dir_bytes(delta_model) < 0.5 * _dir_bytes(full / "rex" / "model")

    # fp16: every weight file half the size, every float tensor fp16, equal to the fp32 result rounded
    for comp in ("unet", "vae", "text_encoder"):
        ratio = _dir_bytes(half / "rex" / "model" / comp) / _dir_bytes(full / "rex" / "model" / comp)
        assert 0.49 < ratio < 0.52, (comp, ratio)
    full_unet, half_unet = _tensors(full / "rex" / "model" / "unet"), _tensors(half / "rex" / "model" / "unet")
    assert {t.dtype for t in half_unet.values()} == {torch.float16}
    assert all(torch.equal(full_unet[k].half(), half_unet[k]) for k in full_unet)
    loaded = load_pipeline(str(half / "rex" / "model")).unet.state_dict()  # diffusers loads fp32 unless told otherwise
    assert all(torch.equal(loaded[k], half_unet[k].float()) for k in half_unet)

    # publishing in fp16 leaves the live model as it was: the next subject trains on the exact base weights
    fresh = load_base_model("builtin:tiny-sd", None, shared["work"] / "cache", None)
    for name in ("vae", "text_encoder", "unet"):
        live, base = getattr(batch.model, name).state_dict(), getattr(fresh, name).state_dict()
        assert all(torch.equal(live[k], base[k]) for k in base), f"{name} changed by an fp16 publish"
    assert _tensors(half / "rex2" / "model" / "unet").keys() == half_unet.keys()
    assert all(torch.equal(a, b) for a, b in zip(_tensors(half / "rex2" / "model" / "unet").values(), half_unet.values())), \
        "the same subject trained second in a batch must give the same weights as trained first"


def _dir_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def test_adamw8bit_is_a_validation_error_without_bitsandbytes_and_gpu(tmp_path: Path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the error under test is about machines without one")
    draw_subject(tmp_path / "imgs")
    doc = {"version": 1, "output": "out", "defaults": {"train": {"optimizer": "adamw8bit"}},
           "subjects": [{"id": "a", "token": "sks", "class_noun": "dog", "images": "imgs/"},
                        {"id": "b", "token": "sks", "class_noun": "dog", "images": "imgs/", "train": {"optimizer": "adamw"}},
                        {"id": "c", "token": "sks", "class_noun": "dog", "images": "imgs/", "train": {"optimizer": "adamw8bit"}}]}
    m = tmp_path / "m.yaml"
    m.write_text(yaml.safe_dump(doc))
    # A package named bitsandbytes that imports, to reach the "installed, but no GPU" case on a CPU machine.
    stub = tmp_path / "stub" / "bitsandbytes"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("")
    cases = [({}, "the bitsandbytes package and a CUDA GPU"),
             ({"PYTHONPATH": f"{tmp_path / 'stub'}{os.pathsep}{cli_env()['PYTHONPATH']}"}, "needs a CUDA GPU")]
    for extra, lacking in cases:
        if not extra and _has_bitsandbytes():
            continue
        proc = run_cli("validate", str(m), "--no-check-remote", env=cli_env(**extra))
        assert proc.returncode == 2, proc.stderr
        lines = [ln for ln in proc.stderr.splitlines() if "train.optimizer" in ln]
        # one line per key the user wrote: the defaults (subject a) and subject c; b chose adamw
        assert len(lines) == 2 and "defaults.train.optimizer" in lines[0] and "subjects[2].train.optimizer" in lines[1], proc.stderr
        assert all(lacking in ln and "use adamw" in ln for ln in lines), proc.stderr


def _has_bitsandbytes() -> bool:
    import importlib.util

    return importlib.util.find_spec("bitsandbytes") is not None


def test_builtin_architectures_have_the_promised_sizes():
    """small-sd ~10x tiny-sd's parameters per component; sd15 is SD 1.5's shape (counted on the meta device)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from dbbatch.models.builtin import ARCHS

    def params(arch: str) -> dict[str, float]:
        spec = ARCHS[arch]
        with torch.device("meta"):
            mods = {"unet": UNet2DConditionModel(**spec["unet"]), "vae": AutoencoderKL(**spec["vae"]),
                    "text_encoder": CLIPTextModel(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **spec["text_encoder"]))}
        return {k: sum(p.numel() for p in m.parameters()) for k, m in mods.items()}

    tiny, small, sd15 = params("tiny-sd"), params("small-sd"), params("sd15")
    for comp in tiny:
        assert 5 < small[comp] / tiny[comp] < 15, (comp, small[comp], tiny[comp])
    assert 8 < sum(small.values()) / sum(tiny.values()) < 12
    assert (round(sd15["unet"] / 1e6), round(sd15["vae"] / 1e6), round(sd15["text_encoder"] / 1e6)) == (860, 84, 123)
    for arch, px in (("tiny-sd", 64), ("small-sd", 128), ("sd15", 512)):
        scale = 2 ** (len(ARCHS[arch]["vae"]["block_out_channels"]) - 1)
        assert ARCHS[arch]["unet"]["sample_size"] * scale == px == ARCHS[arch]["vae"]["sample_size"]


@pytest.mark.slow
def test_bench_quick_runs_and_checks_itself(tmp_path: Path):
    report = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "run.py"), "--quick", "--arch", "tiny", "--json", str(report)],
                          capture_output=True, text=True, env=cli_env(), cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "training steps/s (median)" in proc.stdout and "sanity checks passed" in proc.stdout
    data = json.loads(report.read_text())
    (summary,) = data["summaries"]
    assert summary["steps_per_s"] > 0 and summary["peak_rss_mib"] > 100
    assert [b["subjects"] for b in summary["batches"]] == [1, 2]
    assert data["checks"] and all(c["ok"] for c in data["checks"] if c["kind"] == "sanity")
