"""Pretrain `builtin:toy-sd` (VAE, then UNet + CLIP text encoder) and `builtin:toy-clip` on the toy world.

    python scripts/pretrain_toy.py                      # full run; resumes from --state if interrupted
    python scripts/pretrain_toy.py --check-steps 3      # the first steps of each stage, compared with the log

Everything derives from --seed: the scene pool, each step's batch, noise and timesteps are pure functions of
(seed, stage, step), so an interrupted run resumed from its last checkpoint continues exactly as it would have
(checkpoints every --checkpoint-every steps in --state, outside the repository). One intra-op thread by
default: this machine's cores are shared, and a second thread spin-waiting made the prototype slower.

Stages and their choices (the prototype this replaces needed an estimated 15-30k steps; every change here is
to learn more per CPU-second):
1. VAE (AutoencoderKL, 3 narrow blocks: 32 px images -> 8x8x4 latents, a quarter of the UNet's work of 16x16) trained
   as a plain autoencoder on the latent means, a little latent noise so the decoder tolerates imperfect
   samples, then made deterministic (posterior log-variance -20, as a trained SD VAE is near-deterministic) and
   rounded to fp16, the precision it ships in (so --check-steps reproduces the UNet stage from the shipped
   VAE bit for bit). scaling_factor = 1 / std of the latents: unit variance, what the noise schedule assumes.
2. UNet (tiny-sd's architecture at 8x8 latents) + CLIP text encoder (tiny-sd's), jointly, epsilon objective,
   SD 1.x schedule (dbbatch.models.builtin.SCHEDULER_CONFIG), AdamW with warmup and cosine decay, EMA of the weights
   (what ships). Loss weight per timestep, in x0 terms: min(SNR, 5) at low noise (Min-SNR, Hang et al. 2023),
   and at high noise up to 10x the plain epsilon loss. The epsilon loss weights an x0 error by SNR, which is
   ~0.005 at t=999 where the background colour is decided: the prototype's backgrounds stayed at chance.
3. toy CLIP (transformers CLIPModel, tiny towers), contrastive loss on the same world's images and captions.
Evaluation every --eval-every steps: the 48 held-out prompts (dbbatch's own sampler: 25 DDIM steps, guidance
7.5) read back by dbbatch.models.toyworld's checker. The log (JSON lines) goes to --state/log.jsonl and, with the
weights, to --export (dbbatch/assets: toy-sd/ and toy-clip/; --export-checkpoint exports a running one's newest
checkpoint, labelled intermediate in toy-sd/pretrain_status.json).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from dbbatch.models import toyworld  # noqa: E402
from dbbatch.models.assets import TOKENIZER_DIR  # noqa: E402
from dbbatch.models.builtin import ARCHS, SCHEDULER_CONFIG

POOL_SIZE = 24576  # distinct training scenes (~315 placements per training triple), encoded lazily once
BATCH = 32
SNR_GAMMA = 5.0
HIGH_NOISE_BOOST = 10.0
VAE_ARCH = dict(block_out_channels=(16, 32, 64), norm_num_groups=16, in_channels=3, out_channels=3, latent_channels=4,
                sample_size=toyworld.SIZE, down_block_types=("DownEncoderBlock2D",) * 3,
                up_block_types=("UpDecoderBlock2D",) * 3)
UNET_ARCH = {**ARCHS["tiny-sd"]["unet"], "sample_size": toyworld.SIZE // 4}
TEXT_ARCH = ARCHS["tiny-sd"]["text_encoder"]
CLIP_TEXT = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2)
CLIP_VISION = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=3,
                   image_size=toyworld.SIZE, patch_size=4)
CLIP_PROJECTION = 32
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


def step_rng(seed: int, stage: int, step: int) -> np.random.Generator:
    return np.random.default_rng([seed, stage, step])


def torch_gen(seed: int, stage: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(step_rng(seed, stage, step).integers(0, 2**62)))


def pixels(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def scene_batch(seed: int, stage: int, step: int, n: int) -> list[toyworld.Scene]:
    rng = random.Random(int(step_rng(seed, stage, step).integers(0, 2**62)))
    return [toyworld.random_scene(rng) for _ in range(n)]


class Log:
    """JSON lines, kept in memory too so a checkpoint holds the log up to its step."""

    def __init__(self, path: Path, lines: list[dict]):
        self.path, self.lines = path, list(lines)
        path.write_text("".join(json.dumps(r) + "\n" for r in self.lines))

    def add(self, **record) -> None:
        self.lines.append(record)
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")


def load_state(path: Path):
    """A checkpoint of this script (weights_only; the log lines of early runs hold a TorchVersion)."""
    with torch.serialization.safe_globals([torch.torch_version.TorchVersion]):
        return torch.load(path, weights_only=True)


def save_atomic(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


class Eta:
    def __init__(self, total: int, start: int):
        self.total, self.start, self.t0 = total, start, time.time()

    def __call__(self, step: int) -> str:
        done = step + 1 - self.start
        per = (time.time() - self.t0) / max(done, 1)
        return f"{per:.3f} s/step, ETA {(self.total - step - 1) * per / 60:.1f} min"


# ------------------------------------------------------------------------------------------------ VAE
def new_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(**VAE_ARCH)


def vae_loss(vae, images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    h = vae.quant_conv(vae.encoder(images))
    z = h[:, : VAE_ARCH["latent_channels"]]
    z_noisy = z + 0.1 * z.detach().std() * torch.randn(z.shape, generator=gen)
    recon = vae.decoder(vae.post_quant_conv(z_noisy))
    return torch.nn.functional.mse_loss(recon, images) + 1e-4 * z.pow(2).mean()


def vae_step_batch(seed: int, step: int) -> torch.Tensor:
    return pixels([toyworld.render(s) for s in scene_batch(seed, 1, step, BATCH)])


def finish_vae(vae, seed: int):
    """Deterministic posterior, fp16-rounded weights, unit-variance scaling factor."""
    c = VAE_ARCH["latent_channels"]
    with torch.no_grad():
        vae.quant_conv.weight[c:] = 0
        vae.quant_conv.bias[c:] = -20.0  # log-variance: std 4.5e-5
        for p in vae.parameters():
            p.copy_(p.half().float())
        rng = random.Random(seed + 7)
        sample = pixels([toyworld.render(toyworld.random_scene(rng)) for _ in range(1024)])
        means = torch.cat([vae.encode(sample[i : i + 256]).latent_dist.mean for i in range(0, 1024, 256)])
    vae.register_to_config(scaling_factor=float(1.0 / means.std()))
    return vae


def train_vae(args, log: Log, state_dir: Path, steps: int, check: bool = False):
    path = state_dir / "vae.pt"
    torch.manual_seed(args.seed)
    vae = new_vae()
    if path.is_file() and not check:
        saved = load_state(path)
        vae.load_state_dict(saved["weights"])
        vae.register_to_config(scaling_factor=saved["scaling_factor"])
        return vae
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    eta = Eta(steps, 0)
    losses = []
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, 2e-3, 50)
        loss = vae_loss(vae, vae_step_batch(args.seed, step), torch_gen(args.seed, 1, step))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if check or step < 5 or step % 50 == 0 or step == steps - 1:
            log.add(stage="vae", step=step, loss=round(float(loss), 7))
        if step % 100 == 0 or step == steps - 1:
            print(f"vae {step + 1}/{steps} loss {np.mean(losses[-100:]):.5f} {eta(step)}", flush=True)
    if check:
        return vae
    vae.eval()
    finish_vae(vae, args.seed)
    with torch.no_grad():
        test = pixels([toyworld.render(toyworld.random_scene(random.Random(99))) for _ in range(1)])
        rng = random.Random(args.seed + 11)
        scenes = [toyworld.random_scene(rng, triple=t) for t in toyworld.HELD_OUT for _ in range(8)]
        imgs = pixels([toyworld.render(s) for s in scenes])
        recon = vae.decode(vae.encode(imgs).latent_dist.mean).sample
        arr = ((recon.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
        ok = np.mean([toyworld.background_colour(a) == s.background and toyworld.foreground_colour(a) == s.colour
                      for a, s in zip(arr, scenes)])
        mse = float(torch.nn.functional.mse_loss(recon, imgs))
    del test
    log.add(stage="vae_done", steps=steps, held_out_recon_mse=round(mse, 6), held_out_recon_checker=float(ok),
            scaling_factor=vae.config.scaling_factor)
    print(f"vae done: held-out reconstruction mse {mse:.5f}, checker {ok:.3f}, scaling {vae.config.scaling_factor:.4f}")
    save_atomic({"weights": vae.state_dict(), "scaling_factor": vae.config.scaling_factor}, path)
    return vae


# ------------------------------------------------------------------------------------------ UNet + TE
def new_unet_and_text_encoder(tokenizer):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(1)  # the VAE stage's RNG use must not change these initial weights
    unet = UNet2DConditionModel(**UNET_ARCH)
    te = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **TEXT_ARCH))
    # The token embeddings stay at their random initial values: Adam over 49,408 rows (most never used) cost
    # as much per step as the text encoder itself, and fixed random vectors are as distinguishable as learnt
    # ones. A DreamBooth token (`sks`) is then exactly as untrained as every other word the world lacks.
    te.get_input_embeddings().requires_grad_(False)
    return unet, te


class LatentPool:
    """The fixed scene pool; each scene's latent is computed the first time a batch draws it."""

    def __init__(self, vae, seed: int):
        rng = random.Random(seed + 3)
        self.scenes = [toyworld.random_scene(rng) for _ in range(POOL_SIZE)]
        self.vae, self.cache = vae, {}
        self.scaling = vae.config.scaling_factor

    @torch.no_grad()
    def latents(self, idx: list[int]) -> torch.Tensor:
        missing = sorted({i for i in idx if i not in self.cache})
        if missing:
            z = self.vae.encode(pixels([toyworld.render(self.scenes[i]) for i in missing])).latent_dist.mean
            for i, zi in zip(missing, z * self.scaling):
                self.cache[i] = zi
        return torch.stack([self.cache[i] for i in idx])


