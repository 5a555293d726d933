"""Adapters on the Hugging Face Hub: ``AdaptiveLoraConfig.from_pretrained`` and ``peft-adaptive inspect`` read the
sidecar through ``huggingface_hub``. Offline: the repos are laid out in a temporary hub cache the way the hub
client stores them (``models--owner--name/{blobs,snapshots/<commit>,refs/main}``), with ``HF_HUB_OFFLINE``."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants as hub_constants
from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError
from peft import LoraConfig, get_peft_model

import peft_adaptive.hub_files
from peft_adaptive import AdaptiveLoraConfig, inspect_adapter
from peft_adaptive.cli import main
from peft_adaptive.config import ADAPTIVE_CONFIG_NAME
from peft_adaptive.hub_files import fetch_adapter_file

from .tiny_models import adaptive_model, tiny_llama, token_batch

OLD = "1" * 40  # commit of the adapter before the reallocation
NEW = "2" * 40  # commit of the adapter after it (refs/main)
PLAIN = "3" * 40
SUBFOLDER = "runs/first"


def add_to_cache(cache: Path, repo_id: str, commit: str, folder: Path, subfolder: str = "", main: bool = True) -> None:
    """Store ``folder``'s files as huggingface_hub does: content-addressed blobs, snapshot symlinks, a ref."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    for file in folder.iterdir():
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / subfolder / file.name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    if main:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(commit)


def mark_absent(cache: Path, repo_id: str, commit: str, filename: str) -> None:
    """What the hub client records after an online look-up found no such file at ``commit``."""
    marker = cache / f"models--{repo_id.replace('/', '--')}" / ".no_exist" / commit / filename
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict:
    """An adaptive adapter saved before and after its reallocation, and a plain LoRA adapter."""
    root = tmp_path_factory.mktemp("adapters")
    model = adaptive_model(max_r=12, target_modules=["q_proj", "v_proj"])
    model.save_pretrained(root / "before")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.start_signal_collection()
    for step in range(3):
        batch = token_batch(seed=step)
        model(input_ids=batch, labels=batch).loss.backward()
        model.record_gradients()
        optimizer.step()
        optimizer.zero_grad()
    model.reallocate(optimizer, step=3)
    model.save_pretrained(root / "after")
    ranks = model.base_model.ranks()
    assert len(set(ranks.values())) > 1
    plain = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    plain.save_pretrained(root / "plain")
    return {"root": root, "ranks": ranks}


@pytest.fixture
def hub(adapters, tmp_path, monkeypatch) -> Path:
    """A hub cache, set as the default and offline:

    * ``owner/adaptive``: the adapter before the reallocation at commit OLD, after it at NEW (main);
    * ``owner/nested``: the adapter after the reallocation in SUBFOLDER;
    * ``owner/plain``: plain LoRA; the cache knows the hub has no sidecar (``.no_exist``);
    * ``owner/plain-unchecked``: plain LoRA; whether it has a sidecar was never asked.
    """
    cache = tmp_path / "hub"
    add_to_cache(cache, "owner/adaptive", OLD, adapters["root"] / "before", main=False)
    add_to_cache(cache, "owner/adaptive", NEW, adapters["root"] / "after")
    add_to_cache(cache, "owner/nested", NEW, adapters["root"] / "after", subfolder=SUBFOLDER)
    add_to_cache(cache, "owner/plain", PLAIN, adapters["root"] / "plain")
    mark_absent(cache, "owner/plain", PLAIN, ADAPTIVE_CONFIG_NAME)
    add_to_cache(cache, "owner/plain-unchecked", PLAIN, adapters["root"] / "plain")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    return cache


def assert_after_reallocation(config, adapters) -> None:
    assert type(config) is AdaptiveLoraConfig
    assert config.reallocation_step == 3
    assert config.allocation["ranks_after"] == [adapters["ranks"][n] for n in config.allocation["names"]]
    assert config.rank_pattern == {f"^{re.escape(n)}$": r for n, r in adapters["ranks"].items()}
    assert (config.r, config.max_r, config.signal_steps) == (4, 12, 3)


# --- AdaptiveLoraConfig.from_pretrained ---------------------------------------------------------------------


def test_config_from_hub_reads_the_sidecar(hub, adapters):
    assert_after_reallocation(AdaptiveLoraConfig.from_pretrained("owner/adaptive"), adapters)


