"""Load a model's tokenizer (with its chat template) from a local folder or the embedded tiny model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import MoefitError


def resolve_model_path(model: str | Path) -> Path | str:
    """'tiny' is the embedded model; an existing folder is used as is; anything else is a hub id."""
    from ..config import TINY_MODEL

    if str(model) == TINY_MODEL:
        from ..assets import tiny_model_dir

        return tiny_model_dir()
    p = Path(model)
    return p if p.exists() else str(model)


def load_tokenizer(model: str | Path) -> Any:
    """The transformers tokenizer of `model`; a pad token is set (to eos) when the tokenizer has none."""
    from transformers import AutoTokenizer

    where = resolve_model_path(model)
    if isinstance(where, Path) and not where.is_dir():
        raise MoefitError(f"{where}: not a model folder. Pass a folder with tokenizer files "
                          "(tokenizer.json, tokenizer_config.json) or a hub id.")
    try:
        tok = AutoTokenizer.from_pretrained(str(where))
    except Exception as e:  # OSError (missing files / no network), ValueError (unknown tokenizer class), ...
        raise MoefitError(f"cannot load the tokenizer of {model} ({type(e).__name__}: {(str(e).splitlines() or [''])[0]}). "
                          "Pass a local model folder that holds tokenizer.json and tokenizer_config.json.") from None
    if tok.pad_token_id is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok
