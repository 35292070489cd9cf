"""Shared fixtures. Tests run the real CLI as processes of their own against the tree they live in: children of
a fork server that has imported dbbatch once (tests/forkserver.py), or fresh `python -m dbbatch` interpreters
with DBBATCH_TEST_SPAWN=1. tests/README.md says how the suite is organised and what it may cost."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))  # tcpproxy, chaos: shared with scripts/
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two workers on two cores: torch in a worker's own process (loading and rendering models) uses one thread,
    # as the CLI processes do (cli_env). Set before anything imports torch.
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "DBBATCH_"))}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    # One intra-op thread per CLI process: pytest and the CLI share 2 cores, and torch's second thread
    # spin-waiting for a busy core made runs ~10x slower under load. Bitwise comparisons need equal counts.
    env.setdefault("OMP_NUM_THREADS", "1")
    # Short leases: a rerun on another "machine" after a SIGKILL takes the dead run's subject over after 10 s
    # instead of 2 minutes. (5 s lapsed once under make test's two workers: a renewal every 1.7 s was starved.)
    env["DBBATCH_LEASE_SECONDS"] = "10"
    env.update(extra)
    return env


# -- running the CLI ------------------------------------------------------------------------------------------

_fork_server = None
CLI_PROCESSES: dict[str, int] = {}  # test file -> `dbbatch` processes it started (printed at the end of the run)


def fresh_interpreters() -> bool:
    """DBBATCH_TEST_SPAWN=1: every `dbbatch` command a fresh `python -m dbbatch` (slower; no fork server)."""
    return os.environ.get("DBBATCH_TEST_SPAWN") == "1"


def spawn_cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None, fresh: bool = False,
              drop_capabilities: tuple[int, ...] = ()):
    """Start `dbbatch ARGS` as a process of its own; returns it (a Popen, or the fork server's equivalent:
    pid, poll, wait, communicate -> (stdout, stderr) text, send_signal, kill). `fresh`: a new interpreter even
    with the fork server (for the tests that hold the two ways equal). `drop_capabilities`: the process
    starts without these capabilities (root meeting permission errors)."""
    global _fork_server
    test = os.environ.get("PYTEST_CURRENT_TEST", "?::").split("::", 1)[0]
    CLI_PROCESSES[test] = CLI_PROCESSES.get(test, 0) + 1
    env, cwd = env or cli_env(), cwd or REPO
    if fresh or fresh_interpreters():
        from forkserver import drop_capabilities as drop

        return subprocess.Popen([sys.executable, "-m", "dbbatch", *args], env=env, cwd=cwd, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                preexec_fn=(lambda: drop(list(drop_capabilities))) if drop_capabilities else None)
    if _fork_server is None:
        import tempfile

        from forkserver import ForkServer

        _fork_server = ForkServer(Path(tempfile.mkdtemp(prefix="dbbatch-cli-")))
    return _fork_server.spawn(list(args), env, cwd, drop_capabilities)


def pytest_sessionfinish(session, exitstatus) -> None:
    if _fork_server is not None:
        _fork_server.close()
        import shutil

        shutil.rmtree(_fork_server.logs, ignore_errors=True)
    if hasattr(session.config, "workeroutput"):  # an xdist worker: its counts go to the controller
        session.config.workeroutput["dbbatch_cli_processes"] = json.dumps(CLI_PROCESSES)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error) -> None:
    """xdist's controller: add a finished worker's `dbbatch` process counts to ours."""
    for test, n in json.loads(getattr(node, "workeroutput", {}).get("dbbatch_cli_processes", "{}")).items():
        CLI_PROCESSES[test] = CLI_PROCESSES.get(test, 0) + n


# -- scheduling on both cores (make test: pytest -n 2 --dist loadgroup) -------------------------------------------
# A test file is one xdist group unless its tests name their own (`pytest.mark.xdist_group`): module fixtures are
# then built once, on one worker. Groups start longest first (seconds from pytest's cache of the last run, or
# GROUP_SECONDS on a clean clone), so that no long group starts last while the other worker sits idle.
GROUP_SECONDS = {"learning-lora": 95, "learning-seed0": 90, "tests/test_resume.py": 120, "learning-seed1": 70,
                 "tests/test_packing.py": 92, "tests/test_lora.py": 90, "tests/test_tracking.py": 81,
                 "tests/test_leases.py": 71, "tests/test_ddp.py": 47, "tests/test_evaluation.py": 47,
                 "tests/test_throughput_features.py": 45, "tests/test_healing.py": 44, "tests/test_s3.py": 44,
                 "tests/test_chaos.py": 31, "tests/test_flux.py": 23}
_GROUP_CACHE_KEY = "dbbatch/xdist-group-seconds"


def xdist_group(item) -> str:
    marks = [m.args[0] if m.args else m.kwargs.get("name", "default") for m in item.iter_markers("xdist_group")]
    return "_".join(sorted(map(str, marks))) if marks else item.nodeid.split("::", 1)[0]


@pytest.hookimpl(tryfirst=True)  # before xdist's worker reads the marks
def pytest_collection_modifyitems(config, items) -> None:
    cache = getattr(config, "cache", None)  # none with -p no:cacheprovider
    seconds = {**GROUP_SECONDS, **(cache.get(_GROUP_CACHE_KEY, {}) if cache else {})}
    first_seen: dict[str, int] = {}
    for item in items:
        group = xdist_group(item)
        first_seen.setdefault(group, len(first_seen))
        if not any(item.iter_markers("xdist_group")):
            item.add_marker(pytest.mark.xdist_group(group))
    items.sort(key=lambda item: (-seconds.get(xdist_group(item), 0), first_seen[xdist_group(item)]))


def pytest_terminal_summary(terminalreporter) -> None:
    """The budget at a glance (tests/README.md): seconds (setup, call and teardown summed over its tests, as
    if run one at a time) and `dbbatch` processes per test file, most expensive first."""
    seconds: dict[str, float] = {}  # per test file
    groups: dict[str, float] = {}  # per xdist group (xdist appends "@group" to the node ids)
    for reports in terminalreporter.stats.values():
        for r in reports:
            if getattr(r, "when", None) in ("setup", "call", "teardown"):
                test = r.nodeid.split("::", 1)[0]
                seconds[test] = seconds.get(test, 0.0) + r.duration
                group = r.nodeid.rsplit("@", 1)[1] if "@" in r.nodeid else test
                groups[group] = groups.get(group, 0.0) + r.duration
    if not seconds:
        return
    config = terminalreporter.config
    cache = getattr(config, "cache", None)
    # Only a whole run's seconds schedule the next one: a `-k` or single-file run's would be a part of a group's.
    whole = (not config.option.keyword and not config.option.markexpr and not getattr(config.option, "deselect", None)
             and [Path(a).resolve() for a in config.args] == [Path(__file__).resolve().parent])
    if cache is not None and whole and not hasattr(config, "workerinput"):
        cache.set(_GROUP_CACHE_KEY, {**cache.get(_GROUP_CACHE_KEY, {}), **{g: round(s, 1) for g, s in groups.items()}})
    terminalreporter.write_sep("-", "seconds and dbbatch processes per test file")
    for test, s in sorted(seconds.items(), key=lambda kv: -kv[1]):
        terminalreporter.write_line(f"{s:8.1f} s  {CLI_PROCESSES.get(test, 0):4d} dbbatch  {test}")
    terminalreporter.write_line(f"{sum(seconds.values()):8.1f} s  {sum(CLI_PROCESSES.values()):4d} dbbatch  "
                                f"in all (test time summed; the wall time is pytest's last line)")


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 600,
            fresh: bool = False, drop_capabilities: tuple[int, ...] = ()) -> subprocess.CompletedProcess:
    """Run `dbbatch ARGS` to its end (spawn_cli); returns the completed process (stdout/stderr as text)."""
    proc = spawn_cli(*args, env=env, cwd=cwd, fresh=fresh, drop_capabilities=drop_capabilities)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise
    return subprocess.CompletedProcess(["dbbatch", *args], proc.returncode, out, err)


def start_at_fault(manifest: Path, work: Path, faults: str, *args: str, timeout: float = 300, **env: str):
    """Start `dbbatch run MANIFEST ARGS` with DBBATCH_FAULTS=`faults` (dbbatch/core/faults.py) and work dir `work`;
    return once the fault's marker file appears (the process then waits there), with that marker's path."""
    import time

    marker = work.parent / f"marker-{work.name}-{time.monotonic_ns()}"
    env = cli_env(DBBATCH_WORK_DIR=str(work), DBBATCH_FAULTS=faults, DBBATCH_FAULT_MARKER=str(marker), **env)
    proc = spawn_cli("run", str(manifest), *args, env=env)
    deadline = time.monotonic() + timeout
    while not marker.exists():
        assert proc.poll() is None, f"dbbatch exited early: {proc.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline, "dbbatch never reached the fault point"
        time.sleep(0.05)
    return proc, marker


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


# The model families every family-agnostic test runs on: family -> its built-in tiny architecture.
FAMILY_ARCHS = {"sd": "tiny-sd", "sdxl": "tiny-sdxl"}


@pytest.fixture(scope="session")
def family_model_dirs(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, Path]:
    """Each family's built-in tiny model as a diffusers folder (`dbbatch tiny-model --arch`), once per session."""
    out = tmp_path_factory.mktemp("tiny-sdxl") / "tiny-sdxl"
    proc = run_cli("tiny-model", "--arch", "tiny-sdxl", str(out))
    assert proc.returncode == 0, proc.stderr
    return {"sd": tiny_model_dir, "sdxl": out}


