"""manifest.py / manifest_errors.py / validation.py as plain functions: parsing, wording, id rules, geometry."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import REPO

from dbbatch.config.ids import id_problem
from dbbatch.config.parse import parse_manifest
from dbbatch.config.resolve import resolve_subjects
from dbbatch.core.errors import ManifestError
from dbbatch.models.defaults import load_manifest

BASE = "output: out\nsubjects:\n  - {id: rex, token: sks, class_noun: dog, images: imgs/}\n"


def problems(text: str) -> list[str]:
    with pytest.raises(ManifestError) as e:
        parse_manifest(text, "m.yaml")
    return e.value.problems


def test_shipped_manifests_parse():
    for path in sorted((REPO / "manifests").glob("*.yaml")):
        manifest, base_dir = load_manifest(path)
        assert manifest.subjects and base_dir == path.parent


@pytest.mark.parametrize("value, suggestion", [
    ("Rex", "rex"), ("../x", "x"), ("a/b", "a-b"), ("/abs/x", "abs-x"), ("C:\\photos\\rex", "c-photos-rex"),
    ("caf\u00e9", "cafe"), ("\uff52\uff45\uff58", "rex"), (".hidden", "hidden"), ("my dog", "my-dog"),
])
def test_unsafe_ids_get_a_safe_suggestion(value, suggestion):
    problem = id_problem(value)
    assert problem is not None and problem.endswith(f"use {suggestion!r}")
    assert id_problem(suggestion) is None


@pytest.mark.parametrize("value", ["r\u0435x", "\u0440\u0435\u0445", "\u03c1ex"])  # Cyrillic / Greek look-alikes
def test_lookalike_ids_have_no_suggestion(value):
    problem = id_problem(value)
    assert "non-ASCII character" in problem and "retype the id in plain ASCII" in problem


@pytest.mark.parametrize("value", ["rex", "rex-2", "a.b_c", "0", "x" * 64])
def test_safe_ids(value):
    assert id_problem(value) is None


def test_too_long_id():
    assert id_problem("x" * 65) == f"{'x' * 65!r} is 65 characters long, the limit is 64; use {'x' * 64!r}"


def test_yaml_merge_keys_are_not_duplicate_keys():
    text = ("defaults: &d {train: {max_steps: 5}}\noutput: out\nsubjects:\n"
            "  - <<: {id: rex, token: sks, class_noun: dog, images: imgs/}\n    token: ohwx\n")
    m = parse_manifest(text)
    assert m.subjects[0].token == "ohwx" and m.defaults.train.max_steps == 5


def test_duplicate_key_names_both_lines():
    assert problems(BASE + "output: again\n") == [
        "not valid YAML at line 4, column 1: duplicate key 'output' (first at line 1); YAML would silently keep only "
        "the last one: merge them into one"]


def test_self_referencing_alias_is_refused():
    assert problems("output: out\nsubjects: &s [*s]\n") == [
        "a YAML alias refers to the list or mapping that contains it (an endless loop); remove it"]


def test_a_union_error_deep_inside_a_list_points_at_the_item():
    text = "output: out\nsubjects:\n  - {id: rex, token: sks, class_noun: dog, images: [a.png, 5]}\n"
    assert problems(text) == ["subjects[0].images[1]: must be text, got 5; YAML read it as a number: quote it, e.g. '5'"]


def test_devices_union_is_one_line():
    text = BASE.replace("images: imgs/}", "images: imgs/, train: {devices: two}}")
    assert problems(text) == ["subjects[0].train.devices: must be 'auto' or a number of devices >= 1, got 'two'"]


def test_problems_come_in_file_order():
    text = ("output: out\nversion: 3\nsubjects:\n"
            "  - {id: a, token: sks, class_noun: dog, images: x, instance_prompt: '{tokn}'}\n"
            "  - {id: B, token: sks, class_noun: dog, images: x, train: {max_steps: 0}}\n")
    assert [p.split(":")[0] for p in problems(text)] == [
        "version", "subjects[0].instance_prompt", "subjects[1].train.max_steps", "subjects[1].id"]


def test_merged_checks_run_once_the_schema_is_clean():
    text = BASE.replace("images: imgs/}", "images: imgs/, train: {max_steps: 5, lr_warmup_steps: 5}}")
    assert problems(text) == ["subjects[0].train.lr_warmup_steps: must be < max_steps (5), got 5"]


def test_subject_settings_merge_over_defaults_section_by_section():
    text = ("output: out\ndefaults: {resolution: 32, train: {max_steps: 7, seed: 3}}\nsubjects:\n"
            "  - {id: rex, token: sks, class_noun: dog, images: imgs/, train: {max_steps: 9}}\n")
    s = resolve_subjects(parse_manifest(text), base_dir=Path("/m"))[0]
    assert (s.resolution, s.train.max_steps, s.train.seed, s.images) == (32, 9, 3, ["/m/imgs/"])


@pytest.mark.parametrize("arch", ["tiny-sd", "small-sd"])
def test_geometry_from_configs_matches_what_the_vae_does(arch):
    """The scale factor validate reads from the config is what the VAE really does to an image's size."""
    import torch
    from diffusers import AutoencoderKL

    from dbbatch.batch.model_checks import model_geometry
    from dbbatch.models.builtin import ARCHS

    factor, native, patch = model_geometry(f"builtin:{arch}", None, storage=None, check_remote=False)
    vae = AutoencoderKL(**ARCHS[arch]["vae"])
    with torch.no_grad():
        latent = vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean
    assert 64 // latent.shape[-1] == factor
    assert native == ARCHS[arch]["unet"]["sample_size"] * factor and patch == 1


def test_geometry_of_a_diffusers_folder_needs_only_its_configs(tmp_path: Path):
    from dbbatch.batch.model_checks import model_geometry

    (tmp_path / "vae").mkdir()
    (tmp_path / "unet").mkdir()
    (tmp_path / "vae" / "config.json").write_text('{"block_out_channels": [128, 256, 512, 512]}')
    (tmp_path / "unet" / "config.json").write_text('{"sample_size": 96}')
    assert model_geometry(str(tmp_path), None, storage=None, check_remote=False) == (8, 768, 1)  # SD 2.x at 768
    (tmp_path / "vae" / "config.json").write_text("not json")
    assert model_geometry(str(tmp_path), None, storage=None, check_remote=False) is None  # reported elsewhere


def test_protocol_did_you_mean():
    from dbbatch.batch.validation import location_problem
    from dbbatch.store.storage import Storage

    assert location_problem(Storage(), "memory://ok/out", "output") is None
    assert location_problem(Storage(), "gz://b/out", "output").endswith("did you mean 'gs://'?")