def test_config_from_hub_respects_revision_subfolder_and_cache_dir(hub, adapters, tmp_path, monkeypatch):
    old = AdaptiveLoraConfig.from_pretrained("owner/adaptive", revision=OLD)
    assert type(old) is AdaptiveLoraConfig and old.allocation is None and old.reallocation_step is None
    assert old.revision is None  # a download option, as in PEFT: not a field override
    assert_after_reallocation(AdaptiveLoraConfig.from_pretrained("owner/nested", subfolder=SUBFOLDER), adapters)
    # cache_dir: the repos are found there, not in the (now empty) default cache
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(hub, elsewhere, symlinks=True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    assert_after_reallocation(AdaptiveLoraConfig.from_pretrained("owner/adaptive", cache_dir=str(elsewhere)), adapters)
    # field overrides still apply
    assert AdaptiveLoraConfig.from_pretrained("owner/adaptive", cache_dir=str(elsewhere), min_r=2).min_r == 2


def test_config_from_hub_passes_the_download_options(hub, adapters, monkeypatch):
    calls = []
    download = peft_adaptive.hub_files.hf_hub_download

    def recording(repo_id, filename, **kwargs):
        calls.append((repo_id, filename, kwargs))
        return download(repo_id, filename, **kwargs)

    monkeypatch.setattr(peft_adaptive.hub_files, "hf_hub_download", recording)
    config = AdaptiveLoraConfig.from_pretrained(
        "owner/nested", subfolder=SUBFOLDER, revision="main", token="hf_test", local_files_only=True
    )
    assert_after_reallocation(config, adapters)
    assert [c[1] for c in calls] == [ADAPTIVE_CONFIG_NAME, "adapter_config.json"]
    for repo_id, _, kwargs in calls:
        assert repo_id == "owner/nested"
        assert kwargs == {"subfolder": SUBFOLDER, "revision": "main", "token": "hf_test", "local_files_only": True}


def test_config_from_hub_without_sidecar_is_peft_loader(hub):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the cache knows there is no sidecar: nothing to warn about
        config = AdaptiveLoraConfig.from_pretrained("owner/plain")
    assert type(config) is LoraConfig and config.r == 2
    # offline, and never asked whether the repo has a sidecar: loaded as plain LoRA, with a warning
    with pytest.warns(UserWarning, match="could not fetch adaptive_lora.json"):
        config = AdaptiveLoraConfig.from_pretrained("owner/plain-unchecked")
    assert type(config) is LoraConfig and config.r == 2
    with pytest.raises(ValueError, match="Can't find 'adapter_config.json'"):
        AdaptiveLoraConfig.from_pretrained("owner/missing")


def test_fetch_adapter_file_absent_or_unknown(monkeypatch, tmp_path):
    def absent(repo_id, filename, **kwargs):
        raise EntryNotFoundError(f"{filename} not in {repo_id}")

    monkeypatch.setattr(peft_adaptive.hub_files, "hf_hub_download", absent)
    assert fetch_adapter_file("owner/name", ADAPTIVE_CONFIG_NAME) is None  # the hub said: no such file

    def unreachable(repo_id, filename, **kwargs):
        raise LocalEntryNotFoundError("offline and not cached")

    monkeypatch.setattr(peft_adaptive.hub_files, "hf_hub_download", unreachable)
    with pytest.raises(LocalEntryNotFoundError):
        fetch_adapter_file("owner/name", ADAPTIVE_CONFIG_NAME, cache_dir=str(tmp_path))
    # local paths never reach the hub
    assert fetch_adapter_file(tmp_path, ADAPTIVE_CONFIG_NAME) is None
    assert fetch_adapter_file(tmp_path / "missing" / "folder", ADAPTIVE_CONFIG_NAME) is None


# --- inspect --------------------------------------------------------------------------------------------


def test_inspect_hub_adapter(hub, adapters, capsys):
    summary = inspect_adapter("owner/adaptive")
    assert summary.ranks == adapters["ranks"] and summary.saved_by_plugin
    assert set(summary.scores()) == set(adapters["ranks"]) and summary.budget is not None
    assert summary.path == "owner/adaptive" and summary.warnings == []
    old = inspect_adapter("owner/adaptive", revision=OLD)
    assert set(old.ranks.values()) == {4} and old.scores() is None
    nested = inspect_adapter("owner/nested", subfolder=SUBFOLDER)
    assert nested.ranks == adapters["ranks"] and nested.path == f"owner/nested/{SUBFOLDER}"

    assert main(["inspect", "owner/adaptive", "--revision", OLD, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {m["rank"] for m in data["modules"]} == {4} and data["path"] == f"owner/adaptive (revision {OLD})"
    assert main(["inspect", "owner/nested", "--subfolder", SUBFOLDER]) == 0
    out = capsys.readouterr().out
    assert summary.table() in out and "Reallocation at step 3" in out


def test_inspect_hub_plain_and_unreadable(hub, capsys):
    plain = inspect_adapter("owner/plain")
    assert not plain.saved_by_plugin and plain.warnings == []
    unchecked = inspect_adapter("owner/plain-unchecked")
    assert not unchecked.saved_by_plugin
    assert any("could not fetch adaptive_lora.json" in w for w in unchecked.warnings)
    assert main(["inspect", "owner/missing"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("peft-adaptive: error: owner/missing: no such file or directory, and not readable as a")


def test_plot_and_export_hub_adapter(hub, adapters, tmp_path, capsys):
    assert main(["plot", "owner/adaptive", "-o", str(tmp_path / "ranks.png")]) == 0
    assert (tmp_path / "ranks.png").is_file()
    assert main(["export", "owner/adaptive", str(tmp_path / "lora"), "--format", "lora", "--revision", NEW]) == 0
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and sorted(config["rank_pattern"].values()) == sorted(
        adapters["ranks"].values()
    )


def test_console_inspect_with_hub_environment(hub, adapters):
    """The user's way: HF_HUB_CACHE and HF_HUB_OFFLINE in the environment of a fresh process."""
    env = {**os.environ, "HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [sys.executable, "-m", "peft_adaptive.cli", "inspect", "owner/adaptive", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(result.stdout)
    assert {m["name"]: m["rank"] for m in data["modules"]} == adapters["ranks"]
    assert data["saved_by_plugin"] is True and data["scores"] is not None
