"""Subject ids: the rule, a suggestion for a bad one, and the pattern a variant id has inside an error line (pure)."""

from __future__ import annotations

import re
import unicodedata
from typing import Optional

SUBJECT_ID_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
VARIANT_IN_TEXT = re.compile(r"[a-z0-9][a-z0-9._-]*~[a-z0-9._=,-]+")  # a variant id inside an error line
ID_RULE = "use 1-64 lower-case ASCII letters, digits, '.', '_' or '-', starting with a letter or digit"


def _id_suggestion(v: str) -> Optional[str]:
    """A safe id close to `v`, or None when `v` has characters with no ASCII equivalent."""
    plain = "".join(c for c in unicodedata.normalize("NFKD", v) if not unicodedata.combining(c))
    if not plain.isascii():
        return None
    plain = re.sub(r"[^a-z0-9._-]+", "-", plain.lower()).lstrip("._-")[:64].rstrip("-")
    return plain if SUBJECT_ID_RE.match(plain) else None


def id_problem(v: str) -> Optional[str]:
    """Why `v` cannot name an output folder, or None. Ids become path segments under `output`, so anything
    that could escape it, hide it, or collide with another id on a case-insensitive filesystem is refused."""
    if SUBJECT_ID_RE.match(v):
        return None
    hint = _id_suggestion(v)
    fix = f"use {hint!r}" if hint else ID_RULE
    if not v:
        return f"must not be empty; {ID_RULE}"
    if v.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:[\\/]", v):
        return f"{v!r} is an absolute path; an id names one folder inside output: {fix}"
    if ".." in re.split(r"[/\\]", v) or v in (".", ".."):
        return f"{v!r} would escape the output folder ('..' is not allowed); {fix}"
    if "/" in v or "\\" in v:
        return f"{v!r} contains a path separator, so it would name a nested folder; {fix}"
    odd = next((c for c in v if not c.isascii()), None)
    if odd is not None:
        name = unicodedata.name(odd, "unnamed")
        return (f"{v!r} contains the non-ASCII character {odd!r} (U+{ord(odd):04X} {name}), which can look like an "
                f"ASCII letter but names a different folder; {fix if hint else 'retype the id in plain ASCII: ' + ID_RULE}")
    if any(c.isupper() for c in v):
        return (f"{v!r} has upper-case letters; {v!r} and {v.lower()!r} are the same folder on case-insensitive "
                f"filesystems (macOS, Windows): {fix}")
    if len(v) > 64:
        return f"{v!r} is {len(v)} characters long, the limit is 64; {fix}"
    if v[0] in "._-":
        return f"{v!r} starts with {v[0]!r} (a hidden or option-like folder name); {fix}"
    return f"{v!r} contains characters other than a-z, 0-9, '.', '_', '-'; {fix}"
