"""Sweeps: the expansion (a pure function), the manifest's variants, the CLI listing them, and a 2x2 sweep on the
toy world whose report names the best variant."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from conftest import REPO, cli_env, draw_subject, run_cli, tiny_manifest

from dbbatch.config.parse import parse_manifest
from dbbatch.config.resolve import resolve_subjects
from dbbatch.config.sweeps import expand, format_value, short_names, value_labels

ISSUE_SWEEP = {"train.learning_rate": [1.0e-4, 5.0e-5], "train.lora.rank": [4, 16]}


def _subjects(text: str):
    return resolve_subjects(parse_manifest(text, "m.yaml"), None)


def test_expand_names_every_combination_and_sets_each_value():
    raw = {"id": "rex", "token": "sks", "class_noun": "dog", "images": "p/", "train": {"lora": {"alpha": 8}},
           "sweep": ISSUE_SWEEP}
    variants = expand(raw, ISSUE_SWEEP)
    assert [v[0] for v in variants] == ["rex~lr=1e-4,rank=4", "rex~lr=1e-4,rank=16", "rex~lr=5e-5,rank=4", "rex~lr=5e-5,rank=16"]
    vid, values, subject = variants[3]
    assert values == {"train.learning_rate": 5e-5, "train.lora.rank": 16}
    assert subject["train"] == {"lora": {"alpha": 8, "rank": 16}, "learning_rate": 5e-5} and "sweep" not in subject
    assert raw["train"] == {"lora": {"alpha": 8}}  # the input is not changed
    assert expand(raw, ISSUE_SWEEP) == variants  # stable: the same manifest names the same variants


@pytest.mark.parametrize("value, shown", [(1e-4, "1e-4"), (3e-3, "3e-3"), (2.5e-6, "2.5e-6"), (0.05, "0.05"), (0.5, "0.5"),
                                          (7.5, "7.5"), (16, "16"), (True, "true"), (None, "null"), ("cosine", "cosine")])
def test_values_read_as_written(value, shown):
    assert format_value(value) == shown


def test_values_that_cannot_be_told_apart_in_an_id_are_numbered():
    alike = value_labels([1e-4, 1.00000001e-4])  # both would read 1e-4: digests of the values
    assert len(set(alike)) == 2 and all(x.startswith("h") and len(x) == 7 for x in alike)
    prompts = value_labels(["a photo of {token}", "the {token}"])
    assert len(set(prompts)) == 2 and all(x.startswith("h") for x in prompts)
    # a value's label does not depend on the others: adding or reordering values renames no variant
    assert value_labels(["the {token}", "a {token} dog", "a photo of {token}"])[::2] == prompts[::-1]
    assert value_labels(["constant", "cosine"]) == ["constant", "cosine"]
    assert value_labels(["constant", "a {token} dog"])[0] == "constant"  # only the prompt gets a digest
    assert short_names(["train.learning_rate", "train.lora.alpha", "train.lora.rank"]) == \
        {"train.learning_rate": "lr", "train.lora.alpha": "alpha", "train.lora.rank": "rank"}
    assert short_names(["priors.guidance_scale", "samples.guidance_scale"]) == \
        {"priors.guidance_scale": "priors.guidance_scale", "samples.guidance_scale": "samples.guidance_scale"}


def test_variants_are_subjects_with_their_values_their_origin_and_their_defaults():
    subjects = _subjects(f"""
output: out
defaults: {{train: {{method: lora, lora: {{target: attention+ff, alpha: 4}}}}}}
subjects:
  - {{id: rex, token: sks, class_noun: dog, images: p/, sweep: {json.dumps(ISSUE_SWEEP)}}}
  - {{id: kit, token: zwx, class_noun: cat, images: q/, train: {{lora: {{rank: 8}}}}}}
