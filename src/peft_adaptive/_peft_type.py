"""Add ``ADAPTIVE_LORA`` to PEFT's ``PeftType`` enum.

Why this exists: ``peft.utils.register_peft_method`` only accepts names that are already members of
``PeftType``, and that enum is closed (no plugin hook or entry point; subclassing an enum with members
raises, and ``PeftType.X = "X"`` creates a non-member). So the member is added here, once, through the
enum's own tables. This is the only place that touches enum internals; it is idempotent, so importing
or reloading the plugin twice is harmless.
"""

from __future__ import annotations

from peft.utils.peft_types import PeftType

ADAPTIVE_LORA_NAME = "ADAPTIVE_LORA"


def ensure_peft_type(name: str = ADAPTIVE_LORA_NAME) -> PeftType:
    """Return ``PeftType[name]``, adding the member first if PEFT does not know it yet."""
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    member.__init__(name)
    member._sort_order_ = len(PeftType._member_names_)
    PeftType._member_names_.append(name)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    type.__setattr__(PeftType, name, member)
    return member
