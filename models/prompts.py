"""Text prompts describing a crop: colour + item, in grammatical English.

The prototype filled "A close-up of a {}." with a coarse class and wrote "a close-up of a shoes".
Here the noun phrase is built first, with the determiner the noun needs ("a navy cardigan",
"an orange dress", "green pants", "a pair of black shoes"), and only then dropped into a
template that never supplies an article of its own.

The colour word is the crop's colour *family* (models/colour.py), not its fine survey name: the
noun phrase is then exactly what a shopper types ("a navy jacket"), so fine-tuning teaches the
words searches use. Fine names ("marine", "pinky", "milk chocolate") split one everyday colour
into dozens of rare words the text tower would each have to learn, and none is what people
search for. The fine name stays on the crop (``crops.colour_name``) for display.
"""

from __future__ import annotations

import hashlib
import re

from models.labels import FineLabel

# Every template takes a complete noun phrase, so templates never decide on an article.
TEMPLATES: tuple[str, ...] = (
    "a photo of {}",
    "a product photo of {}",
    "a close-up photo of {}",
    "a studio photo of {}",
    "an image of {}",
    "a catalog photo of {}",
    "{} on a plain background",
)

# Used when a whole-image crop has no recognised category.
FALLBACK_NOUN = "fashion item"

# Vowel letters that sound like a consonant ("a uniform", "a european", "a one-piece"), and
# consonant letters that are silent ("an hour"). Colour names and item nouns are the only words
# that ever follow the article, so this short list covers them.
_CONSONANT_SOUND = re.compile(r"^(uni|use|usu|uti|eu|one\b|once\b)")
_VOWEL_SOUND = re.compile(r"^(hour|honest|honou?r|heir|[aeiou])")


def indefinite_article(word: str) -> str:
    """``"a"`` or ``"an"`` for the word that follows, by sound rather than spelling."""
    lowered = word.strip().lower()
    if _CONSONANT_SOUND.match(lowered):
        return "a"
    return "an" if _VOWEL_SOUND.match(lowered) else "a"


def noun_phrase(label: FineLabel | None, colour: str | None) -> str:
    """``"an orange dress"``, ``"black pants"``, ``"a pair of white shoes"``; colour optional."""
    noun = label.noun if label is not None else FALLBACK_NOUN
    grammar = label.grammar if label is not None else "count"
    described = f"{colour} {noun}" if colour else noun
    if grammar == "plural":
        return described
    if grammar == "pair":
        return f"a pair of {described}"
    return f"{indefinite_article(described)} {described}"


def template_index(key: str, n_templates: int = len(TEMPLATES)) -> int:
    """A template index derived from ``key`` alone: the same crop always gets the same wording,
    across processes and machines (unlike ``hash()``, which Python salts per process)."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % n_templates


def crop_key(image_sha256: str, crop_index: int) -> str:
    """The stable key of one crop: its image's content hash and its position in that image."""
    return f"{image_sha256}:{crop_index}"


def make_prompt(label: FineLabel | None, colour: str | None, key: str) -> str:
    """The prompt for one crop; ``key`` (see ``crop_key``) picks the template deterministically."""
    return TEMPLATES[template_index(key)].format(noun_phrase(label, colour))
