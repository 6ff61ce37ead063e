"""Is torch.compile's UNet backward right on this device? Gradients of the trainer's UNet (with its LoRA)
through torch.compile against eager, per backend, plus the first compiled step's time.

    python benchmarks/compile_check.py                 # the tiny UNet on CPU (or on CUDA when there is one)
    python benchmarks/compile_check.py --full          # SD-1.5's UNet, random weights, bf16 (GPU)

Found on torch 2.13.0+cpu (2026-11-23): inductor's CPU backward of diffusers' UpBlock2D returns zero
gradients (the forward matches; aot_eager and aot_eager_decomp_partition are exact), so the whole tiny
UNet's input gradient is 64 % off. A compile fast path needs this check to pass on the GPU first.
"""

import argparse
import sys
import time

import torch

from palp_trainer.families.base import add_lora, load_base


def unet_grads(unet, x, t, enc, target, params) -> tuple[torch.Tensor, ...]:
    x = x.clone().requires_grad_()
    out = unet(x, t, enc).sample
    loss = (out.float() - target).square().mean()  # the denoising loss (Eq. 1)
    return torch.autograd.grad(loss, (x, *params))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--full", action="store_true", help="SD-1.5's UNet (random weights), bf16, 64x64 latents")
    parser.add_argument("--backends", nargs="+", default=["aot_eager", "inductor"])
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    if args.full:
        from step_bench import SD15_UNET  # this script's folder is on sys.path
        from diffusers import UNet2DConditionModel
        unet, dtype, size, width = UNet2DConditionModel(**SD15_UNET), torch.bfloat16, 64, 768
    else:
        unet, dtype, size, width = load_base("tiny").denoiser, torch.float32, 16, 32
    unet.requires_grad_(False)
    params = add_lora(unet, 4)
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn_like(p))  # LoRA B starts at zero: make every grad non-trivial
    for p in unet.parameters():
        if not p.requires_grad:
            p.data = p.data.to(dtype)
    unet.to(device)
    g = torch.Generator().manual_seed(1)
    x, target = (torch.randn(2, 4, size, size, generator=g).to(device, dtype) for _ in range(2))
    enc = torch.randn(2, 77, width, generator=g).to(device, dtype)
    t = torch.tensor([10, 700], device=device)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        eager = unet_grads(unet, x, t, enc, target.float(), params)
        failed = False
        for backend in args.backends:
            torch._dynamo.reset()
            started = time.perf_counter()
            got = unet_grads(torch.compile(unet, backend=backend), x, t, enc, target.float(), params)
            seconds = time.perf_counter() - started
            errors = [((a - b).float().norm() / b.float().norm()).item() for a, b in zip(got, eager)]
            ok = max(errors) < (1e-4 if dtype == torch.float32 else 5e-2)
            failed |= not ok
            print(f"{backend:>28}: first step {seconds:6.1f} s, worst relative grad error {max(errors):.2e} "
                  f"(input {errors[0]:.2e}) {'ok' if ok else 'WRONG'}", flush=True)
    print(f"device {device}, torch {torch.__version__}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
