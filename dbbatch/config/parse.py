"""Manifest text to a validated Manifest: YAML, the schema, sweeps expanded, every problem in one error.

Pure but for `load_manifest`, which reads the file. Each problem is one line naming the subject and field.
"""

from __future__ import annotations

import re
import string
from typing import Any, Optional

from pydantic import ValidationError

from dbbatch.config.ids import VARIANT_IN_TEXT, id_problem
from dbbatch.config.manifest import PROMPT_FIELDS, Manifest, SubjectEntry
from dbbatch.config.manifest_errors import closest, load_yaml, problems_from, short
from dbbatch.config.resolve import merged_checks
from dbbatch.config.sweeps import MAX_VARIANT_ID
from dbbatch.core.errors import ManifestError


def _placeholder_problems(template: str, where: str) -> list[str]:
    try:
        fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(template) if name is not None]
    except ValueError as e:
        return [f"{where}: malformed braces in {template!r} ({e}); write {{{{ and }}}} for literal braces"]
    for name, spec, conv in fields:
        if name not in PROMPT_FIELDS:
            close = closest(name, sorted(PROMPT_FIELDS))
            hint = f"; did you mean {{{close}}}?" if close else ""
            return [f"{where}: unknown placeholder {{{name}}} in {short(template)}{hint} (available: {{token}}, {{class_noun}})"]
        if spec or conv:
            # a format spec is an easy memory bomb ({token:>999999999}) and never needed in a prompt
            return [f"{where}: placeholder {{{name}{'!' + conv if conv else ''}{':' + spec if spec else ''}}} in {short(template)} "
                    f"has a format spec or conversion; write {{{name}}}"]
    return []


def parse_manifest(text: str, source: str = "manifest") -> Manifest:
    """YAML text -> validated Manifest; every problem found is reported at once as ManifestError.

    Schema errors and the checks on raw values (placeholders, duplicate ids, token == class noun) run
    together, so one `dbbatch validate` lists all of them; checks on merged settings need a valid schema."""
    data = load_yaml(text, source)
    problems: list[str] = []
    manifest: Optional[Manifest] = None
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as e:
        problems += problems_from(e, Manifest)
    problems += _raw_checks(data)
    if manifest is not None and not problems:
        manifest, swept = _expand_sweeps(manifest, data["subjects"])
        problems += swept
    if manifest is not None and not problems:  # merging formats the prompts: only once they are known good
        problems += once_per_sweep(merged_checks(manifest))
    if problems or manifest is None:
        raise ManifestError(sorted(problems, key=_subject_order), source)
    return manifest


def _subject_order(problem: str) -> tuple[int, int]:
    """Sort key: top-level problems first, then subject by subject (the order of the file)."""
    m = re.match(r"subjects\[(\d+)\]", problem)
    return (1, int(m.group(1))) if m else (0, 0)


def _raw_checks(data: dict[str, Any]) -> list[str]:
    """Checks that need no valid schema; values of the wrong type are skipped (the schema reports them)."""
    problems: list[str] = []
    subjects = data.get("subjects") if isinstance(data.get("subjects"), list) else []
    for where, section in [("defaults", data.get("defaults"))] + [(f"subjects[{i}]", s) for i, s in enumerate(subjects)]:
        if not isinstance(section, dict):
            continue
        for key in ("instance_prompt", "class_prompt"):
            if isinstance(section.get(key), str):
                problems += _placeholder_problems(section[key], f"{where}.{key}")
        for name in ("samples", "evaluation"):
            part = section.get(name)
            if isinstance(part, dict) and isinstance(part.get("prompts"), list):
                for j, p in enumerate(part["prompts"]):
                    if isinstance(p, str):
                        problems += _placeholder_problems(p, f"{where}.{name}.prompts[{j}]")
    seen: dict[str, int] = {}
    for i, s in enumerate(subjects):
        if not isinstance(s, dict):
            continue
        sid, token, noun = s.get("id"), s.get("token"), s.get("class_noun")
        if isinstance(sid, str) and id_problem(sid) is None:  # an unsafe id is reported by the schema
            if sid in seen:
                problems.append(f"subjects[{i}].id: duplicate id {sid!r} (also subjects[{seen[sid]}]); ids name output folders, make them unique")
            seen.setdefault(sid, i)
        if isinstance(token, str) and isinstance(noun, str) and token.strip() and token.casefold() == noun.strip().casefold():
            problems.append(f"subjects[{i}].token: the token {token!r} is the class noun itself; pick a rare word such as 'sks'")
    return problems


def once_per_sweep(problems: list[str]) -> list[str]:
    """A problem every variant of a sweep has (a setting the sweep does not change) is said once, for the first."""
    first: dict[str, int] = {}
    counts: dict[str, int] = {}
    for k, p in enumerate(problems):
        key = VARIANT_IN_TEXT.sub("<variant>", p)
        first.setdefault(key, k)
        counts[key] = counts.get(key, 0) + 1
    return [problems[k] + (f" (and {counts[key] - 1} more variant(s) of this sweep)" if counts[key] > 1 else "")
            for key, k in first.items()]


def _expand_sweeps(m: Manifest, raw_subjects: list[Any]) -> tuple[Manifest, list[str]]:
    """The manifest with every subject that has a `sweep` replaced by its variants (dbbatch/config/sweeps.py), each
    validated as a subject of its own; and the problems of the swept values, each named once."""
    from dbbatch.config.sweeps import expand

    if not any(s.sweep for s in m.subjects):
        return m, []
    out: list[SubjectEntry] = []
    problems: list[str] = []
    for i, (s, raw) in enumerate(zip(m.subjects, raw_subjects)):
        if not s.sweep:
            s._source = i  # its place in the file, which the variants before it moved in the list
            out.append(s)
            continue
        for vid, values, variant in expand(raw, s.sweep):
            try:
                entry = SubjectEntry.model_validate(variant)
            except ValidationError as e:
                described = ", ".join(f"{p}={short(v)}" for p, v in values.items())
                problems += [f"subjects[{i}].sweep: {p} (in the variant {described})" for p in problems_from(e, SubjectEntry)]
                continue
            if len(vid) > MAX_VARIANT_ID:
                problems.append(f"subjects[{i}].sweep: the variant id {vid!r} is {len(vid)} characters long, at most "
                                f"{MAX_VARIANT_ID}; shorten the subject's id or sweep fewer settings")
                break
            entry = entry.model_copy(update={"id": vid, "sweep": {}})
            entry._sweep_of, entry._swept, entry._source = s.id, dict(values), i
            out.append(entry)
    # the same bad value fails every variant that has it: say it once
    first: dict[str, str] = {}
    for p in problems:
        first.setdefault(p.split(" (in the variant ")[0], p)
    problems = list(first.values())
    return m.model_copy(update={"subjects": out}), problems
