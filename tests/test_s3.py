"""Everything on real S3: a moto server on 127.0.0.1 (see the `s3` fixture), reached the way a pod reaches
AWS: through AWS_ENDPOINT_URL and credentials in the environment. No fsspec or boto mocks.

The endpoint outage is made with a TCP proxy in front of moto: cutting it refuses new connections and
resets open ones, which is what a client sees when an endpoint dies. Killing moto itself would not do: it
keeps its objects in process memory, so a restarted moto is an empty store, unlike a real S3 coming back.
"""

from __future__ import annotations

import json
import logging
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import (
    FAMILY_ARCHS,
    REPO,
    S3,
    draw_subject,
    pipeline_class,
    render_stored_samples,
    run_cli,
    spawn_cli,
    tiny_manifest,
)
from tcpproxy import CuttableProxy  # scripts/tcpproxy.py (conftest puts scripts/ on the path)

OUTPUTS = ["_SUCCESS", "_stage.json", "metrics.json", "config.yaml", "samples/grid.png", "samples/prompts.json",
           "model/model_index.json", "model/unet/diffusion_pytorch_model.safetensors",
           "model/text_encoder/model.safetensors", "model/vae/diffusion_pytorch_model.safetensors",
           "model/tokenizer/tokenizer_config.json", "model/scheduler/scheduler_config.json"]


@pytest.fixture
def proxy(moto_endpoint: str):
    p = CuttableProxy(int(moto_endpoint.rsplit(":", 1)[1]))
    yield p
    p.cut()


def _photos(s3: S3, tmp_path: Path, name: str, color=(220, 30, 30), n: int = 3) -> str:
    """Draw a subject's photos and upload them; returns the folder URL (with a trailing slash)."""
    return s3.put_dir(draw_subject(tmp_path / "photos" / name, color, n=n), "photos", name) + "/"


def _manifest(tmp_path: Path, name: str, s3: S3, subjects: list[dict], **overrides) -> Path:
    return tiny_manifest(tmp_path / f"{name}.yaml", s3.url("out"), subjects, **overrides)


# -- the whole job on S3 ---------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILY_ARCHS))
def test_run_with_everything_on_s3_then_a_second_manifest_reuses_priors(s3: S3, tmp_path: Path, family_model_dirs, family: str):
    model_url = s3.put_dir(family_model_dirs[family], "models", "tiny")
    m = _manifest(tmp_path, "m", s3, [{"id": "rex", "token": "sks", "class_noun": "dog", "images": _photos(s3, tmp_path, "rex")}],
                  base_model=model_url, prior_cache=s3.url("priors"))
    started = time.monotonic()
    proc = run_cli("run", str(m), env=s3.env())
    seconds = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr
    print(f"S3 end-to-end run: {seconds:.1f}s")

    stored = s3.keys("out", "rex")
    for rel in OUTPUTS:
        assert rel in stored, f"rex/{rel} missing from the bucket: {sorted(stored)}"
    assert len([k for k in stored if k.startswith("samples/prompt") and k.endswith(".png")]) == 2 * 2  # (prompt + class prompt) x 2 seeds
    assert not [k for k in stored if k.startswith("checkpoints/")], "checkpoints are pruned once the subject is done"
    run_ids = {k[len("_runs/"):-len(".json")] for k in s3.keys("out") if k.startswith("_runs/")}
    assert s3.read("out", "rex", "_SUCCESS").decode().strip() in run_ids
    metrics = json.loads(s3.read("out", "rex", "metrics.json"))
    assert metrics["steps"] == 6 and metrics["priors_generated"] == 2
    assert "generating 2 of 2 class images" in proc.stderr
    config = yaml.safe_load(s3.read("out", "rex", "config.yaml"))
    assert config["base_model"] == model_url and config["output"] == s3.url("out")
    priors = {k: s3.read("priors", k) for k in s3.keys("priors")}
    assert sorted(k.rsplit("/", 1)[-1] for k in priors) == ["000000.png", "000001.png", "prior.json"]

    # the base model was downloaded once into a cache folder named by its URL and content
    cached = [p for p in (s3.work_dir / "cache" / "models").iterdir() if p.name.startswith("remote-")]
    assert len(cached) == 1 and (cached[0] / ".complete").read_text().strip() == model_url
    assert f"base model {model_url}: downloading" in proc.stderr

    # the stored model is a plain diffusers folder: download it and load it with the family's pipeline; it
    # makes the samples dbbatch stored
    local = tmp_path / "downloaded"
    s3.fs().get(s3.url("out", "rex") + "/", str(local), recursive=True)
    pipe = pipeline_class(family).from_pretrained(str(local / "model"))
    made, stored = render_stored_samples(pipe, local, steps=2)
    assert all(np.array_equal(a, b) for a, b in zip(made, stored))

    # another manifest, another output, a subject of the same class: its priors come from the cache, and
    # the base model from the local download (same work dir: a second pod on the same node)
    second = tiny_manifest(tmp_path / "second.yaml", s3.url("other-out"),
                           [{"id": "max", "token": "ohwx", "class_noun": "dog", "images": _photos(s3, tmp_path, "max", (30, 60, 220)),
                             "train": {"max_steps": 2, "checkpoint_every": 2}, "samples": {"seeds": [0], "include_class_prompt": False}}],
                           base_model=model_url, prior_cache=s3.url("priors"))
    two = run_cli("run", str(second), env=s3.env())
    assert two.returncode == 0, two.stderr
    assert json.loads(s3.read("other-out", "max", "metrics.json"))["priors_generated"] == 0
    assert "class images" not in two.stderr
    assert {k: s3.read("priors", k) for k in s3.keys("priors")} == priors
    assert f"base model {model_url}: using the cached copy" in two.stderr and "downloading" not in two.stderr


