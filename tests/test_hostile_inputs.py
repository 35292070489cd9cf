"""Hostile inputs: bad manifests, bad photos, failing training, unwritable outputs, planted secrets.

Every case states the exact behaviour: the exit code and the one line it prints (what is wrong, the bad value,
where, what to do), with no traceback. Manifest cases run `dbbatch validate` in this process (the same Typer
app, without a Python start-up per case); image and runtime cases share ONE multi-subject `dbbatch run` in a
subprocess, where each bad subject fails on its own and the good ones still finish.

To print the corpus as "case -> line" (for notes and reviews): python scripts/hostile_corpus.py
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import hostile_files as hf
import pytest
import yaml
from conftest import REPO, cli_env, draw_subject, run_cli

LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d (INFO|WARNING|ERROR) (.*)$")
# A planted secret must never be written anywhere: env vars and storage_options both carry one.
SECRETS = {"AWS_SECRET_ACCESS_KEY": "planted-env-secret-7f3a", "HF_TOKEN": "planted-hf-token-91c2",
           "WANDB_API_KEY": "planted-wandb-key-3e9b", "MLFLOW_TRACKING_PASSWORD": "planted-mlflow-pass-a41d",
           "MLFLOW_TRACKING_TOKEN": "planted-mlflow-token-77c0"}
OPTION_SECRETS = ["planted-option-password-5d1e", "planted-option-client-secret-88b0"]


def record(case: str, line: str) -> None:
    """Append "case -> line" to $HOSTILE_CORPUS (scripts/hostile_corpus.py reads it)."""
    path = os.environ.get("HOSTILE_CORPUS")
    if path:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(f"{case} -> {line}\n")


@dataclass
class Outcome:
    exit_code: int
    errors: list[str]
    warnings: list[str]
    text: str  # everything printed


def parse_log(text: str) -> tuple[list[str], list[str]]:
    errors, warns = [], []
    for raw in text.splitlines():
        m = LOG_LINE.match(raw)
        if m and m.group(1) == "ERROR":
            errors.append(m.group(2))
        elif m and m.group(1) == "WARNING":
            warns.append(m.group(2))
    return errors, warns


@pytest.fixture
def cli_in_process(monkeypatch):
    """Run the real Typer app in this process; undo the logging/warnings setup it does for a process."""
    from typer.testing import CliRunner

    from dbbatch.cli import app

    root = logging.getLogger()
    saved = (root.handlers[:], root.level, logging.getLogger("dbbatch").level, warnings.filters[:])

    def invoke(*args: str, cwd: Path) -> Outcome:
        monkeypatch.chdir(cwd)
        result = CliRunner().invoke(app, list(args))
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise AssertionError(f"uncaught {type(result.exception).__name__}: {result.exception}\n{result.output}")
        errors, warns = parse_log(result.stderr)
        return Outcome(result.exit_code, errors, warns, result.output)

    yield invoke
    root.handlers[:], _, _, warnings.filters[:] = saved[0], None, None, saved[3]
    root.setLevel(saved[1])
    logging.getLogger("dbbatch").setLevel(saved[2])


# ---------------------------------------------------------------------------------------------------------
# Manifest cases: `dbbatch validate m.yaml` in a fresh folder with a valid imgs/ folder beside the manifest


def subject(id: str = "rex", **over: Any) -> dict[str, Any]:
    return {"id": id, "token": "sks", "class_noun": "dog", "images": "imgs/", **over}


def doc(*subjects: dict[str, Any], **top: Any) -> dict[str, Any]:
    return {"output": "out", **top, "subjects": list(subjects) or [subject()]}


def fake_sd_folder(d: Path, name: str = "sd") -> None:
    """A Stable Diffusion 1.x folder as far as validate reads it: configs and tokenizer, no weights."""
    m = d / name
    for part in ("unet", "vae", "text_encoder", "scheduler"):
        (m / part).mkdir(parents=True)
    (m / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    (m / "vae" / "config.json").write_text(json.dumps({"block_out_channels": [128, 256, 512, 512]}))
    (m / "unet" / "config.json").write_text(json.dumps({"sample_size": 64}))
    shutil.copytree(REPO / "dbbatch" / "assets" / "tokenizer", m / "tokenizer")


def flux_folder_without_t5(d: Path) -> None:
    """A FLUX.1 folder (model_index.json of FluxPipeline) whose T5 encoder was not uploaded."""
    m = d / "flux"
    for part in ("transformer", "vae", "text_encoder", "tokenizer", "tokenizer_2", "scheduler"):
        (m / part).mkdir(parents=True)
    (m / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))


def broken_tokenizer_folder(d: Path) -> None:
    fake_sd_folder(d, "broken")
    (d / "broken" / "tokenizer" / "vocab.json").write_text("<html>rate limited</html>")


def evaluator_folder(d: Path, name: str, config: dict[str, Any]) -> None:
    """A transformers model folder as far as validate reads it: config.json and a weights file, no processor."""
    (d / name).mkdir()
    (d / name / "config.json").write_text(json.dumps(config))
    (d / name / "model.safetensors").write_bytes(b"\0" * 16)


def not_diffusers_folder(d: Path) -> None:
    (d / "weights").mkdir()
    (d / "weights" / "model.ckpt").write_bytes(b"\0" * 16)


ALIAS_BOMB = "output: out\n" + "".join(
    f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9) if i else ', '.join(['lol'] * 9)}]\n" for i in range(7)
) + "subjects: [{id: rex, token: sks, class_noun: dog, images: *l6}]\n"


@dataclass
class ManifestCase:
    name: str
    manifest: Union[str, bytes, dict[str, Any], None]  # None: no file at all
    exit_code: int
    errors: list[str]  # the exact ERROR lines ({dir}: the case's folder)
    warnings: list[str] = field(default_factory=list)
    setup: Optional[Callable[[Path], None]] = None
    args: tuple[str, ...] = ("--no-check-remote",)


TYPO_TRAIN = {"max_step": 5}
MANIFEST_CASES = [
    ManifestCase("not-yaml", "output: out\nsubjects: [{id: rex, token: sks\n", 2, [
        "m.yaml: not valid YAML at line 3, column 1: expected ',' or '}', but got '<stream end>'"]),
    ManifestCase("yaml-tab-indent", "output: out\nsubjects:\n\t- {id: rex, token: sks, class_noun: dog, images: imgs/}\n", 2, [
        "m.yaml: not valid YAML at line 3, column 1: found character '\\t' that cannot start any token; indent with "
        "spaces: YAML does not allow tabs"]),
    ManifestCase("yaml-not-a-mapping", "- rex\n- tom\n", 2, [
        "m.yaml: the top level must be a mapping of keys (version, output, subjects, ...), got a list: ['rex', 'tom']"]),
    ManifestCase("empty-file", "", 2, ["m.yaml: the file is empty; see manifests/demo.yaml for a starting point"]),
    ManifestCase("not-utf8", b"output: \xff\xfe out\n", 2, [
        "m.yaml: the file is not UTF-8 text; a manifest is a YAML text file (is this a binary or another encoding?)"]),
    ManifestCase("no-such-file", None, 2, ["m.yaml: no such file (looked for {dir}/m.yaml); check the path"]),
    ManifestCase("duplicate-yaml-key", "output: out\nsubjects:\n  - id: rex\n    token: sks\n    class_noun: dog\n"
                 "    images: imgs/\n    token: ohwx\n", 2, [
        "m.yaml: not valid YAML at line 7, column 5: duplicate key 'token' (first at line 4); YAML would silently "
        "keep only the last one: merge them into one"]),
    ManifestCase("yaml-alias-bomb", ALIAS_BOMB, 2, [
        # l_i = 1 + 9 * l_(i-1), l0 = 10: l6 = 5,380,840, used twice (l6 and images), + l0..l5 + 20 keys/scalars
        "m.yaml: expands to 11,434,303 values (more than 100,000); YAML aliases (*name) repeat whole lists: write the "
        "values out or split the batch"]),
    ManifestCase("yaml-nested-too-deep", "output: out\nsubjects: " + "[" * 3000 + "]" * 3000 + "\n", 2, [
        "m.yaml: not valid YAML: nested hundreds of levels deep; a manifest is a few levels of keys"]),
    ManifestCase("unknown-key-typo", doc(defaults={"train": TYPO_TRAIN}), 2, [
        "m.yaml: defaults.train.max_step: unknown key; did you mean 'max_steps'?"]),
    ManifestCase("required-key-typo", {"ouptut": "out", "subjects": [subject()]}, 2, [
        "m.yaml: ouptut: unknown key; did you mean 'output'?"]),
    ManifestCase("unknown-key", doc(subject(colour="brown")), 2, [
        "m.yaml: subjects[0].colour: unknown key; allowed here: resolution, instance_prompt, class_prompt, train, "
        "priors, samples, evaluation, sdxl, flux, id, token, class_noun, images, sweep"]),
    ManifestCase("missing-key", {"subjects": [subject()]}, 2, [
        "m.yaml: output: required key is missing (Where results go: a local path or fsspec URL.)"]),
    ManifestCase("wrong-type-number", doc(subject(train={"max_steps": "many"})), 2, [
        "m.yaml: subjects[0].train.max_steps: must be a whole number, got 'many'"]),
    ManifestCase("wrong-type-section", doc(subject(train=400)), 2, [
        "m.yaml: subjects[0].train: must be a mapping of keys, got 400"]),
    ManifestCase("wrong-type-images", doc(subject(images=5)), 2, [
        "m.yaml: subjects[0].images: must be a folder, a glob or a list of files/URLs, got 5"]),
    ManifestCase("token-read-as-number", "output: out\nsubjects: [{id: rex, token: 1234, class_noun: dog, images: imgs/}]\n", 2, [
        "m.yaml: subjects[0].token: must be text, got 1234; YAML read it as a number: quote it, e.g. '1234'"]),
    ManifestCase("negative-steps", doc(subject(train={"max_steps": -3})), 2, [
        "m.yaml: subjects[0].train.max_steps: must be > 0, got -3"]),
    ManifestCase("zero-steps", doc(defaults={"priors": {"steps": 0}}), 2, ["m.yaml: defaults.priors.steps: must be > 0, got 0"]),
    ManifestCase("choice-typo", doc(defaults={"train": {"lr_scheduler": "cosin"}}), 2, [
        "m.yaml: defaults.train.lr_scheduler: must be one of 'constant', 'constant_with_warmup', 'linear' or 'cosine', "
        "got 'cosin'; did you mean 'cosine'?"]),
    ManifestCase("no-subjects", doc() | {"subjects": []}, 2, ["m.yaml: subjects: must list at least 1 item(s), got none"]),
    ManifestCase("resolution-not-multiple-tiny", doc(subject(resolution=33)), 2, [
        "m.yaml: subjects[0].resolution: 33 is not a multiple of 8 (diffusers renders multiples of 8, and the VAE scale "
        "factor of builtin:tiny-sd is 2; native size 64); use 32 or 40"]),
    ManifestCase("resolution-not-multiple-sd", doc(defaults={"resolution": 500}, base_model="./sd"), 2, [
        "m.yaml: defaults.resolution: 500 is not a multiple of 8 (diffusers renders multiples of 8, and the VAE scale "
        "factor of ./sd is 8; native size 512); use 496 or 504"], setup=fake_sd_folder),
    ManifestCase("duplicate-id", doc(subject("rex"), subject("rex")), 2, [
        "m.yaml: subjects[1].id: duplicate id 'rex' (also subjects[0]); ids name output folders, make them unique"]),
    ManifestCase("id-parent-dir", doc(subject("../x")), 2, [
        "m.yaml: subjects[0].id: '../x' would escape the output folder ('..' is not allowed); use 'x'"]),
    ManifestCase("id-nested-path", doc(subject("a/b")), 2, [
        "m.yaml: subjects[0].id: 'a/b' contains a path separator, so it would name a nested folder; use 'a-b'"]),
    ManifestCase("id-absolute-path", doc(subject("/etc/cron.d")), 2, [
        "m.yaml: subjects[0].id: '/etc/cron.d' is an absolute path; an id names one folder inside output: use 'etc-cron.d'"]),
    ManifestCase("id-unicode-lookalike", doc(subject("rex"), subject("r\u0435x")), 2, [
        "m.yaml: subjects[1].id: 'r\u0435x' contains the non-ASCII character '\u0435' (U+0435 CYRILLIC SMALL LETTER IE), "
        "which can look like an ASCII letter but names a different folder; retype the id in plain ASCII: use 1-64 "
        "lower-case ASCII letters, digits, '.', '_' or '-', starting with a letter or digit"]),
    ManifestCase("id-case-collision", doc(subject("rex"), subject("Rex")), 2, [
        "m.yaml: subjects[1].id: 'Rex' has upper-case letters; 'Rex' and 'rex' are the same folder on "
        "case-insensitive filesystems (macOS, Windows): use 'rex'"]),
    ManifestCase("token-common-word", doc(subject(token="photo")), 2, [
        "m.yaml: subjects[0].token: 'photo' is a common word (CLIP token #1125); fine-tuning would overwrite its "
        "meaning. Pick a rare token such as 'sks' or 'ohwx'"]),
    ManifestCase("token-is-class-noun", doc(subject(token="Dog")), 2, [
        "m.yaml: subjects[0].token: the token 'Dog' is the class noun itself; pick a rare word such as 'sks'"]),
    ManifestCase("token-splits", doc(subject(token="qwertzuiop")), 0, [], warnings=[
        "m.yaml: subjects[0].token: 'qwertzuiop' splits into 6 tokens (q + wer + t + zu + io + p); a single rare "
        "token such as 'sks' binds better"]),
    ManifestCase("placeholder-unknown", doc(subject(instance_prompt="a photo of {tokn} {class_noun}")), 2, [
        "m.yaml: subjects[0].instance_prompt: unknown placeholder {tokn} in 'a photo of {tokn} {class_noun}'; did "
        "you mean {token}? (available: {token}, {class_noun})"]),
    ManifestCase("placeholder-format-spec", doc(defaults={"samples": {"prompts": ["{token:>999999999}"]}}), 2, [
        "m.yaml: defaults.samples.prompts[0]: placeholder {token:>999999999} in '{token:>999999999}' has a format "
        "spec or conversion; write {token}"]),
    ManifestCase("output-unknown-protocol", doc(output="s4://bucket/out"), 2, [
        "m.yaml: output: unsupported location 's4://bucket/out': Protocol not known: s4; did you mean 's3://'?"]),
    ManifestCase("base-model-missing", doc(base_model="./no-such-model"), 2, [
        "m.yaml: base_model './no-such-model': no such folder ({dir}/no-such-model); give a diffusers folder, a "
        "built-in model (builtin:tiny-sd, builtin:small-sd, builtin:sd15, builtin:tiny-sdxl, builtin:sdxl, builtin:tiny-flux, builtin:tiny-flux-schnell, builtin:flux, builtin:toy-sd) or a hub id (org/name)"]),
    ManifestCase("base-model-typo", doc(base_model="bulitin:tiny-sd"), 2, [
        "m.yaml: base_model 'bulitin:tiny-sd': no such folder ({dir}/bulitin:tiny-sd); give a diffusers folder, a "
        "built-in model (builtin:tiny-sd, builtin:small-sd, builtin:sd15, builtin:tiny-sdxl, builtin:sdxl, builtin:tiny-flux, builtin:tiny-flux-schnell, builtin:flux, builtin:toy-sd) or a hub id (org/name); did you mean "
        "'builtin:tiny-sd'?"]),
    ManifestCase("base-model-not-diffusers", doc(base_model="./weights"), 2, [
        "m.yaml: base_model './weights': not a diffusers folder (no model_index.json); use a folder saved with "
        "save_pretrained of StableDiffusionPipeline (Stable Diffusion 1.x/2.x), StableDiffusionXLPipeline (Stable "
        "Diffusion XL), FluxPipeline (FLUX.1)"], setup=not_diffusers_folder),
    ManifestCase("base-model-unsupported-pipeline-class", doc(base_model="./sd3"), 2, [
        "m.yaml: base_model './sd3': its pipeline class 'StableDiffusion3Pipeline' (model_index.json _class_name) is not "
        "supported; dbbatch trains StableDiffusionPipeline (Stable Diffusion 1.x/2.x), StableDiffusionXLPipeline (Stable "
        "Diffusion XL), FluxPipeline (FLUX.1)"],
        setup=lambda d: (fake_sd_folder(d, "sd3"), (d / "sd3" / "model_index.json").write_text('{"_class_name": "StableDiffusion3Pipeline"}'))),
    ManifestCase("sdxl-keys-on-an-sd-model", doc(subject(sdxl={"original_size": [1024, 1024]})), 2, [
        "m.yaml: subjects[0].sdxl: applies to Stable Diffusion XL base models only, but base_model builtin:tiny-sd is "
        "Stable Diffusion 1.x/2.x (StableDiffusionPipeline); remove it"]),
    ManifestCase("sdxl-keys-in-defaults-on-an-sd-model", doc(defaults={"sdxl": {"train_text_encoder_2": False}}), 2, [
        "m.yaml: defaults.sdxl: applies to Stable Diffusion XL base models only, but base_model builtin:tiny-sd is "
        "Stable Diffusion 1.x/2.x (StableDiffusionPipeline); remove it"]),
    ManifestCase("sdxl-size-not-a-pair", doc(subject(sdxl={"original_size": [1024]}), base_model="builtin:tiny-sdxl"), 2, [
        "m.yaml: subjects[0].sdxl.original_size: must be [height, width] (two whole numbers), got [1024]"]),
    ManifestCase("sdxl-size-zero", doc(subject(sdxl={"target_size": [0, 64]}), base_model="builtin:tiny-sdxl"), 2, [
        "m.yaml: subjects[0].sdxl.target_size[0]: must be > 0, got 0"]),
    ManifestCase("sdxl-crop-negative", doc(subject(sdxl={"crops_coords_top_left": [-1, 0]}), base_model="builtin:tiny-sdxl"), 2, [
        "m.yaml: subjects[0].sdxl.crops_coords_top_left[0]: must be >= 0, got -1"]),
    ManifestCase("sdxl-key-typo", doc(subject(sdxl={"orig_size": [64, 64]}), base_model="builtin:tiny-sdxl"), 2, [
        "m.yaml: subjects[0].sdxl.orig_size: unknown key; did you mean 'original_size'?"]),
    ManifestCase("sdxl-text-encoder-2-without-the-text-encoder",
                 doc(subject(train={"method": "lora"}, sdxl={"train_text_encoder_2": True}), base_model="builtin:tiny-sdxl"), 2, [
        "m.yaml: subjects[0].sdxl.train_text_encoder_2: trains the second text encoder beside the first, but "
        "train.lora.text_encoder is false; set train.lora.text_encoder: true or remove sdxl.train_text_encoder_2"]),
    # FLUX.1 (issue 27)
    ManifestCase("flux-full-fine-tune", doc(base_model="builtin:tiny-flux"), 2, [
        "m.yaml: defaults.train.method: full fine-tuning is refused for FLUX.1 (builtin:tiny-flux): FLUX.1's transformer "
        "has 12B parameters: a full fine-tune per subject needs about 190 GB for its weights, gradients and AdamW state "
        "and writes a 24 GB model; train LoRA adapters instead (train.method: lora)"]),
    ManifestCase("flux-resolution-not-a-multiple-of-16",
                 doc(defaults={"resolution": 40, "train": {"method": "lora"}}, base_model="builtin:tiny-flux"), 2, [
        "m.yaml: defaults.resolution: 40 is not a multiple of 16 (diffusers renders multiples of 8, and the VAE scale "
        "factor of builtin:tiny-flux is 8, in 2x2 latent patches; native size 64); use 32 or 48"]),
    ManifestCase("flux-guidance-for-schnell",
                 doc(subject(train={"method": "lora"}, flux={"train_guidance": 3.5}), base_model="builtin:tiny-flux-schnell"), 2, [
        "m.yaml: subjects[0].flux.train_guidance: builtin:tiny-flux-schnell is not guidance-distilled (its transformer "
        "has no guidance embedding, as FLUX.1-schnell); remove flux.train_guidance"]),
    ManifestCase("flux-section-for-sd", doc(subject(flux={"weighting_scheme": "logit_normal"})), 2, [
        "m.yaml: subjects[0].flux: applies to FLUX.1 base models only, but base_model builtin:tiny-sd is Stable "
        "Diffusion 1.x/2.x (StableDiffusionPipeline); remove it"]),
    ManifestCase("flux-scheme-typo-and-zero-shift",
                 doc(defaults={"train": {"method": "lora"}, "flux": {"weighting_scheme": "logit-normal", "timestep_shift": 0}},
                     base_model="builtin:tiny-flux"), 2, [
        "m.yaml: defaults.flux.weighting_scheme: must be one of 'none', 'logit_normal' or 'mode', got 'logit-normal'; "
        "did you mean 'logit_normal'?",
        "m.yaml: defaults.flux.timestep_shift: must be > 0.0, got 0"]),
    ManifestCase("flux-true-cfg-below-one", doc(subject(flux={"true_cfg_scale": 0.5}), base_model="builtin:tiny-flux"), 2, [
        "m.yaml: subjects[0].flux.true_cfg_scale: must be >= 1.0, got 0.5"]),
    ManifestCase("base-dtype-with-method-full", doc(base_dtype="bf16"), 2, [
        "m.yaml: base_dtype: bf16 holds the base weights in bf16, but subjects[0] (rex) fine-tunes them (method full), "
        "which needs fp32; set train.method: lora or base_dtype fp32"]),
    ManifestCase("base-dtype-typo", doc(base_dtype="bfloat16"), 2, [
        "m.yaml: base_dtype: must be one of 'fp32', 'bf16' or 'fp16', got 'bfloat16'; did you mean 'bf16'?"]),
    ManifestCase("flux-folder-without-t5", doc(defaults={"train": {"method": "lora"}}, base_model="./flux"), 2, [
        "m.yaml: base_model './flux': diffusers folder lacks text_encoder_2; a complete FluxPipeline folder is needed"],
        setup=flux_folder_without_t5),
    ManifestCase("base-model-broken-tokenizer", doc(base_model="./broken"), 2, [
        "m.yaml: base_model './broken': the tokenizer in {dir}/broken/tokenizer cannot be loaded (Error while "
        "initializing BPE: expected value at line 1 column 1); the folder is incomplete or damaged: save the pipeline again"],
        setup=broken_tokenizer_folder),
    # train.method lora and priors.source (issue 12)
    ManifestCase("lora-rank-zero", doc(subject(train={"method": "lora", "lora": {"rank": 0}})), 2, [
        "m.yaml: subjects[0].train.lora.rank: must be > 0, got 0"]),
    ManifestCase("lora-alpha-negative", doc(defaults={"train": {"method": "lora", "lora": {"alpha": -1}}}), 2, [
        "m.yaml: defaults.train.lora.alpha: must be > 0.0, got -1"]),
    ManifestCase("lora-target-matches-nothing", doc(subject(train={"method": "lora", "lora": {"target": ["to_q", "attn3.to_k"]}})), 2, [
        "m.yaml: subjects[0].train.lora.target: pattern 'attn3.to_k' matches no layer of the base model's UNet; did you "
        "mean 'attn2.to_k'? (layer names end in e.g. to_q, to_out.0, ff.net.2, proj_in, conv1; presets: attention, "
        "attention+ff, all-linear+conv)"]),
    ManifestCase("lora-target-preset-typo", doc(subject(train={"method": "lora", "lora": {"target": "atention"}})), 2, [
        "m.yaml: subjects[0].train.lora.target: must be a preset (attention, attention+ff, all-linear+conv) or a list of "
        "module-name patterns, got 'atention'; did you mean 'attention'?"]),
    ManifestCase("lora-keys-with-method-full", doc(subject(train={"lora": {"rank": 4}})), 2, [
        "m.yaml: subjects[0].train.lora: set, but train.method is full (LoRA settings apply to method lora); set "
        "train.method: lora or remove train.lora"]),
    ManifestCase("lora-with-train-text-encoder", doc(subject(train={"method": "lora", "train_text_encoder": True})), 2, [
        "m.yaml: subjects[0].train.train_text_encoder: fine-tunes the whole text encoder, but train.method is lora; set "
        "train.lora.text_encoder: true for text-encoder adapters"]),
    ManifestCase("prior-from-base-without-prior-preservation",
                 doc(subject(train={"method": "lora", "with_prior_preservation": False}, priors={"source": "base_model"})), 2, [
        "m.yaml: subjects[0].priors.source: base_model is a kind of prior preservation, but "
        "train.with_prior_preservation is false; set it true or remove priors.source"]),
    ManifestCase("prior-from-base-with-method-full", doc(subject(priors={"source": "base_model"})), 2, [
        "m.yaml: subjects[0].priors.source: base_model needs train.method lora (the base model's prediction is the "
        "adapters switched off); use source: images with method full"]),
    ManifestCase("model-format-delta-with-lora", doc(subject(train={"method": "lora"}), model_format="delta"), 2, [
        "m.yaml: model_format: delta stores fine-tuned components, but subjects[0] (rex) trains LoRA adapters; use "
        "model_format lora (the adapters) or full (merged into a full pipeline)"]),
    # packing (issue 13)
    ManifestCase("packing-zero", doc(packing={"subjects_per_step": 0}), 2, [
        "m.yaml: packing.subjects_per_step: must be >= 1, got 0"]),
    ManifestCase("packing-too-many", doc(packing={"subjects_per_step": 65}), 2, [
        "m.yaml: packing.subjects_per_step: must be <= 64, got 65"]),
    ManifestCase("packing-not-a-number", doc(packing={"subjects_per_step": "eight"}), 2, [
        "m.yaml: packing.subjects_per_step: must be a whole number, got 'eight'"]),
    ManifestCase("packing-key-typo", doc(packing={"subjects": 8}), 2, [
        "m.yaml: packing.subjects: unknown key; did you mean 'subjects_per_step'?"]),
    # evaluation (issue 14)
    ManifestCase("evaluation-builtin-typo", doc(defaults={"evaluation": {"clip": "builtin:toy-clp"}}), 2, [
        "m.yaml: defaults.evaluation.clip: unknown built-in evaluation model 'builtin:toy-clp'; available: "
        "builtin:toy-clip; did you mean 'builtin:toy-clip'?"]),
    ManifestCase("evaluation-model-missing", doc(subject(evaluation={"dino": "./no-such-dino"})), 2, [
        "m.yaml: subjects[0].evaluation.dino: './no-such-dino': no such folder ({dir}/no-such-dino); give a "
        "transformers model folder, an fsspec URL or a hub id"]),
    ManifestCase("evaluation-model-wrong-kind", doc(subject(evaluation={"clip": "./bert"})), 2, [
        "m.yaml: subjects[0].evaluation.clip: './bert': a 'bert' model (config.json model_type), but clip needs a "
        "CLIPModel"], setup=lambda d: evaluator_folder(d, "bert", {"model_type": "bert"})),
    ManifestCase("evaluation-model-no-processor", doc(subject(evaluation={"clip": "./clip"})), 2, [
        "m.yaml: subjects[0].evaluation.clip: './clip': no preprocessor_config.json (the image processor) in it; save "
        "the processor beside the model"], setup=lambda d: evaluator_folder(d, "clip", {"model_type": "clip"})),
    ManifestCase("evaluation-select-by-typo", doc(subject(evaluation={"clip": "builtin:toy-clip", "select_by": "clip-i"})), 2, [
        "m.yaml: subjects[0].evaluation.select_by: unknown metric 'clip-i'; one of dino, clip_i, clip_t, class_drift, "
        "pres; did you mean 'clip_i'?"]),
    ManifestCase("evaluation-select-by-empty", doc(subject(evaluation={"clip": "builtin:toy-clip", "select_by": {}})), 2, [
        "m.yaml: subjects[0].evaluation.select_by: must name a metric or weight at least one (dino, clip_i, clip_t, "
        "class_drift, pres)"]),
    ManifestCase("evaluation-metric-without-its-model", doc(subject(evaluation={"clip": "builtin:toy-clip", "select_by": "dino"})), 2, [
        "m.yaml: subjects[0].evaluation.select_by: dino needs evaluation.dino, which is not set (rex); set it or use a "
        "metric of evaluation.clip"]),
    ManifestCase("evaluation-keep-best-without-a-model", doc(subject(evaluation={"keep": "best"})), 2, [
        "m.yaml: subjects[0].evaluation.keep: set, but no evaluation model is (rex); set evaluation.clip (and/or "
        "evaluation.dino), e.g. clip: builtin:toy-clip on the toy world"]),
    ManifestCase("evaluation-keep-best-one-point", doc(subject(evaluation={"clip": "builtin:toy-clip", "keep": "best", "every": 500})), 2, [
        "m.yaml: subjects[0].evaluation.every: 500 scores only the last step (train.max_steps 400), so keep: best has "
        "nothing to choose from (rex); lower every or use keep: last"]),
    ManifestCase("evaluation-every-zero", doc(defaults={"evaluation": {"every": 0}}), 2, [
        "m.yaml: defaults.evaluation.every: must be > 0, got 0"]),
    ManifestCase("evaluation-flag-threshold-nan", doc(subject(evaluation={"clip": "builtin:toy-clip", "flag_below": {"clip_t": float("nan")}})), 2, [
        "m.yaml: subjects[0].evaluation.flag_below: clip_t: the threshold must be a finite number, got nan"]),
    ManifestCase("evaluation-flag-metric-typo", doc(subject(evaluation={"clip": "builtin:toy-clip", "flag_above": {"drift": 0.3}})), 2, [
        "m.yaml: subjects[0].evaluation.flag_above: unknown metric 'drift'; one of dino, clip_i, clip_t, class_drift, "
        "pres; did you mean 'class_drift'?"]),
    ManifestCase("evaluation-not-improved-class-drift", doc(subject(evaluation={"clip": "builtin:toy-clip", "flag_not_improved": ["class_drift"]})), 2, [
        "m.yaml: subjects[0].evaluation.flag_not_improved: class_drift is 0 for the base model by definition, so it "
        "cannot improve on it; use flag_above: {class_drift: ...}"]),
    ManifestCase("evaluation-not-improved-without-its-model", doc(subject(evaluation={"clip": "builtin:toy-clip", "flag_not_improved": ["dino"]})), 2, [
        "m.yaml: subjects[0].evaluation.flag_not_improved: dino needs evaluation.dino, which is not set (rex); set it or "
        "use a metric of evaluation.clip"]),
    ManifestCase("evaluation-prompt-without-token", doc(subject(evaluation={"clip": "builtin:toy-clip", "prompts": ["a photo of a {class_noun}"]})), 2, [
        "m.yaml: subjects[0].evaluation.prompts[0]: 'a photo of a {class_noun}' has no {token}; evaluation scores the "
        "subject's own prompts (the class prompt is scored for class_drift and pres already) (rex)"]),
    ManifestCase("evaluation-prompt-placeholder-typo", doc(defaults={"evaluation": {"prompts": ["a {tokn} {class_noun}"]}}), 2, [
        "m.yaml: defaults.evaluation.prompts[0]: unknown placeholder {tokn} in 'a {tokn} {class_noun}'; did you mean "
        "{token}? (available: {token}, {class_noun})"]),
    ManifestCase("evaluation-key-typo", doc(defaults={"evaluation": {"evry": 100}}), 2, [
        "m.yaml: defaults.evaluation.evry: unknown key; did you mean 'every'?"]),
    # tracking and sweeps (issue 16)
    ManifestCase("tracking-wandb-api-key", doc(tracking={"wandb": {"project": "p", "api_key": "abc"}}), 2, [
        "m.yaml: tracking.wandb: api_key: credentials never go in the manifest (it is committed, shared and embedded in "
        "Job specs); set WANDB_API_KEY in the environment"]),
    ManifestCase("tracking-wandb-no-project", doc(tracking={"wandb": {"mode": "offline"}}), 2, [
        "m.yaml: tracking.wandb.project: required key is missing (W&B project: one run per subject in it.)"]),
    ManifestCase("tracking-wandb-mode-typo", doc(tracking={"wandb": {"project": "p", "mode": "ofline"}}), 2, [
        "m.yaml: tracking.wandb.mode: must be one of 'online', 'offline' or 'disabled', got 'ofline'; did you mean 'offline'?"]),
    ManifestCase("tracking-wandb-project-with-entity", doc(tracking={"wandb": {"project": "team/avatars"}}), 2, [
        "m.yaml: tracking.wandb.project: 'team/avatars' contains '/'; W&B names cannot contain / \\ # ? % or :"]),
    ManifestCase("tracking-mlflow-uri-with-password", doc(tracking={"mlflow": {"experiment": "e", "tracking_uri": "https://me:hunter2@mlflow.example.com"}}), 2, [
        "m.yaml: tracking.mlflow.tracking_uri: has a user name or password in it; credentials never go in the manifest: "
        "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) in the environment and "
        "give the URI without them"]),
    ManifestCase("tracking-mlflow-database-uri-with-password", doc(tracking={"mlflow": {"experiment": "e", "tracking_uri": "postgresql://ml:hunter2@db:5432/mlflow"}}), 2, [
        "m.yaml: tracking.mlflow.tracking_uri: has a user name or password in it; credentials never go in the manifest: "
        "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) in the environment and "
        "give the URI without them"]),
    ManifestCase("tracking-mlflow-uri-no-scheme", doc(tracking={"mlflow": {"experiment": "e", "tracking_uri": "mlflow.example.com:5000"}}), 2, [
        "m.yaml: tracking.mlflow.tracking_uri: 'mlflow.example.com:5000' is not an MLflow tracking URI; use "
        "http(s)://host:port for a server or sqlite:///path/mlflow.db for a local store"]),
    ManifestCase("tracking-key-typo", doc(tracking={"tensorbord": False}), 2, [
        "m.yaml: tracking.tensorbord: unknown key; did you mean 'tensorboard'?"]),
    ManifestCase("sweep-images", doc(subject(sweep={"images": ["a/", "b/"]})), 2, [
        "m.yaml: subjects[0].sweep: 'images' cannot be swept: it names the subject's photos (a sweep compares settings "
        "on the same photos)"]),
    ManifestCase("sweep-token", doc(subject(sweep={"token": ["sks", "ohwx"]})), 2, [
        "m.yaml: subjects[0].sweep: 'token' cannot be swept: it names the subject in its prompts"]),
    ManifestCase("sweep-unknown-setting", doc(subject(sweep={"train.learning_rat": [1e-4]})), 2, [
        "m.yaml: subjects[0].sweep: unknown setting 'train.learning_rat'; did you mean 'train.learning_rate'? (a dotted "
        "path such as train.learning_rate or train.lora.rank)"]),
    ManifestCase("sweep-not-a-list", doc(subject(sweep={"train.learning_rate": 1e-4})), 2, [
        "m.yaml: subjects[0].sweep.train.learning_rate: must be a list, got 0.0001"]),
    ManifestCase("sweep-bad-value-named-once", doc(subject(train={"method": "lora"}, sweep={"train.learning_rate": [1e-4, -1.0], "train.lora.rank": [4, 8]})), 2, [
        "m.yaml: subjects[0].sweep: train.learning_rate: must be > 0.0, got -1.0 (in the variant "
        "train.learning_rate=-1.0, train.lora.rank=4)"]),
    ManifestCase("sweep-empty-list", doc(subject(sweep={"train.seed": []})), 2, [
        "m.yaml: subjects[0].sweep: train.seed: give at least one value"]),
    ManifestCase("sweep-duplicate-value", doc(subject(sweep={"train.seed": [4, 4]})), 2, [
        "m.yaml: subjects[0].sweep: train.seed: a value is listed twice; each combination must differ"]),
    ManifestCase("sweep-list-value", doc(subject(train={"method": "lora"}, sweep={"train.lora.target": [["to_q"], ["to_k"]]})), 2, [
        "m.yaml: subjects[0].sweep: train.lora.target: ['to_q'] is not a single value; sweep values are numbers, "
        "strings, true/false or null"]),
    ManifestCase("sweep-too-many-variants", doc(subject(sweep={"train.seed": list(range(9)), "train.max_steps": list(range(10, 90, 10))})), 2, [
        "m.yaml: subjects[0].sweep: expands into 72 variants, at most 64; sweep fewer values (or split the subject)"]),
    ManifestCase("sweep-variant-conflict", doc(subject(train={"lora": {"rank": 4}}, sweep={"train.method": ["full", "lora"]})), 2, [
        "m.yaml: subjects[0](rex~method=full).train.lora: set, but train.method is full (LoRA settings apply to method "
        "lora); set train.method: lora or remove train.lora"]),
    ManifestCase("sweep-problem-of-every-variant-said-once", doc(subject(sweep={"train.learning_rate": [1e-4, 5e-5], "train.lora.rank": [4, 16]})), 2, [
        "m.yaml: subjects[0](rex~lr=1e-4,rank=4).train.lora: set, but train.method is full (LoRA settings apply to "
        "method lora); set train.method: lora or remove train.lora (and 3 more variant(s) of this sweep)"]),
    ManifestCase("sweep-in-defaults", doc(defaults={"sweep": {"train.seed": [1, 2]}}), 2, [
        "m.yaml: defaults.sweep: unknown key; allowed here: resolution, instance_prompt, class_prompt, train, priors, "
        "samples, evaluation, sdxl, flux"]),
    ManifestCase("sweep-variant-id-too-long", doc(subject(id="a" * 63, sweep={"train.text_encoder_learning_rate": [1e-4], "priors.guidance_scale": [1.5], "samples.guidance_scale": [3.0], "train.with_prior_preservation": [True]})), 2, [
        "m.yaml: subjects[0].sweep: the variant id '" + "a" * 63 + "~te_lr=1e-4,priors.guidance_scale=1.5,"
        "samples.guidance_scale=3,prior=true' is 136 characters long, at most 128; shorten the subject's id or sweep "
        "fewer settings"]),
    ManifestCase("id-looks-like-a-variant", doc(subject(id="rex~lr=1e-4")), 2, [
        "m.yaml: subjects[0].id: 'rex~lr=1e-4' contains characters other than a-z, 0-9, '.', '_', '-'; use 'rex-lr-1e-4'"]),
    ManifestCase("images-empty-folder", doc(subject(images="empty/")), 2, [
        "m.yaml: subjects[0].images: no image files at {dir}/empty/: the folder is empty or missing, or the pattern "
        "matches nothing; put photos (.bmp, .gif, .jpeg, .jpg, .png, .tif, .tiff, .webp) there or fix the subject's "
        "images"], setup=lambda d: (d / "empty").mkdir(), args=()),
]


@pytest.mark.parametrize("case", MANIFEST_CASES, ids=[c.name for c in MANIFEST_CASES])
def test_manifest_case(case: ManifestCase, tmp_path: Path, cli_in_process):
    draw_subject(tmp_path / "imgs", n=2, size=40)
    if case.setup:
        case.setup(tmp_path)
    if isinstance(case.manifest, dict):
        (tmp_path / "m.yaml").write_text(yaml.safe_dump(case.manifest, sort_keys=False, allow_unicode=True), encoding="utf-8")
    elif isinstance(case.manifest, bytes):
        (tmp_path / "m.yaml").write_bytes(case.manifest)
    elif isinstance(case.manifest, str):
        (tmp_path / "m.yaml").write_text(case.manifest, encoding="utf-8")
    got = cli_in_process("validate", "m.yaml", *case.args, cwd=tmp_path)
    expected = [line.replace("{dir}", str(tmp_path)) for line in case.errors]
    assert (got.exit_code, got.errors) == (case.exit_code, expected), got.text
    assert got.warnings == [w.replace("{dir}", str(tmp_path)) for w in case.warnings], got.text
    assert "Traceback" not in got.text
    for line in got.errors + got.warnings:
        record(f"manifest/{case.name} (exit {got.exit_code})", line.replace(str(tmp_path), "<dir>"))


# `dbbatch run` options that are wrong before any subject starts: one line, exit 2, nothing trained.
RUN_OPTION_CASES = [
    ("lease-seconds-too-short", ["--lease-seconds", "1"], True,
     "Invalid value for '--lease-seconds' (env var: 'DBBATCH_LEASE_SECONDS'): Input should be greater than or equal to 2"),
    ("queue-without-leases", ["--queue", "--no-leases"], False,
     "--queue needs leases (workers divide the subjects through them); drop --no-leases"),
    ("output-cannot-hold-a-lease", ["--output", "memory://dbbatch-hostile"], False,
     "output: memory:// cannot hold a lease (no conditional create); leases need stores shared between processes "
     "(local paths, s3://), so two workers on it could train one subject at once; use a local path or s3://, or "
     "pass --no-leases to accept that risk"),
]


@pytest.mark.parametrize("name,args,usage,line", RUN_OPTION_CASES, ids=[c[0] for c in RUN_OPTION_CASES])
def test_run_option_case(name: str, args: list[str], usage: bool, line: str, tmp_path: Path, cli_in_process):
    draw_subject(tmp_path / "imgs", n=1, size=40)
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(doc()))
    got = cli_in_process("run", "m.yaml", *args, cwd=tmp_path)
    assert got.exit_code == 2, got.text
    if usage:  # a usage error: click's own message, not a log line
        assert line in " ".join(got.text.replace("│", " ").split()), got.text  # typer draws a box around it
    else:
        assert got.errors == [line], got.text
    assert not (tmp_path / "out").exists() or not any(p.name not in ("_priors",) for p in (tmp_path / "out").iterdir())
    record(f"run-options/{name} (exit 2)", line)


def test_every_manifest_problem_is_reported_at_once(tmp_path: Path, cli_in_process):
    """Schema errors, raw-value checks and model checks together: one validate run lists them all."""
    draw_subject(tmp_path / "imgs", n=2, size=40)
    m = doc(subject("rex", train={"max_steps": 0}, instance_prompt="{tokn}"), subject("rex", token="photo"),
            subject("Tom", resolution=33), output="s4://x/out")
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(m, sort_keys=False))
    got = cli_in_process("validate", "m.yaml", "--no-check-remote", cwd=tmp_path)
    assert got.exit_code == 2
    assert [e.split(":")[1].strip() for e in got.errors] == [
        "subjects[0].train.max_steps", "subjects[0].instance_prompt", "subjects[1].id", "subjects[2].id"]
    # The schema failed, so the model checks did not run yet: fix those four and validate again.
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(doc(subject("rex", token="photo"), subject("tom", resolution=33),
                                                         output="s4://x/out"), sort_keys=False))
    got = cli_in_process("validate", "m.yaml", "--no-check-remote", cwd=tmp_path)
    assert [e.split(":")[1].strip() for e in got.errors] == ["subjects[0].token", "subjects[1].resolution", "output"]


def test_unexpected_error_is_one_line_and_traceback_only_with_debug(tmp_path: Path, cli_in_process, monkeypatch):
    """The last line of defence: an exception we did not foresee still prints one line, exit 1."""
    import dbbatch.batch.validation

    def broken(*args, **kwargs):
        raise KeyError("vae")

    monkeypatch.setattr(dbbatch.batch.validation, "check_manifest", broken)
    draw_subject(tmp_path / "imgs", n=1, size=40)
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(doc()))
    got = cli_in_process("validate", "m.yaml", cwd=tmp_path)
    assert got.exit_code == 1
    assert got.errors == ["unexpected error: KeyError: 'vae'", "rerun with --debug for the traceback, and report it if "
                          "the line above does not say what to fix"]
    assert "Traceback" not in got.text
    debug = cli_in_process("validate", "m.yaml", "--debug", cwd=tmp_path)
    assert debug.exit_code == 1 and "Traceback" in debug.text and 'raise KeyError("vae")' in debug.text


def test_real_process_prints_no_traceback(tmp_path: Path):
    """The in-process cases above, checked once as a real process: stderr is the one line, nothing else."""
    (tmp_path / "m.yaml").write_text("output: out\nsubjects: [{id: rex, token: sks\n")
    proc = run_cli("validate", "m.yaml", cwd=tmp_path)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and LOG_LINE.match(lines[0]).group(2).startswith("m.yaml: not valid YAML at line 3"), proc.stderr
    assert proc.stdout == ""


# ---------------------------------------------------------------------------------------------------------
# Read-only output: refused by validate (and by run) before any training


# Root ignores permission bits through CAP_DAC_OVERRIDE (and CAP_DAC_READ_SEARCH): the CLI runs without them, a
# root process that file permissions do apply to.
NO_ROOT_FILE_ACCESS = (1, 2) if os.geteuid() == 0 else ()


def test_read_only_output_fails_in_validate_and_before_training(tmp_path: Path):
    draw_subject(tmp_path / "imgs", n=2, size=40)
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(doc()))
    (tmp_path / "out").mkdir(mode=0o555)
    (tmp_path / "out").chmod(0o555)
    env = cli_env(DBBATCH_WORK_DIR=str(tmp_path / "work"))
    expected = f"m.yaml: output: {tmp_path}/out is not writable (Permission denied); grant write access to it or choose another output"
    try:
        for command in ("validate", "run"):
            proc = run_cli(command, "m.yaml", env=env, cwd=tmp_path, timeout=300, drop_capabilities=NO_ROOT_FILE_ACCESS)
            errors, _ = parse_log(proc.stderr)
            line = expected if command == "validate" else expected.removeprefix("m.yaml: ")
            assert (proc.returncode, errors) == (3, [line]), proc.stderr
            assert "Traceback" not in proc.stderr
            record(f"storage/read-only-output ({command}, exit 3)", line.replace(str(tmp_path), "<dir>"))
        assert not (tmp_path / "work" / "cache").exists(), "run loaded the model before finding the output unwritable"
    finally:
        (tmp_path / "out").chmod(0o755)


def test_read_only_prior_cache_fails_before_training_with_exit_3(tmp_path: Path):
    draw_subject(tmp_path / "imgs", n=2, size=40)
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(doc(prior_cache="cache")))
    (tmp_path / "cache").mkdir(mode=0o555)
    (tmp_path / "cache").chmod(0o555)
    env = cli_env(DBBATCH_WORK_DIR=str(tmp_path / "work"))
    line = (f"prior_cache: {tmp_path}/cache is not writable (Permission denied); grant write access to it or choose "
            "another prior_cache")
    try:
        proc = run_cli("run", "m.yaml", env=env, cwd=tmp_path, timeout=300, drop_capabilities=NO_ROOT_FILE_ACCESS)
    finally:
        (tmp_path / "cache").chmod(0o755)
    errors, _ = parse_log(proc.stderr)
    assert (proc.returncode, errors) == (3, [line]), proc.stderr
    assert not (tmp_path / "work" / "cache").exists(), "run loaded the model before finding the prior cache unwritable"
    record("storage/read-only-prior-cache (run, exit 3)", line.replace(str(tmp_path), "<dir>"))


def test_every_attempted_subject_failing_for_bad_input_exits_2_even_beside_a_done_one(tmp_path: Path):
    draw_subject(tmp_path / "imgs", n=2, size=40)
    (tmp_path / "zero.jpg").write_bytes(b"")
    small = {"resolution": 32, "train": {"max_steps": 1, "with_prior_preservation": False}, "priors": {"num_images": 0},
             "samples": {"seeds": [0], "steps": 1, "include_class_prompt": False}}
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(doc(subject("good"), subject("bad", images=["zero.jpg"]), defaults=small)))
    env = cli_env(DBBATCH_WORK_DIR=str(tmp_path / "work"))
    first = run_cli("run", "m.yaml", env=env, cwd=tmp_path)
    assert first.returncode == 1, first.stderr  # one succeeded, one failed: retrying may help
    again = run_cli("run", "m.yaml", env=env, cwd=tmp_path)
    errors, _ = parse_log(again.stderr)
    line = f"bad: failed: {tmp_path}/zero.jpg: the file is empty (0 bytes); re-upload the photo"
    assert (again.returncode, errors) == (2, [line, "1 of 2 subject(s) failed"]), again.stderr
    record("run/bad-input beside a done subject (exit 2)", line.replace(str(tmp_path), "<dir>"))


# ---------------------------------------------------------------------------------------------------------
# Images and runtime faults: one `dbbatch run` with a subject per bad input, and good subjects that must finish


class _Evil:
    """Unpickling this runs open(MARKER, 'w'): proof of code execution if a checkpoint were unpickled."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@dataclass
