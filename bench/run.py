#!/usr/bin/env python
"""Throughput benchmark: where a subject's seconds go, and what a batch of subjects costs.

    python bench/run.py [--arch tiny|small|tiny-sdxl|sd15|sdxl-lora] [--quick] [--json FILE] [--keep DIR]
    python bench/run.py --sweep [--steps N]    # a sweep of four variants against four subjects (bench/sweep.py)

Runs the real worker (`dbbatch.batch.batch.Batch`, one `run_one` per subject, as `dbbatch run` does) on
generated subjects of one class, each batch in a fresh subprocess so its peak RSS is its own, and prints:

- per architecture: model load seconds, prior images/s, training steps/s (median of steady-state steps, from
  the TensorBoard event times Lightning writes every step) and s/step, sampling images/s, publish seconds,
  peak RSS (and on a GPU: peak GPU memory, UNet forward+backward FLOPs per step, model FLOPs utilisation);
- per batch of 1, 4 and 10 subjects: wall time, seconds per subject, what each subject after the first cost
  against its own training + sampling time, and peak RSS against the 1-subject batch.

Phase seconds come from each subject's metrics.json. The script checks its own numbers (every phase measured
above zero, every subject trained its steps, class priors generated once per batch, ...) and the issue's
targets (tiny-sd <= 0.10 s per step; later subjects cost <= their training + sampling + 10%; peak memory of
10 subjects <= 1 subject + 10%).
Exit status: 0 all good, 1 a sanity check failed (the numbers cannot be trusted), 2 a target was missed.
--quick (fewer steps and subjects, for smoke tests) checks sanity only.

`--arch tiny-sdxl` is the SDXL-shaped built-in model (two text encoders, the text_time added embedding) at
its native 64 px, on this CPU. `--arch sd15` is the full SD 1.5 architecture (random weights, built in memory:
no 4 GB folder is written) at 512 px with bf16 autocast, and `--arch sdxl-lora` LoRA (rank 16) on the full
SDXL 1.0 architecture at 1024 px in bf16; both are meant for a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

WARMUP_STEPS = 3  # step times before this are warm-up (allocator, kernel selection) and left out of the median
TINY_TARGET_SECONDS_PER_STEP = 0.10  # issue 6: a reference trainer took 0.13 s here
MARGINAL_TOLERANCE = 1.10  # a later subject costs <= its own training + sampling time + 10%
MEMORY_TOLERANCE = 1.10  # peak RSS of the largest batch <= 1 subject's + 10%
# bf16 dense peaks from NVIDIA's data sheets (the sparse figures are twice these). Ordered: first match wins.
GPU_BF16_PEAK = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989.4e12), ("H200", 989.4e12),
                 ("A100", 312e12), ("L40S", 362e12))


@dataclass(frozen=True)
class Plan:
    arch: str  # the name on the command line
    base_model: str
    resolution: int
    max_steps: int
    prior_images: int
    prior_steps: int
    sample_steps: int
    sample_seeds: int  # grid columns; rows are one prompt plus the class prompt
    batches: tuple[int, ...]
    mixed_precision: str = "no"
    output_dtype: str = "fp32"
    model_format: str = "full"
    in_memory: bool = False  # build the base model in memory instead of writing and loading a folder
    target_seconds_per_step: Optional[float] = None
    method: str = "full"  # train.method
    lora_rank: int = 16  # train.lora.rank (= alpha) with method lora
    prior_source: str = "images"  # priors.source
    checkpoint_every: Optional[int] = None  # None: no checkpoint inside the run
    base_dtype: str = "fp32"  # the manifest's base_dtype


PLANS = {
    # The reference setting: 64 px, batch 1 instance + 1 class, fp32, UNet only, 8 class images, 50 steps.
    "tiny": Plan("tiny", "builtin:tiny-sd", 64, max_steps=50, prior_images=8, prior_steps=20, sample_steps=20,
                 sample_seeds=2, batches=(1, 4, 10), target_seconds_per_step=TINY_TARGET_SECONDS_PER_STEP),
    "small": Plan("small", "builtin:small-sd", 128, max_steps=30, prior_images=8, prior_steps=20, sample_steps=20,
                  sample_seeds=2, batches=(1, 4, 10)),
    # SDXL-shaped, CPU-sized: the same step budget as tiny, on both of its text encoders' conditioning.
    "tiny-sdxl": Plan("tiny-sdxl", "builtin:tiny-sdxl", 64, max_steps=50, prior_images=8, prior_steps=20, sample_steps=20,
                      sample_seeds=2, batches=(1, 4)),
    # GPU: bf16 autocast; outputs as an fp16 delta (the UNet only) so publishing does not write 4 GB per subject.
    "sd15": Plan("sd15", "builtin:sd15", 512, max_steps=100, prior_images=8, prior_steps=25, sample_steps=25,
                 sample_seeds=2, batches=(1, 4), mixed_precision="bf16", output_dtype="fp16", model_format="delta",
                 in_memory=True),
    # GPU: LoRA on the SDXL 1.0 architecture (2.6B-parameter UNet) at 1024 px, bf16 autocast, fp16 adapters.
    "sdxl-lora": Plan("sdxl-lora", "builtin:sdxl", 1024, max_steps=60, prior_images=4, prior_steps=25, sample_steps=25,
                      sample_seeds=1, batches=(1,), mixed_precision="bf16", output_dtype="fp16", model_format="lora",
                      in_memory=True, method="lora", lora_rank=16),
    # FLUX.1-shaped, CPU-sized (tiny-flux): LoRA rank 16 on the attention preset, at its native 64 px
    "tiny-flux": Plan("tiny-flux", "builtin:tiny-flux", 64, max_steps=50, prior_images=8, prior_steps=20, sample_steps=20,
                      sample_seeds=2, batches=(1, 4), model_format="lora", method="lora", lora_rank=16),
    # GPU: LoRA rank 16 on the FLUX.1-dev architecture (12B transformer, T5-XXL) at 512 px from a bf16 base
    "flux-lora": Plan("flux-lora", "builtin:flux", 512, max_steps=30, prior_images=4, prior_steps=28, sample_steps=28,
                      sample_seeds=1, batches=(1,), mixed_precision="bf16", output_dtype="fp16", model_format="lora",
                      in_memory=True, method="lora", lora_rank=16, base_dtype="bf16"),
}
DEFAULT_ARCHS = ("tiny", "small")
# --methods: training methods compared on each architecture (issue 12), each with one checkpoint mid-run
METHODS = {"full": {}, "lora4": {"method": "lora", "lora_rank": 4}, "lora16": {"method": "lora", "lora_rank": 16},
           "lora64": {"method": "lora", "lora_rank": 64},
           "lora16-base": {"method": "lora", "lora_rank": 16, "prior_source": "base_model"}}


def method_plan(plan: Plan, name: str) -> Plan:
    """`plan` trained with method variant `name` (METHODS); full keeps the plan's output format."""
    v = METHODS[name]
    lora = v.get("method") == "lora"
    return replace(plan, arch=f"{plan.arch}/{name}", checkpoint_every=max(1, plan.max_steps // 2),
                   model_format="lora" if lora else plan.model_format,
                   target_seconds_per_step=None if lora else plan.target_seconds_per_step, **v)


def quick(plan: Plan) -> Plan:
    return replace(plan, max_steps=12, prior_images=4, prior_steps=4, sample_steps=4, sample_seeds=1, batches=(1, 2))


# ------------------------------------------------------------------------------------------------------------
# Parent: subjects, manifests, one subprocess per batch, tables, checks


def draw_subjects(folder: Path, count: int, size: int) -> list[Path]:
    """`count` subjects of 4 photos each: a coloured disc on a varied background (distinct hue per subject)."""
    import colorsys
    import random

    from PIL import Image, ImageDraw

    out = []
    for s in range(count):
        sub = folder / f"s{s:02d}"
        sub.mkdir(parents=True, exist_ok=True)
        r, g, b = (round(255 * c) for c in colorsys.hsv_to_rgb(s / max(count, 1), 0.8, 0.9))
        rng = random.Random(s)
        for i in range(4):
            img = Image.new("RGB", (size, size), tuple(rng.randint(150, 240) for _ in range(3)))
            rad = rng.randint(size // 5, size // 3)
            cx, cy = size // 2 + rng.randint(-size // 8, size // 8), size // 2 + rng.randint(-size // 8, size // 8)
            ImageDraw.Draw(img).ellipse((cx - rad, cy - rad, cx + rad, cy + rad), fill=(r, g, b))
            img.save(sub / f"{i}.png")
        out.append(sub)
    return out


def write_manifest(path: Path, plan: Plan, output: Path, subject_dirs: list[Path]) -> Path:
    import yaml

    doc = {
        "version": 1, "base_model": plan.base_model, "output": str(output),
        "output_dtype": plan.output_dtype, "model_format": plan.model_format, "base_dtype": plan.base_dtype,
        "defaults": {
            "resolution": plan.resolution,
            "train": {"max_steps": plan.max_steps, "batch_size": 1, "learning_rate": 5e-6 if plan.method == "full" else 1e-4,
                      "mixed_precision": plan.mixed_precision,
                      # by default no checkpoint inside the run: their cost is the storage's (resume tests)
                      "checkpoint_every": plan.checkpoint_every or plan.max_steps + 1,
                      "method": plan.method,
                      **({"lora": {"rank": plan.lora_rank, "alpha": plan.lora_rank}} if plan.method == "lora" else {})},
            "priors": {"num_images": plan.prior_images, "steps": plan.prior_steps, "batch_size": 8,
                       "source": plan.prior_source},
            "samples": {"prompts": ["a photo of {token} {class_noun} on the beach"],
                        "seeds": list(range(plan.sample_seeds)), "steps": plan.sample_steps, "batch_size": 8,
                        "include_class_prompt": True},
        },
        # One class for every subject: its priors are made by the first subject and reused by the rest.
        "subjects": [{"id": d.name, "token": "sks", "class_noun": "dog", "images": str(d) + "/"} for d in subject_dirs],
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def run_child(spec: dict[str, Any], folder: Path) -> dict[str, Any]:
    """One batch in a fresh interpreter: wall time from spawn to exit (imports included) and its own peak RSS."""
    spec_path = folder / "spec.json"
    spec_path.write_text(json.dumps(spec))
    log_path = folder / "child.log"
    started = time.monotonic()
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--child", str(spec_path)],
                                stdout=log_file, stderr=subprocess.STDOUT, cwd=REPO,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        # wait4, not wait: its rusage is this child's alone, so each batch's peak RSS is its own.
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.monotonic() - started
    result_path = folder / "result.json"
    if proc.returncode != 0 or not result_path.is_file():
        tail = log_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"benchmark child for {folder.name} exited {proc.returncode}; log {log_path}:\n{tail}")
    result = json.loads(result_path.read_text())
    result["wall_seconds"] = wall
    result["peak_rss_mib"] = usage.ru_maxrss / 1024  # Linux reports KiB
    return result


def bench_arch(plan: Plan, root: Path, say) -> dict[str, Any]:
    folder = root / plan.arch
    work = folder / "work"  # shared by the batches: the built-in model folder is written once, then loaded
    subjects = draw_subjects(folder / "images", max(plan.batches), size=plan.resolution * 5 // 4)
    if not plan.in_memory:
        say(f"[{plan.arch}] writing {plan.base_model} to the model cache (not measured)")
        run_child({"mode": "prepare", "base_model": plan.base_model, "work_dir": str(work)}, _fresh(folder / "prepare"))
    batches = {}
    for n in plan.batches:
        bdir = _fresh(folder / f"batch{n}")
        manifest = write_manifest(bdir / "manifest.yaml", plan, bdir / "out", subjects[:n])
        say(f"[{plan.arch}] batch of {n} subject(s) ...")
        res = run_child({"mode": "batch", "manifest": str(manifest), "work_dir": str(work), "plan": asdict(plan),
                         "count_flops": n == plan.batches[0]}, bdir)
        res["metrics"] = [json.loads((bdir / "out" / s["id"] / "metrics.json").read_text()) if s["status"] == "succeeded" else None
                          for s in res["subjects"]]
        batches[n] = res
        say(f"[{plan.arch}] batch of {n}: {res['wall_seconds']:.1f}s wall, peak RSS {res['peak_rss_mib']:.0f} MiB")
    return {"plan": asdict(plan), "batches": batches}


def _fresh(folder: Path) -> Path:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def summarize(run: dict[str, Any]) -> dict[str, Any]:
    """The table's numbers for one architecture (phases from the first batch's first subject)."""
    plan = run["plan"]
    first = run["batches"][min(run["batches"])]
    m = first["metrics"][0] or {}
    sec = m.get("seconds", {})
    samples_per_subject = 2 * plan["sample_seeds"]  # (prompt + class prompt) x seeds
    step_times = [t for b in run["batches"].values() for s in b["subjects"] for t in s.get("step_seconds", [])[WARMUP_STEPS:]]
    s_per_step = statistics.median(step_times) if step_times else 0.0
    out = {
        "arch": plan["arch"], "base_model": plan["base_model"], "resolution": plan["resolution"],
        "precision": plan["mixed_precision"], "device": first.get("device"),
        "model_load_s": first.get("model_load_seconds", 0.0),
        "prior_img_per_s": (m.get("priors_generated", 0) / sec["priors"]) if sec.get("priors") else 0.0,
        "steps_per_s": 1 / s_per_step if s_per_step else 0.0, "s_per_step": s_per_step,
        "steady_steps_measured": len(step_times),
        "train_phase_s": sec.get("train", 0.0),
        "sample_img_per_s": samples_per_subject / sec["sample"] if sec.get("sample") else 0.0,
        "publish_s": sec.get("publish", 0.0), "peak_rss_mib": first["peak_rss_mib"],
        "params_m": first.get("params_m"), "method": plan.get("method", "full"),
        "trainable_params": m.get("trainable_parameters"), "checkpoint_bytes": (m.get("checkpoint_bytes") or [None])[0],
        "output_bytes": m.get("output_bytes"),
        "reset_s": statistics.mean(r for b in run["batches"].values() for r in b.get("reset_seconds", [])) if any(
            b.get("reset_seconds") for b in run["batches"].values()) else None,
    }
    cuda = first.get("cuda")
    if cuda:
        out["peak_gpu_mib"] = cuda["max_allocated_mib"]
        out["gpu"] = cuda["name"]
    flops = first.get("unet_train_flops_per_step")
    if flops:
        out["unet_train_gflop_per_step"] = flops / 1e9
        out["achieved_tflops"] = flops / s_per_step / 1e12 if s_per_step else 0.0
        if cuda and cuda.get("bf16_peak_flops"):
            out["mfu"] = flops / s_per_step / cuda["bf16_peak_flops"] if s_per_step else 0.0
            out["bf16_peak_tflops"] = cuda["bf16_peak_flops"] / 1e12
        if cuda and cuda.get("matmul_tflops"):
            out["measured_matmul_tflops"] = cuda["matmul_tflops"]
    out["batches"] = []
    one_rss = first["peak_rss_mib"]
    for n, b in sorted(run["batches"].items()):
        later = list(zip(b["subjects"], b["metrics"]))[1:]
        own = [mm["seconds"]["train"] + mm["seconds"]["sample"] for _, mm in later if mm]
        cost = [s["seconds"] for s, mm in later if mm]
        out["batches"].append({
            "subjects": n, "wall_s": b["wall_seconds"], "s_per_subject": b["wall_seconds"] / n,
            "first_subject_s": b["subjects"][0]["seconds"],
            "later_subject_s": statistics.mean(cost) if cost else None,
            "later_train_sample_s": statistics.mean(own) if own else None,
            "worst_later_ratio": max(c / o for c, o in zip(cost, own)) if own else None,
            "peak_rss_mib": b["peak_rss_mib"], "rss_vs_1": b["peak_rss_mib"] / one_rss if one_rss else 0.0,
            "peak_gpu_mib": (b.get("cuda") or {}).get("max_allocated_mib"),
        })
    return out


def checks(run: dict[str, Any], summary: dict[str, Any], enforce_targets: bool) -> list[tuple[str, str, bool, str]]:
    """(kind, name, ok, detail); kind is 'sanity' (the measurement itself) or 'target' (the issue's goals)."""
    plan = run["plan"]
    arch = plan["arch"]
    out: list[tuple[str, str, bool, str]] = []

    def add(kind: str, name: str, ok: bool, detail: str) -> None:
        out.append((kind, f"{arch}: {name}", bool(ok), detail))

    for key, label in (("model_load_s", "model load seconds"), ("prior_img_per_s", "prior images/s"),
                       ("steps_per_s", "training steps/s"), ("sample_img_per_s", "sampling images/s"),
                       ("publish_s", "publish seconds"), ("peak_rss_mib", "peak RSS")):
        if key == "prior_img_per_s" and plan.get("prior_source") == "base_model":
            continue  # no class images to make
        add("sanity", f"{label} measured", summary[key] > 0, f"{summary[key]:.4g}")
    for n, b in sorted(run["batches"].items()):
        statuses = [s["status"] for s in b["subjects"]]
        add("sanity", f"batch {n}: every subject succeeded", statuses == ["succeeded"] * n,
            ", ".join(f"{s['id']} {s['status']} {s.get('message') or ''}".strip() for s in b["subjects"]))
        for s, m in zip(b["subjects"], b["metrics"]):
            if not m:
                continue
            sec = m["seconds"]
            steps_ok = m["steps"] == plan["max_steps"] and len(s.get("step_seconds", [])) == plan["max_steps"] - 1
            add("sanity", f"batch {n} {s['id']}: trained {plan['max_steps']} steps, one event per step", steps_ok,
                f"steps {m['steps']}, step intervals {len(s.get('step_seconds', []))}")
            zero = [k for k in ("images", "priors", "train", "sample", "publish") if not sec.get(k, 0) > 0]
            # later subjects reuse the class latents, which can round to 0.000 s: only the first must show priors;
            # priors.source base_model makes none
            if (s is not b["subjects"][0] or plan.get("prior_source") == "base_model") and zero == ["priors"]:
                zero = []
            add("sanity", f"batch {n} {s['id']}: every phase above zero", not zero, f"zero: {zero}" if zero else "ok")
            phases = sum(sec.values())
            add("sanity", f"batch {n} {s['id']}: phases fit in the subject's wall time", phases <= s["seconds"] * 1.01 + 0.01,
                f"phases {phases:.2f}s, subject {s['seconds']:.2f}s")
            steps = s.get("step_seconds", [])
            add("sanity", f"batch {n} {s['id']}: step times fit in the training phase", sum(steps) <= sec["train"] + 0.01,
                f"steps {sum(steps):.2f}s, train phase {sec['train']:.2f}s")
            if len(steps) > WARMUP_STEPS:
                median = statistics.median(steps[WARMUP_STEPS:])
                add("sanity", f"batch {n} {s['id']}: median step x steady steps fits the training phase",
                    median * (len(steps) - WARMUP_STEPS) <= sec["train"], f"{median:.3f}s x {len(steps) - WARMUP_STEPS} vs {sec['train']:.2f}s")
        generated = [m["priors_generated"] if m else None for m in b["metrics"]]
        first_makes = 0 if plan.get("prior_source") == "base_model" else plan["prior_images"]
        add("sanity", f"batch {n}: class priors generated once per batch (none from the base model)",
            generated == [first_makes] + [0] * (n - 1), f"generated per subject {generated}")
        add("sanity", f"batch {n}: wall time covers its subjects",
            b["wall_seconds"] >= sum(s["seconds"] for s in b["subjects"]), f"{b['wall_seconds']:.1f}s")
    sps = summary["s_per_step"]
    add("sanity", "enough steady-state steps", summary["steady_steps_measured"] >= 5, str(summary["steady_steps_measured"]))
    if "mfu" in summary:
        add("sanity", "MFU below 100%", 0 < summary["mfu"] < 1, f"{summary['mfu']:.1%}")

    kind = "target" if enforce_targets else "info"
    if plan.get("target_seconds_per_step"):
        add(kind, f"<= {plan['target_seconds_per_step']:.2f} s per training step", sps <= plan["target_seconds_per_step"],
            f"{sps:.3f} s/step")
    for b in summary["batches"]:
        if b["worst_later_ratio"] is not None:
            add(kind, f"batch {b['subjects']}: each later subject <= its training + sampling + {MARGINAL_TOLERANCE - 1:.0%}",
                b["worst_later_ratio"] <= MARGINAL_TOLERANCE,
                f"worst {b['worst_later_ratio']:.3f}x (mean {b['later_subject_s']:.2f}s vs {b['later_train_sample_s']:.2f}s)")
    big = summary["batches"][-1]
    if big["subjects"] > 1:
        add(kind, f"peak RSS {big['subjects']} subjects <= 1 subject + {MEMORY_TOLERANCE - 1:.0%}", big["rss_vs_1"] <= MEMORY_TOLERANCE,
            f"{big['peak_rss_mib']:.0f} vs {summary['peak_rss_mib']:.0f} MiB ({big['rss_vs_1']:.3f}x)")
        gpu = [b["peak_gpu_mib"] for b in summary["batches"]]
        if gpu[0] and gpu[-1]:
            add(kind, f"peak GPU memory {big['subjects']} subjects <= 1 subject + {MEMORY_TOLERANCE - 1:.0%}",
                gpu[-1] <= gpu[0] * MEMORY_TOLERANCE, f"{gpu[-1]:.0f} vs {gpu[0]:.0f} MiB")
    return out


def print_tables(summaries: list[dict[str, Any]]) -> None:
    rows = [
        ("base model", lambda s: f"{s['base_model']} ({s['params_m']:.1f}M)" if s.get("params_m") else s["base_model"]),
        ("resolution / precision", lambda s: f"{s['resolution']} px / {s['precision']}"),
        ("device", lambda s: s.get("gpu") or s.get("device") or "?"),
        ("model load s", lambda s: f"{s['model_load_s']:.2f}"),
        ("prior images/s", lambda s: f"{s['prior_img_per_s']:.2f}"),
        ("training steps/s (median)", lambda s: f"{s['steps_per_s']:.2f}"),
        ("s/step (median)", lambda s: f"{s['s_per_step']:.3f}"),
        ("sampling images/s", lambda s: f"{s['sample_img_per_s']:.2f}"),
        ("publish s", lambda s: f"{s['publish_s']:.2f}"),
        ("peak RSS MiB (1 subject)", lambda s: f"{s['peak_rss_mib']:.0f}"),
        ("peak GPU MiB (1 subject)", lambda s: f"{s['peak_gpu_mib']:.0f}" if s.get("peak_gpu_mib") else "-"),
        ("UNet fwd+bwd GFLOP/step", lambda s: f"{s['unet_train_gflop_per_step']:.1f}" if s.get("unet_train_gflop_per_step") else "-"),
        ("achieved TFLOP/s (UNet)", lambda s: f"{s['achieved_tflops']:.3f}" if s.get("achieved_tflops") else "-"),
        ("MFU (bf16 dense peak)", lambda s: f"{s['mfu']:.1%} of {s['bf16_peak_tflops']:.0f}" if "mfu" in s else "-"),
        ("measured bf16 matmul TFLOP/s", lambda s: f"{s['measured_matmul_tflops']:.0f}" if s.get("measured_matmul_tflops") else "-"),
    ]
    width = max(len(r[0]) for r in rows) + 2
    cols = [max(24, max(len(str(fn(s))) for _, fn in rows) + 2) for s in summaries]
    print()
    print("phase".ljust(width) + "".join(s["arch"].rjust(c) for s, c in zip(summaries, cols)))
    for label, fn in rows:
        print(label.ljust(width) + "".join(str(fn(s)).rjust(c) for s, c in zip(summaries, cols)))
    print()
    head = ("arch", "subjects", "wall s", "s/subject", "1st subj s", "later subj s", "later train+sample s", "worst later/own",
            "peak RSS MiB", "RSS vs 1", "peak GPU MiB")
    print("".join(h.rjust(max(9, len(h) + 2)) for h in head))
    for s in summaries:
        for b in s["batches"]:
            vals = (s["arch"], b["subjects"], f"{b['wall_s']:.1f}", f"{b['s_per_subject']:.2f}", f"{b['first_subject_s']:.2f}",
                    _f(b["later_subject_s"]), _f(b["later_train_sample_s"]), _f(b["worst_later_ratio"], "{:.3f}x"),
                    f"{b['peak_rss_mib']:.0f}", f"{b['rss_vs_1']:.3f}x", _f(b["peak_gpu_mib"], "{:.0f}"))
            print("".join(str(v).rjust(max(9, len(h) + 2)) for v, h in zip(vals, head)))
    print()
    if len({s.get("method") for s in summaries}) > 1 or any(s.get("method") == "lora" for s in summaries):
        head = ("arch/method", "trainable", "s/step", "peak RSS MiB", "ckpt bytes", "output bytes", "s/subject (4)",
                "reset s")
        print("".join(h.rjust(max(10, len(h) + 2)) for h in head))
        for s in summaries:
            four = next((b for b in s["batches"] if b["subjects"] == 4), s["batches"][-1])
            vals = (s["arch"], _f(s.get("trainable_params"), "{:,.0f}"), f"{s['s_per_step']:.3f}", f"{s['peak_rss_mib']:.0f}",
                    _f(s.get("checkpoint_bytes"), "{:,.0f}"), _f(s.get("output_bytes"), "{:,.0f}"),
                    f"{four['s_per_subject']:.2f}", _f(s.get("reset_s"), "{:.4f}"))
            print("".join(str(v).rjust(max(10, len(h) + 2)) for v, h in zip(vals, head)))
        print()


def _f(v: Optional[float], fmt: str = "{:.2f}") -> str:
    return "-" if v is None else fmt.format(v)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", choices=sorted(PLANS), action="append",
                    help="architecture to run (repeatable; default: tiny and small)")
    ap.add_argument("--quick", action="store_true", help="few steps, batches of 1 and 2, sanity checks only")
    ap.add_argument("--batches", help="comma-separated batch sizes, overriding the plan's (e.g. 1,4)")
    ap.add_argument("--steps", type=int, help="training steps per subject, overriding the plan's")
    ap.add_argument("--methods", help=f"comma-separated training methods to compare per architecture ({', '.join(METHODS)}); "
                    "each run stores one checkpoint mid-run and defaults to batches of 1 and 4")
    ap.add_argument("--packing", help="comma-separated subjects per step (e.g. 1,2,4,8): 8 LoRA subjects per architecture "
                    "trained packed at each K (bench/packing.py), instead of the tables above")
    ap.add_argument("--sweep", action="store_true", help="what a sweep of four variants costs against four subjects, "
                    "and what tracking adds (bench/sweep.py), instead of the tables above")
    ap.add_argument("--json", type=Path, help="also write every number here")
    ap.add_argument("--keep", type=Path, help="keep the benchmark's files here (default: a temporary folder, removed)")
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child_main(args.child)

    plans = [PLANS[a] for a in (args.arch or DEFAULT_ARCHS)]
    if args.quick:
        plans = [quick(p) for p in plans]
    if args.methods:
        names = args.methods.split(",")
        unknown = [n for n in names if n not in METHODS]
        if unknown:
            ap.error(f"--methods: unknown {unknown[0]!r}; choose from {', '.join(METHODS)}")
        plans = [replace(method_plan(p, n), batches=p.batches if args.quick else (1, 4)) for p in plans for n in names]
    if args.batches:
        plans = [replace(p, batches=tuple(int(x) for x in args.batches.split(","))) for p in plans]
    if args.steps:
        plans = [replace(p, max_steps=args.steps) for p in plans]
    root = args.keep or Path(tempfile.mkdtemp(prefix="dbbatch-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()

    def say(msg: str) -> None:
        print(f"{time.monotonic() - started:7.1f}s {msg}", flush=True)

    if args.sweep:
        from bench import sweep

        try:
            rows = sweep.bench_sweep(root, args.steps or (20 if args.quick else 150), say)
        finally:
            if not args.keep:
                shutil.rmtree(root, ignore_errors=True)
        sweep.print_table(rows)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1))
        return 0

    if args.packing:
        from bench import packing

        try:
            runs = [packing.bench_packing(p, root, [int(k) for k in args.packing.split(",")], say, run_child,
                                          write_manifest, draw_subjects, _fresh) for p in plans]
        finally:
            if not args.keep:
                shutil.rmtree(root, ignore_errors=True)
        packing.print_table(runs)
        if args.json:
            args.json.write_text(json.dumps(runs, indent=1))
        return 0

    runs, summaries, results = [], [], []
    try:
        for plan in plans:
            run = bench_arch(plan, root, say)
            summary = summarize(run)
            runs.append(run)
            summaries.append(summary)
            results += checks(run, summary, enforce_targets=not args.quick)
            if args.json:  # after each architecture, so a run cut short still leaves its numbers
                args.json.write_text(json.dumps({"summaries": summaries, "runs": runs,
                                                 "checks": [dict(zip(("kind", "name", "ok", "detail"), c)) for c in results]},
                                                indent=1, default=str))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print_tables(summaries)
    for kind, name, ok, detail in results:
        if kind != "sanity" or not ok:
            print(f"{'ok  ' if ok else 'FAIL' if kind == 'sanity' else 'MISS'} {kind:6} {name}: {detail}")
    sane = all(ok for kind, _, ok, _ in results if kind == "sanity")
    met = all(ok for kind, _, ok, _ in results if kind == "target")
    n_sanity = sum(1 for kind, *_ in results if kind == "sanity")
    print(f"{n_sanity} sanity checks {'passed' if sane else 'FAILED'}; targets {'met' if met else 'MISSED'}; "
          f"benchmark took {time.monotonic() - started:.0f}s")
    return 0 if sane and met else (1 if not sane else 2)


# ------------------------------------------------------------------------------------------------------------
# Child: one batch through the worker, in this process


def child_main(spec_path: Path) -> int:
    import resource

    spec = json.loads(spec_path.read_text())
    from dbbatch.console import quiet_libraries, setup_logging

    setup_logging(False)
    quiet_libraries()
    if spec["mode"] == "prepare":
        from dbbatch.models.loading import load_base_model

        load_base_model(spec["base_model"], None, Path(spec["work_dir"]) / "cache", None)
        (spec_path.parent / "result.json").write_text("{}")
        return 0

    import torch

    from dbbatch.batch.batch import Batch
    from dbbatch.batch.results import RunOptions
    from dbbatch.batch.validation import locations
    from dbbatch.config.resolve import resolve_subjects
    from dbbatch.models.defaults import load_manifest
    from dbbatch.store.storage import Storage

    plan = Plan(**{**spec["plan"], "batches": tuple(spec["plan"]["batches"])})
    manifest, base_dir = load_manifest(Path(spec["manifest"]))
    out, cache = locations(manifest, base_dir, None)
    storage = Storage(manifest.storage_options)
    batch = Batch(manifest, base_dir, storage, RunOptions(output=out, prior_cache=cache, work_dir=Path(spec["work_dir"])),
                  reporter=None)
    if plan.in_memory:
        preload_in_memory(batch, plan)
    model = batch.model
    if spec["mode"] == "packing":
        from bench import packing

        result = packing.child(spec, batch, resolve_subjects(manifest, base_dir))
        (spec_path.parent / "result.json").write_text(json.dumps(result))
        return 0
    result: dict[str, Any] = {
        "model_load_seconds": batch.model_load_seconds, "device": str(batch.device), "subjects": [],
        "params_m": sum(p.numel() for mod in (model.denoiser, model.vae, *model.text_encoders) for p in mod.parameters()) / 1e6,
    }
    for subject in resolve_subjects(manifest, base_dir):
        started = time.monotonic()
        r = batch.run_one(subject)  # restores the base weights in its `finally`: timed too
        seconds = time.monotonic() - started
        result["subjects"].append({"id": r.id, "status": r.status, "message": r.message, "seconds": seconds,
                                   "step_seconds": step_intervals(Path(out) / r.id / "logs")})
    result["reset_seconds"] = batch.reset_seconds
    if torch.cuda.is_available():
        result["cuda"] = cuda_numbers()
    if spec.get("count_flops"):
        result["unet_train_flops_per_step"] = unet_train_flops(batch, plan)
    result["self_maxrss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    (spec_path.parent / "result.json").write_text(json.dumps(result))
    return 0


def preload_in_memory(batch: Any, plan: Plan) -> None:
    """Build a built-in architecture in memory and hand it to the batch (no 4 GB folder written and read back).
    Sets the attributes `Batch.model` would; the rest of the run is the ordinary worker path."""
    import torch

    from dbbatch.models.base import BaseModel
    from dbbatch.models.builtin import ARCHS, BUILTIN_SEED, BUILTIN_VERSION, SCHEDULER_CONFIG, build_builtin

    name = plan.base_model.split(":", 1)[1]
    started = time.monotonic()
    comps = build_builtin(name)
    comps.pop("scheduler")
    comps["denoiser"] = comps.pop(comps["family"].denoiser)
    model = BaseModel(**comps, scheduler_config=dict(ARCHS[name].get("scheduler", SCHEDULER_CONFIG)),
                      identity=f"builtin:{name}:v{BUILTIN_VERSION}:seed{BUILTIN_SEED}", source=plan.base_model)
    if plan.base_dtype != "fp32":  # before the move: FLUX.1-dev's 16.7B float32 parameters are 67 GB
        model.hold_in(plan.base_dtype)
    model.freeze()
    batch.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch._model = model.to(batch.device)
    batch.model_load_seconds = time.monotonic() - started


def step_intervals(log_dir: Path) -> list[float]:
    """Seconds between consecutive training steps, from the wall times of the `loss` scalars Lightning logs
    after every step (TensorBoard event files: TFRecord frames of Event protos)."""
    import struct

    from tensorboardX.proto import event_pb2

    times: dict[int, float] = {}
    for path in sorted(log_dir.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        i = 0
        while i + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[i : i + 8])
            event = event_pb2.Event()
            event.ParseFromString(data[i + 12 : i + 12 + length])
            i += 12 + length + 4  # length, its crc, the record, its crc
            if any(v.tag == "loss" for v in event.summary.value):
                times[event.step] = event.wall_time
    steps = sorted(times)
    return [times[b] - times[a] for a, b in zip(steps, steps[1:]) if b == a + 1]


def cuda_numbers() -> dict[str, Any]:
    import torch

    name = torch.cuda.get_device_name()
    out = {"name": name, "max_allocated_mib": torch.cuda.max_memory_allocated() / 2**20,
           "max_reserved_mib": torch.cuda.max_memory_reserved() / 2**20,
           "bf16_peak_flops": next((f for key, f in GPU_BF16_PEAK if key in name), None)}
    # What a large bf16 matrix product reaches on this card: the practical ceiling next to the data sheet's.
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        a @ b
    end.record()
    torch.cuda.synchronize()
    out["matmul_tflops"] = 2 * 8192**3 * 20 / (start.elapsed_time(end) / 1000) / 1e12
    return out


def unet_train_flops(batch: Any, plan: Plan) -> float:
    """FLOPs of one training step's UNet forward + backward (1 instance + 1 class example), counted by
    PyTorch's FlopCounterMode (matrix products, convolutions, attention) at the plan's resolution."""
    import contextlib

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    model = batch.model
    unet = model.denoiser  # the family's (a UNet, FLUX.1's transformer)
    lat = plan.resolution // model.vae_scale_factor
    device = batch.device
    from dbbatch.train.module import rows

    x = torch.randn(2, model.vae.config.latent_channels, lat, lat, device=device)
    cond = {**model.encode(["a photo of sks dog"], device),
            **{k: v.to(device) for k, v in model.family.added_conditioning(None, plan.resolution).items()}}
    cond = rows(cond, 2)
    t = torch.tensor([10, 500], device=device)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16 if plan.mixed_precision == "bf16" else torch.float16)
                if plan.mixed_precision != "no" else contextlib.nullcontext())
    unet.requires_grad_(True)
    try:
        with FlopCounterMode(display=False) as counter:
            with autocast:
                pred = model.family.predict(unet, x, t, cond)
            pred.float().pow(2).mean().backward()
    finally:
        unet.requires_grad_(False)
        unet.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


if __name__ == "__main__":
    sys.exit(main())
