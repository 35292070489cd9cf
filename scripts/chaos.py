"""Chaos: kill `dbbatch run` at random moments of every stage, rerun it, and check what must hold afterwards.

    python scripts/chaos.py --rounds 40 --seed 7            # make chaos: solo, packed, sweep, evaluation, queue
    python scripts/chaos.py --rounds 3 --scenarios solo     # a short round (tests/test_chaos.py runs one)

Each round picks a scenario (a small batch on the built-in tiny model), a moment and a signal. The moment is a
fault point of dbbatch/core/faults.py (a training step, a file being uploaded, a point of publishing) or a
random delay after the start; the signal is SIGKILL or SIGTERM. The run is stopped there, then run again (a new
pod: a fresh work dir, everything else from the output store) until it exits 0. Then, for the round:
- the stopped run exited as documented (SIGTERM: 143, whenever it came; SIGKILL: killed);
- every subject is published (`_SUCCESS`), and once: no run but the one `_SUCCESS` names reports it succeeded;
- its weights are bitwise those of the uninterrupted reference run, and so is its loss curve;
- no partial file (`.<name>.<hex>.part`, `*.part`) is left in a published subject's folder.
A queue round starts two `--queue` workers on one output and stops one of them.

It prints one line per round and a summary (kills tried, reached, survived); it exits 1 if any invariant
failed. CPU only, tens of seconds per round.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

REPO = Path(__file__).resolve().parent.parent
PART = re.compile(r"(^\..+\.[0-9a-f]{8}\.part$)|(\.part$)")
STEPS, EVERY = 8, 3
SCENARIOS = ("solo", "packed", "sweep", "evaluation", "queue")


def default_start(args: list[str], env: dict[str, str], cwd: Path) -> Any:
    """`dbbatch ARGS` as a process of its own (tests pass their fork server's equivalent)."""
    return subprocess.Popen([sys.executable, "-m", "dbbatch", *args], env=env, cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "DBBATCH_"))}
    env.update(PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""), PYTHONUNBUFFERED="1",
               OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"), DBBATCH_LEASE_SECONDS="6", **extra)
    return env


# -- scenarios -------------------------------------------------------------------------------------------------
def _photos(root: Path, name: str, color: tuple[int, int, int]) -> str:
    from PIL import Image, ImageDraw

    folder = root / "imgs" / name
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(3):
        img = Image.new("RGB", (48, 48), (200 + 10 * i, 215, 205))
        ImageDraw.Draw(img).rectangle((8 + 2 * i, 10, 38, 36 - 2 * i), fill=color)
        img.save(folder / f"img{i}.png")
    return f"imgs/{name}/"


def manifest(root: Path, scenario: str, output: str) -> Path:
    """The scenario's manifest in `root` (photos beside it), writing to `output`."""
    rex, tom = _photos(root, "rex", (220, 30, 30)), _photos(root, "tom", (30, 60, 220))
    lora = {"method": "lora", "lora": {"rank": 4}}
    subjects: list[dict[str, Any]] = [{"id": "rex", "token": "sks", "class_noun": "dog", "images": rex},
                                      {"id": "tom", "token": "zwx", "class_noun": "cat", "images": tom, "train": lora}]
    doc: dict[str, Any] = {"version": 1, "base_model": "builtin:tiny-sd", "output": output, "defaults": {
        "resolution": 32, "train": {"max_steps": STEPS, "checkpoint_every": EVERY, "learning_rate": 1e-4},
        "priors": {"num_images": 2, "steps": 2, "batch_size": 2},
        "samples": {"prompts": ["a photo of {token} {class_noun}"], "seeds": [0], "steps": 2}}}
    if scenario == "packed":
        subjects[0]["train"] = lora
        doc["packing"] = {"subjects_per_step": 2}
    elif scenario == "sweep":
        subjects = [{**subjects[1], "sweep": {"train.learning_rate": [1e-4, 3e-4]}}]
    elif scenario == "evaluation":
        doc["defaults"]["evaluation"] = {"clip": "builtin:toy-clip", "every": 4, "keep": "best",
                                         "prompts": ["a photo of {token} {class_noun} on a beach"], "seeds": [0]}
    doc["subjects"] = subjects
    path = root / f"{scenario}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def moments(scenario: str) -> list[str]:
    """The fault points a stop can land at (dbbatch/core/faults.py), and `after=<seconds>`."""
    out = [f"pause_at_step={s}" for s in range(1, STEPS)]
    out += [f"pause_at_upload={n}" for n in (f"step-{EVERY:07d}.ckpt", "diffusion_pytorch_model.safetensors",
                                             "pytorch_lora_weights.safetensors", "grid.png", "metrics.json", "photos.png")]
    out += ["pause_at_publish=config", "pause_at_publish=success", "sigterm_at_checkpoint=3"]
    out += [f"after={t}" for t in (0.5, 1.5, 3.0, 5.0)]
    return out