""")
    assert [s.id for s in subjects] == ["rex~lr=1e-4,rank=4", "rex~lr=1e-4,rank=16", "rex~lr=5e-5,rank=4",
                                        "rex~lr=5e-5,rank=16", "kit"]
    v = subjects[1]
    assert (v.sweep_of, v.swept) == ("rex", {"train.learning_rate": 1e-4, "train.lora.rank": 16})
    assert (v.train.learning_rate, v.train.lora.rank, v.train.lora.target, v.train.lora.alpha) == (1e-4, 16, "attention+ff", 4)
    assert v.settings_from["train.learning_rate"] == v.settings_from["train.lora.rank"] == "subjects[0].sweep"
    assert v.images == ["p/"] and v.token == "sks" and [s.index for s in subjects] == [0, 1, 2, 3, 4]
    # a subject's own nested key keeps the rest of the section its defaults set (merged key by key)
    assert (subjects[4].train.lora.rank, subjects[4].train.lora.target, subjects[4].sweep_of) == (8, "attention+ff", None)


def test_validate_and_dry_run_list_the_variants_and_variants_of_one_shape_pack(tmp_path: Path):
    photos = draw_subject(tmp_path / "p")
    m = tiny_manifest(tmp_path / "m.yaml", str(tmp_path / "out"), [
        {"id": "rex", "token": "sks", "class_noun": "dog", "images": str(photos), "train": {"method": "lora"},
         "sweep": {"train.seed": [1, 2], "train.lora.rank": [4, 8]}},
        {"id": "kit", "token": "zwx", "class_noun": "cat", "images": str(photos)}], packing={"subjects_per_step": 4})
    ok = run_cli("validate", str(m), "--no-check-remote", "--show-settings")
    assert ok.returncode == 0, ok.stderr
    assert "rex~seed=2,rank=8\ttrain.lora.rank = 8\t(from subjects[0].sweep)" in ok.stdout  # a nested swept setting
    assert "rex: sweep of 4 variant(s): rex~seed=1,rank=4, rex~seed=1,rank=8, rex~seed=2,rank=4, rex~seed=2,rank=8" in ok.stdout
    dry = run_cli("run", str(m), "--dry-run", "--only", "rex", env=cli_env(DBBATCH_WORK_DIR=str(tmp_path / "w")))
    assert dry.returncode == 0, dry.stderr
    lines = dry.stdout.splitlines()
    assert [line.split("\t")[0] for line in lines[1:5]] == ["rex~seed=1,rank=4", "rex~seed=1,rank=8", "rex~seed=2,rank=4", "rex~seed=2,rank=8"]
    assert "kit\t" not in dry.stdout  # --only rex: its variants, nothing else
    cohorts = [line.strip() for line in lines if line.strip().startswith("cohort-")]
    assert sorted(c.split(": ", 1)[1] for c in cohorts) == ["rex~seed=1,rank=4, rex~seed=2,rank=4", "rex~seed=1,rank=8, rex~seed=2,rank=8"]


@pytest.mark.slow
def test_a_2x2_sweep_on_the_toy_world_names_its_best_variant(tmp_path: Path):
    """manifests/sweep.yaml, shortened: four variants trained and scored; each variant's config.yaml records
    its values, and the report's best is the variant whose published score is highest (read from metrics.json)."""
    doc = yaml.safe_load((REPO / "manifests" / "sweep.yaml").read_text())
    doc["output"] = str(tmp_path / "out")
    doc["tracking"] = {"tensorboard": False}
    doc["defaults"]["train"].update(max_steps=40, checkpoint_every=40)
    doc["defaults"]["evaluation"].update(every=20, seeds=[0, 1])
    doc["defaults"]["samples"]["seeds"] = [0, 1]
    import subprocess
    import sys

    drawn = subprocess.run([sys.executable, str(REPO / "scripts" / "make_demo_images.py"), str(tmp_path / "photos")])
    assert drawn.returncode == 0
    doc["subjects"][0]["images"] = str(tmp_path / "photos" / "tom")
    m = tmp_path / "sweep.yaml"
    m.write_text(yaml.safe_dump(doc, sort_keys=False))
    proc = run_cli("run", str(m), env=cli_env(DBBATCH_WORK_DIR=str(tmp_path / "work")))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "out"
    ids = ["tom~lr=3e-3,rank=4", "tom~lr=3e-3,rank=16", "tom~lr=3e-4,rank=4", "tom~lr=3e-4,rank=16"]
    scores = {}
    for vid in ids:
        config = yaml.safe_load((out / vid / "config.yaml").read_text())["subject"]
        lr, rank = (3e-3 if "lr=3e-3" in vid else 3e-4), (4 if vid.endswith("rank=4") else 16)
        assert (config["sweep_of"], config["swept"]) == ("tom", {"train.learning_rate": lr, "train.lora.rank": rank})
        assert (config["train"]["learning_rate"], config["train"]["lora"]["rank"]) == (lr, rank)
        metrics = json.loads((out / vid / "metrics.json").read_text())
        scores[vid] = metrics["evaluation"]["published"]["dino"]
        assert metrics["trainable_parameters"] > 0
    assert len(set(scores.values())) == 4  # four different models
    summary = json.loads((out / "_report" / "summary.json").read_text())
    (group,) = summary["sweeps"]
    assert group["subject"] == "tom" and sorted(v["id"] for v in group["variants"]) == sorted(ids)
    assert group["best"] == max(scores, key=scores.get)
    assert (out / "_report" / group["plot"]).is_file()
    page = (out / "_report" / "index.html").read_text()
    marked = re.findall(r'<tr class="variant [a-z]+ best" data-id="([^"]+)"', page)
    assert marked == [group["best"]] and page.count('best-mark">') == 1


def test_problems_name_the_entry_of_the_file_and_a_shared_problem_once():
    from dbbatch.core.errors import ManifestError

    text = """
output: out
subjects:
  - {id: rex, token: sks, class_noun: dog, images: p/, sweep: {train.seed: [1, 2]}}
  - {id: kit, token: zwx, class_noun: cat, images: p/, train: {max_steps: 5, lr_warmup_steps: 9}}
  - {id: tom, token: ohwx, class_noun: cat, images: p/, evaluation: {keep: best}, sweep: {train.seed: [1, 2]}}
"""
    with pytest.raises(ManifestError) as e:
        parse_manifest(text, "m.yaml")
    assert e.value.problems == [
        "subjects[1].train.lr_warmup_steps: must be < max_steps (5), got 9",
        "subjects[2](tom~seed=1).evaluation.keep: set, but no evaluation model is (tom~seed=1); set evaluation.clip "
        "(and/or evaluation.dino), e.g. clip: builtin:toy-clip on the toy world (and 1 more variant(s) of this sweep)"]
    ok = parse_manifest(text.replace("lr_warmup_steps: 9", "lr_warmup_steps: 1").replace("evaluation: {keep: best}, ", ""))
    subjects = resolve_subjects(ok, None)
    assert [s.settings_from["train.max_steps"] for s in subjects] == ["dbbatch", "dbbatch", "subjects[1]", "dbbatch", "dbbatch"]
    assert subjects[3].settings_from["train.seed"] == "subjects[2].sweep"
