"""LoRA DreamBooth (train.method: lora, issue 12) on the built-in tiny model.

- which layers get adapters; attaching and removing them leaves the base weights bitwise as they were;
- a real `dbbatch run`: the diffusers file and the kohya file both load with diffusers' `load_lora_weights`
  and reproduce dbbatch's own samples (negative control: the base model alone does not); the kohya keys
  follow AUTOMATIC1111's naming rules (restated below from its Lora extension, not from our output);
- the next subject starts from the clean base (it trains the same adapters as when it runs alone);
- priors.source base_model makes no class images;
- resume after SIGKILL mid-epoch and at an epoch end, with and without the text-encoder LoRA, is bitwise equal
  to an uninterrupted run; SIGTERM exits 143; checkpoints hold only the adapters; a checkpoint of another
  LoRA shape is not resumed, with the setting that differs named.
"""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import (
    FAMILY_ARCHS,
    cli_env,
    draw_subject,
    pipeline_class,
    render_stored_samples,
    run_cli,
    start_at_fault,
    tiny_manifest,
)
from safetensors import safe_open
from safetensors.torch import load_file

from dbbatch.models.lora import PRESETS, adaptable_layers, resolve_targets
from dbbatch.models.lora_export import _clip_layout

STEPS = 12
LORA = {"rank": 4, "alpha": 8}


def _manifest(tmp: Path, name: str, subjects: list[dict], base_model: str = "builtin:tiny-sd", every: int = 4,
              **top) -> Path:
    for s in subjects:
        folder = tmp / "imgs" / s["id"]
        if not folder.exists():
            draw_subject(folder, color=(220, 30, 30) if s["id"] == "rex" else (30, 30, 220))
    for s in subjects:
        s.setdefault("token", "sks")
        s.setdefault("class_noun", "dog")
        s.setdefault("images", f"imgs/{s['id']}/")
    return tiny_manifest(tmp / f"{name}.yaml", name, subjects, base_model=base_model,
                         defaults={"resolution": 32,
                                   "train": {"method": "lora", "max_steps": STEPS, "checkpoint_every": every, "lora": LORA},
                                   "priors": {"num_images": 2, "steps": 2, "batch_size": 2},
                                   "samples": {"prompts": ["a photo of {token} {class_noun}"], "seeds": [0, 1], "steps": 3}},
                         **top)


def _adapters(out: Path, subject: str = "rex") -> dict[str, torch.Tensor]:
    return load_file(str(out / subject / "lora" / "pytorch_lora_weights.safetensors"))


def _differing(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(a[k], b[k])]


# -- which layers, attach and detach (in-process) ------------------------------------------------------------


def test_presets_and_patterns_select_layers_and_name_what_matches_nothing():
    layers = ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
              "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0",
              "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2", "down_blocks.0.resnets.0.conv1",
              "conv_in", "time_embedding.linear_1"]
    assert resolve_targets(layers, "attention") == (layers[:2], [])
    assert resolve_targets(layers, "attention+ff") == (layers[:3], [])
    assert resolve_targets(layers, "all-linear+conv") == (layers[:4], [])  # not conv_in or the time embedding
    assert resolve_targets(layers, ["attn2.to_out.0", "resnets.*.conv?"]) == ([layers[1], layers[3]], [])
    assert resolve_targets(layers, ["to_q", "attn3.to_k"]) == ([layers[0]], ["attn3.to_k"])
    assert resolve_targets(layers, ["q"]) == ([], ["q"])  # a name's tail, not a substring of it
    assert set(PRESETS["attention"]) < set(PRESETS["attention+ff"])


