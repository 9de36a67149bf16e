"""Load a model's tokenizer (with its chat template) from a local folder, a hub id or the embedded tiny model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import MoefitError

# Files any transformers tokenizer is loaded from (fast tokenizer, its config, sentencepiece / BPE / tiktoken).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "tiktoken.model")


def resolve_model_path(model: str | Path) -> Path:
    """'tiny' is the embedded model; an existing folder is used as is; an owner/name hub id is fetched (its
    tokenizer files only) into the HF cache, failing fast when offline (moefit.hub)."""
    from ..config import TINY_MODEL
    from ..hub import TOKENIZER_FILES as HUB_PATTERNS
    from ..hub import is_hub_id, snapshot

    if str(model) == TINY_MODEL:
        from ..assets import tiny_model_dir

        return tiny_model_dir()
    p = Path(model).expanduser()
    if p.exists():
        return p
    if not is_hub_id(str(model)):
        raise MoefitError(f"model {str(model)!r}: no such folder, and not a hub id (owner/name). Pass a local model "
                          "folder with tokenizer files, a hub id, or 'tiny'.")
    return snapshot(str(model), HUB_PATTERNS)


def load_tokenizer(model: str | Path) -> Any:
    """The transformers tokenizer of `model`; a pad token is set (to eos) when the tokenizer has none."""
    from transformers import AutoTokenizer

    where = resolve_model_path(model)
    if not where.is_dir():
        raise MoefitError(f"{where}: not a model folder. Pass a folder with tokenizer files "
                          "(tokenizer.json, tokenizer_config.json) or a hub id.")
    if not any((where / f).is_file() for f in TOKENIZER_FILES) and not any(where.glob("*.tiktoken")):
        raise MoefitError(f"{where}: this model folder has no tokenizer files (none of {', '.join(TOKENIZER_FILES)}). "
                          "Copy them (and chat_template.jinja if the model has one) from the original model "
                          "into the folder, or pass a folder that has them.")
    try:
        tok = AutoTokenizer.from_pretrained(str(where))
    except Exception as e:  # ValueError (unknown tokenizer class), OSError (a broken file), ...
        raise MoefitError(f"cannot load the tokenizer of {model} ({type(e).__name__}: {(str(e).splitlines() or [''])[0]}). "
                          "Pass a local model folder that holds tokenizer.json and tokenizer_config.json.") from None
    if tok.pad_token_id is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok
