"""Chaos: kill `dbbatch run` at random moments of every stage, rerun it, and check what must hold afterwards.

    python scripts/chaos.py --rounds 40 --seed 7            # make chaos: solo, packed, sweep, evaluation, queue, s3
    python scripts/chaos.py --rounds 3 --scenarios solo     # a short round (tests/test_chaos.py runs one)
    python scripts/chaos.py --every-moment SIGTERM --scenarios solo,packed   # each moment once: 143, a checkpoint

Each round picks a scenario (a small batch on the built-in tiny model), a moment and a signal. The moment is a
fault point of dbbatch/core/faults.py (a training step, a file being uploaded, a point of publishing) or a
random delay after the start; the signal is SIGKILL or SIGTERM. The run is stopped there, then run again (a new
pod: a fresh work dir, everything else from the output store) until it exits 0. Then, for the round:
- the stopped run exited as documented (SIGTERM: 143, whenever it came; SIGKILL: killed), and a SIGTERM during
  training left a checkpoint of its step;
- every subject is published (`_SUCCESS`), and once: no run but the one `_SUCCESS` names reports it succeeded,
  and that one (if it wrote a report) does; its checkpoints are gone;
- its weights are bitwise those of the uninterrupted reference run, and so is its loss curve (a packed
  member that resumed in another cohort: to float32 rounding, PACKED_TOL, as tests/test_packing.py documents);
- no partial file (`.<name>.<hex>.part`, `*.part`) is left in a published subject's folder.
A queue round starts two `--queue` workers on one output and stops one of them. An s3 round writes to a moto
S3 server behind a TCP proxy and cuts the endpoint when the moment comes (an outage of 1-4 s, the lease's
renewals included), then sends the signal or none (the run rides the outage out on its retries, or fails its
subject or the batch's storage cleanly: exit 0, 1 or 3); its output is read back from the store for the checks.

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
SCENARIOS = ("solo", "packed", "sweep", "evaluation", "queue", "s3")


def default_start(args: list[str], env: dict[str, str], cwd: Path) -> Any:
    """`dbbatch ARGS` as a process of its own (tests pass their fork server's equivalent)."""
    return subprocess.Popen([sys.executable, "-m", "dbbatch", *args], env=env, cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "DBBATCH_"))}
    env.update(PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""), PYTHONUNBUFFERED="1",
               OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"), DBBATCH_LEASE_SECONDS="6", **extra)
    return env


class S3World:
    """A moto S3 server (started here unless `endpoint` names one) behind a cuttable proxy, and one bucket."""

    def __init__(self, root: Path, endpoint: Optional[str] = None, bucket: str = "chaos"):
        from tcpproxy import CuttableProxy, free_port

        self.server = None
        if endpoint is None:
            port = free_port()
            self.server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                           stdout=open(root / "moto.log", "wb"), stderr=subprocess.STDOUT,
                                           env={k: v for k, v in os.environ.items() if not k.startswith("AWS_")})
            endpoint = f"http://127.0.0.1:{port}"
        self.endpoint, self.bucket = endpoint, bucket
        deadline = time.monotonic() + 60
        while True:
            try:
                fs = self.fs()
                if not fs.exists(bucket):
                    fs.mkdir(bucket)
                break
            except Exception:  # noqa: BLE001 - moto still starting
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        self.proxy = CuttableProxy(int(endpoint.rsplit(":", 1)[1]))

    def fs(self) -> Any:
        import s3fs

        return s3fs.S3FileSystem(endpoint_url=self.endpoint, key="testing", secret="testing", skip_instance_cache=True)

    def env(self) -> dict[str, str]:
        """What a pod's environment says to reach the store (through the proxy), with short retries."""
        return {"AWS_ENDPOINT_URL": self.proxy.url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true", "AWS_MAX_ATTEMPTS": "1",
                "AWS_CONFIG_FILE": "/nonexistent", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
                "DBBATCH_RETRY_ATTEMPTS": "4", "DBBATCH_RETRY_BACKOFF_SECONDS": "0.5"}

    def download(self, url: str, local: Path) -> Path:
        fs = self.fs()
        local.mkdir(parents=True, exist_ok=True)
        for key in fs.find(url):
            dest = local / key[len(url.removeprefix("s3://")) + 1:]
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(fs.cat_file(key))
        return local

    def close(self) -> None:
        self.proxy.cut()
        if self.server is not None:
            self.server.terminate()
            self.server.wait(10)


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
    if scenario == "s3":  # points that can also go on without a signal (an upload's pause waits for one)
        return out + ["pause_at_publish=config", "pause_at_publish=success"] + [f"after={t}" for t in (1.5, 3.0, 5.0)]
    out += [f"pause_at_upload={n}" for n in (f"step-{EVERY:07d}.ckpt", "diffusion_pytorch_model.safetensors",
                                             "pytorch_lora_weights.safetensors", "grid.png", "metrics.json", "photos.png",
                                             "000001.png",  # a class-prior image (priors)
                                             "index.html")]  # the batch report
    out += ["pause_at_publish=config", "pause_at_publish=success", "sigterm_at_checkpoint=3"]
    out += [f"after={t}" for t in (0.5, 1.5, 3.0, 5.0)]
    return out