def test_only_the_adapters_train_and_removing_them_restores_the_base_bitwise(tmp_path: Path):
    from peft.tuners.tuners_utils import BaseTunerLayer

    from dbbatch.config.settings import LoraSettings
    from dbbatch.models import lora
    from dbbatch.models.loading import load_base_model

    model = load_base_model("builtin:tiny-sd", None, tmp_path / "cache", None)
    before = {name: {k: v.clone() for k, v in getattr(model, name).state_dict().items()} for name in ("unet", "text_encoder")}
    n = lora.attach(model, LoraSettings(rank=4, alpha=8, target="all-linear+conv", text_encoder=True), 0, "rex", ("text_encoder",))
    assert lora.attached(model.text_encoder)
    trainable = [p for m in (model.unet, model.text_encoder) for p in m.parameters() if p.requires_grad]
    assert n == sum(p.numel() for p in trainable) and 0 < n < sum(p.numel() for p in model.unet.parameters()) / 2
    named = [k for m in (model.unet, model.text_encoder) for k, p in m.named_parameters() if p.requires_grad]
    assert named and all(".lora_A." in k or ".lora_B." in k for k in named)
    optimizer = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.1)  # weight decay: touches only what it is given
    ids = model.tokenizer(["a photo of sks dog"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    for _ in range(3):
        states = model.text_encoder(ids)[0]
        loss = model.unet(torch.randn(1, 4, 16, 16), 10, encoder_hidden_states=states).sample.pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert any(not torch.equal(p, torch.zeros_like(p)) for k, p in model.unet.named_parameters() if ".lora_B." in k)
    base_now = {k.replace(".base_layer", ""): v for k, v in model.unet.state_dict().items() if "lora_" not in k}
    assert not _differing(before["unet"], base_now), "a base weight changed while the adapters trained"
    assert lora.detach(model)
    assert not any(isinstance(m, BaseTunerLayer) for m in model.unet.modules())
    assert not any(isinstance(m, BaseTunerLayer) for m in model.text_encoder.modules())
    for name in ("unet", "text_encoder"):
        assert not _differing(before[name], getattr(model, name).state_dict()), name
    # a new subject can attach again after the removal
    assert lora.attach(model, LoraSettings(rank=2), 0, "kim") > 0
    lora.detach(model)


# -- a real run: files, formats, clean base between subjects -------------------------------------------------


@pytest.fixture(scope="module", params=list(FAMILY_ARCHS))
def runs(request, tmp_path_factory, family_model_dirs) -> dict:
    """For each family: rex: adapters on every linear and conv layer and on the text encoder (both of SDXL's);
    kim: the default preset with priors.source base_model. Then kim alone, and rex once more with model_format
    full."""
    family = request.param
    tmp = tmp_path_factory.mktemp(f"lora-runs-{family}")
    base = str(family_model_dirs[family])
    rex = {"id": "rex", "train": {"lora": {**LORA, "target": "all-linear+conv", "text_encoder": True}}}
    if family == "sdxl":  # both text encoders, and micro-conditioning sizes of its own (the samples must follow)
        rex["sdxl"] = {"train_text_encoder_2": True, "original_size": [96, 96], "crops_coords_top_left": [0, 4]}
    kim = {"id": "kim", "priors": {"source": "base_model"}}
    outs = {}
    for name, subjects, top in (("both", [rex, kim], {}), ("kim-alone", [kim], {}), ("merged", [rex], {"model_format": "full"})):
        proc = run_cli("run", str(_manifest(tmp, name, json.loads(json.dumps(subjects)), base, **top)),
                       env=cli_env(DBBATCH_WORK_DIR=str(tmp / f"w-{name}")))
        assert proc.returncode == 0, proc.stderr
        outs[name] = tmp / name
        outs[f"{name}-log"] = proc.stderr
    outs.update(family=family, base=Path(base))
    return outs


def _pipeline(folder: Path, family: str):
    return pipeline_class(family).from_pretrained(str(folder))


def _render(pipe, out: Path, subject: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(what the user's pipeline makes for the subject's sample grid, the sample PNGs dbbatch stored)."""
    return render_stored_samples(pipe, out / subject, steps=3)


@pytest.mark.parametrize("subject,weight_name", [("rex", "pytorch_lora_weights.safetensors"), ("rex", "rex.safetensors"),
                                                 ("kim", "pytorch_lora_weights.safetensors"), ("kim", "kim.safetensors")])
def test_both_files_load_with_diffusers_and_reproduce_the_samples(runs, subject: str, weight_name: str):
    pipe = _pipeline(runs["base"], runs["family"])
    plain, stored = _render(pipe, runs["both"], subject)
    assert any(not np.array_equal(a, b) for a, b in zip(plain, stored)), "the base model alone makes the same images"
    pipe.load_lora_weights(str(runs["both"] / subject / "lora"), weight_name=weight_name)
    made, stored = _render(pipe, runs["both"], subject)
    assert all(np.array_equal(a, b) for a, b in zip(made, stored)), f"{weight_name} does not reproduce the samples"


# AUTOMATIC1111's rules (extensions-builtin/Lora/networks.py, convert_diffusers_name_to_compvis, SD 1.x/2.x): the
# part of a key before the first "." names a layer; these are the forms it converts to the original model's names.
A1111_LAYER_RULES = [
    r"lora_unet_conv_in(.*)", r"lora_unet_conv_out(.*)", r"lora_unet_time_embedding_linear_(\d+)(.*)",
    r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)",
    r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv",
    r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv", r"lora_te_text_model_encoder_layers_(\d+)_(.+)",
    # SDXL (the same file's lora_te1_text_model -> 0_transformer_text_model, lora_te2_text_model_encoder_layers ->
    # 1_model_transformer_resblocks): its two text encoders
    r"lora_te1_text_model_encoder_layers_(\d+)_(.+)", r"lora_te2_text_model_encoder_layers_(\d+)_(.+)",
]
KOHYA_TEXT_PREFIXES = {"sd": {"text_encoder": "lora_te_"}, "sdxl": {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}}
A1111_PARTS = {"lora_down.weight", "lora_up.weight", "alpha"}  # network_lora.py: the keys a LoRA module needs


def test_kohya_file_follows_the_a1111_naming_rules_and_carries_its_metadata(runs):
    path = runs["both"] / "rex" / "lora" / "rex.safetensors"
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        layer, part = key.split(".", 1)
        assert part in A1111_PARTS, key
        assert any(re.fullmatch(rule, layer) for rule in A1111_LAYER_RULES), f"A1111 cannot place {key}"
        layers.setdefault(layer, {})[part] = value
    from dbbatch.models.loading import load_base_model

    model = load_base_model(str(runs["base"]), None, runs["both"].parent / "cache", None)
    unet_layers = {"lora_unet_" + n.replace(".", "_"): n for n in resolve_targets(adaptable_layers(model.unet), "all-linear+conv")[0]}
    te_layers = {prefix + _clip_layout(n).replace(".", "_")
                 for name, prefix in KOHYA_TEXT_PREFIXES[runs["family"]].items() for n in adaptable_layers(getattr(model, name))
                 if n.endswith(("q_proj", "k_proj", "v_proj", "out_proj"))}
    assert set(layers) == set(unet_layers) | te_layers  # every adapted layer, named after the model's own module
    for layer, parts in layers.items():
        assert set(parts) == A1111_PARTS, layer
        down, up = parts["lora_down.weight"], parts["lora_up.weight"]
        assert down.shape[0] == 4 and up.shape[1] == 4, layer  # rank 4: down is (r, in, ...), up is (out, r, ...)
        assert parts["alpha"].ndim == 0 and float(parts["alpha"]) == 8.0, layer  # our alpha, not the rank
    convs = [name for name in layers if name in unet_layers and layers[name]["lora_down.weight"].ndim == 4]
    assert convs, "all-linear+conv adapted no conv layer"
    assert (meta["ss_network_dim"], meta["ss_network_alpha"], meta["ss_network_module"]) == ("4", "8", "networks.lora")
    assert meta["dbbatch.token"] == "sks" and meta["dbbatch.trigger_prompt"] == "a photo of sks dog"
    assert meta["ss_sd_model_name"].endswith(FAMILY_ARCHS[runs["family"]]) and meta["dbbatch.base_model_identity"]


def test_outputs_metrics_and_model_card(runs):
    rex = runs["both"] / "rex"
    metrics = json.loads((rex / "metrics.json").read_text())
    files = {p.relative_to(rex).as_posix(): p.stat().st_size for p in (rex / "lora").glob("*.safetensors")}
    assert metrics["method"] == "lora" and metrics["output_bytes"] == sum(files.values())
    assert set(metrics["output_files"]) == set(files)
    assert 0 < metrics["trainable_parameters"] < 200_000
    assert not (rex / "model").exists()  # model_format defaults to lora with method lora
    config = yaml.safe_load((rex / "config.yaml").read_text())
    assert config["model_format"] == "lora" and config["subject"]["train"]["learning_rate"] == 1e-4  # lora's default
    card = (rex / "lora" / "README.md").read_text()
    assert card.startswith("---\nbase_model: ") and "instance_prompt: a photo of sks dog" in card
    assert "| Rank / alpha | 4 / 8 |" in card and "rex.safetensors" in card and (rex / "lora" / "grid.png").is_file()
    # kim: prior preservation from the base model's own prediction, no class images
    kim = json.loads((runs["both"] / "kim" / "metrics.json").read_text())
    assert kim["priors_generated"] == 0 and kim["loss_curve"]
    assert "kim generating" not in runs["both-log"] and "rex generating" in runs["both-log"]


def test_the_next_subject_starts_from_the_clean_base(runs):
    """kim after rex (which trained adapters on every layer and the text encoder) == kim alone."""
    assert not _differing(_adapters(runs["both"], "kim"), _adapters(runs["kim-alone"], "kim"))
    assert _differing(_adapters(runs["both"], "kim"), {k: torch.zeros_like(v) for k, v in _adapters(runs["both"], "kim").items()})


def test_model_format_full_writes_the_adapters_merged_into_a_pipeline(runs):
    rex = runs["merged"] / "rex"
    assert (rex / "lora" / "rex.safetensors").is_file() and (rex / "model" / "model_index.json").is_file()
    assert not _differing(_adapters(runs["merged"]), _adapters(runs["both"]))
    pipe = _pipeline(rex / "model", runs["family"])
    made, stored = _render(pipe, runs["merged"], "rex")
    diff = max(int(np.abs(a.astype(int) - b.astype(int)).max()) for a, b in zip(made, stored))
    assert diff <= 3, f"the merged model renders other images (max difference {diff}/255)"
    plain, _ = _render(_pipeline(runs["base"], runs["family"]), runs["merged"], "rex")
    assert max(int(np.abs(a.astype(int) - b.astype(int)).max()) for a, b in zip(plain, stored)) > 3


# -- resume ----------------------------------------------------------------------------------------------------


def _rex(te: bool, **lora) -> list[dict]:
    return [{"id": "rex", "train": {"lora": {**LORA, "text_encoder": te, **lora}}}]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[bool, Path]:
    tmp = tmp_path_factory.mktemp("lora-reference")
    outs = {}
    for te in (False, True):
        name = f"ref-te{int(te)}"
        proc = run_cli("run", str(_manifest(tmp, name, _rex(te))), env=cli_env(DBBATCH_WORK_DIR=str(tmp / f"w-{name}")))
        assert proc.returncode == 0, proc.stderr
        outs[te] = tmp / name
    return outs


# 3 photos: an epoch is 3 steps. Killed in step 6 with checkpoints every 4: resumes mid-epoch (step 4); killed
# in step 8 with checkpoints every 3: resumes at an epoch's end (step 6).
@pytest.mark.parametrize("kill_step,every,te", [(5, 4, False), (7, 3, True)])
def test_sigkill_then_rerun_gives_bitwise_the_same_adapters(tmp_path: Path, uninterrupted, kill_step: int, every: int, te: bool):
    m = _manifest(tmp_path, "killed", _rex(te), every=every)
    proc, _ = start_at_fault(m, tmp_path / "pod1", f"pause_at_step={kill_step}")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    last = kill_step // every * every
    ckpt = tmp_path / "killed" / "rex" / "checkpoints" / f"step-{last:07d}.ckpt"
    state = torch.load(str(ckpt), weights_only=True, map_location="cpu")["state_dict"]
    assert state and all(".lora_A." in k or ".lora_B." in k for k in state), "the checkpoint holds more than the adapters"
    assert any(k.startswith("text_encoder.") for k in state) == te
    assert ckpt.stat().st_size < 2_000_000  # the tiny UNet alone is ~6 MB in fp32
    rerun = run_cli("run", str(m), env=cli_env(DBBATCH_WORK_DIR=str(tmp_path / "pod2")))
    assert rerun.returncode == 0, rerun.stderr
    assert f"resuming from {ckpt}" in rerun.stderr
    got, ref = _adapters(tmp_path / "killed"), _adapters(uninterrupted[te])
    assert not _differing(got, ref), "resumed adapters differ from the uninterrupted run's"
    assert any(k.startswith("text_encoder.") for k in got) == te
    metrics = json.loads((tmp_path / "killed" / "rex" / "metrics.json").read_text())
    assert metrics["resumed_from_step"] == last
    assert metrics["loss_curve"] == json.loads((uninterrupted[te] / "rex" / "metrics.json").read_text())["loss_curve"]
    # negative control: the adapters of the checkpoint (step `last`) are not the final ones
    early = {k.replace("unet.", "", 1): v for k, v in state.items() if k.startswith("unet.")}
    final = {k.replace("unet.", "", 1).replace(".weight", ".default.weight"): v for k, v in got.items() if k.startswith("unet.")}
    assert early.keys() == final.keys() and _differing(early, final)


def test_sigterm_exits_143_with_a_checkpoint_and_another_lora_shape_is_not_resumed(tmp_path: Path, uninterrupted):
    m = _manifest(tmp_path, "termed", _rex(False))
    proc, _ = start_at_fault(m, tmp_path / "pod1", "pause_at_step=7")
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    assert sorted(p.name for p in (tmp_path / "termed" / "rex" / "checkpoints").glob("*.ckpt")) == ["step-0000008.ckpt"]
    # the same subject with rank 8: the rank-4 checkpoint is not resumed, and the line says why
    other = _manifest(tmp_path, "termed", _rex(False, rank=8))
    rerun = run_cli("run", str(other), env=cli_env(DBBATCH_WORK_DIR=str(tmp_path / "pod2")))
    assert rerun.returncode == 0, rerun.stderr
    line = next(x for x in rerun.stderr.splitlines() if "not resuming checkpoint" in x)
    assert line.endswith("changed since it was written: train.lora.rank (4 -> 8); training restarts from step 0 "
                         "(the stored checkpoints of rex are removed)"), line
    metrics = json.loads((tmp_path / "termed" / "rex" / "metrics.json").read_text())
    assert metrics["resumed_from_step"] is None and metrics["steps"] == STEPS
    assert _adapters(tmp_path / "termed")["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"].shape[0] == 8