class Captions:
    def __init__(self, tokenizer):
        self.tokenizer, self.cache = tokenizer, {}

    def ids(self, captions: list[str]) -> torch.Tensor:
        for c in set(captions) - set(self.cache):
            self.cache[c] = self.tokenizer(c, padding="max_length", max_length=self.tokenizer.model_max_length,
                                           truncation=True, return_tensors="pt").input_ids[0]
        return torch.stack([self.cache[c] for c in captions])


def loss_weights(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    snr = alphas_cumprod[timesteps] / (1 - alphas_cumprod[timesteps])
    return torch.clamp(snr, max=SNR_GAMMA) / snr * torch.clamp(1 / snr, min=1.0, max=HIGH_NOISE_BOOST)


def sd_step(unet, te, pool: LatentPool, captions: Captions, scheduler, seed: int, step: int):
    rng = step_rng(seed, 2, step)
    idx = rng.integers(0, POOL_SIZE, BATCH).tolist()
    forms = rng.choice(len(toyworld.CAPTION_FORMS), size=BATCH, p=toyworld.CAPTION_WEIGHTS)
    texts = [toyworld.caption(pool.scenes[i], toyworld.CAPTION_FORMS[f]) for i, f in zip(idx, forms)]
    latents = pool.latents(idx)
    gen = torch_gen(seed, 2, step)
    noise = torch.randn(latents.shape, generator=gen)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (BATCH,), generator=gen)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    states = te(captions.ids(texts))[0]
    pred = unet(noisy, timesteps, encoder_hidden_states=states).sample
    per_example = (pred - noise).pow(2).mean(dim=(1, 2, 3))
    w = loss_weights(scheduler.alphas_cumprod, timesteps)
    return (w * per_example).mean(), per_example.mean()


