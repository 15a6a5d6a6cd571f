"""The built-in text of the core demo: a seeded toy grammar, so the demo needs no download.

Words are whitespace tokens.  ``pseudo_sentences`` writes a new word ("glorp")
into the same frames as two existing nouns, the way a new token arrives in
real text: used like a known word, with its own mix of contexts.
"""

from __future__ import annotations

import numpy as np

_DET = ["the", "a", "one"]
_ADJ = ["small", "happy", "red", "old", "quick", "sleepy"]
_NOUN = ["cat", "dog", "bird", "girl", "boy", "fish", "tree", "ball"]
_VERB = ["sees", "likes", "finds", "chases", "hears", "wants"]
_PLACE = ["in the park", "by the river", "at home", "under the tree", "near the sea"]
_END = [".", "!", "."]


def _noun_phrase(rng: np.random.Generator, noun: str) -> list[str]:
    words = [str(rng.choice(_DET))]
    if rng.random() < 0.5:
        words.append(str(rng.choice(_ADJ)))
    return words + [noun]


def _sentence(rng: np.random.Generator, subject: str) -> list[str]:
    words = _noun_phrase(rng, subject) + [str(rng.choice(_VERB))]
    words += _noun_phrase(rng, str(rng.choice(_NOUN)))
    if rng.random() < 0.4:
        words += str(rng.choice(_PLACE)).split()
    return words + [str(rng.choice(_END))]


def base_sentences(n: int, seed: int = 0) -> list[list[str]]:
    """``n`` sentences over the base vocabulary."""
    rng = np.random.default_rng(seed)
    return [_sentence(rng, str(rng.choice(_NOUN))) for _ in range(n)]


def pseudo_sentences(word: str, like: dict[str, float], n: int, seed: int = 1) -> list[list[str]]:
    """``n`` sentences where ``word`` is the subject and follows the frames of the nouns in ``like``.

    ``like`` maps existing nouns to the share of sentences in which the new word
    takes their place; what follows the new word is what follows those nouns.
    """
    rng = np.random.default_rng(seed)
    nouns = list(like)
    weights = np.array([like[k] for k in nouns], dtype=float)
    weights /= weights.sum()
    out = []
    for _ in range(n):
        stand_in = str(rng.choice(nouns, p=weights))
        sent = _sentence(rng, stand_in)
        out.append([word if w == stand_in and i < 3 else w for i, w in enumerate(sent)])
    return out
