"""All file and object-store I/O: the only module that imports fsspec (and, through it, s3fs).

Locations are strings: a local path or any fsspec URL (s3://, gs://, memory://, file://). Every call is
wrapped in a bounded retry with exponential backoff and full jitter for transient errors (connection refused
or reset, 5xx, throttling); permanent ones (no such bucket/key, access denied, missing or rejected
credentials) raise StorageError at once, naming the URL and what to check. Writes are atomic per object:
local files go to a temporary name and are renamed; object stores make a PUT visible only when complete.

botocore retries each request on its own (AWS_MAX_ATTEMPTS, AWS_RETRY_MODE); the retry here is around whole
operations (DBBATCH_RETRY_ATTEMPTS, DBBATCH_RETRY_BACKOFF_SECONDS), so it also rides out an outage longer
than botocore's few seconds of backoff."""

from __future__ import annotations

import json
import logging
import os
import re
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, TypeVar

import fsspec
from fsspec.callbacks import Callback

from dbbatch.core.errors import StorageError
from dbbatch.store.failures import advice, backoff_delay, first_line, is_permanent, kind_of
from dbbatch.store.local import atomic_local_copy, atomic_local_write, exclusive_local_write
from dbbatch.store.locations import PARTIAL_RE, FileInfo, ignored, is_remote, join, protocol_of, redact, version_of

log = logging.getLogger(__name__)
T = TypeVar("T")
PROGRESS_MIN_BYTES = 4 * 1024 * 1024
MULTIPART_PROTOCOLS = ("s3", "s3a")  # whose put_file takes `chunksize` (the multipart part size)

# Object stores whose fsspec pipe_file(mode="create") is a real conditional create. fsspec's generic
# mode="create" is exists-then-write (not atomic), so only these are trusted; memory:// lives inside one
# process and cannot coordinate workers.
CONDITIONAL_CREATE_PROTOCOLS = ("s3", "s3a")


class _ProgressCallback(Callback):
    """fsspec callback -> a dbbatch progress task (only for transfers large enough to be worth a bar)."""

    def __init__(self, reporter: Any, description: str):
        super().__init__()
        self._reporter, self._description, self._task = reporter, description, None

    def call(self, *args: Any, **kwargs: Any) -> None:
        if self.size and self.size >= PROGRESS_MIN_BYTES and self._reporter is not None:
            if self._task is None:
                self._task = self._reporter.start(self._description, total=self.size, unit="B")
            self._task.set(self.value)

    def close(self) -> None:
        if self._task is not None:
            self._task.close()