class RunCase:
    name: str  # = the subject id
    images: Union[str, list[str]]
    error_class: Optional[str]  # None: the subject succeeds
    run_line: Optional[str]  # the ERROR line of `dbbatch run`, "{dir}": the batch folder
    validate_line: Optional[str] = None  # the ERROR line of `dbbatch validate` (which decodes every image)
    train: dict[str, Any] = field(default_factory=dict)


def _write_images(d: Path) -> None:
    imgs = d / "imgs"
    imgs.mkdir(parents=True)
    files = {
        "zero.jpg": b"", "cut.jpg": hf.truncated_jpeg(), "notes.jpg": hf.TEXT, "404.png": hf.HTML_404,
        "bomb.png": hf.bomb_png(), "pixel.png": hf.save(hf.Image.new("RGB", (1, 1), hf.RED), "PNG"),
    }
    for name, data in files.items():
        (imgs / name).write_bytes(data)
    (d / "empty").mkdir()
    # Everything a real upload folder has that is awkward but usable, and junk that must be ignored silently.
    good = draw_subject(d / "good", n=2, size=48)
    for name, data in {"cmyk.jpg": hf.cmyk_jpeg(), "scan16.png": hf.gray16_png(), "gray.png": hf.gray_png(),
                       "logo.png": hf.palette_transparent_png(), "anim.gif": hf.animated_gif(),
                       "phone.jpg": hf.exif_jpeg(6), "portrait.jpg": hf.phone_mpo(), "img9-copy.png": (good / "img0.png").read_bytes(),
                       ".DS_Store": b"\0\0\0\1Bud1" + b"\0" * 64, "Thumbs.db": b"\xd0\xcf\x11\xe0" + b"\0" * 64,
                       "._img0.png": b"\0\5\x16\7" + b"\0" * 64}.items():
        (good / name).write_bytes(data)
    draw_subject(d / "plain", n=2, size=48)


