"""Base models of any family: the built-in random-weight architectures, diffusers folders (local or any fsspec
URL), hub ids.

Every base model ends up as a `BaseModel` loaded from a diffusers folder: a built-in model is first written
as one (once, into the cache), so the built-in tiny models run exactly the code path a real SD 1.x/2.x or
SDXL folder runs. The folder's family (dbbatch/families/) says which components it has and how they load.
The VAE and (unless trained) the text encoders are frozen here, once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from dbbatch.errors import ModelError, StorageError

log = logging.getLogger(__name__)

TOKENIZER_DIR = Path(__file__).parent / "assets" / "tokenizer"
# SDXL's second tokenizer: the same vocabulary and merges (read from TOKENIZER_DIR), its own special tokens
# (padding with "!", as SDXL 1.0's tokenizer_2 does); only its two config files are shipped.
TOKENIZER_2_DIR = Path(__file__).parent / "assets" / "tokenizer_2"
BUILTIN_VERSION = "2"  # bump when a built-in config or its seed changes: it is part of every cache key
BUILTIN_SEED = 1234
ASSETS_DIR = Path(__file__).parent / "assets"
# Built-in models with trained weights (scripts/pretrain_toy.py), shipped as package data: a diffusers folder
# without its tokenizer (the shared one in assets/tokenizer/ is copied in when the folder is written out).
PRETRAINED: dict[str, Path] = {"toy-sd": ASSETS_DIR / "toy-sd"}
PRETRAINED_CLIP: dict[str, Path] = {"toy-clip": ASSETS_DIR / "toy-clip"}  # transformers CLIPModel folders
WEIGHT_SUMS = "SHA256SUMS"  # beside the shipped weights: `sha256sum -c` format, checked by the tests
# Training defaults a model carries (a built-in in its asset folder, a user's folder beside model_index.json):
# SubjectSettings keys (resolution, train, priors, samples) that apply where the manifest is silent.
MODEL_DEFAULTS_FILE = "dbbatch_defaults.json"

# Scheduler as shipped with SD 1.x checkpoints; DDIM is used for sampling, DDPM (same betas) for training.
SCHEDULER_CONFIG = {
    "_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1,
    "prediction_type": "epsilon",
}

# Built-in architectures (random weights, fixed seed), each of a family (dbbatch/families/). tiny-sd: CI-sized,
# native 64 px. small-sd: about 10x the parameters, native 128 px, still CPU-friendly. sd15: the full SD 1.5
# shapes, for GPU benchmarks. tiny-sdxl: SDXL-shaped (two text encoders, the second with a projection, the
# text_time added embedding), CI-sized, native 64 px. sdxl: the full SDXL 1.0 base shapes, for GPU benchmarks.
_TINY_CLIP = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=5, projection_dim=32)
_TINY_VAE = dict(block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4, sample_size=64,
                 down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
ARCHS: dict[str, dict[str, Any]] = {
    "tiny-sd": {
        "family": "sd",
        "unet": dict(block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
                     down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                     up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32, attention_head_dim=8),
        "vae": _TINY_VAE,
        "text_encoder": _TINY_CLIP,
    },
    # ~10x tiny-sd per component (UNet 16.5M, VAE 6.7M, text encoder 15.8M; 39M in all vs 3.7M), native 128 px
    # with a 4x VAE, so the UNet works on the same 32x32 latents as tiny-sd at 64 px: about 5x its FLOPs per step.
    "small-sd": {
        "family": "sd",
        "unet": dict(block_out_channels=(64, 128, 192), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
                     down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                     up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                     cross_attention_dim=256, attention_head_dim=8),
        "vae": dict(block_out_channels=(64, 128, 192), in_channels=3, out_channels=3, latent_channels=4, sample_size=128,
                    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3),
        "text_encoder": dict(hidden_size=256, intermediate_size=1024, num_attention_heads=4, num_hidden_layers=4,
                             projection_dim=256),
    },
    "sd15": {
        "family": "sd",
        "unet": dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, sample_size=64, in_channels=4,
                     out_channels=4, cross_attention_dim=768, attention_head_dim=8,
                     down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                     up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3),
        "vae": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, in_channels=3, out_channels=3, latent_channels=4,
                    sample_size=512, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4),
        "text_encoder": dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                             projection_dim=768, hidden_act="quick_gelu"),
    },
    # The UNet's cross-attention width is the two encoders' widths side by side (32 + 32); its added embedding
    # takes the pooled projection (32) and six micro-conditioning ids of addition_time_embed_dim (6 x 8).
    "tiny-sdxl": {
        "family": "sdxl",
        "unet": dict(block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
                     down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                     up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                     use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                     transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=32 + 6 * 8,
                     cross_attention_dim=64),
        "vae": _TINY_VAE,
        "text_encoder": _TINY_CLIP,
        "text_encoder_2": _TINY_CLIP,
    },
    # SDXL 1.0 base: 2.6B-parameter UNet, CLIP ViT-L + OpenCLIP ViT-bigG, native 1024 px (GPU benchmarks).
    "sdxl": {
        "family": "sdxl",
        "unet": dict(block_out_channels=(320, 640, 1280), layers_per_block=2, sample_size=128, in_channels=4,
                     out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                     up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                     attention_head_dim=(5, 10, 20), use_linear_projection=True, addition_embed_type="text_time",
                     addition_time_embed_dim=256, transformer_layers_per_block=(1, 2, 10),
                     projection_class_embeddings_input_dim=2816, cross_attention_dim=2048),
        "vae": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, in_channels=3, out_channels=3,
                    latent_channels=4, sample_size=1024, scaling_factor=0.13025,
                    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4),
        "text_encoder": dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                             projection_dim=768, hidden_act="quick_gelu"),
        "text_encoder_2": dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
                               projection_dim=1280, hidden_act="gelu"),
    },
}


def load_shipped_tokenizer(name: str = "tokenizer") -> Any:
    """The CLIP tokenizer shipped with dbbatch ("tokenizer"), or SDXL's second one ("tokenizer_2")."""
    from transformers import CLIPTokenizer

    if name == "tokenizer":
        return CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR))
    special = json.loads((TOKENIZER_2_DIR / "special_tokens_map.json").read_text())
    config = json.loads((TOKENIZER_2_DIR / "tokenizer_config.json").read_text())
    return CLIPTokenizer(vocab_file=str(TOKENIZER_DIR / "vocab.json"), merges_file=str(TOKENIZER_DIR / "merges.txt"),
                         model_max_length=config["model_max_length"], do_lower_case=config.get("do_lower_case", True),
                         **special)


