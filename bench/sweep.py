"""What a sweep costs: four variants of one subject against the same four settings written out as four subjects,
unpackable (learning rate x LoRA rank: each variant trains alone) and packable (seed x prior loss weight, packing
on: one cohort), and what tracking (W&B offline + MLflow's local store) adds. Run by `bench/run.py --sweep`.

Each case is one `dbbatch run` in a subprocess on builtin:toy-sd (LoRA, its native 32 px), timed from the outside;
per-subject seconds come from its --report. Sanity: every case trains four subjects the same number of steps.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

UNPACKABLE = {"train.learning_rate": [3.0e-3, 1.0e-3], "train.lora.rank": [4, 16]}
PACKABLE = {"train.seed": [0, 1], "train.prior_loss_weight": [0.5, 1.0]}


def _manifest(path: Path, output: Path, photos: Path, steps: int, sweep: dict[str, list[Any]], as_sweep: bool,
              packing: int, tracking: dict[str, Any]) -> Path:
    import itertools

    import yaml

    from dbbatch.config.sweeps import set_path

    base = {"token": "sks", "class_noun": "triangle", "images": str(photos)}
    if as_sweep:
        subjects = [{"id": "tom", **base, "sweep": sweep}]
    else:  # the same settings, written out by hand
        subjects = []
        for k, combo in enumerate(itertools.product(*sweep.values())):
            s = {"id": f"tom{k}", **base}
            for p, v in zip(sweep, combo):
                set_path(s, p, v)
            subjects.append(s)
    doc = {"version": 1, "base_model": "builtin:toy-sd", "output": str(output), "packing": {"subjects_per_step": packing},
           "tracking": tracking, "defaults": {"train": {"method": "lora", "max_steps": steps, "checkpoint_every": steps},
                                              "priors": {"source": "base_model"}},
           "subjects": subjects}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _run(manifest: Path, work: Path, env: dict[str, str]) -> dict[str, Any]:
    report = manifest.with_suffix(".report.json")
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "dbbatch", "run", str(manifest), "--report", str(report)],
                          env={**env, "DBBATCH_WORK_DIR": str(work)}, capture_output=True, text=True)
    wall = time.monotonic() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{manifest.name}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    rows = json.loads(report.read_text())["subjects"]
    return {"wall_seconds": round(wall, 1), "subjects": len(rows), "steps": sorted({r["steps"] for r in rows}),
            "subject_seconds": round(sum(r["seconds"] for r in rows), 1)}


def bench_sweep(root: Path, steps: int, say: Callable[[str], None]) -> list[dict[str, Any]]:
    import os

    repo = Path(__file__).resolve().parent.parent
    photos = root / "photos"
    subprocess.run([sys.executable, str(repo / "scripts" / "make_demo_images.py"), str(photos)], check=True,
                   capture_output=True)
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    tracked = {"wandb": {"project": "bench", "mode": "offline", "dir": str(root / "wandb")}, "mlflow": {"experiment": "bench"}}
    cases = [("lr x rank: sweep", UNPACKABLE, True, 1, {}), ("lr x rank: 4 subjects", UNPACKABLE, False, 1, {}),
             ("seed x prior weight, packed: sweep", PACKABLE, True, 4, {}),
             ("seed x prior weight, packed: 4 subjects", PACKABLE, False, 4, {}),
             ("lr x rank: sweep + W&B offline + MLflow", UNPACKABLE, True, 1, tracked)]
    out = []
    for k, (name, sweep, as_sweep, packing, tracking) in enumerate(cases):
        folder = root / f"case{k}"
        folder.mkdir(parents=True, exist_ok=True)
        m = _manifest(folder / "m.yaml", folder / "out", photos / "tom", steps, sweep, as_sweep, packing, tracking)
        say(f"sweep bench: {name}")
        result = {"case": name, **_run(m, folder / "work", env)}
        if result["subjects"] != 4 or result["steps"] != [steps]:
            raise RuntimeError(f"{name}: expected 4 subjects of {steps} steps, got {result}")
        out.append(result)
    return out


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"\n{'case':44} {'wall s':>8} {'subject s (sum)':>16}")
    for r in rows:
        print(f"{r['case']:44} {r['wall_seconds']:8.1f} {r['subject_seconds']:16.1f}")
