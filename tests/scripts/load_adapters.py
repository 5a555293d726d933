"""Load saved adapters in a fresh interpreter, with vanilla PEFT (default) or with the plugin (``--plugin``).

    python tests/scripts/load_adapters.py BASE INPUTS OUT [--plugin] ADAPTER [ADAPTER ...]

For each adapter folder: load the base model from BASE (``AutoModelForCausalLM``), put the adapter on it with
``PeftModel.from_pretrained``, and save the logits for the token ids in INPUTS (a ``torch.save``d tensor) to
``OUT/<i>.pt``. Prints one line ``RESULT <json>``: for each adapter (keyed by its path as given) the tuner
class, config class, ``peft_type``, per-module ranks and logits file, or the loading error; and
``plugin_imported``, whether any ``peft_adaptive`` module was imported. ``peft_adaptive`` is imported only with
``--plugin``. One thread, as in the tests, so that the logits are bit-identical to the test process's.
"""

import json
import sys
from pathlib import Path

import torch


def main(argv: list[str]) -> None:
    plugin = "--plugin" in argv
    base, inputs, out, *adapters = [a for a in argv if a != "--plugin"]
    torch.set_num_threads(1)
    if plugin:
        import peft_adaptive  # noqa: F401  (registers ADAPTIVE_LORA with PEFT)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.load(inputs)
    Path(out).mkdir(parents=True, exist_ok=True)
    result = {}
    for i, adapter in enumerate(adapters):
        try:
            model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
        except Exception as e:  # noqa: BLE001  (the tests check which adapters fail, and how)
            result[adapter] = {"error": f"{type(e).__name__}: {e}"}
            continue
        logits = str(Path(out) / f"{i}.pt")
        with torch.no_grad():
            torch.save(model(ids).logits, logits)
        tuner = model.base_model
        result[adapter] = {
            "tuner": type(tuner).__name__,
            "config": type(model.peft_config["default"]).__name__,
            "peft_type": model.peft_config["default"].peft_type.value,
            "ranks": {
                n: m.r["default"] for n, m in tuner.model.named_modules() if isinstance(getattr(m, "r", None), dict)
            },
            "logits": logits,
        }
    result["plugin_imported"] = any(name.startswith("peft_adaptive") for name in sys.modules)
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
