"""Hub ids without network (moefit.hub): the endpoint is a closed local port, never the real hub. Fails in
seconds with HF_HUB_OFFLINE=1 suggested, uses a model already in the cache, and a model folder without tokenizer
files says exactly that."""

from __future__ import annotations

import logging
import shutil
import time

import pytest
from huggingface_hub import constants

from moefit.assets import tiny_model_dir
from moefit.cli import main
from moefit.data import load_tokenizer
from moefit.errors import MoefitError
from moefit.loading import resolve_source

REPO = "someorg/no-such-model"


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """The hub at a closed local port, an empty cache, online mode."""
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return tmp_path / "hub"


def _cache(hub, repo: str) -> None:
    """A snapshot in the HF cache layout, as `hf download` leaves it (the tiny model's files)."""
    d = hub / f"models--{repo.replace('/', '--')}"
    (d / "refs").mkdir(parents=True)
    (d / "refs" / "main").write_text("0" * 40)
    shutil.copytree(tiny_model_dir(), d / "snapshots" / ("0" * 40), ignore=shutil.ignore_patterns("__*"))


def test_unreachable_hub_fails_in_seconds(no_network, caplog, capsys, tmp_path):
    caplog.set_level(logging.WARNING)
    for load in (load_tokenizer, resolve_source):
        t = time.perf_counter()
        with pytest.raises(MoefitError) as e:
            load(REPO)
        assert time.perf_counter() - t < 10  # was ~50 s of retries
        msg = str(e.value)
        assert "http://127.0.0.1:9) cannot be reached" in msg and "not in the local cache" in msg
        assert "HF_HUB_OFFLINE=1" in msg and "local model directory" in msg
    assert "Retrying" not in caplog.text
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "hello"}\n')
    assert main(["data", "check", str(data), "--model", REPO]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "HF_HUB_OFFLINE=1" in err and "Traceback" not in err


def test_plan_of_a_hub_id_offline(no_network, capsys):
    t = time.perf_counter()
    assert main(["plan", "--model", REPO, "--gpu", "h200"]) == 2
    err = capsys.readouterr().err
    assert time.perf_counter() - t < 10 and "cannot be reached" in err and "use a preset" in err
    _cache(no_network, REPO)  # the tiny model's config.json, from the cache
    assert main(["plan", "--model", REPO, "--gpu", "h200"]) == 0
    assert "4 experts top-1" in capsys.readouterr().out


def test_a_cached_model_is_used_when_the_hub_is_unreachable(no_network):
    _cache(no_network, REPO)
    assert resolve_source(REPO).name == "0" * 40
    assert load_tokenizer(REPO).chat_template


def test_offline_mode_reads_only_the_cache(no_network, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(MoefitError, match="not in the local Hugging Face cache .* HF_HUB_OFFLINE is set"):
        resolve_source(REPO)
    _cache(no_network, REPO)
    assert (resolve_source(REPO) / "config.json").is_file()


def test_not_a_hub_id(no_network):
    with pytest.raises(MoefitError, match="not a directory and not a hub id"):
        resolve_source("./missing-folder")
    with pytest.raises(MoefitError, match="no such folder, and not a hub id"):
        load_tokenizer("missing-folder")


def test_model_folder_without_tokenizer_files(tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    for f in ("config.json", "generation_config.json"):
        shutil.copy(tiny_model_dir() / f, model / f)
    with pytest.raises(MoefitError, match=f"{model}: this model folder has no tokenizer files"):
        load_tokenizer(model)
    (tmp_path / "run.yaml").write_text(f"model: {model}\n")
    assert main(["data", "check", str(tmp_path / "run.yaml")]) == 2  # the shipped data: one error, not 200 records
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no tokenizer files" in err and "bad record" not in err