def builtin_family(name: str) -> Any:
    """The family of a `builtin:` name (pretrained ones: their folder's)."""
    from dbbatch import families

    if name in PRETRAINED:
        return families.of_folder(PRETRAINED[name], f"builtin:{name}")
    if name not in ARCHS:
        raise unknown_builtin(name)
    return families.by_name(ARCHS[name]["family"])


def builtin_names() -> list[str]:
    """Every `builtin:` name a manifest may give: random-weight architectures, then pretrained models."""
    return [*ARCHS, *PRETRAINED]


def unknown_builtin(name: str) -> ModelError:
    return ModelError(f"unknown built-in model 'builtin:{name}'; available: {', '.join('builtin:' + a for a in builtin_names())}")


def pretrained_digest(name: str) -> str:
    """sha256 over the shipped weight files of a pretrained built-in (16 hex digits): its identity."""
    folder = PRETRAINED[name]
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*.safetensors")):
        h.update(p.relative_to(folder).as_posix().encode())
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()[:16]


def write_pretrained(name: str, out_dir: Path) -> Path:
    """A pretrained built-in as a complete diffusers folder (the shipped files plus the shared tokenizer)."""
    src = PRETRAINED[name]
    if not (src / "model_index.json").is_file():
        raise ModelError(f"builtin:{name}: its weights are missing from this installation ({src}); reinstall dbbatch")
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns(WEIGHT_SUMS, "*.jsonl", "*.md"))
    shutil.copytree(TOKENIZER_DIR, tmp / "tokenizer")
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


def load_builtin_clip(name: str = "toy-clip") -> tuple[Any, Any, Any]:
    """(CLIPModel, CLIPTokenizer, CLIPImageProcessor) of a pretrained built-in CLIP (`builtin:toy-clip`), eval
    mode, fp32: the stand-in for CLIP-I/CLIP-T on the toy world."""
    import torch
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    if name not in PRETRAINED_CLIP:
        raise ModelError(f"unknown built-in CLIP 'builtin:{name}'; available: {', '.join('builtin:' + a for a in PRETRAINED_CLIP)}")
    model = CLIPModel.from_pretrained(str(PRETRAINED_CLIP[name]), dtype=torch.float32)
    model.eval()
    folder = str(PRETRAINED_CLIP[name])
    return model, CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR)), CLIPImageProcessor.from_pretrained(folder)


def model_defaults(source: str, base_dir: Optional[Path]) -> tuple[dict[str, Any], Optional[str]]:
    """(the training defaults a base model carries, where they were read) or ({}, None) when it carries
    none or cannot be read without downloading (a remote folder or a hub id)."""
    kind, where = resolve_source(source, base_dir)
    if kind == "builtin":
        if where not in PRETRAINED:
            return {}, None
        path = PRETRAINED[where] / MODEL_DEFAULTS_FILE
    elif kind == "local":
        path = Path(where) / MODEL_DEFAULTS_FILE
    else:
        return {}, None
    if not path.is_file():
        return {}, None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"base_model {source!r}: {path} is not valid JSON ({e}); fix or remove it") from None
    if not isinstance(data, dict):
        raise ModelError(f"base_model {source!r}: {path} must hold a JSON object of manifest `defaults` keys")
    return data, str(path)


def vae_scale_factor(vae_config: Any) -> int:
    """Pixels per latent pixel: the VAE halves the size in every block but the last (as diffusers computes it).
    Takes the config (a dict from vae/config.json, or a loaded VAE's config): no weights needed."""
    channels = vae_config["block_out_channels"] if isinstance(vae_config, dict) else vae_config.block_out_channels
    return 2 ** (len(channels) - 1)


@dataclass
class BaseModel:
    """A loaded base model of a family, split into the parts DreamBooth treats differently."""

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler_config: dict[str, Any]
    identity: str  # stable fingerprint: part of prior-cache keys and checkpoint compatibility checks
    source: str  # what the manifest said
    folder: Optional[Path] = None
    family: Any = None  # a dbbatch.families.Family; None: Stable Diffusion 1.x/2.x
    text_encoder_2: Any = None  # SDXL's second text encoder and tokenizer
    tokenizer_2: Any = None
    _initial: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False)
    _changed: bool = field(default=False, repr=False)

    def __post_init__(self) -> None:
        if self.family is None:
            from dbbatch import families

            self.family = families.by_name("sd")

    @property
    def text_encoders(self) -> list[Any]:
        """The family's text encoders, in the order its conditioning uses them."""
        return [getattr(self, name) for name in self.family.text_encoders]

    @property
    def tokenizers(self) -> list[Any]:
        return [getattr(self, name) for name in self.family.tokenizers]

    @property
    def trainable_parts(self) -> tuple[str, ...]:
        """The components a full fine-tune may change: the UNet and the text encoders."""
        return ("unet", *self.family.text_encoders)

    def parts(self) -> dict[str, Any]:
        """Every component by its diffusers name (for the family's pipeline), the scheduler excepted."""
        return {name: getattr(self, name) for name in ("unet", "vae", *self.family.text_encoders, *self.family.tokenizers)}

    def pipeline(self, **replaced: Any) -> Any:
        """The family's diffusers pipeline over these very modules (with `replaced` ones), DDIM sampling."""
        from diffusers import DDIMScheduler

        return self.family.pipeline({**self.parts(), **replaced}, DDIMScheduler.from_config(self.scheduler_config))

    def encode(self, prompts: list[str], device: Any = None) -> dict[str, Any]:
        """Prompts -> their conditioning (no gradients), on the CPU unless `device`."""
        import torch

        with torch.no_grad():
            cond = self.family.encode(self.text_encoders, self.family.tokenize(self.tokenizers, prompts))
        return {k: v.to(device) if device is not None else v.cpu() for k, v in cond.items()}

    @property
    def vae_scale_factor(self) -> int:
        return vae_scale_factor(self.vae.config)

    @property
    def native_resolution(self) -> int:
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    @property
    def prediction_type(self) -> str:
        return self.scheduler_config.get("prediction_type", "epsilon")

    def snapshot(self, names: tuple[str, ...] = ("unet",)) -> None:
        """Keep an in-memory (CPU) copy of the components `names` that full fine-tuning is about to change, to
        restore between subjects. Each is copied before the first subject that changes it (a LoRA-only batch
        never needs one; SDXL's second text encoder, 2.8 GB, only when it trains); marks the weights as about
        to change, so `restore` puts them back."""
        self._changed = True
        for name in names:
            if name not in self._initial:
                self._initial[name] = {k: v.detach().to("cpu", copy=True) for k, v in getattr(self, name).state_dict().items()}

    def restore(self) -> None:
        """Put the base weights back (after a subject changed them); never reloads from disk or the store."""
        if not self._changed:
            return
        for name, state in self._initial.items():
            getattr(self, name).load_state_dict(state)
        self._changed = False

    def to(self, device: Any) -> "BaseModel":
        for module in (self.unet, self.vae, *self.text_encoders):
            module.to(device)
        return self

    def freeze(self) -> None:
        for module in (self.vae, *self.text_encoders, self.unet):
            module.requires_grad_(False)
            module.eval()


def build_builtin(name: str, torch_dtype: Any = None) -> dict[str, Any]:
    """Components of a built-in architecture with weights from a fixed seed (in memory, nothing on disk), plus
    its `family`."""
    from diffusers import DDIMScheduler

    from dbbatch import families

    if name not in ARCHS:
        raise unknown_builtin(name)
    arch = ARCHS[name]
    family = families.by_name(arch["family"])
    comps = family.build(arch, BUILTIN_SEED)
    comps.update(scheduler=DDIMScheduler.from_config(SCHEDULER_CONFIG), family=family)
    if torch_dtype is not None:
        for k in ("unet", "vae", *family.text_encoders):
            comps[k].to(torch_dtype)
    return comps


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
        with cast_for_saving([comps[name] for name in ("unet", "vae", *family.text_encoders)], dtype):
            pipe.save_pretrained(tmp, safe_serialization=True)

    return _write_model_folder(out_dir, write)


def _write_model_folder(out_dir: Path, write: Callable[[Path], None]) -> Path:
    """`write` the folder as `<out_dir>.tmp`, then rename it to `out_dir`. On any failure the temporary folder
    is removed (a full disk must not stay full for the rerun); a full disk becomes one line naming the path."""
    from dbbatch import faults

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
    from dbbatch import families

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
    from dbbatch.storage import listing_digest, redact

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
    from dbbatch import families

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
    """Only the components fine-tuning changed (the UNet and the trained `text_encoders`), plus a reference to
    the base model (`model_format: delta`). Load with `dbbatch.models.load_pipeline(folder)`."""
    names = ["unet", *text_encoders]

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

    from dbbatch import families

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