def pipeline_class(family: str):
    """The diffusers pipeline class a user loads a family's folders with."""
    import diffusers

    return {"sd": diffusers.StableDiffusionPipeline, "sdxl": diffusers.StableDiffusionXLPipeline}[family]


# ---------------------------------------------------------------------------------------------------------
# Real S3: a moto server on loopback, started once per session (as s3fs's own test suite does), emptied
# before each test. The CLI under test reaches it through the standard AWS environment variables.

S3_BUCKET = "dbbatch-test"


def free_port() -> int:
    from tcpproxy import free_port as free

    return free()


def _http(method: str, url: str, timeout: float = 5.0) -> int:
    import urllib.request

    with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=timeout) as r:
        return r.status


@pytest.fixture(scope="session")
def moto_endpoint(tmp_path_factory: pytest.TempPathFactory):
    """`http://127.0.0.1:PORT` of a moto S3 server running as a separate process for the whole session."""
    import time

    port = free_port()
    log_path = tmp_path_factory.mktemp("moto") / "moto.log"
    log = open(log_path, "wb")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if _http("GET", f"{url}/moto-api/") == 200:
                break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"moto server did not start on {url}: {log_path.read_text()[-2000:]}")
        time.sleep(0.1)
    yield url
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log.close()


class S3:
    """One test's view of the moto server: an empty bucket, the environment that reaches it, helpers."""

    def __init__(self, endpoint: str, bucket: str, work_dir: Path):
        self.endpoint, self.bucket, self.work_dir = endpoint, bucket, work_dir

    def url(self, *parts: str) -> str:
        return "/".join([f"s3://{self.bucket}", *(p.strip("/") for p in parts)])

    def aws_env(self, endpoint: str | None = None) -> dict[str, str]:
        """Dummy credentials (moto accepts any), no shared config files, no instance-metadata lookups."""
        return {
            "AWS_ENDPOINT_URL": endpoint or self.endpoint, "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": "/nonexistent/aws-config",
            "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
        }

    def env(self, endpoint: str | None = None, **extra: str) -> dict[str, str]:
        """Environment for `run_cli`: reaches the endpoint (default: moto itself), private work dir."""
        return cli_env(**{**self.aws_env(endpoint), "DBBATCH_WORK_DIR": str(self.work_dir), **extra})

    def fs(self):
        """A fresh s3fs filesystem on the endpoint (no listing cache carried over from another test)."""
        import s3fs

        return s3fs.S3FileSystem(endpoint_url=self.endpoint, key="testing", secret="testing", skip_instance_cache=True)

    def put_dir(self, local: Path, *parts: str) -> str:
        """Upload a local folder; returns its s3:// URL."""
        fs = self.fs()
        dest = self.url(*parts)
        for f in sorted(p for p in local.rglob("*") if p.is_file()):
            fs.put_file(str(f), f"{dest}/{f.relative_to(local).as_posix()}")
        return dest

    def keys(self, *parts: str) -> set[str]:
        """Object keys below a prefix, relative to it."""
        prefix = self.url(*parts).split("://", 1)[1].rstrip("/") + "/"
        return {k[len(prefix):] for k in self.fs().find(prefix)}

    def read(self, *parts: str) -> bytes:
        return self.fs().cat_file(self.url(*parts))


