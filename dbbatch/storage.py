"""All file and object-store I/O: the only module that imports fsspec (and, through it, s3fs).

Locations are strings: a local path or any fsspec URL (s3://, gs://, memory://, file://). Remote calls are
wrapped in a bounded retry with exponential backoff and full jitter for transient errors (connection reset,
5xx, throttling); permanent ones (no such bucket/key, access denied, bad credentials) raise StorageError at
once, naming the URL and what to check. Writes are atomic per object: local files go to a temporary name
and are renamed; object stores make a PUT visible only when complete.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, TypeVar

import fsspec
from fsspec.callbacks import Callback

from dbbatch.errors import StorageError

log = logging.getLogger(__name__)
T = TypeVar("T")

IGNORED_NAMES = {".ds_store", "thumbs.db", "desktop.ini"}
SECRET_KEY_RE = re.compile(r"secret|password|passwd|token|credential|session|(^|_)key($|_)|access_key", re.I)
PROGRESS_MIN_BYTES = 4 * 1024 * 1024

# Words in an error that mean retrying cannot help. s3fs maps most S3 error codes to FileNotFoundError /
# PermissionError already; these cover the ones it passes through as plain OSError or botocore errors.
_PERMANENT_HINTS = (
    "NoSuchBucket", "NoSuchKey", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch",
    "Unable to locate credentials", "NoCredentialsError", "InvalidBucketName", "AllAccessDisabled",
    "ExpiredToken", "InvalidToken",
)


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
    """A copy of `value` with every secret-looking mapping value replaced, for logs, config.yaml, metrics."""
    if isinstance(value, dict):
        return {k: ("***" if isinstance(k, str) and SECRET_KEY_RE.search(k) and v else redact(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


def _is_permanent(exc: BaseException) -> bool:
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, ValueError, TypeError)):
        return True
    text = f"{type(exc).__name__}: {exc}"
    return any(h in text for h in _PERMANENT_HINTS)


def _advice(exc: BaseException, url: str) -> str:
    text = f"{type(exc).__name__}: {exc}"
    if "NoSuchBucket" in text or ("bucket" in text.lower() and isinstance(exc, FileNotFoundError)):
        return f"the bucket in {url} does not exist; create it or fix the URL"
    if isinstance(exc, FileNotFoundError):
        return f"{url} does not exist; check the path"
    if "credentials" in text.lower() or "InvalidAccessKeyId" in text or "SignatureDoesNotMatch" in text or "Token" in text:
        return (
            f"no valid credentials for {url}; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or the pod's "
            "service-account identity) with access to it"
        )
    if isinstance(exc, PermissionError) or "AccessDenied" in text:
        return f"access denied to {url}; grant the credentials in use read/write permission on it"
    if isinstance(exc, OSError) and exc.errno is not None and exc.strerror:
        return f"{exc.strerror} at {url}"
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return f"{type(exc).__name__} at {url}: {first[:300]}"


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
        attempts: int = int(os.environ.get("DBBATCH_RETRY_ATTEMPTS", "5")),
        backoff_seconds: float = float(os.environ.get("DBBATCH_RETRY_BACKOFF_SECONDS", "0.5")),
        max_backoff_seconds: float = 8.0,
        reporter: Any = None,
    ):
        self.options = storage_options or {}
        self.attempts = max(1, attempts)
        self.backoff_seconds = backoff_seconds
        self.max_backoff_seconds = max_backoff_seconds
        self.reporter = reporter

    # -- plumbing ------------------------------------------------------------------------------------------
    def _fs(self, url: str) -> tuple[Any, str]:
        proto = protocol_of(url)
        try:
            fs, path = fsspec.core.url_to_fs(url, **self.options.get(proto, {}))
        except (ImportError, ValueError) as e:
            raise StorageError(f"unsupported location {url!r}: {e}") from None
        return fs, path

    def _call(self, what: str, url: str, fn: Callable[[], T]) -> T:
        """Run `fn`, retrying transient failures with exponential backoff and full jitter."""
        for attempt in range(1, self.attempts + 1):
            try:
                return fn()
            except StorageError:
                raise
            except Exception as e:  # noqa: BLE001 - classified below, re-raised as StorageError
                if _is_permanent(e) or attempt == self.attempts:
                    suffix = "" if _is_permanent(e) else f" (gave up after {attempt} attempts)"
                    raise StorageError(f"cannot {what}: {_advice(e, url)}{suffix}") from e
                delay = random.uniform(0, min(self.max_backoff_seconds, self.backoff_seconds * 2 ** (attempt - 1)))
                log.warning("retrying %s of %s in %.1fs (attempt %d/%d): %s", what, url, delay, attempt, self.attempts, type(e).__name__)
                time.sleep(delay)
                if is_remote(url):
                    fs, _ = self._fs(url)
                    fs.invalidate_cache()
        raise AssertionError("unreachable")

    def check_location(self, url: str) -> None:
        """Raise StorageError if no fsspec filesystem handles `url` (unknown protocol, missing package)."""
        self._fs(url)

    # -- reading -------------------------------------------------------------------------------------------
    def exists(self, url: str) -> bool:
        fs, path = self._fs(url)
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
            if isinstance(e.__cause__, FileNotFoundError):
                return None
            raise

    def list_files(self, url: str) -> list[str]:
        """Files directly inside a folder, as full URLs/paths in name order (empty if the folder is missing)."""
        fs, path = self._fs(url)

        def ls() -> list[str]:
            try:
                entries = fs.ls(path, detail=True)
            except FileNotFoundError:
                return []
            return sorted(e["name"] for e in entries if e.get("type") == "file")

        return [self._unstrip(url, p) for p in self._call("list", url, ls)]

    def glob(self, url: str) -> list[str]:
        fs, path = self._fs(url)
        return [self._unstrip(url, p) for p in sorted(self._call("list", url, lambda: fs.glob(path))) if fs.isfile(p)]

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

    @staticmethod
    def _unstrip(url: str, path: str) -> str:
        proto = protocol_of(url)
        if proto == "file" and "://" not in url:
            return path
        return f"{proto}://{path.split('://', 1)[-1]}"

    def fetch(self, url: str, local: Path) -> Path:
        """Download one file to `local` (temp name, then rename); skipped when it is already there."""
        if local.exists():
            return local
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
        return local

    def fetch_tree(self, url: str, local_dir: Path) -> Path:
        """Download every file below `url` into `local_dir`, keeping relative paths; existing files are kept."""
        fs, path = self._fs(url)
        files = self._call("list", url, lambda: fs.find(path))
        if not files:
            raise StorageError(f"cannot download: {url} is empty or does not exist")
        root = path.rstrip("/")
        for f in files:
            rel = f[len(root) :].lstrip("/")
            self.fetch(join(url, rel), local_dir / rel)
        return local_dir

    # -- writing -------------------------------------------------------------------------------------------
    def write_bytes(self, url: str, data: bytes) -> None:
        fs, path = self._fs(url)
        if not is_remote(url):
            _atomic_local_write(Path(path), data)
            return
        self._call("write", url, lambda: fs.pipe_file(path, data))

    def write_text(self, url: str, text: str) -> None:
        self.write_bytes(url, text.encode("utf-8"))

    def write_json(self, url: str, obj: Any) -> None:
        self.write_text(url, json.dumps(obj, indent=2, sort_keys=True) + "\n")

    def upload(self, local: Path, url: str) -> None:
        """Upload one file. s3fs streams large files as multipart uploads, so nothing is read whole."""
        fs, path = self._fs(url)
        if not is_remote(url):
            dest = Path(path)
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.part")
            try:
                _copy_file(local, tmp)
                os.replace(tmp, dest)
            finally:
                tmp.unlink(missing_ok=True)
            return

        def put() -> None:
            cb = _ProgressCallback(self.reporter, f"upload {local.name}")
            try:
                fs.put_file(str(local), path, callback=cb)
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

    def check_writable(self, url: str) -> None:
        """Write and delete a probe object under `url`, so a bad output location fails before any training."""
        probe = join(url, f"_dbbatch_write_probe_{uuid.uuid4().hex[:8]}")
        self.write_bytes(probe, b"probe")
        self.remove(probe)


def _ignored(url: str) -> bool:
    name = url.rstrip("/").rsplit("/", 1)[-1]
    return name.lower() in IGNORED_NAMES or name.startswith("._")


def _atomic_local_write(dest: Path, data: bytes) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.part")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
    except OSError as e:
        raise StorageError(f"cannot write {dest}: {e.strerror or e}") from e
    finally:
        tmp.unlink(missing_ok=True)


def _copy_file(src: Path, dest: Path) -> None:
    try:
        with open(src, "rb") as fin, open(dest, "wb") as fout:
            while chunk := fin.read(8 * 1024 * 1024):
                fout.write(chunk)
            fout.flush()
            os.fsync(fout.fileno())
    except OSError as e:
        raise StorageError(f"cannot write {dest}: {e.strerror or e}") from e