# -- one round ---------------------------------------------------------------------------------------------------
@dataclass
class Round:
    scenario: str
    moment: str
    sig: str
    reached: bool = False
    exit_code: Optional[int] = None
    problems: list[str] = field(default_factory=list)


def _trained(subject: Path) -> dict[str, Any]:
    """A published subject's weights (full: the UNet; LoRA: the adapters) and loss curve."""
    from safetensors.torch import load_file

    files = [subject / "lora" / "pytorch_lora_weights.safetensors", subject / "model" / "unet" / "diffusion_pytorch_model.safetensors"]
    weights = load_file(str(next(f for f in files if f.exists())))
    return {"weights": weights, "losses": json.loads((subject / "metrics.json").read_text())["loss_curve"]}


def _equal(a: dict[str, Any], b: dict[str, Any]) -> bool:
    import torch

    return a["losses"] == b["losses"] and a["weights"].keys() == b["weights"].keys() and all(
        torch.equal(a["weights"][k], b["weights"][k]) for k in a["weights"])


def check(out: Path, reference: Path, subject_ids: list[str]) -> list[str]:
    """What must hold for a batch after its reruns (see the module's docstring); one line per breach."""
    problems = []
    reports = [json.loads(p.read_text()) for p in sorted((out / "_runs").glob("*.json"))]
    for sid in subject_ids:
        folder = out / sid
        if not (folder / "_SUCCESS").exists():
            problems.append(f"{sid}: not published")
            continue
        # once: at most one run reports it succeeded, and it is the run `_SUCCESS` names (a run SIGKILLed after
        # publishing leaves no report; then the rerun must have skipped the subject, not published it again)
        published_by = (folder / "_SUCCESS").read_text().strip()
        succeeded = [r["run_id"] for r in reports for s in r["subjects"] if s["id"] == sid and s["status"] == "succeeded"]
        if len(succeeded) > 1 or (succeeded and succeeded != [published_by]):
            problems.append(f"{sid}: published by {published_by}, reported succeeded by {succeeded}")
        parts = [str(p.relative_to(out)) for p in folder.rglob("*") if PART.search(p.name)]
        if parts:
            problems.append(f"{sid}: partial files left: {parts[:3]}")
        if not _equal(_trained(folder), _trained(reference / sid)):
            problems.append(f"{sid}: weights or loss curve differ from the uninterrupted run")
    return problems


