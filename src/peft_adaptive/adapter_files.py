"""Read and validate the files of a saved LoRA adapter folder: its config, the plugin's fields, its weights.

:func:`locate_adapter` turns a Hugging Face Hub repo id into the hub-cache folder of its files; the readers
then work on local folders only. Every reader raises :class:`AdapterError` for a problem with the user's input (missing folder or file,
unreadable JSON, not a LoRA adapter, corrupt weights), which the CLI reports without a traceback.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME

from .config import ADAPTIVE_CONFIG_NAME, AdaptiveLoraConfig, _renamed_fields
from .hub_files import fetch_adapter_file, is_hub_id

#: peft_type values whose adapters this package understands.
LORA_PEFT_TYPES = ("LORA", "ADAPTIVE_LORA")

#: Prefix PEFT puts in front of base-model module names in the saved state dict.
STATE_DICT_PREFIX = "base_model.model."

_FACTOR_KEY = re.compile(r"^(?P<module>.+)\.(?P<factor>lora_A|lora_B)\.weight$")
_EMBEDDING_KEY = re.compile(r"^(?P<module>.+)\.(?P<factor>lora_embedding_A|lora_embedding_B)$")


class AdapterError(ValueError):
    """A problem with the user's input (path, files, options): reported without a traceback by the CLI."""


adaptive_field_names = AdaptiveLoraConfig.adaptive_field_names


