"""Packed training (`packing.subjects_per_step`, issue 13) on the built-in tiny model, float32 on the CPU.

- grouping: a pure function of the manifest (shape, manifest order, K, why a subject trains alone, stored
  cohorts first);
- a K=3 cohort equals 3 solo runs (warm-up + cosine, weight decay, a short last batch that is padded, a
  gradient clip that bites for one subject only); negative controls: one mean over the packed batch, and one
  clip over all subjects, both give other adapters;
- isolation: another subject's photos change no other adapter, bitwise;
- SIGKILL mid-cohort, rerun: bitwise the uninterrupted adapters; SIGTERM: exit 143, then parts of the stored
  cohort resume (exactly) in other cohorts; a member whose photos changed makes the rerun refuse the
  checkpoint, with the reason;
- a NaN in one subject fails only that subject, at its step; gradient checkpointing changes nothing;
- the kernel (operator) count of a step does not grow with K.

Tolerance: packed and solo runs compute the same sums in other kernels (a batched matmul against one per
layer), so they agree to float32 rounding, not bitwise: ~3e-7 after these steps on weights of size ~1. TOL
(1e-5) leaves 30x room and is still 100x below what each negative control changes.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from conftest import cli_env, draw_subject, run_cli, spawn_cli, start_at_fault, tiny_manifest
from safetensors import safe_open
from safetensors.torch import load_file

from dbbatch.config.packing import StoredCohort, alone_reason, cohorts

TOL = 1e-5
IDS = ("rex", "tom", "max")
COLORS = {"rex": (220, 30, 30), "tom": (30, 30, 220), "max": (30, 200, 30)}


# -- grouping (pure) ----------------------------------------------------------------------------------------
def _subjects(entries: list[dict], per_step: int = 3) -> list:
    from dbbatch.config.manifest import Manifest
    from dbbatch.config.resolve import resolve_subjects

    subjects = [{"id": e.pop("id"), "token": "sks", "class_noun": "dog", "images": "x/", **e} for e in entries]
    m = Manifest.model_validate({"output": "o", "packing": {"subjects_per_step": per_step},
                                 "defaults": {"train": {"method": "lora"}}, "subjects": subjects})
    return resolve_subjects(m, None)


def test_cohorts_group_by_shape_in_manifest_order_and_say_why_a_subject_trains_alone():
    subs = _subjects([{"id": "a"}, {"id": "b", "train": {"method": "full"}}, {"id": "c", "train": {"seed": 7}},
                      {"id": "d", "train": {"max_steps": 5}}, {"id": "e"}, {"id": "f", "train": {"max_steps": 5}},
                      {"id": "g"}, {"id": "h", "train": {"lora": {"text_encoder": True}}}])
    got = cohorts(subs, 3)
    assert [[s.id for s in c.members] for c in got] == [["a", "c", "e"], ["b"], ["d", "f"], ["g"], ["h"]]
    assert [c.packed for c in got] == [True, False, True, False, False]
    assert "train.method is full" in got[1].alone and "text_encoder" in got[4].alone
    assert "no other subject of its shape" in got[3].alone
    assert sorted(s.id for c in got for s in c.members) == sorted(s.id for s in subs)  # each exactly once
    assert all(not c.packed for c in cohorts(subs, 1))
    assert alone_reason(_subjects([{"id": "x", "train": {"gradient_accumulation": 2}}])[0])


def test_a_stored_cohort_is_formed_again_first_and_a_new_subject_does_not_join_it():
    subs = _subjects([{"id": "a"}, {"id": "b"}, {"id": "c"}, {"id": "new"}], per_step=4)
    stored = [StoredCohort("cohort-x", ("b", "c", "gone"), 40)]
    got = cohorts(subs, 4, stored)
    assert [[s.id for s in c.members] for c in got] == [["a", "new"], ["b", "c"]]
    assert got[1].resumes == stored[0] and got[0].resumes is None
    split = cohorts(subs, 1, stored)  # K lowered after a preemption: each part still resumes the checkpoint
    assert [([s.id for s in c.members], c.resumes is not None) for c in split] == \
        [(["a"], False), (["b"], True), (["c"], True), (["new"], False)]


# -- real runs ----------------------------------------------------------------------------------------------
class World:
    """Photos and manifests of three subjects; `run` trains them and returns the output folder."""

    def __init__(self, root: Path):
        self.root = root
        for sid in IDS:
            draw_subject(root / "imgs" / sid, color=COLORS[sid])
        draw_subject(root / "imgs" / "tom-other", color=(240, 200, 0))

    def manifest(self, name: str, per_step: int = 3, train: dict | None = None, images: dict | None = None,
                 base_model: str = "builtin:tiny-sd", own: dict | None = None) -> Path:
        subjects = [{"id": sid, "token": "sks", "class_noun": "dog", "images": (images or {}).get(sid, f"imgs/{sid}/"),
                     "train": {"seed": i}, **(own or {}).get(sid, {})} for i, sid in enumerate(IDS)]
        t = {"method": "lora", "max_steps": 6, "checkpoint_every": 2, "batch_size": 2, "learning_rate": 3e-3,
             "lr_scheduler": "cosine", "lr_warmup_steps": 2, "weight_decay": 0.05, "lora": {"rank": 4, "alpha": 8},
             **(train or {})}
        return tiny_manifest(self.root / f"{name}.yaml", name, subjects, packing={"subjects_per_step": per_step}, base_model=base_model,
                             defaults={"resolution": 32, "train": t, "priors": {"num_images": 2, "steps": 2, "batch_size": 2},
                                       "samples": {"prompts": ["a photo of {token} {class_noun}"], "seeds": [0], "steps": 2}})

    def run(self, name: str, *args: str, expect: int = 0, faults: str = "", **kw) -> tuple[Path, str]:
        m = self.root / f"{name}.yaml"
        if kw or not m.exists():
            m = self.manifest(name, **kw)
        env = cli_env(DBBATCH_WORK_DIR=str(self.root / "work"), **({"DBBATCH_FAULTS": faults} if faults else {}))
        proc = run_cli("run", str(m), *args, env=env, cwd=self.root)
        assert proc.returncode == expect, proc.stderr[-3000:]
        return self.root / name, proc.stderr + proc.stdout


def adapters(out: Path, sid: str) -> dict[str, torch.Tensor]:
    return load_file(str(out / sid / "lora" / "pytorch_lora_weights.safetensors"))


def gap(a: Path, b: Path, sid: str) -> float:
    x, y = adapters(a, sid), adapters(b, sid)
    assert x.keys() == y.keys()
    return max((x[k] - y[k]).abs().max().item() for k in x)


def metrics(out: Path, sid: str) -> dict:
    return json.loads((out / sid / "metrics.json").read_text())


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return World(tmp_path_factory.mktemp("packing"))


@pytest.fixture(scope="module")
def clip(world: World) -> float:
    """A clip norm that bites for one subject only: between the largest and the second largest of the subjects'
    largest unclipped gradient norms (clipping one subject changes no other's norms: isolation)."""
    out, _ = world.run("unclipped", train={"max_grad_norm": None})
    peaks = sorted(max(metrics(out, sid)["grad_norm_curve"]) for sid in IDS)
    assert peaks[2] > 1.05 * peaks[1]
    return (peaks[1] + peaks[2]) / 2


@pytest.fixture(scope="module")
def reference(world: World, clip: float) -> Path:
    out, log = world.run("reference", train={"max_grad_norm": clip})
    assert not (out / "_cohorts").exists() or not any((out / "_cohorts").iterdir()), "the cohort's folder outlived it"
    return out


def test_a_packed_cohort_equals_solo_runs_and_the_test_catches_a_batch_mean_or_a_global_clip(world, clip, reference):
    solo, _ = world.run("solo", per_step=1, train={"max_grad_norm": clip})
    clipped = [sid for sid in IDS if max(metrics(reference, sid)["grad_norm_curve"]) > clip]
    assert len(clipped) == 1, "the clip must bite for exactly one subject"
    for sid in IDS:
        assert gap(reference, solo, sid) < TOL, sid
        m = metrics(reference, sid)
        assert m["cohort"]["size"] == 3 and m["cohort"]["members"] == list(IDS) and "cohort" not in metrics(solo, sid)
        assert m["loss_curve"] == pytest.approx(metrics(solo, sid)["loss_curve"], rel=1e-5)
        assert sorted(p.name for p in (reference / sid / "lora").iterdir()) == sorted(p.name for p in (solo / sid / "lora").iterdir())
        for name in ("pytorch_lora_weights.safetensors", f"{sid}.safetensors"):  # the same writers, the same metadata
            with safe_open(str(reference / sid / "lora" / name), "pt") as a, safe_open(str(solo / sid / "lora" / name), "pt") as b:
                assert a.metadata() == b.metadata() and sorted(a.keys()) == sorted(b.keys())
    unclipped = world.root / "unclipped"
    assert [sid for sid in IDS if gap(reference, unclipped, sid) > 0] == clipped  # clipping touched that one alone
    for variant in ("batch_mean", "global_clip"):
        out, _ = world.run(f"variant-{variant}", faults=f"packing_variant={variant}", train={"max_grad_norm": clip})
        worst = max(gap(out, solo, sid) for sid in IDS)
        assert worst > 100 * TOL, f"the {variant} variant went unnoticed ({worst:.2e})"


# Packing on the other families. SDXL: the conditioning a member carries (two encoders, pooled projection, size
# ids) goes with its rows of the packed batch; the members differ in it (tom another token and class, max other
# micro-conditioning sizes). FLUX.1 (tiny-flux): each member's T5 sequence, pooled CLIP and guidance value go with
# its rows, and its flow-matching timesteps come from its own keys (logit-normal, shifted). Measured: packed vs
# solo 4.4e-6 (SDXL) and 2.0e-6 (FLUX.1) against TOL 1e-5; the batch mean 1.5e-3 and 1.3e-3 against 100 x TOL (the
# runs are deterministic on the CPU, so the thin margin of the control does not flake).
FAMILY_COHORTS = {
    "sdxl": {"base_model": "builtin:tiny-sdxl", "own": {"tom": {"token": "ohwx", "class_noun": "cat"},
                                                         "max": {"sdxl": {"original_size": [128, 128]}}}},
    "flux": {"base_model": "builtin:tiny-flux",
             "own": {sid: {"flux": {"weighting_scheme": "logit_normal", "timestep_shift": 3.0},
                           **({"token": "ohwx", "class_noun": "cat"} if sid == "tom" else {})} for sid in IDS}},
}


@pytest.mark.parametrize("family", list(FAMILY_COHORTS))
def test_a_cohort_of_another_family_equals_solo_runs_and_the_test_catches_a_batch_mean(world, family: str):
    kw = FAMILY_COHORTS[family]
    packed, _ = world.run(f"{family}-packed", **kw)
    solo, _ = world.run(f"{family}-solo", per_step=1, **kw)
    for sid in IDS:
        assert gap(packed, solo, sid) < TOL, sid
        assert metrics(packed, sid)["cohort"]["size"] == 3 and "cohort" not in metrics(solo, sid)
    out, _ = world.run(f"{family}-batch-mean", faults="packing_variant=batch_mean", **kw)
    assert max(gap(out, solo, sid) for sid in IDS) > 100 * TOL


def test_another_subjects_photos_change_no_other_adapter(world, reference, clip):
    out, _ = world.run("isolation", images={"tom": "imgs/tom-other/"}, train={"max_grad_norm": clip})
    assert gap(out, reference, "tom") > 100 * TOL  # the photos did change tom's
    assert gap(out, reference, "rex") == 0 and gap(out, reference, "max") == 0


def test_gradient_checkpointing_changes_nothing(world, reference, clip):
    out, _ = world.run("checkpointing", train={"max_grad_norm": clip, "gradient_checkpointing": True})
    assert all(gap(out, reference, sid) < TOL for sid in IDS)


def test_sigkill_mid_cohort_then_rerun_is_bitwise_the_uninterrupted_run(world, reference, clip):
    m = world.manifest("killed", train={"max_grad_norm": clip})
    proc, _ = start_at_fault(m, world.root / "pod1", "pause_at_step=3")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (folder,) = (world.root / "killed" / "_cohorts").iterdir()
    ckpt = folder / "checkpoints" / "step-0000002.ckpt"
    state = torch.load(str(ckpt), weights_only=True, map_location="cpu")
    assert set(state["dbbatch"]["members"]) == set(IDS) and all(v.shape[0] == 3 for v in state["state_dict"].values())
    assert all(k.endswith((".A", ".B")) for k in state["state_dict"])  # the stacked adapters and nothing else
    assert not any((world.root / "killed" / sid / "_SUCCESS").exists() for sid in IDS)
    out, log = world.run("killed")
    assert f"resuming from {ckpt}" in log
    for sid in IDS:
        assert gap(out, reference, sid) == 0, sid
        assert metrics(out, sid)["resumed_from_step"] == 2
        assert metrics(out, sid)["loss_curve"] == metrics(reference, sid)["loss_curve"]
    assert not folder.exists()
    # negative control: the checkpoint's adapters are not the final ones
    first = state["state_dict"][next(k for k in state["state_dict"] if k.endswith(".B"))][0]
    assert not torch.equal(first, adapters(out, "rex")[next(k for k in adapters(out, "rex") if "lora_B" in k)].float())


def test_sigterm_exits_143_and_parts_of_the_stored_cohort_resume_exactly(world, reference, clip):
    m = world.manifest("termed", train={"max_grad_norm": clip})
    proc, _ = start_at_fault(m, world.root / "pod1", "pause_at_step=3")
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr[-2000:]
    (folder,) = (world.root / "termed" / "_cohorts").iterdir()
    assert (folder / "checkpoints" / "step-0000004.ckpt").exists()  # the step it was in when SIGTERM came
    out, log = world.run("termed", "--only", "rex", "--only", "max")  # a cohort of two of the three
    assert f"resuming rex, max of stored {folder.name} (3 subjects) at step 4" in log
    assert folder.exists(), "tom still needs the stored checkpoint"
    out, log = world.run("termed")  # tom alone, resumed from the same checkpoint
    assert "resuming tom of stored" in log and not folder.exists()
    for sid in IDS:
        assert gap(out, reference, sid) < TOL, sid
        assert metrics(out, sid)["resumed_from_step"] == 4


def test_a_member_whose_photos_changed_makes_the_rerun_refuse_the_checkpoint(world, reference, clip):
    m = world.manifest("changed", train={"max_grad_norm": clip})
    proc, _ = start_at_fault(m, world.root / "pod1", "pause_at_step=3")
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    out, log = world.run("changed", images={"tom": "imgs/tom-other/"}, train={"max_grad_norm": clip})
    assert "not resuming checkpoint" in log and "subject tom: changed since it was written: instance_images" in log
    assert "trains from step 0" in log
    assert all(metrics(out, sid)["resumed_from_step"] is None for sid in IDS)
    assert gap(out, reference, "rex") == 0 and gap(out, reference, "tom") > 100 * TOL


def test_force_resumes_no_stored_cohort(world, reference, clip):
    m = world.manifest("forced", train={"max_grad_norm": clip})
    proc, _ = start_at_fault(m, world.root / "pod1", "pause_at_step=3")
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    out, log = world.run("forced", "--force")
    assert "resuming" not in log
    assert all(metrics(out, sid)["resumed_from_step"] is None and gap(out, reference, sid) == 0 for sid in IDS)
    assert not any((out / "_cohorts").iterdir())


def test_a_nan_in_one_subject_fails_it_alone_at_its_step(world, reference, clip):
    out, log = world.run("nan", expect=1, faults="nan_at=tom@3", train={"max_grad_norm": clip})
    assert "tom: failed: subject tom: the loss became non-finite at step 4" in log
    assert not (out / "tom" / "_SUCCESS").exists()
    for sid in ("rex", "max"):
        assert (out / sid / "_SUCCESS").exists() and gap(out, reference, sid) == 0
    lease = sorted((out / "_leases" / "tom").glob("*.json"))[-1]
    assert json.loads(lease.read_text())["outcome"] == "failed"


def test_queue_workers_claim_a_cohort_each_and_train_every_subject_once(world):

    ids = ["q1", "q2", "q3", "q4"]
    subjects = [{"id": i, "token": "sks", "class_noun": "dog", "images": f"imgs/{IDS[n % 3]}/", "train": {"seed": n}}
                for n, i in enumerate(ids)]
    m = tiny_manifest(world.root / "queue.yaml", "queue", subjects, packing={"subjects_per_step": 2},
                      defaults={"resolution": 32, "train": {"method": "lora", "max_steps": 4, "checkpoint_every": 100},
                                "priors": {"source": "base_model"},
                                "samples": {"prompts": ["a photo of {token} {class_noun}"], "seeds": [0], "steps": 2,
                                            "include_class_prompt": False}})
    procs = [spawn_cli("run", str(m), "--queue", cwd=world.root, env=cli_env(DBBATCH_WORK_DIR=str(world.root / f"queue-w{w}")))
             for w in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    out = world.root / "queue"
    trained = [s["id"] for r in (out / "_runs").glob("*.json") for s in json.loads(r.read_text())["subjects"]
               if s["status"] == "succeeded"]
    assert sorted(trained) == ids  # every subject once
    holder = {i: json.loads(sorted((out / "_leases" / i).glob("*.json"))[-1].read_text())["holder"]["run_id"] for i in ids}
    for i in ids:  # a cohort's members were all claimed by the worker that trained them
        members = metrics(out, i)["cohort"]["members"]
        assert len({holder[x] for x in members}) == 1 and i in members
    assert len(set(holder.values())) == 2, "both workers took a cohort"


def test_a_target_with_conv_layers_falls_back_to_one_subject_at_a_time(world):
    out, log = world.run("conv", train={"max_steps": 3, "lora": {"rank": 4, "alpha": 8, "target": ["to_q", "conv1"]}})
    assert "packed training adapts linear layers only" in log and "its subjects train one at a time" in log
    for sid in IDS:
        assert "cohort" not in metrics(out, sid) and metrics(out, sid)["steps"] == 3 and "train" in metrics(out, sid)["seconds"]
        assert any(".conv1." in k for k in adapters(out, sid))  # trained alone, with the conv adapters


def test_a_nan_fails_a_solo_subject_too_and_the_next_subject_trains(world):
    out, log = world.run("nan-solo", expect=1, faults="nan_at=tom@3", per_step=1)
    assert "tom: failed: subject tom: the loss became non-finite at step 4" in log
    assert (out / "rex" / "_SUCCESS").exists() and (out / "max" / "_SUCCESS").exists()
    assert not (out / "tom" / "_SUCCESS").exists()


def test_validate_warns_when_packing_is_set_and_no_two_subjects_can_share_a_step():
    from dbbatch.batch.validation import packing_warnings
    from dbbatch.config.manifest import Manifest

    def manifest(method_b: str) -> Manifest:
        return Manifest.model_validate({"output": "o", "packing": {"subjects_per_step": 4}, "defaults": {"train": {"method": "lora"}},
                                        "subjects": [{"id": "a", "token": "sks", "class_noun": "dog", "images": "x/"},
                                                     {"id": "b", "token": "sks", "class_noun": "dog", "images": "x/",
                                                      "train": {"method": method_b}}]})

    (warning,) = packing_warnings(manifest("full"))
    assert warning.startswith("packing.subjects_per_step: 4, but no two subjects can train together") and "method is full" in warning
    assert packing_warnings(manifest("lora")) == []


def test_kernels_per_step_do_not_grow_with_the_number_of_subjects(tmp_path: Path):
    from torch.profiler import ProfilerActivity, profile

    from dbbatch.config.settings import LoraSettings, TrainConfig
    from dbbatch.models.loading import load_base_model
    from dbbatch.models.lora import adaptable_layers, adapter_state, attach, detach, resolve_targets
    from dbbatch.models.packed_lora import attach_packed, detach_packed
    from dbbatch.store.storage import Storage
    from dbbatch.train.packed_training import CohortData, CohortModule, Member

    model = load_base_model("builtin:tiny-sd", None, tmp_path / "cache", Storage({}))
    lora = LoraSettings(rank=4)
    cfg = TrainConfig(method="lora", batch_size=1, learning_rate=1e-4, lora=lora)
    names, _ = resolve_targets(adaptable_layers(model.unet), "attention")
    counts = {}
    for k in (1, 2, 4):
        states, members = [], []
        for i in range(k):
            attach(model, lora, i, f"s{i}")
            states.append({n: v.detach().clone() for n, v in adapter_state(model.unet).items()})
            detach(model)
            lat = (torch.randn(2, 4, 4, 4), torch.ones(2, 4, 4, 4))
            text = {"encoder_hidden_states": torch.randn(1, 77, model.text_encoder.config.hidden_size)}
            members.append(Member(f"s{i}", i, lat, lat, text, text))
        model.freeze()
        attach_packed(model.unet, states, names, 4, 4.0, 0.0)
        module = CohortModule(model.unet, members, cfg, model.scheduler_config, 0.18215, {}, family=model.family)
        batch = CohortData(members, 1, module.noise_scheduler, 0.18215, model.family)[0]
        module.member_loss(batch).sum().backward()  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            module.member_loss(batch).sum().backward()
        counts[k] = sum(1 for e in prof.events() if e.name.startswith("aten::"))
        detach_packed(model.unet)
    # flat: ~7000 operators at every K (a dozen aten::fill_ more at K=4, from slicing backward); a loop over the
    # subjects in each layer would add ~200 per subject
    assert counts[2] <= counts[1] * 1.01 and counts[4] <= counts[1] * 1.01, counts
