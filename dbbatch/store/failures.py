"""Storage failures told apart: transient (retried with backoff) or permanent, and what to check for each (pure).

s3fs turns S3 error codes into FileNotFoundError / PermissionError / OSError and keeps the botocore ClientError
as __cause__ (the code is read from there); connection-level failures arrive as botocore or aiohttp
exceptions. Matching class names keeps fsspec and botocore out of this module.
"""

from __future__ import annotations

import errno
import random
from typing import Callable, Optional

from dbbatch.store.locations import USERINFO_RE, is_remote, protocol_of

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


def backoff_delay(attempt: int, base: float, cap: float, rand: Callable[[], float] = random.random) -> float:
    """Seconds to wait after failed attempt `attempt` (1-based): uniform in [0, min(cap, base * 2**(attempt-1))].
    Full jitter (AWS's recommendation) keeps many pods that hit the same throttled bucket from retrying in step."""
    return rand() * min(cap, base * 2 ** (attempt - 1))


def error_code(exc: BaseException) -> Optional[str]:
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


def kind_of(exc: BaseException) -> str:
    """What went wrong, in the terms `advice` uses. Everything but 'transient' is permanent."""
    names = {c.__name__ for c in type(exc).__mro__}
    code = error_code(exc)
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


def is_permanent(exc: BaseException) -> bool:
    return kind_of(exc) != "transient"


def first_line(exc: BaseException) -> str:
    line = str(exc).splitlines()[0] if str(exc) else ""
    return USERINFO_RE.sub("***@", line)[:300]


def advice(exc: BaseException, url: str) -> str:
    """What is wrong and what to check after an operation on `url` failed (the caller names the URL)."""
    kind, proto, code = kind_of(exc), protocol_of(url), error_code(exc)
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
        return f"not a valid bucket or object name ({first_line(exc)})"
    if kind == "transient":
        return f"storage unreachable or failing ({type(exc).__name__}: {first_line(exc)}); check the network and the storage endpoint"
    if kind == "os" and isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return f"{type(exc).__name__}: {first_line(exc)}"
