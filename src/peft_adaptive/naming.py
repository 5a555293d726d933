"""``rank_pattern``/``alpha_pattern`` keys for module names (no torch import; shared by the tuner and the exporter)."""

from __future__ import annotations

import re


def pattern_key(module_name: str) -> str:
    """A ``rank_pattern``/``alpha_pattern`` key that matches exactly this module and no other.

    PEFT treats the keys as regexes, tries them in (on-disk: sorted) order and takes the first match, so a
    plain name could match a longer one (``.`` is a wildcard, and ``a.q`` matches ``x.a.q``).
    """
    return f"^{re.escape(module_name)}$"
