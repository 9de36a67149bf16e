"""Hugging Face hub ids -> local folders (the HF cache), failing in seconds with what to do when the hub cannot
be reached, instead of huggingface_hub's minute of retries.

Before downloading, one request with a short timeout checks that the hub answers. If it does not, a model already
in the local cache is used as is; otherwise the error suggests HF_HUB_OFFLINE=1 and a local path. With
HF_HUB_OFFLINE=1 only the cache is looked at.
"""

from __future__ import annotations

from pathlib import Path

from .errors import MoefitError

PROBE_TIMEOUT_S = 5.0
MODEL_FILES = ["*.json", "*.safetensors", "*.jinja", "tokenizer*"]
TOKENIZER_FILES = ["tokenizer*", "*.jinja", "special_tokens_map.json", "config.json", "*.tiktoken", "vocab*",
                   "merges.txt"]


def is_hub_id(source: str) -> bool:
    """owner/name, not a path that exists or starts like one."""
    return (source.count("/") == 1 and not source.startswith((".", "/", "~")) and not Path(source).exists()
            and all(source.split("/")))


def _unreachable(endpoint: str) -> str | None:
    """None when the hub answers (any HTTP status), else why not."""
    from huggingface_hub.utils import get_session

    try:
        get_session().head(endpoint, timeout=PROBE_TIMEOUT_S)
    except Exception as e:  # connection refused, DNS failure, timeout, proxy error
        return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
    return None


def _cached(repo_id: str, patterns: list[str]) -> Path | None:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except Exception:  # not in the cache (or an incomplete snapshot)
        return None


def snapshot(repo_id: str, patterns: list[str] | None = None) -> Path:
    """The local folder of `repo_id` holding the files that match `patterns` (default: config, safetensors and
    tokenizer files), downloaded into the HF cache when needed."""
    from huggingface_hub import constants, snapshot_download

    patterns = patterns or MODEL_FILES
    if constants.is_offline_mode():
        if (found := _cached(repo_id, patterns)) is not None:
            return found
        raise MoefitError(f"model {repo_id!r}: not in the local Hugging Face cache ({constants.HF_HUB_CACHE}), and "
                          "HF_HUB_OFFLINE is set, so it is not downloaded. Pass a local model directory, or download "
                          f"it once where there is network (`hf download {repo_id}`).")
    why = _unreachable(constants.ENDPOINT)
    if why is not None:
        if (found := _cached(repo_id, patterns)) is not None:
            return found
        raise MoefitError(f"model {repo_id!r}: the Hugging Face hub ({constants.ENDPOINT}) cannot be reached ({why}) "
                          "and the model is not in the local cache. Offline? Pass a local model directory, or set "
                          "HF_HUB_OFFLINE=1 to use the models already in the cache without trying the network.")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:  # network, auth, gated repo: all the user's to fix, so say it plainly
        raise MoefitError(f"model {repo_id!r}: could not download it from the Hugging Face hub ({type(e).__name__}: "
                          f"{(str(e).splitlines() or [''])[0]}). Check the id, run `hf auth login` for gated "
                          "models, or pass a local directory (HF_HUB_OFFLINE=1 uses only the local cache).") from None
