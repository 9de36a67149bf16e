"""Export a trained run: a merged HF checkpoint (plain transformers / vLLM load it) or the adapter in PEFT's format.

    moefit.export("runs/tiny-…", out="merged/")                        # merged, NF4-dequantized base + LoRA
    moefit.export("runs/scout1", out="merged/", base="/models/Scout")   # merged into the original bf16 weights
    moefit.export("runs/scout1", out="adapter/", merge=False)          # PEFT adapter
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from ..rundir import RunInfo, read_run
from .merge import ExportReport, merged_export
from .peft_adapter import peft_export

__all__ = ["ExportReport", "RunInfo", "export", "merged_export", "parse_size", "peft_export", "read_run"]


def parse_size(size: str | int) -> int:
    """'5GB' -> 5e9 bytes, '500MB', '2GiB', or a plain number of bytes."""
    if isinstance(size, int):
        return size
    s = size.strip().upper().replace(" ", "")
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    for unit, mult in units.items():
        if s.endswith(unit):
            try:
                return int(float(s[: -len(unit)]) * mult)
            except ValueError:
                break
    try:
        return int(s)
    except ValueError:
        from ..errors import MoefitError

        raise MoefitError(f"size {size!r}: expected a number of bytes or e.g. 5GB, 500MB, 2GiB.") from None


def export(run_dir: str | Path, out: str | Path, merge: bool = True, adapter: bool | None = None,
           base: str | Path | None = None, dtype: torch.dtype | str = "bfloat16", max_shard_size: str | int = "5GB",
           device: str = "auto", overwrite: bool = False, workers: int | None = None,
           progress: bool | Callable[[int, int], None] = False, pinned: bool = True) -> ExportReport:
    """Export the run in `run_dir` (or an adapter directory) to `out`.

    merge=True: an HF checkpoint with the base's architecture class, config and tensor names. The base weights
    are the NF4-dequantized ones the run trained against, or, with `base=` the original (bf16) checkpoint,
    which avoids NF4 rounding and is the better choice when you have it.
    merge=False (or adapter=True): the adapter in PEFT's format.
    `device`: where the merge arithmetic and any decoding (NF4 round trip, FP8, MXFP4) run: auto = the GPU when
    there is one, else cpu. `workers`: threads making and writing the shards' pieces concurrently (default: the
    CPUs, at most 8); host memory holds about one piece (a weight, or one expert's slice) per worker.
    `progress`: True prints bytes written and MB/s to stderr (or pass a callable(done_bytes, total_bytes)).
    `pinned`: on a GPU, each worker copies through a reused page-locked host buffer (False: pageable tensors).
    """
    from ..dtypes import resolve_dtype

    if adapter is not None:
        merge = not adapter
    info = read_run(run_dir)
    if merge:
        return merged_export(info, Path(out), base=Path(base) if base else None, dtype=resolve_dtype(dtype),
                             max_shard_bytes=parse_size(max_shard_size), device=device, overwrite=overwrite,
                             workers=workers, progress=progress, pinned=pinned)
    return peft_export(info, Path(out), base=Path(base) if base else None, overwrite=overwrite)


from .._callable import make_module_callable  # noqa: E402

make_module_callable(__name__, export)
