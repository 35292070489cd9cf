"""Sharding: the pure assignment's properties, and `dbbatch run --dry-run` per shard (reads state, writes nothing)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, cli_env, run_cli, tiny_manifest

from dbbatch.config.sharding import select, shard_of

IDS = [f"subject-{i:04d}" for i in range(600)]


@pytest.mark.parametrize("count", [1, 2, 3, 7, 16])
def test_every_subject_in_exactly_one_shard(count):
    shards = [select(IDS, i, count) for i in range(count)]
    flat = [s for shard in shards for s in shard]
    assert sorted(flat) == sorted(IDS) and len(flat) == len(set(flat))
    # each shard keeps the manifest's order, so a shard works through its subjects top to bottom
    assert all(shard == [i for i in IDS if i in set(shard)] for shard in shards)


@pytest.mark.parametrize("count", [2, 5, 16])
def test_appending_subjects_moves_none(count):
    before = {i: shard_of(i, count) for i in IDS[:400]}
    after_ids = IDS[:400] + [f"late-{j}" for j in range(100)]
    for index in range(count):
        mine = select(after_ids, index, count)
        assert {i for i in mine if i in before} == {i for i, s in before.items() if s == index}


def test_shards_are_roughly_even():
    # not a guarantee (a hash, not a balancer) but 600 ids over 4 shards must not pile up in one
    sizes = [len(select(IDS, i, 4)) for i in range(4)]
    assert min(sizes) > 0.7 * len(IDS) / 4 and max(sizes) < 1.3 * len(IDS) / 4, sizes


def test_assignment_is_the_same_in_every_process():
    # Python's hash() of a str changes per process (PYTHONHASHSEED); shards computed by different pods must agree
    code = "import json, sys; from dbbatch.config.sharding import shard_of; print(json.dumps([shard_of(i, 5) for i in sys.argv[1:]]))"
    outs = set()
    for seed in ("1", "2", "random"):
        env = dict(os.environ, PYTHONHASHSEED=seed, PYTHONPATH=str(REPO))
        outs.add(subprocess.run([sys.executable, "-c", code, *IDS[:50]], env=env, capture_output=True, text=True,
                                check=True).stdout)
    assert len(outs) == 1
    assert json.loads(outs.pop()) == [shard_of(i, 5) for i in IDS[:50]]


@pytest.mark.parametrize("index,count", [(2, 2), (-1, 2), (0, 0)])
def test_select_rejects_bad_shards(index, count):
    with pytest.raises(ValueError):
        select(IDS, index, count)


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def _states(stdout: str) -> dict[str, str]:
    lines = stdout.strip().splitlines()
    assert lines[0].startswith("shard "), stdout
    return dict(line.split("\t", 1) for line in lines[1:])


@pytest.fixture
def staged_batch(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A 9-subject manifest whose output already holds every state a subject can be in."""
    ids = [f"s{i}" for i in range(9)]
    (tmp_path / "imgs").mkdir()
    m = tiny_manifest(tmp_path / "m.yaml", "out", [
        {"id": i, "token": "sks", "class_noun": "dog", "images": "imgs/"} for i in ids])
    out = tmp_path / "out"
    (out / "s0").mkdir(parents=True)
    (out / "s0" / "_SUCCESS").write_text("")
    (out / "s1" / "checkpoints").mkdir(parents=True)
    (out / "s1" / "checkpoints" / "step-0000012.ckpt").write_bytes(b"x")
    (out / "s2").mkdir()
    (out / "s2" / "_stage.json").write_text(json.dumps({"stage": "samples"}))
    expected = {i: "pending" for i in ids}
    expected.update({"s0": "done", "s1": "resumable from step 12", "s2": "model stored, samples"})
    return m, expected


def test_dry_run_lists_each_shard_and_writes_nothing(tmp_path: Path, staged_batch):
    manifest, expected = staged_batch
    work = tmp_path / "work"
    before = _tree(tmp_path)
    seen: dict[str, str] = {}
    for index in range(3):
        if index == 1:  # as a pod of the Indexed Job gets it: from the environment
            args, env = [], cli_env(DBBATCH_WORK_DIR=str(work), JOB_COMPLETION_INDEX="1", DBBATCH_SHARD_COUNT="3")
        else:
            args, env = ["--shard-index", str(index), "--shard-count", "3"], cli_env(DBBATCH_WORK_DIR=str(work))
        proc = run_cli("run", str(manifest), "--dry-run", *args, env=env)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith(f"shard {index}/3:"), proc.stdout
        states = _states(proc.stdout)
        assert set(states) == set(select(list(expected), index, 3))
        assert not set(states) & set(seen), "a subject listed by two shards"
        seen.update(states)
    assert seen == expected
    assert _tree(tmp_path) == before, "--dry-run wrote or touched something"
    assert not work.exists()


@pytest.mark.parametrize("args,env,says", [
    (["--shard-index", "3", "--shard-count", "3"], {}, "shard index must be in [0, 3), got 3"),
    (["--shard-count", "0"], {}, "shard count must be >= 1, got 0"),
    ([], {"DBBATCH_SHARD_COUNT": "two"}, "DBBATCH_SHARD_COUNT"),
])
def test_bad_shard_settings_exit_2_with_one_line(staged_batch, args, env, says):
    manifest, _ = staged_batch
    proc = run_cli("run", str(manifest), "--dry-run", *args, env=cli_env(**env))
    assert proc.returncode == 2
    assert says in proc.stderr and "Traceback" not in proc.stderr