# -- an endpoint outage in the middle of publishing ------------------------------------------------------------


@pytest.mark.slow
def test_endpoint_outage_mid_publish_then_rerun_does_not_train_again(s3: S3, proxy: CuttableProxy, tmp_path: Path):
    m = _manifest(tmp_path, "m", s3, [{"id": "rex", "token": "sks", "class_noun": "dog", "images": _photos(s3, tmp_path, "rex"),
                                       "train": {"with_prior_preservation": False}}])
    marker = tmp_path / "paused"
    env = s3.env(proxy.url, DBBATCH_FAULTS="pause_at_publish=config", DBBATCH_FAULT_MARKER=str(marker),
                 DBBATCH_RETRY_ATTEMPTS="3", DBBATCH_RETRY_BACKOFF_SECONDS="0.2",
                 AWS_MAX_ATTEMPTS="1")  # botocore's own retries would only make the test slower
    run = spawn_cli("run", str(m), env=env, cwd=REPO)
    try:
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert run.poll() is None, run.communicate()[1]
            assert time.monotonic() < deadline, "the run never reached the publish point"
            time.sleep(0.1)
        proxy.cut()
        Path(str(marker) + ".continue").touch()
        out, err = run.communicate(timeout=300)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 1, err
    failed = [line for line in err.splitlines() if "rex: failed:" in line]
    assert len(failed) == 1, err
    assert f"cannot write {s3.url('out', 'rex', 'config.yaml')}: storage unreachable" in failed[0]
    assert "(gave up after 3 attempts)" in failed[0]
    assert "Traceback" not in err
    assert "failed" in out  # the results table

    stored = s3.keys("out", "rex")  # read past the proxy: the objects the run left behind
    assert "_SUCCESS" not in stored and "config.yaml" not in stored and "metrics.json" not in stored
    assert json.loads(s3.read("out", "rex", "_stage.json"))["stage"] == "trained"
    assert "model/unet/diffusion_pytorch_model.safetensors" in stored and "samples/grid.png" in stored

    proxy.restore()
    again = run_cli("run", str(m), env=s3.env(proxy.url))
    assert again.returncode == 0, again.stderr
    assert "rex: fine-tuned model already stored; loading it instead of training" in again.stderr
    assert "rex train" not in again.stderr and "checkpoint" not in again.stderr
    metrics = json.loads(s3.read("out", "rex", "metrics.json"))
    assert "train" not in metrics["seconds"] and "load_trained" in metrics["seconds"]
    assert metrics["steps"] == 6
    assert "_SUCCESS" in s3.keys("out", "rex")


