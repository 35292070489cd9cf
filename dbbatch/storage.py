"""All file and object-store I/O: the only module that imports fsspec (and, through it, s3fs).

Locations are strings: a local path or any fsspec URL (s3://, gs://, memory://, file://). Every call is
wrapped in a bounded retry with exponential backoff and full jitter for transient errors (connection refused
or reset, 5xx, throttling); permanent ones (no such bucket/key, access denied, missing or rejected
credentials) raise StorageError at once, naming the URL and what to check. Writes are atomic per object:
local files go to a temporary name and are renamed; object stores make a PUT visible only when complete.

botocore retries each request on its own (AWS_MAX_ATTEMPTS, AWS_RETRY_MODE); the retry here is around whole
operations (DBBATCH_RETRY_ATTEMPTS, DBBATCH_RETRY_BACKOFF_SECONDS), so it also rides out an outage longer
than botocore's few seconds of backoff.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import random
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, TypeVar

import fsspec
from fsspec.callbacks import Callback

from dbbatch import faults
from dbbatch.errors import StorageError

log = logging.getLogger(__name__)
T = TypeVar("T")

PARTIAL_RE = re.compile(r"^\..+\.[0-9a-f]{8}\.part$")  # the temporary name of _atomic_local and fetch
IGNORED_NAMES = {".ds_store", "thumbs.db", "desktop.ini"}
SECRET_KEY_RE = re.compile(r"secret|password|passwd|token|credential|session|(^|_)key($|_)|access_key", re.I)
USERINFO_RE = re.compile(r"(?<=://)[^/@\s]+@")  # user:password@ inside a URL
PROGRESS_MIN_BYTES = 4 * 1024 * 1024
MULTIPART_PROTOCOLS = ("s3", "s3a")  # whose put_file takes `chunksize` (the multipart part size)
# Object stores whose fsspec pipe_file(mode="create") is a real conditional create. fsspec's generic
# mode="create" is exists-then-write (not atomic), so only these are trusted; memory:// lives inside one
# process and cannot coordinate workers.
CONDITIONAL_CREATE_PROTOCOLS = ("s3", "s3a")

# How failures are told apart. s3fs turns S3 error codes into FileNotFoundError / PermissionError / OSError
# and keeps the botocore ClientError as __cause__ (the code is read from there); connection-level failures
# arrive as botocore or aiohttp exceptions. Matching class names keeps fsspec the only import here.
_TRANSIENT_CLASSES = {  # anywhere in the exception's MRO
    "ConnectionError", "HTTPClientError", "TimeoutError", "IncompleteReadError", "ClientPayloadError",
    "ServerDisconnectedError", "ClientConnectionError", "ClientOSError", "ResponseStreamingError",
}
_NO_CREDENTIALS_CLASSES = {
    "NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError", "TokenRetrievalError",
    "SSOTokenLoadError", "ProfileNotFound",
}
_TRANSIENT_CODES = {
    "SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequestsException",
    "RequestTimeout", "InternalError", "ServiceUnavailable", "OperationAborted", "500", "502", "503", "504",
}
_REJECTED_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken", "TokenRefreshRequired"}
_DENIED_CODES = {"AccessDenied", "AllAccessDisabled", "AccountProblem", "403"}
_WRONG_REGION_CODES = {"PermanentRedirect", "301", "307", "AuthorizationHeaderMalformed", "IllegalLocationConstraintException"}
_BAD_NAME_CODES = {"InvalidBucketName", "KeyTooLongError", "InvalidURI"}
_TRANSIENT_ERRNOS = {
    None, errno.EIO, errno.EBUSY, errno.EAGAIN, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNREFUSED,
    errno.ECONNABORTED, errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EPIPE, getattr(errno, "EREMOTEIO", errno.EIO),
}
_CREDENTIAL_HINTS = {
    "s3": "set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or give the pod an IAM role (IRSA)",
    "gs": "set GOOGLE_APPLICATION_CREDENTIALS, or give the pod a workload identity",
    "az": "set AZURE_STORAGE_ACCOUNT_NAME/AZURE_STORAGE_ACCOUNT_KEY, or give the pod a managed identity",
}
_CREDENTIAL_HINTS.update(s3a=_CREDENTIAL_HINTS["s3"], gcs=_CREDENTIAL_HINTS["gs"], abfs=_CREDENTIAL_HINTS["az"])


def protocol_of(location: str) -> str:
    return location.split("://", 1)[0] if "://" in location else "file"


def is_remote(location: str) -> bool:
    return protocol_of(location) not in ("file", "local")


def join(base: str, *parts: str) -> str:
    out = base.rstrip("/")
    for p in parts:
        out += "/" + p.strip("/")
    return out


def redact(value: Any) -> Any:
    """A copy of `value` fit for logs, config.yaml and metrics: secret-looking mapping values become '***'
    and user:password@ inside URLs is dropped."""
    if isinstance(value, dict):
        return {k: ("***" if isinstance(k, str) and SECRET_KEY_RE.search(k) and v else redact(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    if isinstance(value, str):
        return USERINFO_RE.sub("***@", value)
    return value


def secret_option_paths(options: dict[str, Any], prefix: str = "storage_options") -> list[str]:
    """Field paths of the secret-looking values in storage_options (secrets belong in the environment)."""
    out = []
    for k, v in options.items():
        where = f"{prefix}.{k}"
        if isinstance(v, dict):
            out += secret_option_paths(v, where)
        elif v and (SECRET_KEY_RE.search(str(k)) or (isinstance(v, str) and USERINFO_RE.search(v))):
            out.append(where)
    return out


@dataclass(frozen=True, order=True)
class FileInfo:
    """One file of a listed folder."""

    rel: str  # path below the listed folder, '/'-separated
    size: int
    version: str  # ETag / generation / mtime: changes whenever the content does


def listing_digest(files: Iterable[FileInfo]) -> str:
    """A digest of a folder listing (names, sizes, versions): the same digest means the same content, known
    without reading a byte of it (an S3 ETag is the MD5 of the object, or of its multipart parts)."""
    rows = sorted((f.rel, f.size, f.version) for f in files)
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]


def backoff_delay(attempt: int, base: float, cap: float, rand: Callable[[], float] = random.random) -> float:
    """Seconds to wait after failed attempt `attempt` (1-based): uniform in [0, min(cap, base * 2**(attempt-1))].
    Full jitter (AWS's recommendation) keeps many pods that hit the same throttled bucket from retrying in step."""
    return rand() * min(cap, base * 2 ** (attempt - 1))


def _error_code(exc: BaseException) -> Optional[str]:
    """The service's error code (e.g. 'NoSuchBucket') from the exception or the botocore error it wraps."""
    seen: set[int] = set()
    e: Optional[BaseException] = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            code = (response.get("Error") or {}).get("Code")
            if code:
                return str(code)
        e = e.__cause__ or e.__context__
    return None


def _kind(exc: BaseException) -> str:
    """What went wrong, in the terms `_advice` uses. Everything but 'transient' is permanent."""
    names = {c.__name__ for c in type(exc).__mro__}
    code = _error_code(exc)
    text = str(exc).lower()
    if names & _NO_CREDENTIALS_CLASSES or "unable to locate credentials" in text:
        return "no-credentials"
    if code == "NoSuchBucket" or (isinstance(exc, FileNotFoundError) and "bucket does not exist" in text):
        return "no-bucket"
    if code in _REJECTED_CODES:
        return "rejected-credentials"
    if code in _WRONG_REGION_CODES or getattr(exc, "errno", None) == getattr(errno, "EREMCHG", -1):
        return "wrong-region"
    if code in _DENIED_CODES or isinstance(exc, PermissionError):
        return "denied"
    if isinstance(exc, FileNotFoundError) or code in ("NoSuchKey", "404"):
        return "missing"
    if code in _BAD_NAME_CODES or "ParamValidationError" in names:
        return "bad-name"
    if code in _TRANSIENT_CODES or names & _TRANSIENT_CLASSES:
        return "transient"
    if isinstance(exc, (IsADirectoryError, NotADirectoryError, FileExistsError)):
        return "conflict"
    if isinstance(exc, OSError):
        return "transient" if exc.errno in _TRANSIENT_ERRNOS else "os"
    return "error"  # a bug or a misuse (ValueError, TypeError, ...): retrying cannot help


def _is_permanent(exc: BaseException) -> bool:
    return _kind(exc) != "transient"


def _first_line(exc: BaseException) -> str:
    line = str(exc).splitlines()[0] if str(exc) else ""
    return USERINFO_RE.sub("***@", line)[:300]


def _advice(exc: BaseException, url: str) -> str:
    """What is wrong and what to check after an operation on `url` failed (the caller names the URL)."""
    kind, proto, code = _kind(exc), protocol_of(url), _error_code(exc)
    creds = _CREDENTIAL_HINTS.get(proto, f"check the credentials configured for {proto}://")
    if kind == "no-credentials":
        return f"no credentials found; {creds}"
    if kind == "rejected-credentials":
        return f"the credentials were rejected ({code}); check them ({creds}) and the endpoint they are for"
    if kind == "denied" and not is_remote(url):
        return "permission denied; check the permissions of the path and its folder"
    if kind == "denied":
        return f"access denied; check that the credentials in use may read and write there ({creds})"
    if kind == "no-bucket":
        bucket = url.split("://", 1)[-1].split("/", 1)[0]
        return f"bucket {bucket!r} does not exist; create it or fix the URL"
    if kind == "missing":
        return "no such file or object; check the path"
    if kind == "wrong-region":
        return (f"the bucket is in another region ({code or 'redirect'}); set AWS_DEFAULT_REGION or "
                f"storage_options.{proto}.client_kwargs.region_name to its region")
    if kind == "bad-name":
        return f"not a valid bucket or object name ({_first_line(exc)})"
    if kind == "transient":
        return f"storage unreachable or failing ({type(exc).__name__}: {_first_line(exc)}); check the network and the storage endpoint"
    if kind == "os" and isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return f"{type(exc).__name__}: {_first_line(exc)}"


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
            raise StorageError(f"unsupported location {redact(url)!r}: {_first_line(e)}") from None
        return fs, path

    def _call(self, what: str, url: str, fn: Callable[[], T]) -> T:
        """Run `fn`, retrying transient failures with exponential backoff and full jitter."""
        for attempt in range(1, self.attempts + 1):
            try:
                return fn()
            except StorageError:
                raise
            except Exception as e:  # noqa: BLE001 - classified below, re-raised as StorageError
                permanent = _is_permanent(e)
                if permanent or attempt == self.attempts:
                    suffix = "" if permanent else f" (gave up after {attempt} attempts)"
                    raise StorageError(f"cannot {what} {redact(url)}: {_advice(e, url)}{suffix}") from e
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
            if isinstance(e.__cause__, FileNotFoundError) and _kind(e.__cause__) == "missing":
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
                if _kind(e) == "no-bucket":
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
            out += [f for f in found if not _ignored(f)]
        return out

    def list_tree(self, url: str) -> list[FileInfo]:
        """Every file below the folder `url` with its size and version (empty if there is none)."""
        fs, path = self._fs(url)
        root = path.rstrip("/") + "/"

        def find() -> dict[str, dict[str, Any]]:
            try:
                return fs.find(path, detail=True)
            except FileNotFoundError as e:
                if _kind(e) == "no-bucket":
                    raise
                return {}

        found = self._call("list", url, find)
        return sorted(FileInfo(name[len(root):], int(info.get("size") or 0), _version_of(info))
                      for name, info in found.items() if info.get("type") == "file" and name.startswith(root))

    def info(self, url: str, what: str = "check") -> FileInfo:
        """Size and version of one stored file (`rel` is its name); `what` names the operation in errors."""
        fs, path = self._fs(url)
        found = self._call(what, url, lambda: fs.info(path))
        return FileInfo(url.rstrip("/").rsplit("/", 1)[-1], int(found.get("size") or 0), _version_of(found))

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
            self._call("write", url, lambda: _atomic_local_write(Path(path), data))

    def write_text(self, url: str, text: str) -> None:
        self.write_bytes(url, text.encode("utf-8"))

    def write_json(self, url: str, obj: Any) -> None:
        self.write_text(url, json.dumps(obj, indent=2, sort_keys=True) + "\n")

    def upload(self, local: Path, url: str) -> None:
        """Upload one file, streamed: locally in 8 MiB chunks; to S3 as one PUT below two parts' size and as a
        multipart upload above (s3fs reads part by part), so a multi-GB UNet is never read whole."""
        fs, path = self._fs(url)
        if not is_remote(url):
            self._call("upload", url, lambda: _atomic_local_copy(local, Path(path)))
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
            return self._call("create", url, lambda: _exclusive_local_write(Path(path), data))
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
            self._call("write to", url, lambda: _atomic_local_write(Path(path), b"probe"))
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
        if _kind(exc) != "transient":
            return True
        log.debug("an orphaned storage request task failed with %s (already retried): %s", type(exc).__name__, _first_line(exc))
        return False


def quiet_orphaned_transfer_tasks() -> None:
    """Install the filter above on asyncio's logger (once)."""
    logger = logging.getLogger("asyncio")
    if not any(isinstance(f, _OrphanedTransferTaskFilter) for f in logger.filters):
        logger.addFilter(_OrphanedTransferTaskFilter())


def _version_of(info: dict[str, Any]) -> str:
    """Whatever the filesystem reports that changes with the content: ETag (S3), md5/generation (GCS),
    mtime (local), creation time (memory)."""
    for key in ("ETag", "etag", "md5Hash", "generation", "VersionId", "mtime", "LastModified", "last_modified", "created"):
        if info.get(key) is not None:
            return str(info[key]).strip('"')
    return ""


def _ignored(url: str) -> bool:
    name = url.rstrip("/").rsplit("/", 1)[-1]
    return name.lower() in IGNORED_NAMES or name.startswith("._")


def _atomic_local(dest: Path, fill: Callable[[Any], None]) -> None:
    """`fill` a temporary file beside `dest`, fsync, rename: readers see the old file or the new one."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.part")
    try:
        with open(tmp, "wb") as fh:
            fill(fh)
            fh.flush()
            faults.on_upload(dest)
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _atomic_local_write(dest: Path, data: bytes) -> None:
    _atomic_local(dest, lambda fh: fh.write(data))


def _exclusive_local_write(dest: Path, data: bytes) -> bool:
    """Write a complete temporary file, then link(2) it to `dest`: fails if `dest` exists, and `dest` never
    appears half-written. Filesystems without hard links fall back to O_CREAT|O_EXCL (atomic, but a reader
    may briefly see a short file; lease readers treat an unparsable lease as one being written)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.part")
    try:
        _atomic_local_write(tmp, data)
        try:
            os.link(tmp, dest)
            return True
        except FileExistsError:
            return False
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EMLINK):
                raise
        try:
            fd = os.open(dest, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        return True
    finally:
        tmp.unlink(missing_ok=True)


def _atomic_local_copy(src: Path, dest: Path) -> None:
    """Copy in 8 MiB chunks, so a multi-GB file is never read whole."""

    def copy(fout: Any) -> None:
        with open(src, "rb") as fin:
            while chunk := fin.read(8 * 1024 * 1024):
                fout.write(chunk)

    _atomic_local(dest, copy)
