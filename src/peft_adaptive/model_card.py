"""The model card (``README.md``) PEFT writes beside a saved adapter, with the tags of a LoRA adapter.

``PeftModel.create_or_update_model_card`` derives the tags from the live config's ``peft_type``: ``lora`` only for
``LORA``, so an adaptive adapter (``ADAPTIVE_LORA`` while it lives) would be saved without it, although its
``adapter_config.json`` says ``LORA``. ``AdaptiveLoraConfig.save_pretrained`` calls :func:`add_lora_tags` after PEFT
wrote the card (PEFT saves the card first, then each adapter's config).
"""

from __future__ import annotations

import os

#: Tags PEFT gives a LoRA adapter's card beyond the ones that do not depend on the method.
LORA_TAGS = ("lora",)
CARD_NAME = "README.md"


def add_lora_tags(adapter_directory: str | os.PathLike) -> None:
    """Add the LoRA tags to the PEFT model card of the adapter saved in ``adapter_directory``.

    PEFT writes the card into the folder given to ``save_pretrained``: the adapter's own folder for the default
    adapter, its parent for the others. Only a card that PEFT made (``library_name: peft``) is changed.
    """
    from huggingface_hub import ModelCard

    adapter_directory = os.fspath(adapter_directory)
    for folder in (adapter_directory, os.path.dirname(os.path.abspath(adapter_directory))):
        path = os.path.join(folder, CARD_NAME)
        if not os.path.isfile(path):
            continue
        card = ModelCard.load(path)
        if card.data.get("library_name") != "peft":
            continue
        tags = set(card.data.get("tags") or [])
        if not set(LORA_TAGS) <= tags:
            card.data["tags"] = sorted(tags | set(LORA_TAGS))
            card.save(path)
        return