class Storage:
    """fsspec with dbbatch's rules: per-protocol options, retries, atomic writes, clear errors."""

    def __init__(
        self,
        storage_options: Optional[dict[str, dict[str, Any]]] = None,
        attempts: Optional[int] = None,
        backoff_seconds: Optional[float] = None,
        max_backoff_seconds: float = 8.0,
        reporter: Any = None,
        part_bytes: Optional[int] = None,
    ):
        self.options = storage_options or {}
        self.attempts = max(1, attempts if attempts is not None else int(os.environ.get("DBBATCH_RETRY_ATTEMPTS", "5")))
        self.backoff_seconds = backoff_seconds if backoff_seconds is not None else float(os.environ.get("DBBATCH_RETRY_BACKOFF_SECONDS", "0.5"))
        self.max_backoff_seconds = max_backoff_seconds
        self.reporter = reporter
        # Multipart part size for S3 uploads; None keeps s3fs's 50 MiB. Memory is bounded by the parts in flight
        # (storage_options.s3.max_concurrency, default 10; the client holds about two copies of each), not by
        # the file's size.
        self.part_bytes = part_bytes
        quiet_orphaned_transfer_tasks()

    # -- plumbing ------------------------------------------------------------------------------------------
    def _fs(self, url: str) -> tuple[Any, str]:
        proto = protocol_of(url)
        try:
            fs, path = fsspec.core.url_to_fs(url, **self.options.get(proto, {}))
        except (ImportError, ValueError, TypeError) as e:
            raise StorageError(f"unsupported location {redact(url)!r}: {first_line(e)}") from None
        return fs, path

    def _call(self, what: str, url: str, fn: Callable[[], T]) -> T:
        """Run `fn`, retrying transient failures with exponential backoff and full jitter."""
        for attempt in range(1, self.attempts + 1):
            try:
                return fn()
            except StorageError:
                raise
            except Exception as e:  # noqa: BLE001 - classified below, re-raised as StorageError
                permanent = is_permanent(e)
                if permanent or attempt == self.attempts:
                    suffix = "" if permanent else f" (gave up after {attempt} attempts)"
                    raise StorageError(f"cannot {what} {redact(url)}: {advice(e, url)}{suffix}") from e
                delay = backoff_delay(attempt, self.backoff_seconds, self.max_backoff_seconds)
                log.warning("retrying %s of %s in %.1fs (attempt %d/%d failed: %s)", what, redact(url), delay, attempt,
                            self.attempts, type(e).__name__)
                time.sleep(delay)
                if is_remote(url):
                    fs, _ = self._fs(url)
                    fs.invalidate_cache()
        raise AssertionError("unreachable")

    def check_location(self, url: str) -> None:
        """Raise StorageError if no fsspec filesystem handles `url` (unknown protocol, missing package)."""
        self._fs(url)

    def _url(self, url: str, path: str) -> str:
        """A path from a listing of `url`'s filesystem, written the way `url` is (local path or URL)."""
        proto = protocol_of(url)
        if proto == "file" and "://" not in url:
            return path
        if proto == "memory":
            path = path.lstrip("/")  # fsspec roots memory:// paths at '/'; keep the memory://x form users write
        return f"{proto}://{path.split('://', 1)[-1]}"

    # -- reading -------------------------------------------------------------------------------------------
    def exists(self, url: str, fresh: bool = False) -> bool:
        """Whether `url` exists. `fresh`: ask the store, not this process's listing cache (s3fs caches listings
        and sees only its own writes there; other workers' writes need a fresh look)."""
        fs, path = self._fs(url)
        if fresh:
            fs.invalidate_cache(path)
        return self._call("check", url, lambda: fs.exists(path))

    def isdir(self, url: str) -> bool:
        fs, path = self._fs(url)
        return self._call("check", url, lambda: fs.isdir(path))

    def read_bytes(self, url: str) -> bytes:
        fs, path = self._fs(url)
        return self._call("read", url, lambda: fs.cat_file(path))

    def read_text(self, url: str) -> str:
        return self.read_bytes(url).decode("utf-8")

    def read_json(self, url: str) -> Optional[Any]:
        """The parsed JSON at `url`, or None when it does not exist."""
        try:
            return json.loads(self.read_bytes(url))
        except StorageError as e:
            if isinstance(e.__cause__, FileNotFoundError) and kind_of(e.__cause__) == "missing":
                return None
            raise

    def list_files(self, url: str, fresh: bool = False) -> list[str]:
        """Files directly inside a folder, in name order (empty if the folder is missing, an error if its
        bucket is). `fresh`: bypass the listing cache (see `exists`)."""
        return self._list_entries(url, "file", fresh)

    def list_dirs(self, url: str, fresh: bool = False) -> list[str]:
        """Folders directly inside a folder, in name order (empty if the folder is missing)."""
        return self._list_entries(url, "directory", fresh)

    def _list_entries(self, url: str, kind: str, fresh: bool) -> list[str]:
        fs, path = self._fs(url)

        def ls() -> list[str]:
            if fresh:
                fs.invalidate_cache(path)
            try:
                entries = fs.ls(path, detail=True)
            except FileNotFoundError as e:
                if kind_of(e) == "no-bucket":
                    raise
                return []
            return sorted(e["name"].rstrip("/") for e in entries if e.get("type") == kind)

        return [self._url(url, p) for p in self._call("list", url, ls)]

    def glob(self, url: str) -> list[str]:
        fs, path = self._fs(url)
        found = self._call("list", url, lambda: fs.glob(path, detail=True))
        files = sorted(p for p, info in found.items() if info.get("type") == "file")
        if not files and is_remote(url):
            # s3fs answers a glob in a missing bucket with no matches; listing the fixed part of the pattern
            # raises the 'bucket does not exist' a user needs to see instead.
            self.list_files(re.split(r"[*?\[]", url, maxsplit=1)[0].rsplit("/", 1)[0])
        return [self._url(url, p) for p in files]

    def expand(self, locations: Iterable[str]) -> list[str]:
        """Folder / glob / file locations -> file URLs. Hidden system files (.DS_Store, ...) are dropped."""
        out: list[str] = []
        for loc in locations:
            if any(c in loc.split("://")[-1] for c in "*?["):
                found = self.glob(loc)
            elif loc.endswith("/") or self.isdir(loc):
                found = self.list_files(loc)
            else:
                found = [loc]
            out += [f for f in found if not ignored(f)]
        return out

    def list_tree(self, url: str) -> list[FileInfo]:
        """Every file below the folder `url` with its size and version (empty if there is none)."""
        fs, path = self._fs(url)
        root = path.rstrip("/") + "/"

        def find() -> dict[str, dict[str, Any]]:
            try:
                return fs.find(path, detail=True)
            except FileNotFoundError as e:
                if kind_of(e) == "no-bucket":
                    raise
                return {}

        found = self._call("list", url, find)
        return sorted(FileInfo(name[len(root):], int(info.get("size") or 0), version_of(info))
                      for name, info in found.items() if info.get("type") == "file" and name.startswith(root))

    def info(self, url: str, what: str = "check") -> FileInfo:
        """Size and version of one stored file (`rel` is its name); `what` names the operation in errors."""
        fs, path = self._fs(url)
        found = self._call(what, url, lambda: fs.info(path))
        return FileInfo(url.rstrip("/").rsplit("/", 1)[-1], int(found.get("size") or 0), version_of(found))

    def fetch(self, url: str, local: Path, stored: Optional[FileInfo] = None) -> Path:
        """Download one file to `local` (temp name, then rename). A local copy is reused only when it is a copy
        of the stored object as it is now: same URL, size and version (ETag / generation / mtime), recorded
        in a hidden `.<name>.stored` beside it when it was downloaded. A name alone proves nothing: after
        `--force` or a repaired upload the stored file under that name is another one. `stored` is the
        file's listing entry when the caller has it (saves a request)."""
        stored = stored or self.info(url, "download")
        record = local.with_name(f".{local.name}.stored")
        identity = json.dumps({"url": redact(url), "size": stored.size, "version": stored.version})
        if (local.is_file() and local.stat().st_size == stored.size and record.is_file()
                and record.read_text(encoding="utf-8") == identity):
            return local
        record.unlink(missing_ok=True)
        local.parent.mkdir(parents=True, exist_ok=True)
        fs, path = self._fs(url)
        tmp = local.with_name(f".{local.name}.{uuid.uuid4().hex[:8]}.part")

        def get() -> None:
            cb = _ProgressCallback(self.reporter, f"download {url.rsplit('/', 1)[-1]}")
            try:
                fs.get_file(path, str(tmp), callback=cb)
            finally:
                cb.close()

        try:
            self._call("download", url, get)
            os.replace(tmp, local)
        finally:
            tmp.unlink(missing_ok=True)
        record.write_text(identity, encoding="utf-8")
        return local

    def fetch_tree(self, url: str, local_dir: Path, files: Optional[list[FileInfo]] = None) -> Path:
        """Download every file below `url` (or the given listing of it) into `local_dir`, keeping relative
        paths; files already there are kept, so an interrupted download resumes."""
        files = self.list_tree(url) if files is None else files
        if not files:
            raise StorageError(f"cannot download {redact(url)}: no files there; check the path")
        for f in files:
            self.fetch(join(url, f.rel), local_dir / f.rel, f)
        return local_dir

    # -- writing -------------------------------------------------------------------------------------------
    def write_bytes(self, url: str, data: bytes) -> None:
        fs, path = self._fs(url)
        if is_remote(url):
            self._call("write", url, lambda: fs.pipe_file(path, data))
        else:
            self._call("write", url, lambda: atomic_local_write(Path(path), data))

    def write_text(self, url: str, text: str) -> None:
        self.write_bytes(url, text.encode("utf-8"))

    def write_json(self, url: str, obj: Any) -> None:
        self.write_text(url, json.dumps(obj, indent=2, sort_keys=True) + "\n")

    def upload(self, local: Path, url: str) -> None:
        """Upload one file, streamed: locally in 8 MiB chunks; to S3 as one PUT below two parts' size and as a
        multipart upload above (s3fs reads part by part), so a multi-GB UNet is never read whole."""
        fs, path = self._fs(url)
        if not is_remote(url):
            self._call("upload", url, lambda: atomic_local_copy(local, Path(path)))
            return
        kwargs = {"chunksize": self.part_bytes} if self.part_bytes and protocol_of(url) in MULTIPART_PROTOCOLS else {}

        def put() -> None:
            cb = _ProgressCallback(self.reporter, f"upload {local.name}")
            try:
                fs.put_file(str(local), path, callback=cb, **kwargs)
            finally:
                cb.close()

        self._call("upload", url, put)

    def upload_tree(self, local_dir: Path, url: str) -> list[str]:
        """Upload every file below `local_dir` under `url`; returns the URLs written."""
        written = []
        for f in sorted(p for p in local_dir.rglob("*") if p.is_file()):
            dest = join(url, f.relative_to(local_dir).as_posix())
            self.upload(f, dest)
            written.append(dest)
        return written

    def remove(self, url: str, recursive: bool = False) -> None:
        fs, path = self._fs(url)

        def rm() -> None:
            try:
                fs.rm(path, recursive=recursive)
            except FileNotFoundError:
                pass

        self._call("delete", url, rm)

    # -- conditional create (leases) ---------------------------------------------------------------------
    def create_exclusive(self, url: str, data: bytes) -> bool:
        """Create `url` holding `data` only if nothing is there; True if this call created it. Atomic: of two
        callers racing for one name exactly one gets True, and a reader never sees a partial object. Local:
        a complete temporary file hard-linked to the name (link(2) fails if the name exists). S3: a PUT with
        `If-None-Match: *` (s3fs mode="create"). Other protocols: StorageError (see `lease_support`)."""
        fs, path = self._fs(url)
        proto = protocol_of(url)
        if proto == "file":
            return self._call("create", url, lambda: exclusive_local_write(Path(path), data))
        if proto not in CONDITIONAL_CREATE_PROTOCOLS:
            raise StorageError(f"cannot create {redact(url)} exclusively: {proto}:// has no conditional create")

        def put() -> bool:
            try:
                fs.pipe_file(path, data, mode="create")
                return True
            except FileExistsError:
                return False

        # A retried PUT whose first attempt did land answers 412 to our own object: callers that must know
        # read the object back and compare (leases carry a unique token).
        return self._call("create", url, put)

    def lease_support(self, url: str) -> Optional[str]:
        """None if `url` (a folder) can hold leases, else why not. S3 endpoints are probed: an exclusive
        create of a probe object is tried twice and the second must be refused (an S3-compatible store that
        ignores `If-None-Match` would let two workers both believe they hold a subject)."""
        proto = protocol_of(url)
        if proto == "file":
            return None
        if proto not in CONDITIONAL_CREATE_PROTOCOLS:
            known = "local paths and s3://" if proto != "memory" else "stores shared between processes (local paths, s3://)"
            return f"{proto}:// cannot hold a lease (no conditional create); leases need {known}"
        probe = join(url, f"_dbbatch_lease_probe_{uuid.uuid4().hex[:8]}")
        try:
            first = self.create_exclusive(probe, b"1")
            second = self.create_exclusive(probe, b"2")
        finally:
            self.remove(probe)
        if not first or second:
            return (f"{redact(url)} ignores conditional writes (a second PUT with If-None-Match: * was accepted); "
                    "this S3-compatible store cannot hold a lease")
        return None

    def remove_partials(self, url: str) -> list[str]:
        """Delete the temporary files (`.<name>.<hex>.part`) that a killed writer left below the folder `url`.

        Local writes go to such a file beside their destination and are renamed when complete, which keeps a
        reader from ever seeing half a file; a SIGKILL in between leaves the temporary behind. They stay beside
        the destination (a rename is atomic only within one file system, and the output may span several
        mounts), and are swept here instead, just before a subject's _SUCCESS: then no write of that subject is
        in flight, since one worker at a time works on a subject. Object stores make a PUT visible only when
        complete and leave nothing to sweep (an interrupted multipart upload is invisible; a bucket lifecycle
        rule AbortIncompleteMultipartUpload reclaims its parts)."""
        if is_remote(url):
            return []
        stale = [join(url, f.rel) for f in self.list_tree(url) if PARTIAL_RE.match(f.rel.rsplit("/", 1)[-1])]
        for u in stale:
            log.info("removing %s, the partial file of an interrupted write", u)
            self.remove(u)
        return stale

    def check_writable(self, url: str) -> None:
        """Write and delete a probe object under `url`, so a bad output location fails before any training."""
        probe = join(url, f"_dbbatch_write_probe_{uuid.uuid4().hex[:8]}")
        fs, path = self._fs(probe)
        if is_remote(url):
            self._call("write to", url, lambda: fs.pipe_file(path, b"probe"))
        else:
            self._call("write to", url, lambda: atomic_local_write(Path(path), b"probe"))
        self._call("delete a probe file in", url, lambda: fs.rm_file(path))