# -- user mistakes: one clear line each ------------------------------------------------------------------------

PLANTED_ENV_SECRET = "planted-env-secret-4c1d"
PLANTED_OPTION_SECRET = "planted-option-secret-9e2f"


@pytest.mark.slow
def test_missing_bucket_and_wrong_key_fail_their_subject_only_and_no_secret_leaks(s3: S3, tmp_path: Path):
    good = _photos(s3, tmp_path, "good")
    subjects = [
        {"id": "nobucket", "token": "sks", "class_noun": "dog", "images": "s3://no-such-bucket-dbbatch/photos/"},
        {"id": "wrongkey", "token": "sks", "class_noun": "dog", "images": [s3.url("photos", "good", "img9.png")]},
        {"id": "good", "token": "sks", "class_noun": "dog", "images": good,
         "train": {"max_steps": 2, "with_prior_preservation": False}, "samples": {"seeds": [0]}},
    ]
    # a secret in the manifest (against the advice) and one in the environment: neither may show up anywhere
    m = _manifest(tmp_path, "m", s3, subjects,
                  storage_options={"s3": {"key": "testing", "secret": PLANTED_OPTION_SECRET}})
    env = s3.env(AWS_SECRET_ACCESS_KEY=PLANTED_ENV_SECRET)
    proc = run_cli("run", str(m), env=env)
    assert proc.returncode == 1, proc.stderr  # documented: at least one subject failed
    lines = proc.stderr.splitlines()
    nobucket = [x for x in lines if "nobucket: failed:" in x]
    wrongkey = [x for x in lines if "wrongkey: failed:" in x]
    assert len(nobucket) == 1 and len(wrongkey) == 1, proc.stderr
    assert nobucket[0].endswith("cannot list s3://no-such-bucket-dbbatch/photos/: bucket 'no-such-bucket-dbbatch' "
                                "does not exist; create it or fix the URL")
    assert wrongkey[0].endswith(f"cannot read {s3.url('photos', 'good', 'img9.png')}: no such file or object; check the path")
    assert "Traceback" not in proc.stderr
    assert "_SUCCESS" in s3.keys("out", "good")
    report = json.loads(s3.read("out", "_runs", next(k for k in s3.keys("out", "_runs"))))
    assert [(s["id"], s["status"]) for s in report["subjects"]] == [("nobucket", "failed"), ("wrongkey", "failed"), ("good", "succeeded")]

    assert "storage_options.s3.secret: looks like a secret" in proc.stderr  # the manifest is warned about
    config = yaml.safe_load(s3.read("out", "good", "config.yaml"))
    assert config["storage_options"] == {"s3": {"key": "***", "secret": "***"}}
    # the batch report, built in the bucket from what is stored: every subject once, the failed ones' lines
    summary = json.loads(s3.read("out", "_report", "summary.json"))
    assert [(r["id"], r["status"]) for r in summary["subjects"]] == [("nobucket", "failed"), ("wrongkey", "failed"), ("good", "succeeded")]
    assert "does not exist; create it or fix the URL" in summary["subjects"][0]["error"]
    assert {"_report/index.html", "_report/good/grid.png", "_report/good/photos.png"} <= s3.keys("out")
    texts = [proc.stdout, proc.stderr] + [s3.read("out", k).decode("utf-8", "replace") for k in s3.keys("out")
                                          if k.endswith((".json", ".yaml", ".txt", ".html", "_SUCCESS"))]
    for secret in (PLANTED_ENV_SECRET, PLANTED_OPTION_SECRET):
        assert not any(secret in t for t in texts), f"{secret} leaked"