def in_training(moment: str) -> bool:
    """Whether a stop at this moment lands while a subject trains (a checkpoint must then be stored)."""
    return moment.startswith(("pause_at_step=", "sigterm_at_checkpoint=", "pause_at_upload=step-"))


# -- one round ---------------------------------------------------------------------------------------------------
@dataclass
class Round:
    scenario: str
    moment: str
    sig: str
    outage: float = 0.0  # s3: seconds the endpoint is cut when the moment comes
    reached: bool = False
    exit_code: Optional[int] = None
    problems: list[str] = field(default_factory=list)


def _trained(subject: Path) -> dict[str, Any]:
    """A published subject's weights (full: the UNet; LoRA: the adapters) and loss curve."""
    from safetensors.torch import load_file

    files = [subject / "lora" / "pytorch_lora_weights.safetensors", subject / "model" / "unet" / "diffusion_pytorch_model.safetensors"]
    weights = load_file(str(next(f for f in files if f.exists())))
    return {"weights": weights, "losses": json.loads((subject / "metrics.json").read_text())["loss_curve"]}


def _equal(a: dict[str, Any], b: dict[str, Any], tol: float = 0.0) -> bool:
    import torch

    if a["weights"].keys() != b["weights"].keys() or len(a["losses"]) != len(b["losses"]):
        return False
    if tol == 0.0:
        return a["losses"] == b["losses"] and all(torch.equal(a["weights"][k], b["weights"][k]) for k in a["weights"])
    return (all(abs(x - y) <= tol for x, y in zip(a["losses"], b["losses"]))
            and all((a["weights"][k] - b["weights"][k]).abs().max() <= tol for k in a["weights"]))


# Packed members that resume in another cohort (K changed: the others were published) train the same sums in
# other kernels: equal to float32 rounding, as tests/test_packing.py documents (TOL there), not bitwise.
PACKED_TOL = 1e-5


def check(out: Path, reference: Path, subject_ids: list[str], tol: float = 0.0) -> list[str]:
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
        told = [s["status"] for r in reports if r["run_id"] == published_by for s in r["subjects"] if s["id"] == sid]
        if told and told != ["succeeded"]:  # the run that wrote _SUCCESS, if it wrote a report, says succeeded
            problems.append(f"{sid}: published by {published_by}, which reported it {told[0]}")
        if (folder / "checkpoints").exists() and any((folder / "checkpoints").iterdir()):
            problems.append(f"{sid}: published, and its checkpoints are still stored")
        parts = [str(p.relative_to(out)) for p in folder.rglob("*") if PART.search(p.name)]
        if parts:
            problems.append(f"{sid}: partial files left: {parts[:3]}")
        if not _equal(_trained(folder), _trained(reference / sid), tol):
            problems.append(f"{sid}: weights or loss curve differ from the uninterrupted run"
                            + (f" by more than {tol:g}" if tol else ""))
    return problems


