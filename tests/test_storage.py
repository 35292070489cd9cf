"""The storage module on memory:// and file:// (fast, in-process), and how it tells failures apart.

Error classification is checked on the exceptions s3fs and botocore really raise, built the way they build
them (a botocore ClientError with S3's error response, translated by s3fs's own translate_boto_error).
"""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

import pytest

from dbbatch.core.errors import StorageError
from dbbatch.store.failures import advice, backoff_delay, is_permanent
from dbbatch.store.locations import FileInfo, listing_digest, redact, secret_option_paths
from dbbatch.store.storage import Storage


@pytest.fixture
def mem() -> str:
    """A fresh memory:// prefix (the memory filesystem is one process-wide store)."""
    return f"memory://t-{uuid.uuid4().hex[:8]}"


def _layout(storage: Storage, base: str) -> None:
    for name in ("a.png", "b.jpg", ".DS_Store", "Thumbs.db", "._a.png", "notes.txt", "sub/c.png"):
        storage.write_bytes(f"{base}/photos/{name}", name.encode())


@pytest.mark.parametrize("scheme", ["memory", "file", "path"])
def test_expand_folder_glob_and_list(scheme: str, tmp_path: Path, mem: str):
    storage = Storage()
    base = {"memory": mem, "file": f"file://{tmp_path}", "path": str(tmp_path)}[scheme]
    _layout(storage, base)
    folder = storage.expand([f"{base}/photos/"])
    assert [u.rsplit("/", 1)[-1] for u in folder] == ["a.png", "b.jpg", "notes.txt"]  # no system files, not recursive
    assert storage.expand([f"{base}/photos"]) == folder  # a folder without the trailing slash
    assert all(u.startswith(base + "/photos/") for u in folder)  # written the way the location was
    assert [u.rsplit("/", 1)[-1] for u in storage.expand([f"{base}/photos/*.png"])] == ["a.png"]
    assert [u.rsplit("/", 1)[-1] for u in storage.expand([f"{base}/photos/**/*.png"])] == ["a.png", "c.png"]
    listed = [f"{base}/photos/b.jpg", f"{base}/photos/Thumbs.db", f"{base}/photos/sub/c.png"]
    assert storage.expand(listed) == [listed[0], listed[2]]
    assert storage.expand([f"{base}/nothing/"]) == []
    assert storage.read_bytes(folder[0]) == b"a.png"


def test_local_writes_are_atomic(tmp_path: Path):
    storage = Storage(attempts=1)
    dest = tmp_path / "out" / "metrics.json"
    storage.write_json(str(dest), {"steps": 1})
    assert dest.read_text() == '{\n  "steps": 1\n}\n'
    with pytest.raises(StorageError, match=f"cannot write {dest}"):
        storage.write_bytes(str(dest), "not bytes")  # type: ignore[arg-type]  # fails inside the write
    assert dest.read_text() == '{\n  "steps": 1\n}\n', "a failed write leaves the previous file whole"
    assert sorted(p.name for p in dest.parent.iterdir()) == ["metrics.json"], "no temporary file left behind"


def test_fetch_skips_a_finished_download_of_the_same_stored_file(tmp_path: Path, mem: str):
    storage = Storage()
    storage.write_bytes(f"{mem}/ckpt/step-3.ckpt", b"v1")
    local = tmp_path / "dl" / "step-3.ckpt"
    assert storage.fetch(f"{mem}/ckpt/step-3.ckpt", local).read_bytes() == b"v1"
    first = local.stat().st_mtime_ns
    assert storage.fetch(f"{mem}/ckpt/step-3.ckpt", local).stat().st_mtime_ns == first  # not downloaded again
    storage.write_bytes(f"{mem}/ckpt/step-3.ckpt", b"v2")  # another object under the same name
    assert storage.fetch(f"{mem}/ckpt/step-3.ckpt", local).read_bytes() == b"v2"
    with pytest.raises(StorageError, match=rf"cannot download {mem}/ckpt/nope: no such file"):
        storage.fetch(f"{mem}/ckpt/nope", tmp_path / "dl" / "nope")
    assert sorted(p.name for p in local.parent.iterdir()) == [".step-3.ckpt.stored", "step-3.ckpt"], "no partial file left behind"


@pytest.mark.parametrize("scheme", ["memory", "file"])
def test_upload_tree_then_list_and_fetch_tree(scheme: str, tmp_path: Path, mem: str):
    storage = Storage()
    src = tmp_path / "model"
    (src / "unet").mkdir(parents=True)
    (src / "model_index.json").write_text("{}")
    (src / "unet" / "weights.bin").write_bytes(b"\1" * 1000)
    base = mem if scheme == "memory" else f"file://{tmp_path}/remote"
    written = storage.upload_tree(src, f"{base}/m")
    assert written == [f"{base}/m/model_index.json", f"{base}/m/unet/weights.bin"]
    listing = storage.list_tree(f"{base}/m")
    assert [(f.rel, f.size) for f in listing] == [("model_index.json", 2), ("unet/weights.bin", 1000)]
    assert all(f.version for f in listing)
    out = storage.fetch_tree(f"{base}/m", tmp_path / "copy")
    assert (out / "unet" / "weights.bin").read_bytes() == b"\1" * 1000
    assert storage.list_tree(f"{base}/absent") == []
    with pytest.raises(StorageError, match="no files there"):
        storage.fetch_tree(f"{base}/absent", tmp_path / "copy2")