def locate_adapter(
    path: str | os.PathLike, subfolder: str | None = None, **hub_kwargs: Any
) -> tuple[Path, str, list[str]]:
    """``(local folder, name for messages, notes)`` of the adapter at ``path``, a folder or a hub repo id.

    For a hub repo id (``org/name`` that is no local path) its ``adapter_config.json``, weights and
    ``adaptive_lora.json`` are fetched into the hub cache with ``hf_hub_download(**hub_kwargs)`` (offline:
    found there), and the folder is the cache's snapshot folder. The notes say what could not be checked
    (the sidecar, offline and not cached). Raises :class:`AdapterError` when the repo cannot be read.
    """
    if not is_hub_id(path):
        directory = Path(path, subfolder) if subfolder else Path(path)
        return directory, str(directory) if subfolder else str(path), []
    name = os.fspath(path) + (f"/{subfolder}" if subfolder else "")
    if hub_kwargs.get("revision"):
        name += f" (revision {hub_kwargs['revision']})"
    try:
        config_file = fetch_adapter_file(path, CONFIG_NAME, subfolder, **hub_kwargs)
        if config_file is None:
            raise AdapterError(f"{name} is not a PEFT adapter: the Hugging Face Hub repo has no {CONFIG_NAME}")
        if fetch_adapter_file(path, SAFETENSORS_WEIGHTS_NAME, subfolder, **hub_kwargs) is None:
            fetch_adapter_file(path, WEIGHTS_NAME, subfolder, **hub_kwargs)  # neither: weights_file() says so
    except AdapterError:
        raise
    except (OSError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise AdapterError(
            f"{path}: no such file or directory, and not readable as a Hugging Face Hub repo "
            f"({type(exc).__name__}{': ' + reason if reason else ''})"
        ) from exc
    notes = []
    try:
        fetch_adapter_file(path, ADAPTIVE_CONFIG_NAME, subfolder, **hub_kwargs)
    except (OSError, ValueError) as exc:
        notes.append(
            f"could not fetch {ADAPTIVE_CONFIG_NAME} from the Hugging Face Hub ({type(exc).__name__}): the plugin's "
            "fields (scores, budget), if the adapter has them, are missing from this summary"
        )
    return Path(config_file).parent, name, notes


def read_adapter_config(path: str | os.PathLike) -> dict[str, Any]:
    """The ``adapter_config.json`` of adapter directory ``path`` as a dict (key order as on disk).

    Raises :class:`AdapterError` when ``path`` is not a directory holding a readable LoRA adapter config.
    """
    directory = Path(path)
    if not directory.exists():
        raise AdapterError(f"{directory}: no such file or directory")
    if not directory.is_dir():
        raise AdapterError(
            f"{directory} is not an adapter directory (it is a file; pass the folder that holds {CONFIG_NAME})"
        )
    config_file = directory / CONFIG_NAME
    if not config_file.is_file():
        raise AdapterError(f"{directory} is not a PEFT adapter directory: it has no {CONFIG_NAME}")
    config = _read_json_object(config_file)
    peft_type = config.get("peft_type")
    if peft_type not in LORA_PEFT_TYPES:
        raise AdapterError(
            f"{directory} holds a {peft_type!r} adapter; only LoRA adapters (peft_type {' or '.join(LORA_PEFT_TYPES)}) "
            "are supported"
        )
    return config


def read_adaptive_fields(path: str | os.PathLike, config: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The plugin's own fields (``allocation``, ``signal_steps``, ...) of a saved adapter, or None.

    They are in the ``adaptive_lora.json`` sidecar when the adapter was saved as plain LoRA, and in
    ``adapter_config.json`` itself when it was saved with ``save_as_lora=False``.
    """
    directory = Path(path)
    sidecar = directory / ADAPTIVE_CONFIG_NAME
    if sidecar.is_file():
        try:
            with open(sidecar, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise AdapterError(f"{sidecar} is not a readable JSON file: {exc}") from exc
        return _renamed_fields(data) if isinstance(data, dict) else None
    config = read_adapter_config(directory) if config is None else config
    if config.get("peft_type") == "ADAPTIVE_LORA":
        config = _renamed_fields(config)
        return {name: config[name] for name in adaptive_field_names() if name in config}
    return None


def weights_file(path: str | os.PathLike) -> Path:
    """The adapter's weights file: ``adapter_model.safetensors`` (preferred) or ``adapter_model.bin``."""
    directory = Path(path)
    for name in (SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME):
        if (directory / name).is_file():
            return directory / name
    raise AdapterError(
        f"{directory} is not a complete PEFT adapter: it has {CONFIG_NAME} but no {SAFETENSORS_WEIGHTS_NAME} "
        f"(or {WEIGHTS_NAME})"
    )


def read_weight_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Shape of every tensor in the adapter's weights file (safetensors: header only)."""
    file = weights_file(path)
    if file.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(file), framework="pt") as f:
                return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
        except Exception as exc:  # safetensors raises SafetensorError or OSError subclasses
            raise AdapterError(f"{file} is not a valid safetensors file (corrupt or truncated?): {exc}") from exc
    return {key: tuple(t.shape) for key, t in load_weights(path).items()}


def load_weights(path: str | os.PathLike) -> dict[str, Any]:
    """All tensors of the adapter's weights file, on CPU, keyed as saved."""
    file = weights_file(path)
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(file), device="cpu")
        import torch

        data = torch.load(str(file), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise AdapterError(f"{file} is not a valid adapter weights file (corrupt or truncated?): {exc}") from exc
    if not isinstance(data, dict):
        raise AdapterError(f"{file} does not hold a state dict")
    return data


def module_name(state_dict_key: str) -> str:
    """Name in the base model of the module a saved state-dict key belongs to (``base_model.model.`` stripped)."""
    return state_dict_key[len(STATE_DICT_PREFIX) :] if state_dict_key.startswith(STATE_DICT_PREFIX) else state_dict_key


def lora_factor_keys(keys: Iterable[str]) -> dict[str, dict[str, str]]:
    """``{module name: {"A": key, "B": key}}`` for the LoRA factors among saved state-dict keys."""
    modules: dict[str, dict[str, str]] = {}
    for key in keys:
        match = _FACTOR_KEY.match(key) or _EMBEDDING_KEY.match(key)
        if match is None:
            continue
        factor = "A" if match["factor"].endswith("A") else "B"
        modules.setdefault(module_name(match["module"]), {})[factor] = key
    return modules


def _read_json_object(path: str | os.PathLike) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterError(f"{path} is not a readable JSON file (truncated or corrupt?): {exc}") from exc
    if not isinstance(data, dict):
        raise AdapterError(f"{path} does not hold a JSON object")
    return data


def read_config_and_sidecar(config_file: str | os.PathLike, sidecar: str | os.PathLike) -> dict[str, Any]:
    """``adapter_config.json`` updated with the ``adaptive_lora.json`` sidecar, both checked.

    Raises :class:`AdapterError` naming the file when either is not a JSON object, and when the sidecar's
    allocation names modules the adapter's weights do not have or gives them other ranks than the weights
    (when the weights file is beside the sidecar).
    """
    data = _read_json_object(config_file)
    extra = _read_json_object(sidecar)
    allocation = extra.get("allocation")
    if allocation is not None:
        _check_allocation(Path(sidecar), allocation)
    data.update(extra)
    return data


def _check_allocation(sidecar: Path, allocation: Any) -> None:
    if not isinstance(allocation, dict):
        raise AdapterError(f"{sidecar}: 'allocation' must be a JSON object, got {type(allocation).__name__}")
    names, ranks = allocation.get("names"), allocation.get("ranks_after")
    if names is None or ranks is None:
        return
    if not isinstance(names, list) or not isinstance(ranks, list) or len(names) != len(ranks):
        raise AdapterError(f"{sidecar}: allocation 'names' and 'ranks_after' must be lists of the same length")
    try:
        shapes = read_weight_shapes(sidecar.parent)
    except AdapterError:
        return  # no weights beside it (a hub config fetched alone): nothing to compare with
    saved = {module: shapes[keys["A"]][0] for module, keys in lora_factor_keys(shapes).items() if "A" in keys}
    unknown = [n for n, r in zip(names, ranks) if r and n not in saved]
    if unknown:
        raise AdapterError(
            f"{sidecar}: the allocation names modules that the adapter's weights do not have: {unknown[:5]}"
            f"{' ...' if len(unknown) > 5 else ''} (the weights have {sorted(saved)[:5]} ...)"
        )
    wrong = [
        f"{n}: rank {r} in the sidecar, {saved[n]} in the weights" for n, r in zip(names, ranks) if saved.get(n, 0) != r
    ]
    if wrong:
        raise AdapterError(f"{sidecar}: the allocation's ranks disagree with the adapter's weights: {wrong[:5]}")
