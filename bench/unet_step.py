#!/usr/bin/env python
"""Lower bound for `bench/run.py --arch sd15`: the bare UNet training step (no Lightning, no data), on a GPU.

    python bench/unet_step.py [--arch sd15] [--resolution 512]

Times forward + backward + AdamW (+ grad-norm clipping, as dbbatch trains) of the built-in architecture's UNet
under bf16 autocast, batch 2 (1 instance + 1 class), in variants that isolate what a step costs: host time to
enqueue the step vs device time, cudnn autotuning, channels-last, fused AdamW. The gap between the
worker's median step and these says what Lightning and the data path add.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> int:
    import torch
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    from dbbatch.models.builtin import ARCHS

    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="sd15")
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    spec = ARCHS[args.arch]
    lat = args.resolution // 2 ** (len(spec["vae"]["block_out_channels"]) - 1)
    dev = torch.device("cuda")
    torch.manual_seed(0)
    with dev:
        unet = UNet2DConditionModel(**spec["unet"]).train()
    x = torch.randn(2, 4, lat, lat, device=dev)
    ctx = torch.randn(2, 77, spec["unet"]["cross_attention_dim"], device=dev)
    t = torch.tensor([10, 500], device=dev)

    def step_fn(opt, mf):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            pred = unet(x.to(memory_format=mf), t, encoder_hidden_states=ctx).sample
        loss = torch.nn.functional.mse_loss(pred.float(), x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    with FlopCounterMode(display=False) as fc:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            pred = unet(x, t, encoder_hidden_states=ctx).sample
        pred.float().pow(2).mean().backward()
    unet.zero_grad(set_to_none=True)
    flops = fc.get_total_flops()
    print(f"UNet fwd+bwd FLOPs per step (batch 2, {lat}x{lat} latents): {flops / 1e12:.3f} TFLOP")

    rows = []
    for name, bench_flag, mf, fused in (
        ("baseline (as dbbatch: foreach AdamW)", False, torch.contiguous_format, False),
        ("+ cudnn.benchmark", True, torch.contiguous_format, False),
        ("+ cudnn.benchmark + fused AdamW", True, torch.contiguous_format, True),
        ("+ cudnn.benchmark + channels_last", True, torch.channels_last, False),
    ):
        torch.backends.cudnn.benchmark = bench_flag
        unet.to(memory_format=mf)
        opt = torch.optim.AdamW(unet.parameters(), lr=1e-6, fused=fused)
        for _ in range(5):
            step_fn(opt, mf)
        torch.cuda.synchronize()
        host, total = [], []
        for _ in range(args.steps):
            s = time.perf_counter()
            loss = step_fn(opt, mf)
            h = time.perf_counter()
            float(loss)  # dbbatch reads the loss every step: one sync per step, as here
            e = time.perf_counter()
            host.append(h - s)
            total.append(e - s)
        med = statistics.median(total)
        rows.append((name, med, statistics.median(host), flops / med / 1e12))
        del opt
        torch.cuda.empty_cache()
    # Batch 8 (4 instance + 4 class): if a step costs about the same, the batch-2 step is bound by overheads.
    torch.backends.cudnn.benchmark = False
    unet.to(memory_format=torch.contiguous_format)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-6)
    x, ctx, t = x.repeat(4, 1, 1, 1), ctx.repeat(4, 1, 1), t.repeat(4)
    for _ in range(3):
        step_fn(opt, torch.contiguous_format)
    torch.cuda.synchronize()
    s = time.perf_counter()
    for _ in range(10):
        float(step_fn(opt, torch.contiguous_format))
    med = (time.perf_counter() - s) / 10
    rows.append(("batch 8 instead of 2 (FLOPs x4)", med, float("nan"), 4 * flops / med / 1e12))
    # Where a batch-2 step's device time goes: busy time per step vs wall, and the top kernels.
    x, ctx, t = x[:2], ctx[:2], t[:2]
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):
        step_fn(opt, torch.contiguous_format)
    torch.cuda.synchronize()
    s = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            float(step_fn(opt, torch.contiguous_format))
    wall = (time.perf_counter() - s) / 3
    events = prof.key_averages()
    # Kernels only: the optimizer's annotation range also carries device time, over the same kernels.
    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA
               and not getattr(e, "is_user_annotation", False) and "#" not in e.name]
    busy = sum(e.time_range.elapsed_us() for e in kernels) / 3 / 1e6
    launches = sum(e.count for e in events if e.key.startswith(("cudaLaunchKernel", "cuLaunchKernel"))) / 3
    print(f"profiled batch-2 step: wall {wall:.4f}s (profiler on), GPU busy {busy:.4f}s ({busy / wall:.0%}), {launches:.0f} kernel launches")
    print(events.table(sort_by="self_device_time_total", row_limit=12, max_name_column_width=60))
    print(f"{'variant':44}{'s/step':>10}{'host s':>10}{'TFLOP/s':>10}")
    for name, med, host, tf in rows:
        print(f"{name:44}{med:10.4f}{host:10.4f}{tf:10.1f}")
    print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
