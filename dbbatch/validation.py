"""Checks beyond the schema: identifier tokens against the model's tokenizer, and (optionally) storage.

Token rules (CLIP BPE merges are ordered by frequency, so a token's id is its frequency rank):
- a token that is one BPE piece with id < COMMON_WORD_MAX_ID is a common word: an error, since
  fine-tuning would overwrite what the model knows it as (the DreamBooth paper's reason for rare tokens);
- a token that splits into several pieces is allowed but warned, naming the pieces.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from dbbatch.errors import DbbatchError, ModelError
from dbbatch.manifest import Manifest, resolve_location, resolve_subjects

COMMON_WORD_MAX_ID = 10000


def token_problems(manifest: Manifest, tokenizer: Any) -> tuple[list[str], list[str]]:
    problems, warnings = [], []
    for i, s in enumerate(manifest.subjects):
        pieces = tokenizer.tokenize(s.token)
        ids = tokenizer.convert_tokens_to_ids(pieces)
        where = f"subjects[{i}].token"
        if len(pieces) == 1 and ids[0] < COMMON_WORD_MAX_ID:
            problems.append(
                f"{where}: {s.token!r} is a common word (CLIP token #{ids[0]}); fine-tuning would overwrite its meaning. "
                "Pick a rare token such as 'sks' or 'ohwx'"
            )
        elif len(pieces) > 1:
            shown = " + ".join(p.replace("</w>", "") for p in pieces)
            warnings.append(f"{where}: {s.token!r} splits into {len(pieces)} tokens ({shown}); a single rare token such as 'sks' binds better")
    return problems, warnings


def load_tokenizer(base_model: str, base_dir: Optional[Path], storage: Any, check_remote: bool) -> Optional[Any]:
    """The tokenizer only (no weights), or None when it would need the network and that is off."""
    from transformers import CLIPTokenizer

    from dbbatch.models import TOKENIZER_DIR, build_builtin, check_folder, resolve_source

    kind, where = resolve_source(base_model, base_dir)
    if kind == "builtin":
        from dbbatch.models import ARCHS

        if where not in ARCHS:
            build_builtin(where)  # raises the clear ModelError
        return CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR))
    if kind == "local":
        check_folder(Path(where), base_model)
        return CLIPTokenizer.from_pretrained(str(Path(where) / "tokenizer"))
    if kind == "remote" and check_remote:
        import tempfile

        from dbbatch.storage import join

        if not storage.exists(join(where, "model_index.json")):
            raise ModelError(f"base_model {base_model!r}: not a diffusers folder (no model_index.json there)")
        tmp = Path(tempfile.mkdtemp(prefix="dbbatch-tok-"))
        storage.fetch_tree(join(where, "tokenizer"), tmp)
        return CLIPTokenizer.from_pretrained(str(tmp))
    return None


def check_manifest(manifest: Manifest, base_dir: Optional[Path], storage: Any, check_remote: bool,
                   output: str, prior_cache: str) -> tuple[list[str], list[str]]:
    """All problems (errors) and warnings; nothing raised for per-item problems."""
    from dbbatch.images import has_image_suffix

    problems: list[str] = []
    warnings: list[str] = []
    try:
        tokenizer = load_tokenizer(manifest.base_model, base_dir, storage, check_remote)
    except DbbatchError as e:
        problems.append(f"base_model: {e}")
        tokenizer = None
    if tokenizer is not None:
        p, w = token_problems(manifest, tokenizer)
        problems += p
        warnings += w
    eight_bit = [s.index for s in resolve_subjects(manifest, None) if s.train.optimizer == "adamw8bit"]
    lacking = adamw8bit_lacks() if eight_bit else None
    if lacking:
        # Name the key the user wrote: the subject's own, or `defaults` once for every subject inheriting it.
        wheres = {f"subjects[{i}].train.optimizer" if "optimizer" in manifest.subjects[i].train.model_fields_set
                  else "defaults.train.optimizer" for i in eight_bit}
        for where in sorted(wheres):
            problems.append(f"{where}: adamw8bit needs {lacking} (bitsandbytes' 8-bit AdamW runs on CUDA GPUs only); use adamw")
    for location, field in ((output, "output"), (prior_cache, "prior_cache")):
        try:
            storage.check_location(location)
        except DbbatchError as e:
            problems.append(f"{field}: {e}")
    if problems or not check_remote:
        return problems, warnings
    for subject in resolve_subjects(manifest, base_dir):
        where = f"subjects[{subject.index}].images"
        try:
            files = [u for u in storage.expand(subject.images) if has_image_suffix(u) or u in subject.images]
        except DbbatchError as e:
            problems.append(f"{where}: {e}")
            continue
        if not files:
            problems.append(f"{where}: no images found at {', '.join(subject.images)} (subject {subject.id})")
            continue
        if not _any_readable(files, storage):
            problems.append(f"{where}: none of the {len(files)} file(s) is a readable image (subject {subject.id})")
    for location, field in ((output, "output"), (prior_cache, "prior_cache")):
        try:
            storage.check_writable(location)
        except DbbatchError as e:
            problems.append(f"{field}: not writable: {e}")
    return problems, warnings


def adamw8bit_lacks() -> Optional[str]:
    """What this machine lacks for `optimizer: adamw8bit` ("the bitsandbytes package", "a CUDA GPU"), or None."""
    import importlib.util

    import torch

    lacking = []
    if importlib.util.find_spec("bitsandbytes") is None:
        lacking.append("the bitsandbytes package")
    if not torch.cuda.is_available():
        lacking.append("a CUDA GPU")
    return " and ".join(lacking) or None


def _any_readable(files: list[str], storage: Any) -> bool:
    from dbbatch.images import decode

    for url in files:
        try:
            decode(storage.read_bytes(url), url)
            return True
        except DbbatchError:
            continue
    return False


def locations(manifest: Manifest, base_dir: Optional[Path], output_override: Optional[str]) -> tuple[str, str]:
    """(output, prior_cache) with relative paths resolved against the manifest's folder."""
    from dbbatch.storage import join

    out = output_override or manifest.output
    out = resolve_location(out, Path.cwd()) if output_override else resolve_location(out, base_dir or Path.cwd())
    cache = manifest.prior_cache
    cache = resolve_location(cache, base_dir or Path.cwd()) if cache else join(out, "_priors")
    return out.rstrip("/"), cache.rstrip("/")