def test_missing_credentials_or_output_bucket_stop_the_batch_with_exit_3(s3: S3, tmp_path: Path):
    m = _manifest(tmp_path, "m", s3, [{"id": "rex", "token": "sks", "class_noun": "dog", "images": s3.url("photos", "rex") + "/"}])
    env = s3.env()
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        del env[k]
    proc = run_cli("run", str(m), env=env)
    assert proc.returncode == 3, proc.stderr
    errors = [x for x in proc.stderr.splitlines() if " ERROR " in x]
    assert errors == [errors[0]] and errors[0].endswith(
        f"cannot write to {s3.url('out')}: no credentials found; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
        "(or AWS_PROFILE), or give the pod an IAM role (IRSA)"), proc.stderr

    m2 = tiny_manifest(tmp_path / "m2.yaml", "s3://no-such-bucket-dbbatch/out", [{"id": "rex", "token": "sks", "class_noun": "dog", "images": "x/"}])
    proc = run_cli("run", str(m2), env=s3.env())
    assert proc.returncode == 3, proc.stderr
    errors = [x for x in proc.stderr.splitlines() if " ERROR " in x]
    assert len(errors) == 1 and errors[0].endswith(
        "cannot write to s3://no-such-bucket-dbbatch/out: bucket 'no-such-bucket-dbbatch' does not exist; create it or fix the URL")


def test_validate_checks_images_and_output_on_s3(s3: S3, tmp_path: Path, tiny_model_dir: Path):
    model_url = s3.put_dir(tiny_model_dir, "models", "tiny")
    good = _photos(s3, tmp_path, "rex")
    fs = s3.fs()
    fs.pipe_file(s3.url("photos", "junk", "broken.png"), b"not a png")
    fs.pipe_file(s3.url("photos", "junk", "notes.txt"), b"hello")
    ok = _manifest(tmp_path, "ok", s3, [{"id": "rex", "token": "sks", "class_noun": "dog", "images": good}], base_model=model_url)
    proc = run_cli("validate", str(ok), env=s3.env())
    assert proc.returncode == 0, proc.stderr
    assert f"OK (1 subject(s), output {s3.url('out')})" in proc.stdout
    assert not s3.keys("out"), "the write probe is removed"

    bad = tiny_manifest(tmp_path / "bad.yaml", "s3://no-such-bucket-dbbatch/out", [
        {"id": "rex", "token": "sks", "class_noun": "dog", "images": good},
        {"id": "junk", "token": "sks", "class_noun": "dog", "images": s3.url("photos", "junk") + "/"},
        {"id": "none", "token": "sks", "class_noun": "dog", "images": s3.url("photos", "nobody") + "/*.png"},
        {"id": "nob", "token": "sks", "class_noun": "dog", "images": "s3://no-such-bucket-dbbatch/photos/*.png"},
    ], base_model=model_url)
    proc = run_cli("validate", str(bad), env=s3.env())
    assert proc.returncode == 2, proc.stderr
    problems = [x.split(" ERROR ", 1)[1].strip() for x in proc.stderr.splitlines() if " ERROR " in x]
    assert problems == [f"{bad}: {p}" for p in [
        f"subjects[1].images: {s3.url('photos', 'junk', 'broken.png')}: the file is text, not an image (it starts "
        "'not a png'); upload the photo itself",
        f"subjects[2].images: no image files at {s3.url('photos', 'nobody')}/*.png: the folder is empty or missing, "
        "or the pattern matches nothing; put photos (.bmp, .gif, .jpeg, .jpg, .png, .tif, .tiff, .webp) there or fix "
        "the subject's images",
        "subjects[3].images: cannot list s3://no-such-bucket-dbbatch/photos: bucket 'no-such-bucket-dbbatch' "
        "does not exist; create it or fix the URL",
        "output: cannot write to s3://no-such-bucket-dbbatch/out: bucket 'no-such-bucket-dbbatch' "
        "does not exist; create it or fix the URL",
    ]], proc.stderr
    proc = run_cli("validate", "--no-check-remote", str(bad), env=s3.env())
    assert proc.returncode == 0, proc.stderr


# -- the storage module itself against S3 ----------------------------------------------------------------------


