"""Shared fixtures. Tests run the real CLI in subprocesses (`python -m dbbatch`) against the tree they live in."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "DBBATCH_"))}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `python -m dbbatch ARGS`; returns the completed process (stdout/stderr as text)."""
    return subprocess.run([sys.executable, "-m", "dbbatch", *args], capture_output=True, text=True,
                          env=env or cli_env(), cwd=cwd or REPO, timeout=timeout)


def draw_subject(folder: Path, color=(220, 30, 30), n: int = 3, size: int = 72) -> Path:
    """A few small PNGs of a coloured square on varied light backgrounds."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = Image.new("RGB", (size, size), (200 + 10 * i, 220 - 5 * i, 210))
        ImageDraw.Draw(img).rectangle((12 + 2 * i, 14, size - 14, size - 12 - 2 * i), fill=color)
        img.save(folder / f"img{i}.png")
    return folder


def tiny_manifest(path: Path, output: str, subjects: list[dict], **overrides) -> Path:
    """Write a small, fast manifest for the built-in tiny model."""
    doc = {
        "version": 1, "base_model": "builtin:tiny-sd", "output": output,
        "defaults": {
            "resolution": 32,
            "train": {"max_steps": 6, "checkpoint_every": 3, "learning_rate": 1e-4},
            "priors": {"num_images": 2, "steps": 2, "batch_size": 2},
            "samples": {"prompts": ["a photo of {token} {class_noun}"], "seeds": [0, 1], "steps": 2},
        },
        "subjects": subjects,
    }
    for k, v in overrides.items():
        doc[k] = v
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.fixture
def work_env(tmp_path: Path) -> dict[str, str]:
    """CLI environment with a private work dir (model cache included)."""
    return cli_env(DBBATCH_WORK_DIR=str(tmp_path / "work"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built-in tiny model written as a diffusers folder (once per session)."""
    out = tmp_path_factory.mktemp("tiny") / "tiny-sd"
    proc = run_cli("tiny-model", str(out))
    assert proc.returncode == 0, proc.stderr
    return out
