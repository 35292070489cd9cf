"""Base models of any family from diffusers folders (local, any fsspec URL, a hub id, or a built-in written
out as one), and fine-tuned models written back as folders.

Every base model ends up as a `BaseModel` (base.py) loaded from a diffusers folder: a built-in model is first
written as one (once, into the cache), so the built-in tiny models run exactly the code path a real SD 1.x/2.x
or SDXL folder runs. The folder's family (families/) says which components it has and how they load.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from dbbatch.core.errors import ModelError, StorageError
from dbbatch.models.assets import PRETRAINED, pretrained_digest, write_pretrained
from dbbatch.models.base import BaseModel
from dbbatch.models.builtin import ARCHS, BUILTIN_SEED, BUILTIN_VERSION, build_builtin, builtin_names, unknown_builtin

log = logging.getLogger(__name__)


@contextmanager
def cast_for_saving(modules: list[Any], dtype: Any) -> Iterator[None]:
    """Give the modules' floating-point weights `dtype` while saving, then the very tensors they had before.
    Casting there and back instead would round the live model: the VAE (never restored between subjects)
    for the rest of the batch. Costs a `dtype` copy of the weights while it lasts, on their device."""
    originals = []
    if dtype is not None:
        for module in modules:
            for t in list(module.parameters()) + list(module.buffers()):
                if t.is_floating_point() and t.dtype != dtype:
                    originals.append((t, t.data))
                    t.data = t.data.to(dtype)
    try:
        yield
    finally:
        for t, data in originals:
            t.data = data


def save_folder(comps: dict[str, Any], out_dir: Path, dtype: Any = None) -> Path:
    """Write components (with their `family`) as a diffusers folder that the family's pipeline class
    (`StableDiffusionPipeline`, `StableDiffusionXLPipeline`) loads with `from_pretrained`."""
    family = comps["family"]
    pipe = family.pipeline(comps, comps["scheduler"])

    def write(tmp: Path) -> None:
        with cast_for_saving([comps[name] for name in (family.denoiser, "vae", *family.text_encoders)], dtype):
            pipe.save_pretrained(tmp, safe_serialization=True)

    return _write_model_folder(out_dir, write)


def _write_model_folder(out_dir: Path, write: Callable[[Path], None]) -> Path:
    """`write` the folder as `<out_dir>.tmp`, then rename it to `out_dir`. On any failure the temporary folder
    is removed (a full disk must not stay full for the rerun); a full disk becomes one line naming the path."""
    from dbbatch.core import faults

    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        faults.on_model_write(tmp)
        write(tmp)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if _disk_full(e):
            raise StorageError(f"cannot write the fine-tuned model to {tmp}: no space left on device; free space in the "
                               "work dir or pass a larger one with --work-dir (or $DBBATCH_WORK_DIR), then rerun") from None
        raise
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


@contextmanager
def cache_lock(path: Path) -> Iterator[None]:
    """An exclusive flock(2) on `<path>.lock` for the local model cache, shared by the workers of one work dir
    (the lock dies with its process, so a SIGKILLed writer never blocks the next one)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _disk_full(exc: BaseException) -> bool:
    """ENOSPC/EDQUOT as an OSError, or inside safetensors' SafetensorError text ("... (os error 28)")."""
    import errno

    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    return f"os error {errno.ENOSPC}" in text or "No space left on device" in text


def write_builtin(name: str, out_dir: Path) -> Path:
    if name in PRETRAINED:
        return write_pretrained(name, out_dir)
    return save_folder(build_builtin(name), out_dir)


def check_folder(folder: Path, source: str) -> Any:
    """The family of a diffusers folder that has all of that family's components (else one line)."""
    from dbbatch.models import families

    if not folder.is_dir():
        raise ModelError(f"base_model {source!r}: no such folder ({folder}); give a diffusers folder, a built-in "
                         f"model ({', '.join('builtin:' + a for a in builtin_names())}) or a hub id (org/name)")
    index = folder / "model_index.json"
    if not index.is_file():
        raise ModelError(f"base_model {source!r}: not a diffusers folder (no model_index.json); use a folder saved "
                         f"with save_pretrained of {families.supported()}")
    family = families.of_folder(folder, source)
    missing = [c for c in family.components if not (folder / c).is_dir()]
    if missing:
        raise ModelError(f"base_model {source!r}: diffusers folder lacks {', '.join(missing)}; a complete "
                         f"{family.pipeline_class} folder is needed")
    return family