def test_listing_digest_follows_content_not_order():
    a = [FileInfo("unet/w.safetensors", 10, "etag1"), FileInfo("model_index.json", 2, "etag2")]
    assert listing_digest(a) == listing_digest(list(reversed(a)))
    assert listing_digest(a) != listing_digest([FileInfo("unet/w.safetensors", 10, "etag3"), a[1]])
    assert listing_digest(a) != listing_digest([FileInfo("unet/w.safetensors", 11, "etag1"), a[1]])


def test_backoff_is_exponential_capped_and_jittered():
    assert [backoff_delay(n, 0.5, 8.0, rand=lambda: 1.0) for n in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0]
    assert backoff_delay(3, 0.5, 8.0, rand=lambda: 0.0) == 0.0
    assert 0 <= backoff_delay(4, 0.5, 8.0) <= 4.0


def _client_error(code: str, status: int, operation: str = "GetObject", message: str = "msg"):
    """The exception s3fs raises for an S3 error response: botocore's ClientError translated by s3fs."""
    from botocore.exceptions import ClientError
    from s3fs.errors import translate_boto_error

    err = ClientError({"Error": {"Code": code, "Message": message}, "ResponseMetadata": {"HTTPStatusCode": status}}, operation)
    return translate_boto_error(err)


def _classify_cases():
    import botocore.exceptions as bx

    return [
        # exception, permanent?, advice fragment
        (_client_error("NoSuchBucket", 404, message="The specified bucket does not exist"), True, "bucket 'bkt' does not exist"),
        (_client_error("NoSuchKey", 404), True, "no such file or object"),
        (_client_error("AccessDenied", 403), True, "access denied"),
        (_client_error("403", 403, "HeadObject", "Forbidden"), True, "access denied"),
        (_client_error("InvalidAccessKeyId", 403), True, "credentials were rejected (InvalidAccessKeyId)"),
        (_client_error("SignatureDoesNotMatch", 403), True, "credentials were rejected (SignatureDoesNotMatch)"),
        (_client_error("PermanentRedirect", 301), True, "another region"),
        (_client_error("InvalidBucketName", 400), True, "not a valid bucket"),
        (_client_error("SlowDown", 503), False, "unreachable or failing"),
        (_client_error("InternalError", 500), False, "unreachable or failing"),
        (_client_error("ServiceUnavailable", 503), False, "unreachable or failing"),
        (bx.NoCredentialsError(), True, "no credentials found; set AWS_ACCESS_KEY_ID"),
        (bx.ParamValidationError(report='Invalid bucket name "Bad!"'), True, "not a valid bucket"),
        (bx.EndpointConnectionError(endpoint_url="http://127.0.0.1:9/bkt/x"), False, "unreachable"),
        (bx.ConnectionClosedError(endpoint_url="http://127.0.0.1:9/bkt/x"), False, "unreachable"),
        (bx.ReadTimeoutError(endpoint_url="http://127.0.0.1:9/bkt/x"), False, "unreachable"),
        (ConnectionResetError(104, "Connection reset by peer"), False, "unreachable"),
        (TimeoutError(), False, "unreachable"),
        (FileNotFoundError(2, "No such file or directory"), True, "no such file"),
        (OSError(28, "No space left on device"), True, "No space left on device"),
        (ValueError("bad"), True, "ValueError: bad"),
    ]


def test_failures_are_classified_with_advice():
    for exc, permanent, fragment in _classify_cases():
        assert is_permanent(exc) is permanent, f"{exc!r}"
        assert fragment in advice(exc, "s3://bkt/out/x.png"), f"{exc!r}: {advice(exc, 's3://bkt/out/x.png')}"
    assert advice(PermissionError(13, "Permission denied"), "/data/out") == "permission denied; check the permissions of the path and its folder"
    assert advice(_client_error("AccessDenied", 403), "gs://bkt/x").endswith("(set GOOGLE_APPLICATION_CREDENTIALS, or give the pod a workload identity)")