@pytest.fixture
def s3(moto_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> S3:
    """An emptied moto server with one bucket; this process's environment points at it too."""
    _http("POST", f"{moto_endpoint}/moto-api/reset")
    s = S3(moto_endpoint, S3_BUCKET, tmp_path / "work")
    for k, v in s.aws_env().items():
        monkeypatch.setenv(k, v)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # instances (and their listing caches) outlive a reset
    s.fs().mkdir(S3_BUCKET)
    return s


def render_stored_samples(pipe, subject_dir: Path, steps: int, guidance_scale: float = 7.5, resolution: int = 32):
    """(what a user's pipeline makes for the subject's sample grid, the sample PNGs dbbatch stored), as uint8
    arrays: the prompts and seeds come from samples/prompts.json; one intra-op thread, as the CLI that
    rendered the stored samples (cli_env), since with two, float sums round differently."""
    import numpy as np
    import torch
    from PIL import Image

    spec = json.loads((subject_dir / "samples" / "prompts.json").read_text())
    jobs = [(p, seed, spec["files"][r][c]) for r, p in enumerate(spec["rows"]) for c, seed in enumerate(spec["columns"])]
    # an SDXL subject's micro-conditioning, as its config.yaml records it (unset sizes: the pipeline's default)
    sdxl = (yaml.safe_load((subject_dir / "config.yaml").read_text())["subject"].get("sdxl") or {})
    sizes = {k: tuple(v) for k, v in sdxl.items() if k in ("original_size", "crops_coords_top_left", "target_size") and v}
    pipe.set_progress_bar_config(disable=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        made = pipe([p for p, _, _ in jobs], num_inference_steps=steps, guidance_scale=guidance_scale, height=resolution,
                    width=resolution, generator=[torch.Generator().manual_seed(s) for _, s, _ in jobs], **sizes).images
    finally:
        torch.set_num_threads(threads)
    stored = [np.asarray(Image.open(subject_dir / "samples" / f).convert("RGB")) for _, _, f in jobs]
    return [np.asarray(im) for im in made], stored
