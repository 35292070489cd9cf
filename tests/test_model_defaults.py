"""Training defaults a base model carries (dbbatch_defaults.json beside model_index.json, or a built-in's
metadata) apply where the manifest is silent, and each resolved value says where it came from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import run_cli

from dbbatch.config.parse import parse_manifest
from dbbatch.config.resolve import apply_model_defaults, resolve_subjects
from dbbatch.core.errors import ManifestError
from dbbatch.models.assets import PRETRAINED
from dbbatch.models.defaults import MODEL_DEFAULTS_FILE, load_manifest, model_defaults

CARRIED = {"resolution": 32, "class_prompt": "a photo of a {class_noun}",
           "train": {"learning_rate": 3e-4, "max_steps": 120}, "priors": {"num_images": 5}}


def manifest_text(defaults: dict, subject_extra: dict | None = None, base_model: str = "model") -> str:
    return yaml.safe_dump({
        "version": 1, "base_model": base_model, "output": "out", "defaults": defaults,
        "subjects": [{"id": "a", "token": "sks", "class_noun": "square", "images": "img/", **(subject_extra or {})},
                     {"id": "b", "token": "ohwx", "class_noun": "circle", "images": "img/"}],
    })


def fake_model(folder: Path, carried: dict | None) -> Path:
    """A folder that looks like a diffusers model as far as defaults go (no weights are read)."""
    folder.mkdir(parents=True)
    (folder / "model_index.json").write_text("{}")
    if carried is not None:
        (folder / MODEL_DEFAULTS_FILE).write_text(json.dumps(carried))
    return folder


def test_carried_defaults_fill_only_what_the_manifest_leaves_unset(tmp_path: Path):
    fake_model(tmp_path / "model", CARRIED)
    path = tmp_path / "m.yaml"
    path.write_text(manifest_text({"train": {"max_steps": 50}}, {"train": {"learning_rate": 1e-5}, "resolution": 64}))
    m, base_dir = load_manifest(path)
    a, b = resolve_subjects(m, base_dir)
    origin = f"model model ({tmp_path / 'model' / MODEL_DEFAULTS_FILE})"
    assert (a.resolution, a.train.learning_rate, a.train.max_steps, a.priors.num_images) == (64, 1e-5, 50, 5)
    assert (b.resolution, b.train.learning_rate, b.train.max_steps, b.priors.num_images) == (32, 3e-4, 50, 5)
    assert a.class_prompt == "a photo of a square" and b.class_prompt == "a photo of a circle"
    assert a.settings_from == {"class_prompt": origin, "priors.num_images": origin, "resolution": "subjects[0]",
                               "train.learning_rate": "subjects[0]", "train.max_steps": "defaults"}
    assert b.settings_from["resolution"] == origin and b.settings_from["train.learning_rate"] == origin
    assert a.train.batch_size == 1  # keys nobody sets keep dbbatch's defaults
    assert b.settings_from["train.max_steps"] == "defaults"


def test_a_model_without_the_file_changes_nothing(tmp_path: Path):
    fake_model(tmp_path / "model", None)
    path = tmp_path / "m.yaml"
    path.write_text(manifest_text({}))
    m, base_dir = load_manifest(path)
    plain = resolve_subjects(parse_manifest(manifest_text({})), base_dir)
    got = resolve_subjects(m, base_dir)
    assert [s.train for s in got] == [s.train for s in plain]
    assert got[0].settings_from == {k: "dbbatch" for k in ("priors.num_images", "resolution", "train.learning_rate", "train.max_steps")}


def test_a_bad_defaults_file_is_reported_with_its_path(tmp_path: Path):
    fake_model(tmp_path / "model", {"train": {"max_stepz": 3}})
    path = tmp_path / "m.yaml"
    path.write_text(manifest_text({}))
    with pytest.raises(ManifestError) as e:
        load_manifest(path)
    assert "max_stepz" in str(e.value) and MODEL_DEFAULTS_FILE in str(e.value)
    # carried values are checked together with the manifest's: warmup must stay below the steps
    m = parse_manifest(manifest_text({"train": {"lr_warmup_steps": 200}}))
    with pytest.raises(ManifestError, match="lr_warmup_steps"):
        apply_model_defaults(m, CARRIED, "model x")


def test_toy_sd_carries_its_defaults_and_validate_prints_them(tmp_path: Path):
    carried, where = model_defaults("builtin:toy-sd", None)
    assert where == str(PRETRAINED["toy-sd"] / MODEL_DEFAULTS_FILE)
    assert {"resolution", "train", "priors"} <= set(carried)
    (tmp_path / "img").mkdir()
    path = tmp_path / "m.yaml"
    path.write_text(manifest_text({}, base_model="builtin:toy-sd"))
    proc = run_cli("validate", str(path), "--no-check-remote", "--show-settings")
    assert proc.returncode == 0, proc.stderr
    lines = [x for x in proc.stdout.splitlines() if x.startswith("a\t")]
    assert f"a\ttrain.learning_rate = {carried['train']['learning_rate']['full']}\t(from model builtin:toy-sd ({where}))" in lines
    assert f"a\tresolution = {carried['resolution']}\t(from model builtin:toy-sd ({where}))" in lines


def test_learning_rate_null_resolves_per_method_from_the_model_then_dbbatch():
    """train.learning_rate null: the base model's rate for the subject's method, else 5e-6 (full) / 1e-4 (lora);
    a rate the manifest sets wins over both."""
    from dbbatch.config.resolve import apply_model_defaults

    def subjects(**defaults_train):
        m = parse_manifest(yaml.safe_dump({"output": "o", "defaults": {"train": defaults_train} if defaults_train else {},
                                           "subjects": [{"id": "a", "token": "sks", "class_noun": "dog", "images": "x/"},
                                                        {"id": "b", "token": "sks", "class_noun": "dog", "images": "x/",
                                                         "train": {"method": "lora"}}]}))
        return m

    plain = resolve_subjects(subjects(), None)
    assert [s.train.learning_rate for s in plain] == [5e-6, 1e-4]
    carried = {"train": {"learning_rate": {"full": 5e-4, "lora": 3e-3}}}
    with_model = apply_model_defaults(subjects(), carried, "model m (f.json)")
    got = resolve_subjects(with_model, None)
    assert [s.train.learning_rate for s in got] == [5e-4, 3e-3]
    assert [s.settings_from["train.learning_rate"] for s in got] == ["model m (f.json)"] * 2
    own = resolve_subjects(apply_model_defaults(subjects(learning_rate=2e-4), carried, "model m (f.json)"), None)
    assert [s.train.learning_rate for s in own] == [2e-4, 2e-4]
    with pytest.raises(ManifestError, match=r"train.learning_rate: per-method values must be"):
        apply_model_defaults(subjects(), {"train": {"learning_rate": {"lora": -1}}}, "model m (f.json)")