def fingerprint(folder: Path) -> str:
    """A cheap content fingerprint: every config file whole, and each weight file's size plus its first and
    last MiB (safetensors headers list every tensor's shape and offset). Reading 3.4 GB per run to hash it
    all would cost more than it protects against."""
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if not p.is_file() or p.name.startswith("."):
            continue
        h.update(p.relative_to(folder).as_posix().encode())
        if p.suffix in (".json", ".txt"):
            h.update(p.read_bytes())
        else:
            size = p.stat().st_size
            h.update(str(size).encode())
            with open(p, "rb") as fh:
                h.update(fh.read(2**20))
                if size > 2**20:
                    fh.seek(max(size - 2**20, 2**20))
                    h.update(fh.read())
    return h.hexdigest()[:16]


def load_folder(folder: Path, source: str, identity: Optional[str] = None) -> BaseModel:
    """Load a diffusers folder of a supported family (epsilon or v-prediction)."""
    family = check_folder(folder, source)
    try:
        comps = family.load(folder)
        scheduler_config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
        raise ModelError(f"base_model {source!r}: cannot load the diffusers folder: {str(e).splitlines()[0][:200]}") from None
    comps["denoiser"] = comps.pop(family.denoiser)
    model = BaseModel(**comps, scheduler_config=dict(scheduler_config), identity=identity or fingerprint(folder),
                      source=source, folder=folder, family=family)
    model.freeze()
    return model


def resolve_source(source: str, base_dir: Optional[Path]) -> tuple[str, str]:
    """Classify a `base_model` value: ('builtin', name) | ('local', path) | ('remote', url) | ('hub', id)."""
    if source.startswith("builtin:"):
        return "builtin", source.split(":", 1)[1]
    if "://" in source:
        return ("local", source.split("://", 1)[1]) if source.startswith("file://") else ("remote", source)
    p = Path(source).expanduser()
    if not p.is_absolute() and base_dir is not None:
        p = (base_dir / p).resolve()
    if p.exists() or source.startswith((".", "/", "~")) or source.count("/") != 1:
        return "local", str(p)
    return "hub", source  # "org/name", not a local folder


def remote_cache_name(url: str, listing_digest: str) -> str:
    """Cache folder name of a remote model: its URL and its content (so a model replaced in place under the
    same URL is downloaded again, never mixed with the old one)."""
    return "remote-" + hashlib.sha256(f"{url}\n{listing_digest}".encode()).hexdigest()[:16]


def fetch_remote_folder(url: str, cache_dir: Path, storage: Any, marker: str = "model_index.json",
                        field: str = "base_model") -> Path:
    """A model folder at an fsspec URL (a diffusers folder; with `marker` config.json, a transformers one),
    downloaded once into `cache_dir/models/` and reused while the listing (names, sizes, ETags) is unchanged.
    Files land in `<name>.part/` first (an interrupted download resumes there) and the folder takes its final
    name only when complete."""
    from dbbatch.store.locations import listing_digest, redact

    files = storage.list_tree(url)
    label = field.replace("_", " ")  # "base model", "evaluation.clip": what the log lines below name
    if not any(f.rel == marker for f in files):
        what = ("no diffusers folder there (no model_index.json); upload a Stable Diffusion folder saved with "
                "save_pretrained, or fix the URL") if marker == "model_index.json" else (
                f"no transformers model folder there (no {marker}); upload one saved with save_pretrained, or fix the URL")
        raise ModelError(f"{field} {redact(url)!r}: {what}")
    models = cache_dir / "models"
    folder = models / remote_cache_name(url, listing_digest(files))
    if (folder / ".complete").is_file():
        log.info("%s %s: using the cached copy in %s", label, redact(url), folder)
        return folder
    size = sum(f.size for f in files)
    log.info("%s %s: downloading %d files (%.1f MiB) to %s", label, redact(url), len(files), size / 2**20, folder)
    partial = folder.with_name(folder.name + ".part")
    storage.fetch_tree(url, partial, files)
    (partial / ".complete").write_text(url + "\n")
    try:
        partial.rename(folder)
    except OSError:
        if not (folder / ".complete").is_file():  # not a process beside this one having finished first
            raise
        shutil.rmtree(partial, ignore_errors=True)
    # Older downloads of the same URL are stale now (a base model can be GBs): drop them.
    for other in models.glob("remote-*"):
        marker = other / ".complete"
        if other != folder and marker.is_file() and marker.read_text().strip() == url:
            log.info("%s %s changed; removing the old copy %s", label, redact(url), other)
            shutil.rmtree(other, ignore_errors=True)
    return folder


