"""Memory a model pass needs, from the bundle's config, and the memory this machine has free for it.

A 1 mm decode of the UK Biobank autoencoder adds about 11 GB whole (4 GB sliced): on a laptop that can
be more than there is, and the kernel would then kill the process (the app with it) minutes into the
work. :func:`require_memory` refuses such a job before any of it is done, with a message that says what
is needed and what is free.

Free memory: on a CUDA device, what the driver reports free; on the CPU, the kernel's ``MemAvailable``
(memory that can be had without swapping), bounded by the process's cgroup limit where one is set
(a container). Elsewhere (no ``/proc``) nothing is known and nothing is refused.
"""

from __future__ import annotations

from pathlib import Path

from synthbrain.errors import InsufficientMemoryError

GB = 1024**3
CGROUP = Path("/sys/fs/cgroup")
# a VQ-VAE (no estimate of its own): live feature maps of its widest level in a decode or an encode
VQ_MAPS = 4


def element_bytes(precision: str = "fp32") -> int:
    """Bytes of one feature-map value in a pass run at ``precision`` (a resolved one: fp32, bf16, fp16).
    Under bf16 autocast the sliced 1 mm decode of the UK Biobank autoencoder added 1.86 GB where fp32
    added 3.6 (benchmarks/results.md): half, as the feature maps are."""
    return 4 if precision == "fp32" else 2


def decode_bytes(autoencoder_config, shape: tuple[int, ...], sliced: bool = False, batch: int = 1,
                 precision: str = "fp32") -> int:
    """Bytes a decode of ``batch`` latents to volumes of spatial ``shape`` adds at its peak, run at
    ``precision`` (fp32, or bf16 / fp16 autocast)."""
    element = element_bytes(precision)
    if hasattr(autoencoder_config, "decode_bytes"):
        return autoencoder_config.decode_bytes(tuple(shape), sliced=sliced, batch=batch, element=element)
    return VQ_MAPS * element * batch * autoencoder_config.feature_map_elements(tuple(shape))


def encode_bytes(autoencoder_config, shape: tuple[int, ...], batch: int = 1) -> int:
    """Bytes an encode of ``batch`` volumes of spatial ``shape`` adds at its peak (float32)."""
    if hasattr(autoencoder_config, "encode_bytes"):
        return autoencoder_config.encode_bytes(tuple(shape), batch=batch)
    return VQ_MAPS * 4 * batch * autoencoder_config.feature_map_elements(tuple(shape))


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _cgroup_room() -> int | None:
    """The cgroup (v2) limit less what the cgroup uses, where a limit is set."""
    try:
        limit = (CGROUP / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return max(0, int(limit) - int((CGROUP / "memory.current").read_text().strip()))
    except (OSError, ValueError):
        return None


def available_bytes(device=None) -> int | None:
    """Memory free for a model pass on ``device`` (a torch device or its name; default the CPU), in
    bytes; None where it cannot be known."""
    name = str(device or "cpu")
    if name.startswith("cuda"):
        import torch

        return int(torch.cuda.mem_get_info(torch.device(name))[0])
    known = [v for v in (_meminfo_available(), _cgroup_room()) if v is not None]
    return min(known) if known else None


def require_memory(need: int, device=None, what: str = "this job") -> None:
    """Raise :class:`InsufficientMemoryError` when ``device`` has less than ``need`` bytes free."""
    free = available_bytes(device)
    if free is None or free >= need:
        return
    where = "GPU memory" if str(device or "cpu").startswith("cuda") else "memory"
    raise InsufficientMemoryError(
        f"{what} needs about {size_text(need)} of {where}, but only {size_text(free)} is free on this machine; "
        f"nothing was started. Close other programs or jobs, or use a machine with more {where}")


def size_text(n: int) -> str:
    """Bytes as GB to one decimal (MB below 0.1 GB)."""
    return f"{n / GB:.1f} GB" if n >= 0.1 * GB else f"{n / 2**20:.0f} MB"
