"""The merged export's write path alone: `write_shards` with pieces that cost nothing to make (a prepared tensor),
so what is measured is the worker threads copying bytes into the shard files (os.pwrite into the page cache),
with and without each shard preallocated (`preallocate_file`). Runs anywhere (no GPU).

    python benchmarks/shard_write_speed.py [--gb 3] [--piece-mb 168] [--workers 1 2 8] [--shards 1] [--dir /tmp/x]

Each row: GB/s of write_shards (the bytes in the page cache, not on disk), best of --repeats. Prints a table.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from moefit.export.safetensors_stream import Piece, PlannedTensor, plan_shards, write_shards  # noqa: E402


def run(directory: Path, gb: float, piece_mb: int, workers: int, shards: int, preallocate: bool) -> float:
    piece = torch.randint(0, 255, (piece_mb * 2**20,), dtype=torch.uint8).view(torch.bfloat16)
    n = max(1, int(gb * 2**30) // piece.nbytes)
    tensors = [PlannedTensor(f"t{i}", "BF16", (piece.numel(),)) for i in range(n)]
    groups = plan_shards(tensors, max(1, -(-n // shards)) * piece.nbytes)
    pieces = {t.name: [Piece(t.nbytes, lambda: piece)] for t in tensors}
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    out = [(directory / f"s{i}.safetensors", g) for i, g in enumerate(groups)]
    t = time.perf_counter()
    stats = write_shards(out, pieces, workers=workers, preallocate=preallocate)
    seconds = time.perf_counter() - t
    shutil.rmtree(directory, ignore_errors=True)
    return stats.bytes / 1e9 / seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=3.0)
    ap.add_argument("--piece-mb", type=int, default=168, help="one Maverick expert's gate_up slice is 168 MB")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 8])
    ap.add_argument("--shards", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/moefit-shard-write"))
    args = ap.parse_args()
    print(f"{os.cpu_count()} CPUs, {args.gb} GB in pieces of {args.piece_mb} MB, {args.shards} shard(s), "
          f"best of {args.repeats}")
    print("| workers | preallocated | GB/s |\n|---|---|---|")
    for w in args.workers:
        for pre in (False, True):
            best = max(run(args.dir, args.gb, args.piece_mb, w, args.shards, pre) for _ in range(args.repeats))
            print(f"| {w} | {'yes' if pre else 'no'} | {best:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
