"""Load saved adapters in a fresh interpreter, with vanilla PEFT (default) or with the plugin (``--plugin``).

    python tests/scripts/load_adapters.py BASE INPUTS OUT [--plugin] ADAPTER [ADAPTER ...]

For each adapter folder: load the base model from BASE (``AutoModelForCausalLM``), put the adapter on it with
``PeftModel.from_pretrained``, and save the logits for the token ids in INPUTS (a ``torch.save``d tensor) to
``OUT/<i>.pt``. An adapter given as ``ADAPTER::BASE::INPUTS`` has its own base and inputs; a BASE that is a
``.pt`` file is a whole ``torch.save``d module (built from torch.nn classes), whose output is saved as it is. Prints one line ``RESULT <json>``: for each adapter (keyed by its path as given) the tuner
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

    Path(out).mkdir(parents=True, exist_ok=True)
    result = {}
    for i, spec in enumerate(adapters):
        parts = spec.split("::")
        adapter = parts[0]
        own_base = parts[1] if len(parts) > 1 and parts[1] else base
        own_inputs = parts[2] if len(parts) > 2 and parts[2] else inputs
        try:
            if own_base.endswith(".pt"):
                base_model = torch.load(own_base, weights_only=False)
            else:
                base_model = AutoModelForCausalLM.from_pretrained(own_base)
            model = PeftModel.from_pretrained(base_model, adapter).eval()
        except Exception as e:  # noqa: BLE001  (the tests check which adapters fail, and how)
            result[spec] = {"error": f"{type(e).__name__}: {e}"}
            continue
        logits = str(Path(out) / f"{i}.pt")
        with torch.no_grad():
            output = model(torch.load(own_inputs))
            torch.save(getattr(output, "logits", output), logits)
        tuner = model.base_model
        result[spec] = {
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
