"""Export a saved adaptive (or plain) LoRA adapter for serving.

Formats (:data:`EXPORT_FORMATS`):

``lora``
    A plain PEFT LoRA adapter that vanilla PEFT loads without this plugin, with identical outputs:
    ``peft_type: LORA``, the plugin's fields dropped, and one exact, anchored ``rank_pattern`` and
    ``alpha_pattern`` entry per module (the order-independent form; see ``naming.pattern_key``).

``merged``
    The base model with the adapter merged into its weights (PEFT's ``merge_and_unload``), saved with
    ``save_pretrained``; outputs equal the adapter model's up to float rounding. Needs the base model:
    ``base_model`` (a local path or a hub id), default the adapter's ``base_model_name_or_path``.

``lora-global-scale``
    For engines that apply one global ``lora_alpha / r`` to every module and ignore ``rank_pattern`` /
    ``alpha_pattern`` (vLLM, SGLang, LoRAX). Each module's own scaling is folded into its ``lora_B``
    (and ``lora_B`` bias), and every module is zero-padded to the largest rank ``R``; the config says
    ``r = lora_alpha = R``, no rsLoRA and no patterns. So the one global scale is exactly 1 and every
    reader (PEFT included, with or without the patterns) computes the same outputs. The zero padding
    changes no output; it makes the config's ``r`` the true rank of every tensor, which engines use to
    size their buffers (``max_lora_rank`` checks), and it is what makes dropping the patterns safe: with
    modules of different ranks and no ``alpha_pattern``, PEFT would scale each module by ``lora_alpha / r_i``
    while the engines use ``lora_alpha / r``. The cost is file size (every module stored at rank ``R``).

Every export writes into a temporary folder beside ``out`` and moves it into place at the end, so a
failure leaves nothing at ``out``. An existing non-empty ``out`` is only replaced with ``force=True``.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME

from .adapter_files import (
    AdapterError,
    adaptive_field_names,
    load_weights,
    locate_adapter,
    lora_factor_keys,
    read_adapter_config,
)
from .adapter_summary import AdapterSummary, ModuleInfo, inspect_adapter
from .hub_files import is_local_path
from .naming import pattern_key

#: Export format name -> one-line description (also the CLI's help).
EXPORT_FORMATS: dict[str, str] = {
    "lora": "plain PEFT LoRA adapter (loads in vanilla PEFT without this plugin, identical outputs)",
    "merged": "base model with the adapter merged in (merge_and_unload), saved with save_pretrained",
    "lora-global-scale": "LoRA adapter for engines with one global lora_alpha/r (vLLM, SGLang, LoRAX): "
    "per-module scaling folded into lora_B, all modules padded to the largest rank, no rank/alpha patterns",
}

#: Files copied unchanged from the adapter folder into a ``lora``/``lora-global-scale`` export, if present.
PASSTHROUGH_FILES = (
    "README.md",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)

#: transformers Auto class for each PEFT task type (as ``peft.AutoPeftModelFor*`` uses them).
TASK_AUTO_CLASSES = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}


def export_adapter(
    path: str | os.PathLike,
    out: str | os.PathLike,
    format: str,
    base_model: str | None = None,
    force: bool = False,
    subfolder: str | None = None,
    **hub_kwargs: Any,
) -> Path:
    """Export the adapter in folder ``path`` to the new folder ``out`` in ``format`` (see :data:`EXPORT_FORMATS`).

    Args:
        path: the adapter folder, or a Hugging Face Hub repo id (its adapter files are fetched into the hub
            cache with ``hf_hub_download(**hub_kwargs)``, e.g. ``revision``; other files, such as a
            tokenizer, are not fetched).
        base_model: base model for ``merged`` (local path or hub id); default the adapter config's
            ``base_model_name_or_path``. For the LoRA formats it is only recorded in the exported config.
        force: replace ``out`` if it exists and is not empty.
        subfolder: the adapter's folder inside ``path`` or the repo.

    Returns ``out``. Raises :class:`~peft_adaptive.adapter_files.AdapterError` for a bad path, a corrupt or
    incomplete adapter, a base model that cannot be loaded, an unknown format or an existing ``out``;
    then nothing is written to ``out``.
    """
    writers: dict[str, Callable[..., None]] = {
        "lora": _write_lora,
        "merged": _write_merged,
        "lora-global-scale": _write_global_scale,
    }
    if format not in writers:
        raise AdapterError(f"unknown export format {format!r}; choose one of: {', '.join(EXPORT_FORMATS)}")
    source, _, _ = locate_adapter(path, subfolder, **hub_kwargs)
    summary = inspect_adapter(source)  # validates the folder, the config and the weights' header
    out = Path(out)
    _check_output(source, out, force)
    with atomic_directory(out, force=force) as tmp:
        writers[format](source, tmp, summary, base_model)
    return out


# --- formats -------------------------------------------------------------------------------------------


def lora_config_dict(path: str | os.PathLike, summary: AdapterSummary, base_model: str | None = None) -> dict[str, Any]:
    """The adapter's config as a plain LoRA config dict with exact per-module rank/alpha patterns."""
    data = dict(read_adapter_config(path))
    if data.get("peft_type") == "ADAPTIVE_LORA":
        for name in adaptive_field_names():
            data.pop(name, None)
    data["peft_type"] = "LORA"
    data["rank_pattern"] = {pattern_key(m.name): m.rank for m in summary.modules}
    data["alpha_pattern"] = {
        pattern_key(m.name): _alpha_for_rank(m, m.rank, summary.use_rslora) for m in summary.modules
    }
    data["inference_mode"] = True
    if base_model is not None:
        data["base_model_name_or_path"] = base_model
    return data