def load_base_model(source: str, base_dir: Optional[Path], cache_dir: Path, storage: Any) -> BaseModel:
    """Any `base_model` value -> a frozen BaseModel with a snapshot of its trainable weights."""
    kind, where = resolve_source(source, base_dir)
    if kind == "builtin":
        if where in PRETRAINED:
            digest = pretrained_digest(where)
            folder, identity = cache_dir / "models" / f"builtin-{where}-{digest}", f"builtin:{where}:{digest}"
        elif where in ARCHS:
            folder = cache_dir / "models" / f"builtin-{where}-v{BUILTIN_VERSION}"
            identity = f"builtin:{where}:v{BUILTIN_VERSION}:seed{BUILTIN_SEED}"
        else:
            raise unknown_builtin(where)
        if not (folder / "model_index.json").is_file():
            with cache_lock(folder):  # workers sharing a work dir: one writes, the others wait and use it
                if not (folder / "model_index.json").is_file():
                    log.info("writing built-in model %s to %s", source, folder)
                    write_builtin(where, folder)
        return load_folder(folder, source, identity=identity)
    if kind == "local":
        return load_folder(Path(where), source)
    if kind == "remote":
        with cache_lock(cache_dir / "models" / "remote"):
            folder = fetch_remote_folder(where, cache_dir, storage)
        return load_folder(folder, source)
    from dbbatch.models import families

    try:
        from huggingface_hub import snapshot_download

        index = Path(snapshot_download(where, allow_patterns=["model_index.json"]))
    except Exception as e:  # noqa: BLE001 - any hub failure is one clear error
        raise ModelError(f"base_model {source!r}: not a local folder, and the hub could not provide it ({type(e).__name__})") from None
    family = families.of_folder(index, source)
    try:  # only the family's components, in safetensors, full precision: no single-file checkpoints or .fp16 copies
        folder = Path(snapshot_download(where, allow_patterns=["model_index.json"] + [
            f"{c}/{pattern}" for c in family.components for pattern in ("*.json", "*.txt", "*.safetensors")],
            ignore_patterns=["*.fp16.*", "*.bin", "*.ckpt"]))
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"base_model {source!r}: the hub could not provide its files ({type(e).__name__})") from None
    return load_folder(folder, source)


DELTA_FILE = "dbbatch_delta.json"


def save_delta(model: BaseModel, out_dir: Path, text_encoders: tuple[str, ...], dtype: Any = None) -> Path:
    """Only the components fine-tuning changed (the denoiser and the trained `text_encoders`), plus a reference to
    the base model (`model_format: delta`). Load with `dbbatch.models.loading.load_pipeline(folder)`."""
    names = [model.family.denoiser, *text_encoders]

    def write(tmp: Path) -> None:
        for name in names:
            module = getattr(model, name)
            with cast_for_saving([module], dtype):
                module.save_pretrained(tmp / name, safe_serialization=True)
        (tmp / DELTA_FILE).write_text(json.dumps({"base_model": model.source, "base_model_identity": model.identity,
                                                 "components": names}, indent=2))

    return _write_model_folder(out_dir, write)


def load_pipeline(folder: str, base_model: Optional[str] = None, cache_dir: Optional[Path] = None, storage: Any = None):
    """The family's pipeline (`StableDiffusionPipeline`, `StableDiffusionXLPipeline`) for a dbbatch model folder,
    full or delta (the documented loading call)."""
    import diffusers

    from dbbatch.models import families

    path = Path(folder)
    if not (path / DELTA_FILE).is_file():
        family = families.of_folder(path, folder)
        return getattr(diffusers, family.pipeline_class).from_pretrained(str(path))
    delta = json.loads((path / DELTA_FILE).read_text())
    base = load_base_model(base_model or delta["base_model"], None, cache_dir or Path.home() / ".cache" / "dbbatch", storage)
    if base.identity != delta["base_model_identity"]:
        raise ModelError(f"{folder}: made from base model {delta['base_model_identity']}, but {base.identity} was found")
    replaced = {name: type(getattr(base, name)).from_pretrained(str(path / name)) for name in delta["components"]}
    return base.pipeline(**replaced)
