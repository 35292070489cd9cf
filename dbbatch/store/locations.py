"""Locations as strings (a local path or any fsspec URL): protocols, joining, redacting secrets, listings (pure)."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any, Iterable

PARTIAL_RE = re.compile(r"^\..+\.[0-9a-f]{8}\.part$")  # the temporary name of local.atomic_local and fetch
IGNORED_NAMES = {".ds_store", "thumbs.db", "desktop.ini"}
SECRET_KEY_RE = re.compile(r"secret|password|passwd|token|credential|session|(^|_)key($|_)|access_key", re.I)
USERINFO_RE = re.compile(r"(?<=://)[^/@\s]+@")  # user:password@ inside a URL


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


def version_of(info: dict[str, Any]) -> str:
    """Whatever the filesystem reports that changes with the content: ETag (S3), md5/generation (GCS),
    mtime (local), creation time (memory)."""
    for key in ("ETag", "etag", "md5Hash", "generation", "VersionId", "mtime", "LastModified", "last_modified", "created"):
        if info.get(key) is not None:
            return str(info[key]).strip('"')
    return ""


def ignored(url: str) -> bool:
    name = url.rstrip("/").rsplit("/", 1)[-1]
    return name.lower() in IGNORED_NAMES or name.startswith("._")