def as_model(unet, te, vae, tokenizer):
    from dbbatch.models.base import BaseModel

    return BaseModel(unet=unet, vae=vae, text_encoder=te, tokenizer=tokenizer, scheduler_config=dict(SCHEDULER_CONFIG),
                     identity="pretraining", source="pretraining")


def evaluate(model) -> dict:
    """The checker's accuracies over the 48 held-out prompts (25 DDIM steps, guidance 7.5): the same function
    scripts/measure_toy.py and tests/test_learning.py use."""
    from scripts.measure_toy import prompt_following

    return prompt_following(model)


def train_sd(args, log: Log, state_dir: Path, vae, tokenizer, steps: int, check: bool = False):
    from diffusers import DDPMScheduler

    unet, te = new_unet_and_text_encoder(tokenizer)
    ema_unet, ema_te = new_unet_and_text_encoder(tokenizer)
    ema_unet.load_state_dict(unet.state_dict())
    ema_te.load_state_dict(te.state_dict())
    for m in (ema_unet, ema_te, vae):
        m.requires_grad_(False)
        m.eval()
    params = [p for p in list(unet.parameters()) + list(te.parameters()) if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    scheduler = DDPMScheduler.from_config(SCHEDULER_CONFIG)
    pool, captions = LatentPool(vae, args.seed), Captions(tokenizer)
    path = state_dir / "sd-state.pt"
    start = 0
    if path.is_file() and not check:
        saved = load_state(path)
        for module, key in ((unet, "unet"), (te, "te"), (ema_unet, "ema_unet"), (ema_te, "ema_te")):
            module.load_state_dict(saved[key])
        opt.load_state_dict(saved["opt"])
        start = saved["step"]
        print(f"resuming the UNet stage at step {start}", flush=True)
    ema_pairs = [(e, p) for e, p in zip(list(ema_unet.parameters()) + list(ema_te.parameters()),
                                         list(unet.parameters()) + list(te.parameters())) if p.requires_grad]
    eta, recent = Eta(steps, start), []
    unet.train()
    te.train()
    for step in range(start, steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, args.lr, args.warmup)
        loss, plain = sd_step(unet, te, pool, captions, scheduler, args.seed, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in ema_pairs:
                e.lerp_(p, 1 - decay)
        recent.append(float(plain))
        if check:
            log.add(stage="sd", step=step, loss=round(float(loss), 7), eps_mse=round(float(plain), 7))
            continue
        if step < 5 or step % 50 == 0:
            log.add(stage="sd", step=step, loss=round(float(loss), 7), eps_mse=round(float(plain), 7),
                    eps_mse_avg50=round(float(np.mean(recent[-50:])), 7), lr=opt.param_groups[0]["lr"])
        if step % 100 == 0:
            print(f"sd {step + 1}/{steps} eps-mse {np.mean(recent[-100:]):.5f} {eta(step)}", flush=True)
        last = step == steps - 1
        if (step + 1) % args.eval_every == 0 or last:
            t0 = time.time()
            acc = evaluate(as_model(ema_unet, ema_te, vae, tokenizer))
            log.add(stage="eval", step=step + 1, **acc, seconds=round(time.time() - t0, 1))
            print(f"eval at {step + 1}: {acc}", flush=True)
        if (step + 1) % args.checkpoint_every == 0 or last:
            save_atomic({"unet": unet.state_dict(), "te": te.state_dict(), "ema_unet": ema_unet.state_dict(),
                         "ema_te": ema_te.state_dict(), "opt": opt.state_dict(), "step": step + 1,
                         "log": log.lines}, path)
    return ema_unet, ema_te


# ------------------------------------------------------------------------------------------- toy CLIP
def new_clip(tokenizer):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(2)
    text = dict(vocab_size=len(tokenizer), max_position_embeddings=tokenizer.model_max_length,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id, **CLIP_TEXT)
    return CLIPModel(CLIPConfig(text_config=text, vision_config=CLIP_VISION, projection_dim=CLIP_PROJECTION))


def clip_pixels(images: list[np.ndarray]) -> torch.Tensor:
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
    return (x - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]


def clip_eval(model, captions: Captions) -> dict:
    """Zero-shot: each held-out image against the full captions of every (colour, shape, background)."""
    rng = random.Random(5)
    scenes = [toyworld.random_scene(rng, triple=t) for t in toyworld.HELD_OUT for _ in range(4)]
    labels = [(c, s, b) for c in toyworld.COLOURS for s in toyworld.SHAPES for b in toyworld.COLOURS if b != c]
    texts = [toyworld.caption(toyworld.Scene(c, s, b, 0, 0, 0), "full") for c, s, b in labels]
    with torch.no_grad():
        out = model(input_ids=captions.ids(texts), pixel_values=clip_pixels([toyworld.render(s) for s in scenes]))
    best = out.logits_per_image.argmax(1).tolist()
    truth = [labels.index((s.colour, s.shape, s.background)) for s in scenes]
    return {"held_out_top1": float(np.mean([b == t for b, t in zip(best, truth)])), "images": len(scenes)}


def train_clip(args, log: Log, state_dir: Path, tokenizer, steps: int, check: bool = False):
    model = new_clip(tokenizer)
    captions = Captions(tokenizer)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    eta = Eta(steps, 0)
    forms = [f for f in toyworld.CAPTION_FORMS if f != "empty"]
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, 1e-3, 100)
        scenes = scene_batch(args.seed, 3, step, 64)
        rng = step_rng(args.seed, 3, step)
        # Mostly full captions: in a batch of 64 a partial caption often fits several images.
        texts = [toyworld.caption(s, "full" if rng.random() < 0.7 else forms[rng.integers(0, len(forms))]) for s in scenes]
        out = model(input_ids=captions.ids(texts), pixel_values=clip_pixels([toyworld.render(s) for s in scenes]),
                    return_loss=True)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if check or step < 5 or step % 50 == 0:
            log.add(stage="clip", step=step, loss=round(float(out.loss), 7))
        if not check and (step % 100 == 0 or step == steps - 1):
            print(f"clip {step + 1}/{steps} loss {float(out.loss):.4f} {eta(step)}", flush=True)
    if not check:
        model.eval()
        save_atomic(model.state_dict(), state_dir / "clip.pt")
        acc = clip_eval(model, captions)
        log.add(stage="clip_done", steps=steps, **acc)
        print(f"clip done: {acc}", flush=True)
    return model


# ------------------------------------------------------------------------------------------------ export
SD_COMPONENTS = ("model_index.json", "scheduler", "unet", "vae", "text_encoder")


def export(out: Path, vae, unet, te, tokenizer, clip, log_lines: list[dict], status: dict) -> None:
    """Write toy-sd/ (a diffusers folder less its tokenizer: dbbatch adds the shared one) and toy-clip/ under
    `out` (e.g. dbbatch/assets), fp16, each with SHA256SUMS; other files there (dbbatch_defaults.json) stay."""
    import hashlib
    import tempfile

    from diffusers import DDIMScheduler
    from transformers import CLIPImageProcessor

    from dbbatch.models.assets import WEIGHT_SUMS
    from dbbatch.models.loading import save_folder

    def write_sums(folder: Path) -> None:
        lines = [f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.relative_to(folder).as_posix()}"
                 for p in sorted(folder.rglob("*.safetensors"))]
        (folder / WEIGHT_SUMS).write_text("\n".join(lines) + "\n")

    sd_dir = out / "toy-sd"
    sd_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        comps = dict(unet=unet, vae=vae, text_encoder=te, tokenizer=tokenizer, scheduler=DDIMScheduler.from_config(SCHEDULER_CONFIG))
        save_folder(comps, Path(tmp) / "toy-sd", dtype=torch.float16)
        for name in SD_COMPONENTS:
            target = sd_dir / name
            if target.is_dir():
                shutil.rmtree(target)
            (shutil.copytree if (Path(tmp) / "toy-sd" / name).is_dir() else shutil.copy)(Path(tmp) / "toy-sd" / name, target)
    write_sums(sd_dir)
    (sd_dir / "pretrain_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log_lines))
    (sd_dir / "pretrain_status.json").write_text(json.dumps(status, indent=2) + "\n")
    if clip is not None:
        clip_dir = out / "toy-clip"
        shutil.rmtree(clip_dir, ignore_errors=True)
        clip.to(torch.float16).save_pretrained(clip_dir, safe_serialization=True)
        clip.float()
        CLIPImageProcessor(size={"shortest_edge": toyworld.SIZE}, crop_size={"height": toyworld.SIZE, "width": toyworld.SIZE},
                           image_mean=CLIP_MEAN, image_std=CLIP_STD).save_pretrained(clip_dir)
        write_sums(clip_dir)
    print(f"exported {status} to {out}", flush=True)


def export_checkpoint(args, tokenizer) -> None:
    """Export the newest checkpoint's EMA weights (an intermediate model while the run goes on)."""
    vae = train_vae(args, Log(Path(os.devnull), []), args.state, 0) if (args.state / "vae.pt").is_file() else None
    saved = load_state(args.state / "sd-state.pt")
    unet, te = new_unet_and_text_encoder(tokenizer)
    unet.load_state_dict(saved["ema_unet"])
    te.load_state_dict(saved["ema_te"])
    clip = None
    if (args.state / "clip.pt").is_file():
        clip = new_clip(tokenizer)
        clip.load_state_dict(load_state(args.state / "clip.pt"))
    elif (args.state / "export" / "toy-clip" / "config.json").is_file():  # written by the first run's own export
        from transformers import CLIPModel

        clip = CLIPModel.from_pretrained(str(args.state / "export" / "toy-clip"), dtype=torch.float32)
    final = saved["step"] >= args.sd_steps and clip is not None
    export(args.export, vae, unet, te, tokenizer, clip, saved["log"] if not final else
           [json.loads(x) for x in (args.state / "log.jsonl").read_text().splitlines() if x.strip()],
           {"status": "final" if final else "intermediate", "sd_step": saved["step"], "sd_steps": args.sd_steps})


def load_shipped_vae(folder: Path):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(str(folder / "vae"), torch_dtype=torch.float32)
    vae.requires_grad_(False)
    vae.eval()
    return vae


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--state", type=Path, default=Path("/root/toy-pretrain"), help="checkpoints and the log (outside the repo)")
    p.add_argument("--export", type=Path, default=None, help="write toy-sd/, toy-clip/ and the log here when done")
    p.add_argument("--vae-steps", type=int, default=800)
    p.add_argument("--sd-steps", type=int, default=12000)
    p.add_argument("--clip-steps", type=int, default=1000)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--eval-every", type=int, default=1000)
    p.add_argument("--checkpoint-every", type=int, default=250)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--check-steps", type=int, default=0,
                   help="run only the first N steps of each stage (the UNet stage on the shipped VAE) and print "
                        "their log lines as JSON; compare with the committed log")
    p.add_argument("--export-checkpoint", action="store_true",
                   help="only export the newest checkpoint in --state to --export (while a run goes on)")
    p.add_argument("--shipped", type=Path, default=REPO / "dbbatch" / "assets", help="with --check-steps: the folder holding toy-sd/")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR))
    if args.export_checkpoint:
        export_checkpoint(args, tokenizer)
        return 0
    if args.check_steps:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            log = Log(Path(tmp) / "log.jsonl", [])
            n = args.check_steps
            train_vae(args, log, Path(tmp), n, check=True)
            train_sd(args, log, Path(tmp), load_shipped_vae(args.shipped / "toy-sd"), tokenizer, n, check=True)
            train_clip(args, log, Path(tmp), tokenizer, n, check=True)
            print(json.dumps(log.lines))
        return 0
    args.state.mkdir(parents=True, exist_ok=True)
    log_lines = []
    sd_state = args.state / "sd-state.pt"
    if sd_state.is_file():
        log_lines = load_state(sd_state)["log"]
    elif (args.state / "vae.pt").is_file() and (args.state / "log.jsonl").is_file():
        log_lines = [json.loads(x) for x in (args.state / "log.jsonl").read_text().splitlines() if x.strip()]
        log_lines = [r for r in log_lines if r["stage"] in ("vae", "vae_done", "run")]
    log = Log(args.state / "log.jsonl", log_lines)
    if not log_lines:
        log.add(stage="run", seed=args.seed, vae_steps=args.vae_steps, sd_steps=args.sd_steps,
                clip_steps=args.clip_steps, lr=args.lr, warmup=args.warmup, ema=args.ema, batch=BATCH,
                threads=args.threads, torch=str(torch.__version__))
    seconds_path = args.state / "seconds.json"
    seconds = json.loads(seconds_path.read_text()) if seconds_path.is_file() else {}

    def timed(name, fn):
        t0 = time.time()
        result = fn()
        seconds[name] = round(seconds.get(name, 0) + time.time() - t0, 1)
        seconds_path.write_text(json.dumps(seconds))
        return result

    vae = timed("vae", lambda: train_vae(args, log, args.state, args.vae_steps))
    vae.requires_grad_(False)
    vae.eval()
    unet, te = timed("sd", lambda: train_sd(args, log, args.state, vae, tokenizer, args.sd_steps))
    clip = timed("clip", lambda: train_clip(args, log, args.state, tokenizer, args.clip_steps))
    log.add(stage="done", seconds=seconds)
    if args.export:
        export(args.export, vae, unet, te, tokenizer, clip, log.lines,
               {"status": "final", "sd_step": args.sd_steps, "sd_steps": args.sd_steps, "seconds": seconds})
    return 0


if __name__ == "__main__":
    sys.exit(main())
