"""Whether bf16 compute suits this CPU: detection, a measured slowdown, and a one-time warning.

CPUs differ: with AVX512_BF16 or AMX a bf16 matmul is several times faster than fp32; on an
AVX2-only CPU oneDNN emulates it, 60-600x slower. ``precision: auto`` is fp32 on CPU; an
explicit bf16 there warns once with the measured reason.
"""

from __future__ import annotations

import functools
import time
import warnings


def cpu_bf16_native() -> tuple[bool, str]:
    """Whether this CPU has bf16 dot-product instructions, and what torch reports about it.

    Without AVX512_BF16 / AMX_BF16 (x86) or BF16 / SVE_BF16 (Arm), oneDNN emulates bf16
    matmuls through fp32 conversions, far slower than fp32 itself.
    """
    import torch

    caps = getattr(torch.cpu, "get_capabilities", lambda: {
        "avx512_bf16": torch.cpu._is_avx512_bf16_supported(), "amx_bf16": torch.cpu._is_amx_tile_supported()})()
    flags = [f for f in ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16") if caps.get(f)]
    found = "+".join(flags).upper() if flags else "no AVX512_BF16/AMX_BF16"
    return bool(flags), f"cpu capability {torch.backends.cpu.get_cpu_capability()}, {found}"


def bf16_matmul_slowdown(n: int = 256, reps: int = 5) -> float:
    """Time of an n x n bf16 matmul over the fp32 one on this CPU (best of ``reps``, one thread).

    One thread: with several, a core busy elsewhere stalls OpenMP's barriers and the ratio
    measures the contention, not the arithmetic.
    """
    import torch

    def once(x) -> float:
        t0 = time.perf_counter()
        torch.mm(x, x)
        return time.perf_counter() - t0

    def best(dtype) -> float:
        x = torch.randn(n, n).to(dtype)
        once(x)  # the first call pays oneDNN's kernel setup
        return min(once(x) for _ in range(reps))

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return best(torch.bfloat16) / best(torch.float32)
    finally:
        torch.set_num_threads(threads)


@functools.lru_cache(maxsize=1)
def warn_if_cpu_bf16_emulated() -> bool:
    """Warn (once per process) when bf16 compute on this CPU is emulated; returns whether it is native."""
    native, caps = cpu_bf16_native()
    if not native:
        warnings.warn(f"precision: bf16 on a CPU without native bf16 ({caps}): a bf16 matmul takes "
                      f"{bf16_matmul_slowdown():.0f}x the fp32 time here; precision: fp32 (or auto) is faster",
                      stacklevel=3)
    return native
