"""Leases on the output store: one worker per subject, takeover after expiry, work queue (issue 10, findings 1-2).

The unit tests drive `dbbatch.store.leases` directly on a local folder and on the moto S3 endpoint; the end-to-end
tests run real `dbbatch run` processes side by side on one output (SIGKILL is a real SIGKILL)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import cli_env, draw_subject, run_cli, spawn_cli, tiny_manifest

from dbbatch.core.errors import LeaseLost
from dbbatch.store.leases import Leases, describe, failed_since, grace_seconds, is_live
from dbbatch.store.locations import join
from dbbatch.store.storage import Storage

# -- the lease protocol, in-process ---------------------------------------------------------------------------


def test_liveness_and_failure_rules_are_pure_functions_of_the_document():
    doc = {"expires_at": 100.0, "ttl_seconds": 20.0, "released": False}
    assert grace_seconds(20.0) == 2.0 and grace_seconds(3.0) == 1.0
    assert is_live(doc, 101.9) and not is_live(doc, 102.1)  # honoured for the grace past expiry, not longer
    assert not is_live({**doc, "released": True}, 50.0)
    failed = {**doc, "released": True, "outcome": "failed", "released_at": 60.0}
    assert failed_since(failed, 59.0) and not failed_since(failed, 61.0) and not failed_since({**failed, "outcome": "done"}, 0)
    who = describe({"holder": {"pod": "p-1", "host": "h", "pid": 7, "run_id": "r"}, "expires_at": 0})
    assert who == "pod p-1 (host h, pid 7, run r), lease until 1970-01-01T00:00:00Z"


def _race(n: int, fn) -> list:
    """Run fn() in n threads released at the same moment; their results."""
    barrier, out = threading.Barrier(n), [None] * n

    def go(i: int) -> None:
        barrier.wait()
        out[i] = fn()

    threads = [threading.Thread(target=go, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "out")
    s3 = request.getfixturevalue("s3")
    return s3.url("out")


def test_exclusive_create_has_exactly_one_winner(store: str):
    storage = Storage()
    wins = _race(8, lambda: storage.create_exclusive(f"{store}/x.json", b"{}"))
    assert wins.count(True) == 1, wins
    assert storage.read_bytes(f"{store}/x.json") == b"{}"
    assert storage.lease_support(store) is None


def test_claim_is_refused_while_held_and_granted_after_release(store: str):
    storage = Storage()
    a, b = Leases(storage, store, "run-a", ttl=30), Leases(storage, store, "run-b", ttl=30)
    first = a.claim("rex")
    assert first.lease is not None and first.current is None
    held = b.claim("rex")
    assert held.lease is None and held.current["holder"]["run_id"] == "run-a"
    first.lease.release("done")
    second = b.claim("rex")
    assert second.lease is not None and second.lease.doc["generation"] == 1
    assert second.current["outcome"] == "done"
    second.lease.release("failed", "boom", "InputError")
    # a subject released as failed after a worker started is not retried by that worker; a later one retries it
    assert a.claim("rex", unless_failed_since=a.started_at).lease is None
    late = Leases(storage, store, "run-c", ttl=30)
    retry = late.claim("rex", unless_failed_since=late.started_at).lease
    assert retry is not None
    retry.release("done")  # a lease left renewing would outlive this test (and the moto reset)


def test_an_expired_lease_is_taken_over_by_exactly_one_taker_and_its_holder_stops(store: str):
    storage = Storage()
    dead = Leases(storage, store, "run-dead", ttl=2).claim("rex").lease
    dead._stop.set()  # its worker froze: no more renewals
    assert Leases(storage, store, "run-early", ttl=2).claim("rex").lease is None  # still live
    time.sleep(2 + grace_seconds(2) + 0.2)
    claims = _race(4, lambda: Leases(storage, store, "run-t", ttl=30).claim("rex"))
    winners = [c for c in claims if c.lease is not None]
    assert len(winners) == 1, claims
    assert all(c.current["token"] == winners[0].lease.doc["token"] for c in claims if c.lease is None)
    with pytest.raises(LeaseLost, match=r"^subject rex: lease lost \(taken over by pod .* run run-t\), lease until .*\); "
                                         r"stopped before writing _SUCCESS, nothing written"):
        dead.verify("writing _SUCCESS")
    winners[0].lease.release("done")


def test_a_holder_that_died_on_this_machine_is_taken_over_at_once_and_only_then(tmp_path: Path, monkeypatch):
    """A lease written by a process of this machine that is gone (a real child process, exited) is taken over
    long before it expires; a live holder, a reused pid and a holder on another machine are not."""
    from dbbatch.store import leases as leases_mod

    storage, store = Storage(), str(tmp_path / "out")
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(child.stdout)
    here = leases_mod.machine_identity()
    me = leases_mod.worker_identity("run-me")
    assert here["boot_id"] and here["pidns"] and me["started"], "no /proc here: the test would prove nothing"
    assert not leases_mod.holder_is_dead(me, here)  # this very process: alive
    assert not leases_mod.holder_is_dead({**me, "started": "1"}, here, lambda pid: "1")  # same start: alive
    assert leases_mod.holder_is_dead({**me, "started": "1"}, here)  # pid reused by a younger process (this one)
    assert not leases_mod.holder_is_dead({**me, "pid": dead_pid, "boot_id": "another"}, here)  # other machine
    assert not leases_mod.holder_is_dead({**me, "pid": dead_pid, "pidns": "pid:[1]"}, here)  # other pid namespace
    assert not leases_mod.holder_is_dead({"pod": "p", "pid": dead_pid}, here)  # an old lease without the fields

    held = Leases(storage, store, "run-dead", ttl=60).claim("rex").lease
    held._stop.set()  # it renews no more ...
    live = Leases(storage, store, "run-b", ttl=60).claim("rex")
    assert live.lease is None, "a live holder (this process) was taken over"
    doc = {**held.doc, "holder": {**held.doc["holder"], "pid": dead_pid}}  # ... and its process is gone
    storage.write_json(held.url, doc)
    taken = Leases(storage, store, "run-b", ttl=60).claim("rex")
    assert taken.lease is not None and taken.lease.doc["generation"] == 1
    assert taken.lease.doc["acquired_at"] < doc["expires_at"], "it waited for the expiry"
    taken.lease.release("done")
    # negative control: the same dead holder seen from another machine is waited for
    storage.write_json(join(store, "_leases", "kim", "00000000.json"), {**doc, "subject": "kim"})
    monkeypatch.setenv("DBBATCH_FAULTS", "other_machine")
    assert Leases(storage, store, "run-c", ttl=60).claim("kim").lease is None


def test_a_holder_that_cannot_renew_stops_by_its_own_clock(tmp_path: Path):
    lease = Leases(Storage(), str(tmp_path / "out"), "run-a", ttl=2).claim("rex").lease
    lease._stop.set()
    lease.check("a step")  # fine while inside the ttl
    time.sleep(2.1)
    with pytest.raises(LeaseLost, match=r"not renewed for 2s"):
        lease.check("a step")


def test_renewal_extends_the_expiry(tmp_path: Path):
    leases = Leases(Storage(), str(tmp_path / "out"), "run-a", ttl=2)
    lease = leases.claim("rex").lease
    first = lease.doc["expires_at"]
    time.sleep(1.5)  # a renewal every ttl/3
    assert leases.current("rex")["expires_at"] > first
    time.sleep(1.5)
    lease.check("a step")  # renewed: still valid past the first expiry
    lease.release("done")


def test_a_cohorts_leases_are_renewed_together_and_a_release_is_never_undone(tmp_path: Path):
    from dbbatch.store.leases import LeaseGroup

    leases = Leases(Storage(), str(tmp_path / "out"), "run-a", ttl=2)
    held = [leases.claim(sid).lease for sid in ("rex", "tom", "max")]
    group = LeaseGroup(held)
    names = [t.name for t in threading.enumerate()]
    assert names.count("lease-cohort") == 1 and not any(n in names for n in ("lease-rex", "lease-tom", "lease-max"))
    first = {lease.subject: leases.current(lease.subject)["expires_at"] for lease in held}
    held[1].release("done")
    time.sleep(2.5)  # more than two renewal rounds (every ttl/3)
    for lease in (held[0], held[2]):
        lease.check("writing")  # still valid by its own clock: renewed, although no thread of its own runs
    later = {lease.subject: leases.current(lease.subject) for lease in held}
    assert later["rex"]["expires_at"] > first["rex"] and later["max"]["expires_at"] > first["max"]
    assert later["tom"]["released"] and later["tom"]["outcome"] == "done"  # not rewritten by a renewal since
    assert later["tom"]["expires_at"] == first["tom"]
    for lease in (held[0], held[2]):
        lease.release("done")
    group.stop()
    assert "lease-cohort" not in [t.name for t in threading.enumerate()]


def test_lease_listings_see_other_workers_writes_on_s3(s3):
    """s3fs caches listings and sees only its own writes there; a lease read from such a cache would miss the
    worker that took the subject over. (Without fresh listings `current` below is run-a's old generation.)"""
    leases = Leases(Storage(), s3.url("out"), "run-a", ttl=30)
    leases.claim("rex").lease.release("preempted")
    assert leases.current("rex")["generation"] == 0  # listed, and cached by this process's s3fs
    now = time.time()
    other = {"subject": "rex", "generation": 1, "token": "t", "holder": {"pod": "p", "host": "h", "pid": 1, "run_id": "run-b"},
             "ttl_seconds": 30, "expires_at": now + 30, "released": False}
    s3.fs().pipe_file(s3.url("out", "_leases", "rex", "00000001.json"), json.dumps(other).encode())  # another client
    claim = leases.claim("rex")
    assert claim.lease is None and claim.current["holder"]["run_id"] == "run-b"


def test_outputs_that_cannot_hold_a_lease_are_named():
    assert "memory:// cannot hold a lease" in Storage().lease_support("memory://x/out")


# -- real workers side by side ----------------------------------------------------------------------------------

SUBJECTS = [{"id": i, "token": "sks", "class_noun": "dog", "images": f"imgs/{i}/"} for i in ("rex", "tom", "ivy")]


def _manifest(tmp: Path, output: str, subjects=SUBJECTS, **train) -> Path:
    for s in subjects:
        if not (tmp / "imgs" / s["id"]).exists():
            draw_subject(tmp / "imgs" / s["id"], n=2)
    return tiny_manifest(tmp / "m.yaml", output, subjects, defaults={
        "resolution": 32, "train": {"max_steps": 4, "checkpoint_every": 2, "learning_rate": 1e-4, **train},
        "priors": {"num_images": 2, "steps": 2, "batch_size": 2},
        "samples": {"prompts": ["a photo of {token} {class_noun}"], "seeds": [0], "steps": 2, "include_class_prompt": False}})


def _start(manifest: Path, env: dict[str, str], *args: str):
    return spawn_cli("run", str(manifest), *args, env=env, cwd=manifest.parent)


def _finish(procs: list, timeout: float = 150) -> list[tuple[int, str]]:
    out = []
    for p in procs:
        _, err = p.communicate(timeout=timeout)
        out.append((p.returncode, err))
    return out


def _reports(runs_dir_listing: dict[str, bytes]) -> list[dict]:
    return [json.loads(v) for v in runs_dir_listing.values()]


def _trained_by(reports: list[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in reports:
        for s in r["subjects"]:
            if s["status"] == "succeeded":
                counts[s["id"]] = counts.get(s["id"], 0) + 1
    return counts


def _local_reports(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "_runs").glob("*.json"))]


def test_two_runs_on_one_local_output_and_work_dir_train_each_subject_once(tmp_path: Path):
    m = _manifest(tmp_path, "out")
    env = cli_env(DBBATCH_WORK_DIR=str(tmp_path / "shared-work"))  # one work dir: each process has its own scratch
    results = _finish([_start(m, env), _start(m, env)])
    for code, err in results:
        assert code == 0, err[-3000:]
    reports = _local_reports(tmp_path / "out")
    assert len(reports) == 2
    assert _trained_by(reports) == {"rex": 1, "tom": 1, "ivy": 1}, [r["subjects"] for r in reports]
    assert all(s["status"] in ("succeeded", "skipped") for r in reports for s in r["subjects"])
    for s in SUBJECTS:  # one training wrote one TensorBoard log; the model is complete
        assert len(list((tmp_path / "out" / s["id"] / "logs").glob("events.out.tfevents.*"))) == 1
        assert (tmp_path / "out" / s["id"] / "model" / "unet").is_dir()
    leased_lines = [line for _, err in results for line in err.splitlines() if "leased by pod" in line]
    assert leased_lines, "the second worker says who holds the subjects it passes over"
    assert not list((tmp_path / "shared-work" / "scratch").iterdir()), "scratch folders are removed at the end"


def test_negative_control_without_leases_two_runs_train_a_subject_twice(tmp_path: Path):
    """What the test above would see without leases: both runs work on rex and the test above fails. Which way
    depends on timing: both train it and report it succeeded; or the later one finds the model the other stored
    (`_stage.json`) and publishes it again, also reporting it succeeded; or one run's publish is clobbered by the
    other's and fails. Either way neither run passed rex over, which leases make it do."""
    import re

    m = _manifest(tmp_path, "out", SUBJECTS[:1])
    env = cli_env(DBBATCH_WORK_DIR=str(tmp_path / "shared-work"))
    results = _finish([_start(m, env, "--no-leases"), _start(m, env, "--no-leases")])
    errs = [e[-3000:] for _, e in results]
    # a run trained rex if it stored one of rex's periodic checkpoints (the progress line's "done" is printed only
    # for tasks that took half a second, which 4 tiny steps may not)
    assert any(re.search(r"/rex/checkpoints/step-0000002\.ckpt stored", err) for _, err in results), errs
    assert any(code == 0 for code, _ in results), errs
    reports = _local_reports(tmp_path / "out")
    assert not any(s["status"] == "skipped" for r in reports for s in r["subjects"]), (reports, errs)
    trained = _trained_by(reports)
    assert trained == {"rex": 2} or any(code != 0 for code, _ in results), (trained, errs)


def test_two_runs_on_one_s3_output_train_each_subject_once(tmp_path: Path, s3):
    m = _manifest(tmp_path, s3.url("out"), SUBJECTS[:2])
    results = _finish([_start(m, s3.env(DBBATCH_WORK_DIR=str(tmp_path / "w1"))),
                       _start(m, s3.env(DBBATCH_WORK_DIR=str(tmp_path / "w2")))])
    for code, err in results:
        assert code == 0, err[-3000:]
    fs = s3.fs()
    reports = [json.loads(fs.cat_file(k)) for k in fs.find(s3.url("out", "_runs"))]
    assert _trained_by(reports) == {"rex": 1, "tom": 1}, [r["subjects"] for r in reports]
    keys = s3.keys("out")
    assert {"rex/_SUCCESS", "tom/_SUCCESS", "rex/model/model_index.json"} <= keys
    assert sum(1 for k in keys if k.startswith("rex/logs/events.out.tfevents")) == 1
    assert all("lease_probe" not in k for k in keys)


def _wait_for(path: Path, proc, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"dbbatch exited early: {proc.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_force_refuses_while_another_run_is_publishing_the_subject(tmp_path: Path):
    """Finding 1: `--force` during another run's publish deleted the model that run then marked done."""
    m = _manifest(tmp_path, "out", SUBJECTS[:1])
    marker = tmp_path / "publishing"
    holder = _start(m, cli_env(DBBATCH_WORK_DIR=str(tmp_path / "w1"), DBBATCH_FAULTS="pause_at_publish=config",
                               DBBATCH_FAULT_MARKER=str(marker)))
    _wait_for(marker, holder)  # model, _stage.json and samples stored; config, metrics and _SUCCESS not yet
    dry = run_cli("run", str(m), "--dry-run", env=cli_env(DBBATCH_WORK_DIR=str(tmp_path / "w2")), cwd=tmp_path)
    assert dry.returncode == 0 and f"rex\tleased by pod" in dry.stdout, dry.stdout + dry.stderr
    forced = run_cli("run", str(m), "--only", "rex", "--force", env=cli_env(DBBATCH_WORK_DIR=str(tmp_path / "w2")),
                     cwd=tmp_path)
    assert forced.returncode == 1, forced.stderr
    assert "rex: failed: subject rex: --force refused: pod " in forced.stderr, forced.stderr
    assert "is working on it; wait for it to finish (or stop that worker) and rerun" in forced.stderr
    assert (tmp_path / "out" / "rex" / "model" / "unet").is_dir(), "nothing was deleted under the live holder"
    Path(str(marker) + ".continue").touch()
    (code, err), = _finish([holder])
    assert code == 0, err[-3000:]
    rex = tmp_path / "out" / "rex"
    assert {p.name for p in rex.iterdir()} >= {"_SUCCESS", "model", "samples", "metrics.json", "config.yaml"}
    assert not (rex / "checkpoints").exists()
    # once the holder is done, --force is allowed and redoes the subject
    again = run_cli("run", str(m), "--only", "rex", "--force", env=cli_env(DBBATCH_WORK_DIR=str(tmp_path / "w2")), cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    # this run's own report (run ids start with the second they began: the refused run's may sort after it)
    run_id = again.stderr.split(" INFO run ", 1)[1].split(":", 1)[0]
    report = json.loads((tmp_path / "out" / "_runs" / f"{run_id}.json").read_text())
    assert [s["status"] for s in report["subjects"]] == ["succeeded"]


def test_a_lease_lost_right_after_success_leaves_the_subject_published_and_the_next_run_cleans_up(tmp_path: Path):
    """Found by scripts/chaos.py (an outage right after `_SUCCESS`): the failed checkpoint deletion turned a
    published subject into a failed one (exit 1, a retry for nothing). Now it stays succeeded, and the next run
    that finds it done removes the checkpoints it left."""
    m = _manifest(tmp_path, "out", SUBJECTS[:1])  # max_steps 4, checkpoint_every 2: step 2's is stored
    marker = tmp_path / "published"
    holder = _start(m, cli_env(DBBATCH_WORK_DIR=str(tmp_path / "w1"), DBBATCH_FAULTS="pause_at_publish=success",
                               DBBATCH_FAULT_MARKER=str(marker)))
    _wait_for(marker, holder)  # _SUCCESS written; the checkpoints not yet removed
    leases = tmp_path / "out" / "_leases" / "rex"
    doc = json.loads(sorted(leases.glob("*.json"))[-1].read_text())
    taker = {**doc, "generation": doc["generation"] + 1, "token": "another-worker"}
    (leases / f"{doc['generation'] + 1:08d}.json").write_text(json.dumps(taker))  # another worker took it over
    Path(str(marker) + ".continue").touch()
    (code, err), = _finish([holder])
    assert code == 0, err[-3000:]
    assert "rex: published; its checkpoints were not removed (subject rex: lease lost" in err, err[-3000:]
    run_id = err.split(" INFO run ", 1)[1].split(":", 1)[0]
    report = json.loads((tmp_path / "out" / "_runs" / f"{run_id}.json").read_text())
    assert [s["status"] for s in report["subjects"]] == ["succeeded"]
    assert list((tmp_path / "out" / "rex" / "checkpoints").glob("*.ckpt"))  # left behind
    (leases / f"{doc['generation'] + 1:08d}.json").unlink()  # the other worker is gone
    again = run_cli("run", str(m), env=cli_env(DBBATCH_WORK_DIR=str(tmp_path / "w2")), cwd=tmp_path)
    assert again.returncode == 0 and "rex: already done" in again.stderr, again.stderr
    assert "rex: removing the checkpoints its publishing run left" in again.stderr
    assert not (tmp_path / "out" / "rex" / "checkpoints").exists()


def test_a_sigkilled_holder_is_taken_over_after_its_lease_expires_and_training_resumes(tmp_path: Path):
    """A replacement pod on another node starts beside a live one (it waits), then the old one is SIGKILLed: the
    replacement takes the subject over once the lease has expired, and resumes from the checkpoint the dead
    worker stored. (On one machine the taker would see that the holder died and not wait: next test.)"""
    m = _manifest(tmp_path, "out", SUBJECTS[:1], max_steps=6, checkpoint_every=3)
    work = tmp_path / "work"  # one work dir: the taker also clears the dead worker's scratch
    marker = tmp_path / "paused"
    victim = _start(m, cli_env(DBBATCH_WORK_DIR=str(work), DBBATCH_LEASE_SECONDS="4", DBBATCH_FAULTS="pause_at_step=4",
                               DBBATCH_FAULT_MARKER=str(marker)))
    _wait_for(marker, victim)
    taker = _start(m, cli_env(DBBATCH_WORK_DIR=str(work), DBBATCH_FAULTS="other_machine"))
    seen = []
    for line in taker.stderr:  # the taker finds the live lease and waits
        seen.append(line)
        if "rex: leased by pod" in line:
            break
    else:
        pytest.fail("the taker never reported the live lease: " + "".join(seen)[-3000:])
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed_at = time.time()
    assert (tmp_path / "out" / "rex" / "checkpoints" / "step-0000003.ckpt").is_file()
    (code, err), = _finish([taker])
    err = "".join(seen) + err
    assert code == 0, err[-3000:]
    assert "rex: took over the expired lease of pod" in err and "rex: resuming from" in err and "step-0000003.ckpt" in err
    old, new = (json.loads(p.read_text()) for p in sorted((tmp_path / "out" / "_leases" / "rex").glob("*.json")))
    assert (old["generation"], new["generation"]) == (0, 1) and not old["released"]
    assert old["holder"]["pid"] == victim.pid and new["holder"]["pid"] == taker.pid
    assert new["acquired_at"] >= old["expires_at"] + grace_seconds(old["ttl_seconds"]), "taken over before it expired"
    assert new["acquired_at"] - killed_at < 4 + grace_seconds(4) + 5, "took far longer than the lease to take over"
    metrics = json.loads((tmp_path / "out" / "rex" / "metrics.json").read_text())
    assert (metrics["resumed_from_step"], metrics["steps"]) == (3, 6)
    assert not list((work / "scratch").iterdir()), "the dead worker's scratch is removed"


def test_work_queue_three_workers_uneven_subjects_each_done_once_and_nobody_idles(tmp_path: Path):
    steps = {"a": 16, "b": 2, "c": 2, "d": 8, "e": 2, "f": 2}
    subjects = [{"id": i, "token": "sks", "class_noun": "dog", "images": f"imgs/{i}/", "train": {"max_steps": n}}
                for i, n in steps.items()]
    m = _manifest(tmp_path, "out", subjects, checkpoint_every=100)
    procs = [_start(m, cli_env(DBBATCH_WORK_DIR=str(tmp_path / f"w{i}")), "--queue") for i in range(3)]
    for code, err in _finish(procs):
        assert code == 0, err[-3000:]
    reports = _local_reports(tmp_path / "out")
    assert _trained_by(reports) == {i: 1 for i in steps}, [r["subjects"] for r in reports]
    leases = {i: json.loads(sorted((tmp_path / "out" / "_leases" / i).glob("*.json"))[-1].read_text()) for i in steps}
    by_worker: dict[str, list[dict]] = {}
    for doc in leases.values():
        by_worker.setdefault(doc["holder"]["run_id"], []).append(doc)
    assert len(by_worker) == 3, "every worker took work"
    last_claim = max(d["acquired_at"] for d in leases.values())
    for run_id, docs in by_worker.items():
        idle_from = max(d["released_at"] for d in docs)
        # a worker that ran out of work while a subject was still unleased would have claimed it itself
        assert idle_from >= last_claim - 2.0, f"worker {run_id} idle from {idle_from} while a subject was claimed at {last_claim}"


def test_outputs_without_leases_are_refused_unless_the_risk_is_accepted(tmp_path: Path):
    m = _manifest(tmp_path, "memory://dbbatch-out", SUBJECTS[:1])
    proc = run_cli("run", str(m), env=cli_env(DBBATCH_WORK_DIR=str(tmp_path / "w")), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert ("output: memory:// cannot hold a lease (no conditional create); leases need stores shared between processes "
            "(local paths, s3://), so two workers on it could train one subject at once; use a local path or s3://, or "
            "pass --no-leases to accept that risk") in proc.stderr
    both = run_cli("run", str(m), "--queue", "--no-leases", env=cli_env(DBBATCH_WORK_DIR=str(tmp_path / "w")), cwd=tmp_path)
    assert both.returncode == 2 and "--queue needs leases" in both.stderr


# -- the report: shards finishing together ---------------------------------------------------------------------

def _report_race(tmp_path: Path, serialized: bool):
    """Build A pauses between its summary.json and its index.html; build B (one more subject, a later second)
    starts meanwhile. Returns (B waited for A, the final summary.json, the final index.html)."""
    import threading

    from dbbatch.quality.report import build_serialized
    from dbbatch.store.leases import Leases
    from dbbatch.store.storage import Storage

    class PausingStorage(Storage):  # the real local store; thread A's index.html write waits for `go`
        paused, go = threading.Event(), threading.Event()

        def write_text(self, url: str, text: str) -> None:
            if url.endswith("/index.html") and threading.current_thread().name == "A":
                self.paused.set()
                self.go.wait(60)
            super().write_text(url, text)

    out = tmp_path / "out"
    out.mkdir()
    storage = PausingStorage({})

    def builder(name: str, ids: list[str]) -> threading.Thread:
        leases = Leases(storage, str(out), f"run-{name}") if serialized else None
        return threading.Thread(target=build_serialized, args=(storage, str(out), ids, leases), kwargs={"poll_seconds": 0.1},
                                name=name, daemon=True)

    a = builder("A", ["rex"])
    a.start()
    assert storage.paused.wait(60), "build A never reached its index.html"
    time.sleep(1.1)  # B's generated_at is a later second than A's
    b = builder("B", ["rex", "tom"])
    b.start()
    b.join(2.0)
    b_waited = b.is_alive()
    storage.go.set()
    a.join(60)
    b.join(60)
    report = out / "_report"
    return b_waited, json.loads((report / "summary.json").read_text()), (report / "index.html").read_text()


def test_report_builds_of_shards_finishing_together_never_interleave(tmp_path: Path):
    b_waited, summary, page = _report_race(tmp_path, serialized=True)
    assert b_waited, "build B wrote while build A held the report's lease"
    assert [s["id"] for s in summary["subjects"]] == ["rex", "tom"]  # the later build's view, written last
    assert f"generated {summary['generated_at']}" in page and 'id="card-tom"' in page  # page and summary: one build


def test_negative_control_without_the_report_lease_the_page_and_summary_disagree(tmp_path: Path):
    b_waited, summary, page = _report_race(tmp_path, serialized=False)
    assert not b_waited
    assert [s["id"] for s in summary["subjects"]] == ["rex", "tom"]  # B's summary.json ...
    assert f"generated {summary['generated_at']}" not in page and 'id="card-tom"' not in page  # ... under A's older page