def _write_lora(source: Path, tmp: Path, summary: AdapterSummary, base_model: str | None) -> None:
    _save_lora_config(lora_config_dict(source, summary, base_model), tmp)
    _save_weights(load_weights(source), tmp)
    _copy_passthrough(source, tmp)


def _write_global_scale(source: Path, tmp: Path, summary: AdapterSummary, base_model: str | None) -> None:
    import torch

    weights = load_weights(source)
    keys = lora_factor_keys(weights)
    max_rank = max(m.rank for m in summary.modules)
    for module in summary.modules:
        key_a, key_b = keys[module.name]["A"], keys[module.name]["B"]
        A, B = weights[key_a], weights[key_b]
        pad = max_rank - module.rank
        scaled_b = (B.to(torch.float32) * module.scaling).to(B.dtype)
        if pad:
            A = torch.cat([A, A.new_zeros((pad, *A.shape[1:]))], dim=0)
            scaled_b = torch.cat([scaled_b, scaled_b.new_zeros((scaled_b.shape[0], pad, *scaled_b.shape[2:]))], dim=1)
        weights[key_a], weights[key_b] = A.contiguous(), scaled_b.contiguous()
        bias_key = key_b[: -len("weight")] + "bias" if key_b.endswith(".weight") else None
        if bias_key in weights:  # lora_bias=True: lora_B's bias is scaled together with B
            bias = weights[bias_key]
            weights[bias_key] = (bias.to(torch.float32) * module.scaling).to(bias.dtype)
    data = lora_config_dict(source, summary, base_model)
    data.update(r=max_rank, lora_alpha=max_rank, use_rslora=False, rank_pattern={}, alpha_pattern={})
    _save_lora_config(data, tmp)
    _save_weights(weights, tmp)
    _copy_passthrough(source, tmp)


def _write_merged(source: Path, tmp: Path, summary: AdapterSummary, base_model: str | None) -> None:
    from peft import PeftModel

    config = read_adapter_config(source)
    base = base_model or config.get("base_model_name_or_path")
    if not base:
        raise AdapterError(
            f"{source}/{CONFIG_NAME} records no base model (base_model_name_or_path is empty); pass --base-model "
            "with a local path or hub id"
        )
    if is_local_path(base) and not os.path.isdir(base):
        hint = "" if base_model else " (recorded in the adapter config; pass --base-model to use another)"
        raise AdapterError(f"base model {base} does not exist or is not a folder{hint}")
    model_class = base_model_class(config)
    try:
        model = model_class.from_pretrained(base)
    except Exception as exc:
        raise AdapterError(f"cannot load the base model {base!r} with {model_class.__name__}: {exc}") from exc
    try:
        peft_model = PeftModel.from_pretrained(model, str(source))
    except Exception as exc:
        raise AdapterError(f"cannot load the adapter {source} onto the base model {base!r}: {exc}") from exc
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(tmp)
    _save_tokenizer(base, tmp)


