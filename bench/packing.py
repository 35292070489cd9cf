"""Packed training (issue 13): 8 LoRA subjects at K = 1, 2, 4, 8 subjects per step, through the real worker
(`Batch.run`, as `dbbatch run` does), each K in a fresh subprocess. Called by `bench/run.py --packing`.

Per K: the training seconds of the whole batch (sum of the cohorts' training phases; at K=1 the subjects'
own), subject-steps per second over those seconds, the ratio against K=1 measured in the same run, the wall
time of the whole batch (imports, priors, sampling and publishing included), and where a packed step's time
goes: building the batch (CohortData: draws, noising) against the rest (forward, backward, clipping, AdamW and
Lightning's loop).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

SUBJECTS = 8


def bench_packing(plan: Any, root: Path, ks: list[int], say, run_child, write_manifest, draw_subjects, fresh) -> dict[str, Any]:
    import yaml

    plan = replace(plan, arch=f"{plan.arch}/packing", method="lora", lora_rank=16, model_format="lora",
                   prior_images=4, prior_steps=4, sample_steps=4, sample_seeds=1, target_seconds_per_step=None)
    folder = root / plan.arch.replace("/", "-")
    work = folder / "work"
    subjects = draw_subjects(folder / "images", SUBJECTS, size=plan.resolution * 5 // 4)
    run_child({"mode": "prepare", "base_model": plan.base_model, "work_dir": str(work)}, fresh(folder / "prepare"))
    rows = {}
    for k in ks:
        bdir = fresh(folder / f"k{k}")
        manifest = write_manifest(bdir / "manifest.yaml", plan, bdir / "out", subjects)
        doc = yaml.safe_load(manifest.read_text())
        doc["packing"] = {"subjects_per_step": k}
        for i, s in enumerate(doc["subjects"]):
            s["train"] = {"seed": i}
        manifest.write_text(yaml.safe_dump(doc, sort_keys=False))
        say(f"[{plan.arch}] {SUBJECTS} subjects, K={k} ...")
        res = run_child({"mode": "packing", "manifest": str(manifest), "work_dir": str(work), "plan": asdict(plan)}, bdir)
        metrics = [json.loads((bdir / "out" / s["id"] / "metrics.json").read_text()) for s in doc["subjects"]]
        cohorts: dict[str, float] = {}
        for m in metrics:
            if "cohort" in m:
                cohorts[m["cohort"]["id"]] = m["cohort"]["train_seconds"]
            else:
                cohorts[f"solo-{len(cohorts)}"] = m["seconds"]["train"]
        train_s = sum(cohorts.values())
        steps = sum(m["steps"] for m in metrics)
        rows[k] = {"train_s": train_s, "subject_steps_per_s": steps / train_s, "wall_s": res["wall_seconds"],
                   "cohorts": len(cohorts), "data_s_per_step": res.get("data_s_per_step"),
                   "peak_rss_mib": res["peak_rss_mib"]}
        say(f"[{plan.arch}] K={k}: training {train_s:.1f}s ({steps / train_s:.1f} subject-steps/s), wall {res['wall_seconds']:.1f}s")
    return {"arch": plan.arch, "steps": plan.max_steps, "resolution": plan.resolution, "rows": rows}


def child(spec: dict[str, Any], batch: Any, subjects: list[Any]) -> dict[str, Any]:
    """In the child: run the batch, timing CohortData.__getitem__ (the packed step's data side)."""
    from dbbatch.train import packed_training

    spent = {"s": 0.0, "n": 0}
    original = packed_training.CohortData.__getitem__

    def timed(self: Any, step: int) -> Any:
        t = time.perf_counter()
        try:
            return original(self, step)
        finally:
            spent["s"] += time.perf_counter() - t
            spent["n"] += 1

    packed_training.CohortData.__getitem__ = timed
    results = batch.run(subjects)
    bad = [r for r in results if r.status != "succeeded"]
    if bad:
        raise RuntimeError(f"{bad[0].id}: {bad[0].status}: {bad[0].message}")
    return {"data_s_per_step": spent["s"] / spent["n"] if spent["n"] else None}


def print_table(runs: list[dict[str, Any]]) -> None:
    head = ("arch", "K", "cohorts", "train s", "subject-steps/s", "vs K=1", "wall s", "data s/step", "peak RSS MiB")
    print("".join(h.rjust(max(9, len(h) + 2)) for h in head))
    for run in runs:
        base = run["rows"][min(run["rows"])]["subject_steps_per_s"]
        for k, r in sorted(run["rows"].items()):
            vals = (run["arch"], k, r["cohorts"], f"{r['train_s']:.1f}", f"{r['subject_steps_per_s']:.2f}",
                    f"{r['subject_steps_per_s'] / base:.2f}x", f"{r['wall_s']:.1f}",
                    "-" if r["data_s_per_step"] is None else f"{r['data_s_per_step'] * 1000:.1f} ms", f"{r['peak_rss_mib']:.0f}")
            print("".join(str(v).rjust(max(9, len(h) + 2)) for v, h in zip(vals, head)))
    print()
