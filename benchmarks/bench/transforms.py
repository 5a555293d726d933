"""Fixed, invertible rewritings of real text that a user adapting a model could meet: a new script for the same
language. The suites that use them (``Suite.settings["transform"]``) ask whether the need for rank concentrates
where a model reads and writes its input, rather than spreading over the network.

* ``"cipher"``: a consistent letter substitution (one fixed permutation of a-z, case kept; digits, punctuation
  and spaces unchanged), as a text in an unfamiliar alphabet would be.
* ``"nospace"``: the text without its spaces, as in scripts written without word boundaries (Thai, Japanese),
  hashtags or domain names; the model must find the words again.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable

#: The cipher's permutation is part of the task, not of a run: the same for every seed and method.
CIPHER_SEED = 20261204


def letter_cipher(seed: int = CIPHER_SEED) -> Callable[[str], str]:
    """A substitution of the 26 letters by a random permutation with no fixed point (every letter changes)."""
    rng = random.Random(seed)
    letters = list(string.ascii_lowercase)
    while True:
        image = letters[:]
        rng.shuffle(image)
        if all(a != b for a, b in zip(letters, image)):
            break
    table = str.maketrans(string.ascii_lowercase + string.ascii_uppercase, "".join(image) + "".join(image).upper())
    return lambda text: text.translate(table)


def without_spaces(text: str) -> str:
    return "".join(text.split())


TRANSFORMS: dict[str, Callable[[], Callable[[str], str]]] = {
    "cipher": letter_cipher,
    "nospace": lambda: without_spaces,
}


def text_transform(name: str | None) -> Callable[[str], str]:
    """The rewriting called ``name`` (``None``: the text as it is)."""
    if name is None:
        return lambda text: text
    if name not in TRANSFORMS:
        raise SystemExit(f"unknown text transform {name!r}; expected one of {sorted(TRANSFORMS)}")
    return TRANSFORMS[name]()