def base_model_class(config: dict[str, Any]) -> Any:
    """The transformers class to load the base model with: the Auto class of the config's ``task_type``, else
    the class PEFT recorded in ``auto_mapping`` (with PEFT's import allowlist), else ``AutoModel``."""
    import transformers

    task_type = config.get("task_type")
    if task_type:
        if task_type not in TASK_AUTO_CLASSES:
            raise AdapterError(f"task_type {task_type!r} has no known transformers Auto class")
        return getattr(transformers, TASK_AUTO_CLASSES[task_type])
    mapping = config.get("auto_mapping")
    if isinstance(mapping, dict) and mapping.get("base_model_class") and mapping.get("parent_library"):
        import importlib

        from peft.auto import check_import_allowlist, get_default_import_allowlist

        library = mapping["parent_library"]
        if not check_import_allowlist(get_default_import_allowlist(), library):
            raise AdapterError(
                f"the adapter config's auto_mapping wants to import {library!r}, which PEFT does not allow"
            )
        try:
            return getattr(importlib.import_module(library), mapping["base_model_class"])
        except (ImportError, AttributeError) as exc:
            raise AdapterError(f"cannot import the base model class from the adapter's auto_mapping: {exc}") from exc
    return transformers.AutoModel


# --- helpers -------------------------------------------------------------------------------------------


def _alpha_for_rank(module: ModuleInfo, rank: int, use_rslora: bool) -> float:
    """``lora_alpha`` that gives the module its current scaling at ``rank`` (its own alpha when unchanged)."""
    if rank == module.config_rank:
        return module.lora_alpha
    return module.scaling * (math.sqrt(rank) if use_rslora else rank)


def _save_lora_config(data: dict[str, Any], directory: Path) -> None:
    """Validate ``data`` as a ``LoraConfig`` and save it with PEFT's own writer."""
    from peft import LoraConfig

    data = dict(data)
    auto_mapping = data.pop("auto_mapping", None)
    data.pop("peft_version", None)  # written by save_pretrained
    try:
        config = LoraConfig.from_peft_type(**data)
    except (TypeError, ValueError) as exc:
        raise AdapterError(f"the adapter config is not a valid LoRA config: {exc}") from exc
    config.save_pretrained(str(directory), auto_mapping_dict=auto_mapping)


def _save_weights(weights: dict[str, Any], directory: Path) -> None:
    from safetensors.torch import save_file

    save_file(
        {k: v.contiguous() for k, v in weights.items()},
        str(directory / SAFETENSORS_WEIGHTS_NAME),
        metadata={"format": "pt"},
    )


def _copy_passthrough(source: Path, directory: Path) -> None:
    for name in PASSTHROUGH_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, directory / name)


def _save_tokenizer(base: str, directory: Path) -> None:
    """Save the base model's tokenizer beside the merged model, when it has one (serving needs it)."""
    if os.path.isdir(base) and not any(
        (Path(base) / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    ):
        return
    try:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(base).save_pretrained(str(directory))
    except Exception:  # a model without a tokenizer is fine to merge
        return


def _check_output(source: Path, out: Path, force: bool) -> None:
    if out.resolve() == source.resolve() or source.resolve() in out.resolve().parents:
        raise AdapterError(f"the output folder {out} must not be the adapter folder {source} or inside it")
    if out.resolve() in source.resolve().parents:
        raise AdapterError(f"the output folder {out} must not contain the adapter folder {source}")
    if out.exists() and not force:
        if out.is_dir() and not any(out.iterdir()):
            return
        raise AdapterError(f"{out} already exists and is not an empty folder; pass --force (force=True) to replace it")


@contextlib.contextmanager
def atomic_directory(out: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``out`` that becomes ``out`` when the block succeeds.

    On an exception the temporary folder (and any parent folders created for it) is removed and ``out``
    is untouched. An existing ``out`` (an empty folder, or anything with ``force=True``) is replaced only
    after the new one is complete.
    """
    out = Path(out).absolute()
    created = [p for p in [out.parent, *out.parent.parents] if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield tmp
        _set_default_mode(tmp)
        if out.exists() or out.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, old / "previous")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for folder in created:  # innermost first
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


def _set_default_mode(directory: Path) -> None:
    """mkdtemp makes a 0700 folder; give the result the permissions a normal mkdir would."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