RUN_CASES = [
    RunCase("zero-byte", ["imgs/zero.jpg"], "ImageError",
            "zero-byte: failed: {dir}/imgs/zero.jpg: the file is empty (0 bytes); re-upload the photo"),
    RunCase("truncated-jpeg", ["imgs/cut.jpg"], "ImageError",
            "truncated-jpeg: failed: {dir}/imgs/cut.jpg: the image is truncated (the upload or download was cut "
            "off); re-upload it"),
    RunCase("text-as-jpg", ["imgs/notes.jpg"], "ImageError",
            "text-as-jpg: failed: {dir}/imgs/notes.jpg: the file is text, not an image (it starts 'this is not a "
            "photo, just some notes'); upload the photo itself"),
    RunCase("html-as-png", ["imgs/404.png"], "ImageError",
            "html-as-png: failed: {dir}/imgs/404.png: the file is an HTML page titled '404 Not Found', not an image; "
            "the download probably failed: fetch the photo again"),
    RunCase("decompression-bomb", ["imgs/bomb.png"], "ImageError",
            "decompression-bomb: failed: {dir}/imgs/bomb.png: 2,500,000,000 pixels exceeds the limit of 64,000,000 "
            "pixels (8000x8000); refused before decoding (a decompression bomb or a huge scan): downscale it and re-upload"),
    RunCase("one-pixel", ["imgs/pixel.png"], "ImageError",
            "one-pixel: failed: {dir}/imgs/pixel.png: 1x1 pixels is below the minimum of 32 px on the shorter side; "
            "use a larger photo"),
    RunCase("empty-folder", "empty/", "ImageError",
            "empty-folder: failed: no image files at {dir}/empty/: the folder is empty or missing, or the pattern "
            "matches nothing; put photos (.bmp, .gif, .jpeg, .jpg, .png, .tif, .tiff, .webp) there or fix the "
            "subject's images"),
    RunCase("glob-matches-nothing", "plain/*.heic", "ImageError",
            "glob-matches-nothing: failed: no image files at {dir}/plain/*.heic: the folder is empty or missing, or "
            "the pattern matches nothing; put photos (.bmp, .gif, .jpeg, .jpg, .png, .tif, .tiff, .webp) there or "
            "fix the subject's images"),
    RunCase("missing-file", ["plain/img0.png", "plain/nope.jpg"], "ImageError",
            "missing-file: failed: cannot read {dir}/plain/nope.jpg: no such file or object; check the path"),
    RunCase("out-of-memory", "plain/", "OutOfMemoryError",
            "out-of-memory: failed: OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 MiB (simulated by "
            "DBBATCH_FAULTS); lower train.batch_size or resolution, or set train.gradient_checkpointing: true and "
            "train.mixed_precision: fp16 (or bf16)"),
    RunCase("disk-full", "plain/", "StorageError",
            "disk-full: failed: cannot write checkpoint step-0000002.ckpt in {scratch}/subjects/disk-full/checkpoints (No "
            "space left on device); checkpoints already stored in {dir}/out/disk-full/checkpoints are intact: free "
            "space in the work dir (--work-dir) and rerun to resume", train={"max_steps": 3, "checkpoint_every": 1}),
    RunCase("disk-full-model", "plain/", "StorageError",
            "disk-full-model: failed: cannot write the fine-tuned model to {scratch}/subjects/disk-full-model/model.tmp: no "
            "space left on device; free space in the work dir or pass a larger one with --work-dir (or "
            "$DBBATCH_WORK_DIR), then rerun"),
    RunCase("pickled-checkpoint", "plain/", None, None),  # reported, removed, trained from step 0: see its test
    RunCase("good", "good/", None, None),
]
RUN_CASES[0].validate_line = "m.yaml: subjects[0].images: {dir}/imgs/zero.jpg: the file is empty (0 bytes); re-upload the photo"
for _c in RUN_CASES[1:9]:
    _c.validate_line = f"m.yaml: subjects[{RUN_CASES.index(_c)}].images: " + _c.run_line.split(": failed: ", 1)[1]