def test_transient_failure_is_retried_until_the_endpoint_is_back(s3: S3, proxy: CuttableProxy, monkeypatch, caplog):
    from dbbatch.store.storage import Storage

    s3.fs().pipe_file(s3.url("a.txt"), b"hello")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    storage = Storage({"s3": {"endpoint_url": proxy.url, "skip_instance_cache": True}}, attempts=4, backoff_seconds=0.2)
    proxy.cut()

    class RestoreOnRetry(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith("retrying"):
                proxy.restore()

    handler = RestoreOnRetry()
    logging.getLogger("dbbatch.store.storage").addHandler(handler)
    try:
        with caplog.at_level(logging.WARNING, logger="dbbatch.store.storage"):
            assert storage.read_bytes(s3.url("a.txt")) == b"hello"
    finally:
        logging.getLogger("dbbatch.store.storage").removeHandler(handler)
    retries = [r.getMessage() for r in caplog.records]
    assert len(retries) == 1 and retries[0].startswith(f"retrying read of {s3.url('a.txt')} in ")
    assert "EndpointConnectionError" in retries[0]


def test_large_upload_is_multipart_streamed_with_progress(s3: S3, tmp_path: Path, caplog):
    from dbbatch.core.progress import Reporter
    from dbbatch.store.storage import Storage

    part, parts = 5 * 2**20, 8  # S3's smallest part size
    big = tmp_path / "unet.bin"
    with open(big, "wb") as fh:
        for i in range(parts):
            fh.write(bytes([i]) * part)
    # two parts in flight (s3fs's max_concurrency, a storage option): memory is bounded by parts, not the file
    storage = Storage({"s3": {"max_concurrency": 2}}, part_bytes=part, reporter=Reporter(interactive=False, interval=0))
    assert not storage.exists(s3.url("models", "unet.bin"))  # connects first: botocore's loaded API models are not the upload's
    tracemalloc.start()
    try:
        with caplog.at_level(logging.INFO, logger="dbbatch.progress"):
            storage.upload(big, s3.url("models", "unet.bin"))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    info = s3.fs().info(s3.url("models", "unet.bin"))
    assert info["size"] == parts * part
    assert info["ETag"].strip('"').endswith(f"-{parts}"), f"not a {parts}-part multipart upload: ETag {info['ETag']}"
    assert peak < parts * part * 0.75, f"the upload held {peak / 2**20:.0f} MiB of a {parts * part / 2**20:.0f} MiB file"
    assert any(r.getMessage().startswith("upload unet.bin 40.0MiB/40.0MiB") for r in caplog.records), caplog.text

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dbbatch.progress"):
        local = storage.fetch(s3.url("models", "unet.bin"), tmp_path / "dl" / "unet.bin")
    assert local.read_bytes() == big.read_bytes()
    assert any(r.getMessage().startswith("download unet.bin 40.0MiB/40.0MiB") for r in caplog.records), caplog.text


def test_remote_base_model_cache_follows_its_content(s3: S3, tmp_path: Path, caplog):
    from dbbatch.models.loading import fetch_remote_folder
    from dbbatch.store.storage import Storage

    fs = s3.fs()
    url = s3.url("models", "m")
    fs.pipe_file(f"{url}/model_index.json", b"{}")
    fs.pipe_file(f"{url}/unet/w.safetensors", b"v1")
    storage, cache = Storage(), tmp_path / "cache"
    with caplog.at_level(logging.INFO, logger="dbbatch.models.loading"):
        first = fetch_remote_folder(url, cache, storage)
        assert (first / "unet" / "w.safetensors").read_bytes() == b"v1"
        assert fetch_remote_folder(url, cache, storage) == first
    assert [r.getMessage().split(": ", 1)[1].split()[0] for r in caplog.records] == ["downloading", "using"]

    fs.pipe_file(f"{url}/unet/w.safetensors", b"v2")  # replaced in place under the same URL
    second = fetch_remote_folder(url, cache, storage)
    assert second != first and (second / "unet" / "w.safetensors").read_bytes() == b"v2"
    assert not first.exists(), "the stale copy of the same URL is removed"
    assert sorted(p.name for p in (cache / "models").iterdir()) == [second.name]

    from dbbatch.core.errors import ModelError

    with pytest.raises(ModelError, match="no diffusers folder there"):
        fetch_remote_folder(s3.url("models", "absent"), cache, storage)