def play(rnd: Round, root: Path, reference: Path, start: Callable[..., Any] = default_start,
         env: Callable[..., dict[str, str]] = base_env, timeout: float = 300, s3: Optional[S3World] = None) -> Round:
    """Stop a run of the round's scenario at its moment with its signal, rerun until it exits 0, check."""
    out = root / "out"
    output = f"s3://{s3.bucket}/{root.name}" if rnd.scenario == "s3" and s3 is not None else str(out)
    m = manifest(root, "solo" if rnd.scenario == "s3" else rnd.scenario, output)
    marker = root / "marker"
    faults = {} if rnd.moment.startswith("after=") else {"DBBATCH_FAULTS": rnd.moment, "DBBATCH_FAULT_MARKER": str(marker)}
    if rnd.scenario == "s3":
        assert s3 is not None, "an s3 round needs the S3World"
        faults.update(s3.env())
        plain_env = env
        env = lambda **kw: plain_env(**{**s3.env(), **kw})  # noqa: E731 - every run of the round reaches the store
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
    if rnd.outage and victim.poll() is None:  # the endpoint dies while the run is at its moment
        s3.proxy.cut()
        if rnd.sig == "none" and not rnd.moment.startswith("after="):
            Path(f"{marker}.continue").write_text("")  # it goes on into the outage
        time.sleep(rnd.outage)
        s3.proxy.restore()
    if rnd.moment.startswith("sigterm_at"):
        rnd.sig = "SIGTERM"  # the process signals itself, mid-write
    elif rnd.sig != "none" and victim.poll() is None:
        victim.send_signal(getattr(signal, rnd.sig))
    victim_err = [p.communicate(timeout=timeout)[1] for p in procs][0]
    rnd.exit_code = victim.returncode
    if rnd.reached and rnd.sig == "SIGTERM" and in_training(rnd.moment) and rnd.exit_code == 143:
        # SIGTERM during training: the grace period went to a checkpoint of the step it came in (said in the log:
        # the stored file itself may be gone by now, removed by the queue worker that finished the subject)
        if "SIGTERM received; checkpoint at step" not in victim_err:
            rnd.problems.append("SIGTERM during training stored no checkpoint")
    if rnd.reached:
        # no signal: the run rode the outage out (0), failed its subject (1) or the batch's storage (3)
        expected = {"SIGTERM": (143,), "SIGKILL": (-signal.SIGKILL,), "none": (0, 1, 3)}[rnd.sig]
        if rnd.exit_code not in expected:
            rnd.problems.append(f"the stopped run exited {rnd.exit_code}, expected {' or '.join(map(str, expected))}")
    for attempt in range(3):  # a new pod each time; a SIGKILLed holder's lease expires or is taken over
        rerun = start(["run", str(m)], env(DBBATCH_WORK_DIR=str(root / f"rerun{attempt}")), root)
        _, err = rerun.communicate(timeout=timeout)
        if rerun.returncode == 0:
            break
    else:
        rnd.problems.append(f"the rerun exited {rerun.returncode}: {err.strip().splitlines()[-1:]}")
    ids = [p.parent.name for p in reference.glob("*/_SUCCESS")]
    if output != str(out):
        s3.download(output, out)  # read back from the store, past the proxy
    rnd.problems += check(out, reference, sorted(ids), PACKED_TOL if rnd.scenario == "packed" else 0.0)
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
    out = []
    for s in (rng.choice(scenarios) for _ in range(n)):
        out.append(Round(s, rng.choice(moments(s)), rng.choice(["SIGKILL", "SIGTERM", *(["none"] if s == "s3" else [])]),
                         outage=round(rng.uniform(1.0, 4.0), 1) if s == "s3" else 0.0))
    return out


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma-separated, of {', '.join(SCENARIOS)}")
    ap.add_argument("--keep", type=Path, help="keep every round's folders here (default: a temporary folder)")
    ap.add_argument("--every-moment", choices=["SIGTERM", "SIGKILL"],
                    help="instead of random rounds: each scenario stopped once at each of its moments with this signal")
    a = ap.parse_args(argv)
    scenarios = tuple(a.scenarios.split(","))
    unknown = [s for s in scenarios if s not in SCENARIOS]
    if unknown:
        ap.error(f"unknown scenario {unknown[0]}; choose from {', '.join(SCENARIOS)}")
    base = a.keep or Path(tempfile.mkdtemp(prefix="dbbatch-chaos-"))
    base.mkdir(parents=True, exist_ok=True)
    refs: dict[str, Path] = {}
    played: list[Round] = []
    started = time.monotonic()
    planned = ([Round(s, m, a.every_moment, outage=2.0 if s == "s3" else 0.0) for s in scenarios for m in moments(s)]
               if a.every_moment else rounds(a.rounds, a.seed, scenarios))
    s3 = S3World(base) if any(r.scenario == "s3" for r in planned) else None
    for i, rnd in enumerate(planned):
        # a queue batch and an s3 one are the solo batch (where it is stored does not change a bit of it)
        ref_scenario = "solo" if rnd.scenario in ("queue", "s3") else rnd.scenario
        if ref_scenario not in refs:
            (base / f"ref-{ref_scenario}").mkdir(parents=True, exist_ok=True)
            refs[ref_scenario] = reference_run(base / f"ref-{ref_scenario}", ref_scenario)
        root = base / f"round{i:03d}"
        root.mkdir(parents=True, exist_ok=True)
        play(rnd, root, refs[ref_scenario], s3=s3)
        played.append(rnd)
        state = "ok" if not rnd.problems else "FAILED: " + "; ".join(rnd.problems)
        outage = f" outage {rnd.outage}s" if rnd.outage else ""
        print(f"round {i:3d} {rnd.scenario:10s} {rnd.sig:7s} at {rnd.moment + outage:45s} reached={str(rnd.reached):5s} "
              f"exit={rnd.exit_code}  {state}", flush=True)
    if s3 is not None:
        s3.close()
    reached = [r for r in played if r.reached]
    failed = [r for r in played if r.problems]
    print(f"{len(played)} kills tried, {len(reached)} reached their moment, {len(played) - len(failed)} survived "
          f"(every invariant held), {len(failed)} failed; {time.monotonic() - started:.0f}s; folders in {base}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