def play(rnd: Round, root: Path, reference: Path, start: Callable[..., Any] = default_start,
         env: Callable[..., dict[str, str]] = base_env, timeout: float = 300) -> Round:
    """Stop a run of the round's scenario at its moment with its signal, rerun until it exits 0, check."""
    out = root / "out"
    m = manifest(root, rnd.scenario, str(out))
    marker = root / "marker"
    faults = {} if rnd.moment.startswith("after=") else {"DBBATCH_FAULTS": rnd.moment, "DBBATCH_FAULT_MARKER": str(marker)}
    workers = 2 if rnd.scenario == "queue" else 1
    extra = ["--queue"] if rnd.scenario == "queue" else []
    procs = [start(["run", str(m), *extra], env(DBBATCH_WORK_DIR=str(root / f"pod{i}"), **(faults if i == 0 else {})), root)
             for i in range(workers)]  # the second queue worker runs undisturbed beside the stopped one
    victim = procs[0]
    deadline = time.monotonic() + timeout
    if rnd.moment.startswith("after="):
        time.sleep(float(rnd.moment.split("=", 1)[1]))
        rnd.reached = victim.poll() is None
    else:
        while not marker.exists() and victim.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        rnd.reached = marker.exists() or rnd.moment.startswith("sigterm_at")
    if rnd.moment.startswith("sigterm_at"):
        rnd.sig = "SIGTERM"  # the process signals itself, mid-write
    elif victim.poll() is None:
        victim.send_signal(getattr(signal, rnd.sig))
    for p in procs:
        p.communicate(timeout=timeout)
    rnd.exit_code = victim.returncode
    if rnd.reached:
        expected = 143 if rnd.sig == "SIGTERM" else -signal.SIGKILL
        if rnd.exit_code != expected:
            rnd.problems.append(f"the stopped run exited {rnd.exit_code}, expected {expected}")
    for attempt in range(3):  # a new pod each time; a SIGKILLed holder's lease expires or is taken over
        rerun = start(["run", str(m)], env(DBBATCH_WORK_DIR=str(root / f"rerun{attempt}")), root)
        _, err = rerun.communicate(timeout=timeout)
        if rerun.returncode == 0:
            break
    else:
        rnd.problems.append(f"the rerun exited {rerun.returncode}: {err.strip().splitlines()[-1:]}")
    ids = [p.parent.name for p in reference.glob("*/_SUCCESS")]
    rnd.problems += check(out, reference, sorted(ids))
    return rnd


def reference_run(root: Path, scenario: str, start: Callable[..., Any] = default_start,
                  env: Callable[..., dict[str, str]] = base_env) -> Path:
    """The scenario run once without interruption: what every stopped-and-rerun batch must equal."""
    out = root / "ref"
    proc = start(["run", str(manifest(root, scenario, str(out)))], env(DBBATCH_WORK_DIR=str(root / "ref-work")), root)
    _, err = proc.communicate(timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"the reference run of {scenario} failed: {err[-2000:]}")
    return out


def rounds(n: int, seed: int, scenarios: tuple[str, ...]) -> list[Round]:
    rng = random.Random(seed)
    return [Round(s, rng.choice(moments(s)), rng.choice(["SIGKILL", "SIGTERM"])) for s in (rng.choice(scenarios) for _ in range(n))]


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma-separated, of {', '.join(SCENARIOS)}")
    ap.add_argument("--keep", type=Path, help="keep every round's folders here (default: a temporary folder)")
    a = ap.parse_args(argv)
    scenarios = tuple(a.scenarios.split(","))
    unknown = [s for s in scenarios if s not in SCENARIOS]
    if unknown:
        ap.error(f"unknown scenario {unknown[0]}; choose from {', '.join(SCENARIOS)}")
    base = a.keep or Path(tempfile.mkdtemp(prefix="dbbatch-chaos-"))
    refs: dict[str, Path] = {}
    played: list[Round] = []
    started = time.monotonic()
    for i, rnd in enumerate(rounds(a.rounds, a.seed, scenarios)):
        ref_scenario = "solo" if rnd.scenario == "queue" else rnd.scenario  # a queue batch is the solo batch
        if ref_scenario not in refs:
            (base / f"ref-{ref_scenario}").mkdir(parents=True, exist_ok=True)
            refs[ref_scenario] = reference_run(base / f"ref-{ref_scenario}", ref_scenario)
        root = base / f"round{i:03d}"
        root.mkdir(parents=True, exist_ok=True)
        play(rnd, root, refs[ref_scenario])
        played.append(rnd)
        state = "ok" if not rnd.problems else "FAILED: " + "; ".join(rnd.problems)
        print(f"round {i:3d} {rnd.scenario:10s} {rnd.sig:7s} at {rnd.moment:45s} reached={str(rnd.reached):5s} "
              f"exit={rnd.exit_code}  {state}", flush=True)
    reached = [r for r in played if r.reached]
    failed = [r for r in played if r.problems]
    print(f"{len(played)} kills tried, {len(reached)} reached their moment, {len(played) - len(failed)} survived "
          f"(every invariant held), {len(failed)} failed; {time.monotonic() - started:.0f}s; folders in {base}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
