"""Where bfloat16 autocast pays: the devices whose bf16 products are faster than float32 ones."""
from __future__ import annotations

import contextlib

import torch


def fast_bfloat16(device: torch.device | str) -> bool:
    """Whether bfloat16 products run faster than float32 on `device`: GPUs with bf16 support, and
    CPUs with AVX-512 BF16 or AMX (2.7x for SmolLM2's forward on this project's 2-core CPU; a
    CPU without them emulates bf16 and runs it slower than float32)."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            return torch.cuda.is_bf16_supported()
        except (AssertionError, RuntimeError):  # a GPU described, not present (a preflight for another machine)
            return True
    if device.type != "cpu":
        return False
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def bfloat16_autocast(device: torch.device | str, weights_dtype: torch.dtype, enabled: bool = True):
    """bfloat16 autocast on `device` for float32 weights where `fast_bfloat16`; else a no-op
    (weights already in a 16-bit dtype run as they are)."""
    device = torch.device(device)
    if enabled and weights_dtype == torch.float32 and fast_bfloat16(device):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
