"""Checkpoint manifests: a sha256 of every file, a fingerprint of the data and of the config.

`save_checkpoint` writes `manifest.json` just before the `complete` marker; `--resume` checks it (`verified`), so
a truncated or bit-flipped file sends the resume to the previous checkpoint instead of into a traceback, and a
resume on other data or another recipe is reported instead of silently training something else.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from ..config import RunConfig
from ..errors import MoefitError

MANIFEST = "manifest.json"

# Settings that do not change what a step computes: a resume may change them without a warning.
_NOT_TRAINING = {"output_dir", "smoke", "plan", "train.max_steps", "train.epochs", "train.eval_every",
                 "train.eval_batches", "train.save_every", "train.keep_checkpoints", "train.log_every",
                 "train.device", "train.num_threads",
                 # how the host issues the same arithmetic (the same kernels, masks and bits), or where the saved
                 # layer inputs wait (the same bits back): the trainer may turn the graphs off, or the offloading
                 # on, where memory does not fit, e.g. when a run resumes on a smaller GPU
                 "engine.layer_graphs", "engine.backward_graphs", "engine.gc_freeze", "engine.lora_cast_cache",
                 "train.offload_checkpoints"}


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def training_settings(cfg: RunConfig) -> dict[str, Any]:
    """The config flattened to dotted keys, without the settings a resume may change freely."""
    flat: dict[str, Any] = {}

    def walk(node: dict[str, Any], prefix: str) -> None:
        for k, v in node.items():
            key = prefix + k
            if key in _NOT_TRAINING:
                continue
            if isinstance(v, dict):
                walk(v, key + ".")
            else:
                flat[key] = v

    walk(cfg.to_dict(), "")
    return flat


def config_fingerprint(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_identity(cfg: RunConfig, data_fingerprint: str) -> dict[str, Any]:
    """What a checkpoint records about the run that wrote it (the manifest's non-file part)."""
    settings = training_settings(cfg)
    return {"data_fingerprint": data_fingerprint, "config_fingerprint": config_fingerprint(settings),
            "config": settings}


def write_manifest(folder: Path, identity: dict[str, Any] | None) -> None:
    """Hash every file in `folder` (a checkpoint being written) into folder/manifest.json. Rank 0 only."""
    files = {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
             for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}
    (folder / MANIFEST).write_text(json.dumps({"files": files, **(identity or {})}, indent=1), encoding="utf-8")


def read_manifest(checkpoint: Path) -> dict[str, Any] | None:
    """The manifest, or None for a checkpoint written before manifests existed. Raises MoefitError when broken."""
    path = checkpoint / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(manifest.get("files"), dict):
            raise ValueError("no file list")
    except (ValueError, UnicodeDecodeError) as e:
        raise MoefitError(f"{path} is damaged ({e}).") from None
    return manifest


def problem(checkpoint: Path) -> str | None:
    """Why `checkpoint` cannot be trusted (a missing, truncated or changed file), or None when it verifies."""
    try:
        manifest = read_manifest(checkpoint)
    except MoefitError as e:
        return str(e)
    if manifest is None:
        return None  # older checkpoint: nothing to check against; loading it still fails cleanly (load_checkpoint)
    for name, want in manifest["files"].items():
        path = checkpoint / name
        if not path.is_file():
            return f"{path} is missing."
        size = path.stat().st_size
        if size != want["bytes"]:
            return f"{path} has {size:,} bytes, the manifest says {want['bytes']:,} (truncated?)."
        if sha256_file(path) != want["sha256"]:
            return f"{path} does not match its checksum (the file changed after it was written)."
    return None


def pick_verified(candidates: list[Path]) -> tuple[Path, list[str]]:
    """The newest checkpoint of `candidates` (oldest first) that verifies, and a note for each newer one skipped.

    Raises MoefitError naming every damaged checkpoint when none verifies."""
    notes = []
    for path in reversed(candidates):
        why = problem(path)
        if why is None:
            if notes:
                notes.append(f"resuming from {path}, the newest checkpoint that verifies.")
            return path, notes
        notes.append(f"warning: checkpoint {path} is damaged and is skipped: {why}")
    raise MoefitError("cannot resume: no checkpoint verifies. " + " ".join(n.removeprefix("warning: ") for n in notes)
                      + " Start the run again with --overwrite.")


def identity_changes(checkpoint: Path, now: dict[str, Any]) -> list[str]:
    """Warnings when the data or the training settings differ from those the checkpoint was written with."""
    manifest = read_manifest(checkpoint) or {}
    out = []
    old_fp = manifest.get("data_fingerprint")
    if old_fp and old_fp != now["data_fingerprint"]:
        out.append(f"warning: the training data changed since {checkpoint} was written (fingerprint {old_fp} -> "
                   f"{now['data_fingerprint']}): the resumed run continues at the saved position in different "
                   "data, and does not reproduce an uninterrupted run.")
    old_cfg = manifest.get("config")
    if isinstance(old_cfg, dict) and manifest.get("config_fingerprint") != now["config_fingerprint"]:
        diffs = [f"{k} {old_cfg.get(k)!r} -> {now['config'].get(k)!r}"
                 for k in sorted(set(old_cfg) | set(now["config"]))
                 if old_cfg.get(k) != now["config"].get(k) and k not in _NOT_TRAINING]  # (older manifests had some)
        if diffs:
            out.append(f"warning: the config changed since {checkpoint} was written: {', '.join(diffs)}.")
    return out