def test_transient_failures_are_retried_permanent_ones_are_not(caplog):
    storage = Storage(attempts=4, backoff_seconds=0.01)
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError(104, "Connection reset by peer")
        return "ok"

    with caplog.at_level(logging.WARNING, logger="dbbatch.store.storage"):
        assert storage._call("read", "memory://x/y", flaky) == "ok"
    assert len(calls) == 3
    assert [r.getMessage().split(" in ")[0] for r in caplog.records] == ["retrying read of memory://x/y"] * 2

    calls.clear()
    with pytest.raises(StorageError, match=r"^cannot read memory://x/y: storage unreachable.*\(gave up after 4 attempts\)$"):
        storage._call("read", "memory://x/y", lambda: (calls.append(1), (_ for _ in ()).throw(TimeoutError()))[1])
    assert len(calls) == 4

    calls.clear()

    def denied() -> None:
        calls.append(1)
        raise _client_error("AccessDenied", 403)

    with pytest.raises(StorageError, match=r"^cannot write s3://bkt/out/a: access denied; check that"):
        storage._call("write", "s3://bkt/out/a", denied)
    assert len(calls) == 1, "a permanent failure is not retried"


def test_permanent_failure_names_the_url_at_once(mem: str, caplog):
    storage = Storage(attempts=5, backoff_seconds=10)  # a retry would take seconds
    with caplog.at_level(logging.WARNING, logger="dbbatch.store.storage"):
        with pytest.raises(StorageError) as e:
            storage.read_bytes(f"{mem}/photos/missing.png")
    assert str(e.value) == f"cannot read {mem}/photos/missing.png: no such file or object; check the path"
    assert not caplog.records
    with pytest.raises(StorageError, match="unsupported location 'nosuchproto://x'"):
        storage.check_location("nosuchproto://x")


def test_redact_hides_secret_values():
    options = {"s3": {"endpoint_url": "http://user:pw@minio:9000", "key": "AKIA", "secret": "s3cr3t",
                      "client_kwargs": {"aws_session_token": "tok", "region_name": "eu-west-1"}, "anon": False}}
    red = redact(options)
    assert red == {"s3": {"endpoint_url": "http://***@minio:9000", "key": "***", "secret": "***",
                          "client_kwargs": {"aws_session_token": "***", "region_name": "eu-west-1"}, "anon": False}}
    assert options["s3"]["secret"] == "s3cr3t", "the original is untouched"
    assert secret_option_paths(options) == ["storage_options.s3.endpoint_url", "storage_options.s3.key",
                                            "storage_options.s3.secret", "storage_options.s3.client_kwargs.aws_session_token"]


def test_check_writable(tmp_path: Path, mem: str):
    storage = Storage(attempts=1)
    storage.check_writable(mem + "/out")
    storage.check_writable(str(tmp_path / "out"))
    assert list((tmp_path / "out").iterdir()) == [], "the probe is removed"
    (tmp_path / "file").write_text("x")
    with pytest.raises(StorageError, match=f"cannot write to {tmp_path}/file/out: "):
        storage.check_writable(str(tmp_path / "file" / "out"))


def _orphan_task_records(error: BaseException, caplog) -> list[str]:
    """Run a task on a real event loop that fails with `error` and is never awaited; collect what asyncio logs."""
    import asyncio
    import gc

    async def request() -> None:
        raise error

    async def main() -> None:
        asyncio.get_running_loop().create_task(request())  # never awaited: what a failed transfer can leave
        await asyncio.sleep(0.01)

    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        asyncio.run(main())
        gc.collect()
    return [r.getMessage() for r in caplog.records if r.name == "asyncio"]


def test_orphaned_transfer_task_traceback_is_dropped_but_other_task_errors_are_not(caplog):
    from botocore.exceptions import EndpointConnectionError

    logger = logging.getLogger("asyncio")
    saved = logger.filters[:]
    logger.filters[:] = [f for f in saved if type(f).__name__ != "_OrphanedTransferTaskFilter"]
    try:
        reset = EndpointConnectionError(endpoint_url="http://127.0.0.1:9/b/k")
        before = _orphan_task_records(reset, caplog)
        assert before and before[0].startswith("Task exception was never retrieved")  # the chatter, unfiltered
        Storage()  # a Storage in the process installs the filter
        assert _orphan_task_records(reset, caplog) == []
        other = _orphan_task_records(ValueError("a bug in a task"), caplog)
        assert other and other[0].startswith("Task exception was never retrieved")
    finally:
        logger.filters[:] = saved


def test_a_local_copy_is_reused_only_while_it_matches_the_stored_file(tmp_path: Path):
    """A repaired (or --force-rewritten) stored file of the same name and size is fetched again."""
    import os

    storage = Storage()
    stored, local = tmp_path / "out" / "step-0000004.ckpt", tmp_path / "work" / "step-0000004.ckpt"
    storage.write_bytes(str(stored), b"broken!!")
    assert storage.fetch(str(stored), local).read_bytes() == b"broken!!"
    mtime = local.stat().st_mtime_ns
    assert storage.fetch(str(stored), local).stat().st_mtime_ns == mtime  # unchanged: the copy is reused
    storage.write_bytes(str(stored), b"repaired")  # same name, same size
    os.utime(stored, ns=(stored.stat().st_atime_ns, stored.stat().st_mtime_ns + 1_000_000))  # a coarse-mtime disk
    assert storage.fetch(str(stored), local).read_bytes() == b"repaired"