class _OrphanedTransferTaskFilter(logging.Filter):
    """Drops asyncio's "Task exception was never retrieved" report when the task died of a transient storage
    error (a reset or refused connection, a timeout). s3fs sends requests through aiobotocore and aiohttp on
    fsspec's event loop; aiohttp writes a request body in a task of its own (`ClientRequest.write_bytes`), and
    when a connection dies during an upload that task can fail after the request already failed, with nobody
    awaiting it. asyncio then prints its traceback when the task is collected, after `Storage._call` already
    retried the whole operation and said so in one line. (Not reproduced with the pinned aiohttp 3.14, which
    marks its upload futures retrieved; the filter keeps older and newer stacks quiet.) An orphaned task's
    error of any other kind still gets through."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None or not record.getMessage().startswith("Task exception was never retrieved"):
            return True
        if kind_of(exc) != "transient":
            return True
        log.debug("an orphaned storage request task failed with %s (already retried): %s", type(exc).__name__, first_line(exc))
        return False


def quiet_orphaned_transfer_tasks() -> None:
    """Install the filter above on asyncio's logger (once)."""
    logger = logging.getLogger("asyncio")
    if not any(isinstance(f, _OrphanedTransferTaskFilter) for f in logger.filters):
        logger.addFilter(_OrphanedTransferTaskFilter())