@dataclass
class Batch:
    dir: Path
    work: Path
    proc: subprocess.CompletedProcess
    errors: list[str]
    warnings: list[str]
    report: dict[str, Any]  # --report
    stored_report: dict[str, Any]  # <output>/_runs/<run id>.json
    env: dict[str, str]


@pytest.fixture(scope="module")
def batch(tmp_path_factory) -> Batch:
    d = tmp_path_factory.mktemp("hostile-batch")
    _write_images(d)
    subjects = [{"id": c.name, "token": "sks", "class_noun": "dog", "images": c.images,
                 **({"train": c.train} if c.train else {})} for c in RUN_CASES]
    manifest = {
        "version": 1, "base_model": "builtin:tiny-sd", "output": "out",
        "storage_options": {"file": {"password": OPTION_SECRETS[0], "client_kwargs": {"client_secret": OPTION_SECRETS[1]}}},
        # tracked for real (W&B offline, MLflow's local store): their files are searched for the planted secrets too
        "tracking": {"wandb": {"project": "hostile", "mode": "offline", "dir": "wandb"}, "mlflow": {"experiment": "hostile"}},
        "defaults": {"resolution": 32,
                     "train": {"max_steps": 2, "checkpoint_every": 100, "learning_rate": 1e-4, "with_prior_preservation": False},
                     "priors": {"num_images": 0},
                     "samples": {"prompts": ["a photo of {token} {class_noun}"], "seeds": [0], "steps": 2,
                                 "include_class_prompt": False}},
        "subjects": subjects,
    }
    (d / "m.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    # A stored checkpoint that would run code if unpickled.
    import torch

    evil = d / "out" / "pickled-checkpoint" / "checkpoints" / "step-0000001.ckpt"
    evil.parent.mkdir(parents=True)
    torch.save({"state_dict": {}, "payload": _Evil(d / "PWNED")}, evil)

    work = d / "work"
    # OMP_NUM_THREADS=1: on a busy 2-core CI machine torch's second intra-op thread spin-waits for a core and
    # this run takes 80 s instead of 7 s (measured); a tiny model gains nothing from it anyway.
    env = cli_env(DBBATCH_WORK_DIR=str(work),
                  DBBATCH_FAULTS="fail_train=out-of-memory;disk_full_checkpoint=2;disk_full_model=disk-full-model",
                  OMP_NUM_THREADS="1", AWS_ACCESS_KEY_ID="AKIAPLANTED", **SECRETS)
    proc = run_cli("run", "m.yaml", "--report", "report.json", env=env, cwd=d)
    errors, warns = parse_log(proc.stderr)
    report = json.loads((d / "report.json").read_text())
    stored = json.loads((d / "out" / "_runs" / f"{report['run_id']}.json").read_text())
    return Batch(d, work, proc, errors, warns, report, stored, env)


def _fill(line: str, b: Batch) -> str:
    assert Path(b.report["scratch"]).parent == b.work / "scratch"  # the run's own scratch folder
    return line.replace("{dir}", str(b.dir)).replace("{scratch}", b.report["scratch"])


@pytest.mark.parametrize("case", RUN_CASES, ids=[c.name for c in RUN_CASES])
def test_run_case(case: RunCase, batch: Batch):
    entry = next(s for s in batch.report["subjects"] if s["id"] == case.name)
    mine = [e for e in batch.errors if e.startswith(f"{case.name}: ")]
    if case.error_class is None:
        assert entry["status"] == "succeeded" and (batch.dir / "out" / case.name / "_SUCCESS").is_file()
        assert mine == []
        return
    expected = _fill(case.run_line, batch)
    assert mine == [expected], batch.proc.stderr
    assert (entry["status"], entry["error_class"], entry["message"]) == ("failed", case.error_class, expected.split(": failed: ", 1)[1])
    assert not (batch.dir / "out" / case.name / "_SUCCESS").exists()
    record(f"run/{case.name} (subject failed, batch exit 1)", expected.replace(str(batch.dir), "<dir>"))


def test_run_exit_code_and_good_subjects_finish(batch: Batch):
    assert batch.proc.returncode == 1, batch.proc.stderr  # some subjects failed, not all of them for bad input
    assert "Traceback" not in batch.proc.stderr + batch.proc.stdout
    failed = [c.name for c in RUN_CASES if c.error_class]
    assert batch.errors == [_fill(c.run_line, batch) for c in RUN_CASES if c.run_line] + [
        f"{len(failed)} of {len(RUN_CASES)} subject(s) failed"]


def test_awkward_but_usable_photos_are_used_with_warnings_and_junk_is_ignored_silently(batch: Batch):
    good = f"good: {batch.dir}/good"
    assert [w for w in batch.warnings if w.startswith("good: ")] == [
        f"{good}/anim.gif: animated image with 3 frames; using the first frame",
        f"{good}/img9-copy.png: same bytes as {batch.dir}/good/img0.png; duplicate skipped",
    ]
    for line in [w for w in batch.warnings if w.startswith("good: ")]:
        record("run/good (subject succeeded, warning)", line.replace(str(batch.dir), "<dir>"))
    silent = ["cmyk.jpg", "scan16.png", "gray.png", "logo.png", "phone.jpg", "portrait.jpg", ".DS_Store", "Thumbs.db",
              "._img0.png"]
    for name in silent:
        assert name not in batch.proc.stderr + batch.proc.stdout
    record("run/good (subject succeeded, no line)", "CMYK, 16-bit, grayscale, palette+transparency, EXIF-rotated and "
           "multi-picture (MPO) photos are converted silently; .DS_Store, Thumbs.db and ._* files are ignored silently")
    metrics = json.loads((batch.dir / "out" / "good" / "metrics.json").read_text())
    # img0, img1, cmyk, scan16, gray, logo, anim, phone, portrait: the copy is dropped, system files never listed
    assert metrics["instance_images"] == 9


def test_report_lists_every_subject_with_status_class_and_message(batch: Batch):
    assert batch.report == batch.stored_report
    assert [s["id"] for s in batch.report["subjects"]] == [c.name for c in RUN_CASES]
    for s, c in zip(batch.report["subjects"], RUN_CASES):
        assert s["status"] == ("failed" if c.error_class else "succeeded")
        assert s["error_class"] == c.error_class
        assert (s["message"] is None) == (c.error_class is None)


def test_unreadable_checkpoint_is_reported_removed_and_training_restarts(batch: Batch):
    ckpts = batch.dir / "out" / "pickled-checkpoint" / "checkpoints"
    expected = [f"pickled-checkpoint: checkpoint {ckpts}/step-0000001.ckpt cannot be read (UnpicklingError); removing it "
                "and trying the next older checkpoint",
                f"pickled-checkpoint: no readable checkpoint left in {ckpts}; training restarts from step 0"]
    assert [w for w in batch.warnings if w.startswith("pickled-checkpoint: ")] == expected
    metrics = json.loads((batch.dir / "out" / "pickled-checkpoint" / "metrics.json").read_text())
    assert (metrics["resumed_from_step"], metrics["steps"]) == (None, 2)
    for line in expected:
        record("run/pickled-checkpoint (subject succeeded, warning)", line.replace(str(batch.dir), "<dir>"))


def test_full_disk_while_writing_the_model_leaves_no_temporary_folder(batch: Batch):
    scratch = Path(batch.report["scratch"]) / "subjects" / "disk-full-model"
    assert not (scratch / "model.tmp").exists() and not list(batch.work.rglob("model.tmp"))
    assert not (scratch / "checkpoints").exists() and not (scratch / "model").exists()


def test_nothing_from_storage_is_unpickled(batch: Batch):
    assert not (batch.dir / "PWNED").exists(), "a stored checkpoint was unpickled and ran code"
    assert "set_vital" not in batch.proc.stderr  # library warnings do not clutter the one-line errors


def test_full_disk_keeps_the_previous_checkpoint_and_a_rerun_resumes_from_it(batch: Batch):
    import torch

    from dbbatch.train.checkpoints import read_meta

    stored = sorted((batch.dir / "out" / "disk-full" / "checkpoints").iterdir())
    assert [p.name for p in stored] == ["step-0000001.ckpt"]
    ckpt = torch.load(stored[0], map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 1 and ckpt["state_dict"]
    assert read_meta(stored[0])["subject"] == "disk-full"
    assert not list(batch.work.rglob("*.part")), "partial file left behind"

    env = {k: v for k, v in batch.env.items() if k != "DBBATCH_FAULTS"}
    again = run_cli("run", "m.yaml", "--only", "disk-full", env=env, cwd=batch.dir)
    assert again.returncode == 0, again.stderr
    metrics = json.loads((batch.dir / "out" / "disk-full" / "metrics.json").read_text())
    assert (metrics["resumed_from_step"], metrics["steps"]) == (1, 3)
    record("run/disk-full, rerun without the fault (exit 0)", "resumes from the intact step-0000001.ckpt and finishes")


def test_validate_reports_every_bad_image_before_a_run(batch: Batch, cli_in_process):
    """`dbbatch validate` reads and decodes every image: each bad file is one line, found before any training."""
    got = cli_in_process("validate", "m.yaml", cwd=batch.dir)
    expected = [_fill(c.validate_line, batch) for c in RUN_CASES if c.validate_line]
    assert (got.exit_code, got.errors) == (2, expected), got.text
    for c, line in zip([c for c in RUN_CASES if c.validate_line], got.errors):
        record(f"validate/{c.name} (exit 2)", line.replace(str(batch.dir), "<dir>"))


def test_secrets_never_written(batch: Batch):
    planted = list(SECRETS.values()) + OPTION_SECRETS + ["AKIAPLANTED"]
    printed = batch.proc.stdout + batch.proc.stderr
    for secret in planted:
        assert secret not in printed
    for path in [p for p in batch.dir.rglob("*") if p.is_file() and p.name != "m.yaml"]:
        data = path.read_bytes()
        for secret in planted:
            assert secret.encode() not in data, f"{secret} written to {path}"
    config = yaml.safe_load((batch.dir / "out" / "good" / "config.yaml").read_text())
    assert config["storage_options"] == {"file": {"password": "***", "client_kwargs": {"client_secret": "***"}}}
    record("security/planted-secrets (env and storage_options)", "never printed, never in config.yaml (shown as ***), "
           "metrics.json, logs or the run reports")


def test_generated_names_come_only_from_validated_ids(batch: Batch):
    """Everything the batch wrote lies in <output>/<subject id>/ (or _runs/); ids were checked by the manifest."""
    from dbbatch.config.ids import id_problem

    top = {p.name for p in (batch.dir / "out").iterdir()}
    kept = {"_runs", "_priors", "_leases", "_report", "_mlflow"}  # _mlflow: tracking.mlflow's local store
    assert top <= {c.name for c in RUN_CASES} | kept  # _priors: validate's write probe
    assert all(id_problem(name) is None for name in top - kept)
    report = {p.name for p in (batch.dir / "out" / "_report").iterdir() if p.is_dir()}
    assert report and report <= {c.name for c in RUN_CASES}  # the report's folders are subject ids too
    # subjects' leases, and the report builds' (a name no subject id can have)
    assert {p.name for p in (batch.dir / "out" / "_leases").iterdir()} <= {c.name for c in RUN_CASES} | {"_report"}
