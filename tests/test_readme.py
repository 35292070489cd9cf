"""The README's commands are what CI runs: make test, make demo, then every dbbatch line (scripts/check_readme.py)."""

import importlib.util

from conftest import REPO

spec = importlib.util.spec_from_file_location("check_readme", REPO / "scripts" / "check_readme.py")
check_readme = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check_readme)


def test_ci_runs_the_readme_commands():
    readme = (REPO / "README.md").read_text()
    commands = check_readme.readme_commands(readme)
    assert commands[:2] == ["make demo", "make test"]
    assert {c.split()[1] for c in commands if c.startswith("dbbatch")} >= {"validate", "run", "schema", "tiny-model", "k8s", "report"}
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert "make test" in ci and "make demo" in ci
    assert any("scripts/check_readme.py" in line for line in ci)
    assert ".ci/run" in (REPO / ".github" / "workflows" / "ci.yml").read_text()  # the users' CI runs the same script


def test_every_shipped_manifest_starts_with_its_command_and_validates():
    from dbbatch.models.defaults import load_manifest

    for path in sorted((REPO / "manifests").glob("*.yaml")):
        first = path.read_text().splitlines()[0]
        assert first.startswith("#") and ("dbbatch run" in first or "make demo" in first), f"{path.name}: {first}"
        load_manifest(path)  # raises ManifestError on any problem


def test_the_readme_manifest_example_is_a_valid_manifest():
    import re

    from dbbatch.config.parse import parse_manifest
    from dbbatch.config.resolve import resolve_subjects

    block = re.findall(r"```yaml\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)[0]
    subjects = resolve_subjects(parse_manifest(block, "README.md"), None)
    assert [(s.id, s.train.method, s.model_format, s.train.learning_rate) for s in subjects] == [
        ("rex", "full", "full", 5e-6), ("tom", "lora", "lora", 1e-4)]


def test_the_readme_tracking_and_sweep_examples_are_valid():
    import re

    from dbbatch.config.parse import parse_manifest
    from dbbatch.config.resolve import resolve_subjects

    blocks = re.findall(r"```yaml\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    tracking = next(b for b in blocks if b.startswith("tracking:"))
    m = parse_manifest(tracking + "output: out\nsubjects: [{id: rex, token: sks, class_noun: dog, images: p/}]\n", "README.md")
    assert (m.tracking.wandb.project, m.tracking.mlflow.experiment, m.tracking.backends()) == ("avatars", "avatars", ["wandb", "mlflow"])
    sweep = next(b for b in blocks if "sweep:" in b and b.startswith("subjects:"))
    ids = [s.id for s in resolve_subjects(parse_manifest("output: out\n" + sweep, "README.md"), None)]
    assert ids == ["rex~lr=1e-4,rank=4", "rex~lr=1e-4,rank=16", "rex~lr=5e-5,rank=4", "rex~lr=5e-5,rank=16"]
    assert all(i in (REPO / "README.md").read_text() for i in ids)  # the ids the README names are the real ones
