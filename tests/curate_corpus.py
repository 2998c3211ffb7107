"""A generated corpus with planted defects, for the curation tests and benchmark.

Every document's id says what it is: ``clean-K`` (an on-topic astronomy article), ``exact-K-J``
(a copy of clean-K, re-spaced and re-cased), ``near-K-J`` (clean-K with a few words changed),
``boilerplate-N`` (navigation and cookie-banner pages), ``spam-N`` (one line repeated),
``gibberish-N`` (random letters and symbols) and ``offtopic-N`` (clean cooking articles, which
only a keyword recipe removes). Deterministic for a given seed.
"""

import json
import random
from pathlib import Path

ADJECTIVES = (
    "distant bright faint massive young ancient hot cold dense rotating spiral elliptical "
    "compact luminous red blue dusty quiet violent isolated nearby remote stable variable "
    "binary central outer inner early late"
).split()
ASTRONOMY_NOUNS = (
    "galaxy star planet nebula telescope orbit comet asteroid quasar pulsar cluster "
    "supernova moon spectrum observatory halo disk jet accretion redshift photon "
    "magnetar exoplanet satellite eclipse meteor corona horizon universe"
).split()
COOKING_NOUNS = (
    "recipe oven onion garlic sauce butter flour dough pan skillet broth pepper salt "
    "kitchen bread cheese tomato basil olive vinegar soup noodle rice carrot lemon "
    "cream sugar spoon knife stew"
).split()
VERBS = (
    "reveals contains shapes heats follows surrounds crosses changes feeds absorbs emits "
    "reflects orbits hides disturbs balances outshines replaces joins dominates"
).split()
ADVERBS = "slowly quickly clearly rarely often gently suddenly steadily partly mostly".split()
CONNECTORS = (
    "Astronomers think that",
    "Researchers found that",
    "It is likely that",
    "Over many years",
    "In most cases",
    "According to recent work",
    "Because of this",
    "For a long time",
    "As a result",
    "During the night",
)


def sentence(rng: random.Random, nouns: list[str]) -> str:
    def phrase():
        return f"the {rng.choice(ADJECTIVES)} {rng.choice(nouns)}"

    words = f"{rng.choice(CONNECTORS)} {phrase()} {rng.choice(ADVERBS)} {rng.choice(VERBS)} {phrase()}"
    if rng.random() < 0.5:
        words += f" and {rng.choice(VERBS)} {phrase()} with {rng.choice(nouns)}s"
    return words + "."


def article(rng: random.Random, nouns: list[str]) -> str:
    paragraphs = [" ".join(sentence(rng, nouns) for _ in range(rng.randint(3, 4))) for _ in range(3)]
    return "\n".join(paragraphs)


def exact_copy(text: str, rng: random.Random) -> str:
    """Same words, different case and spacing (what normalized exact dedup still matches)."""
    words = text.split(" ")
    return "  ".join(word.upper() if rng.random() < 0.1 else word for word in words)


def near_copy(text: str, rng: random.Random, edits: int = 2) -> str:
    words = text.split(" ")
    for _ in range(edits):
        position = rng.randrange(len(words))
        words[position] = rng.choice(ADJECTIVES)
    return " ".join(words)


def boilerplate(rng: random.Random) -> str:
    menu = ["Home", "About us", "Products", "Contact", "Login", "Sign up", "Cart", "Search", "Careers", "Blog", "Help"]
    lines = rng.sample(menu, 8)
    lines += [
        "This website uses cookies to improve your experience",
        "Accept all cookies",
        "Read our privacy policy and terms of use",
        f"Copyright {rng.randint(1998, 2024)} All rights reserved",
    ]
    return "\n".join(lines)


def spam(rng: random.Random) -> str:
    line = rng.choice(
        [
            "Buy cheap watches online now, best prices guaranteed!",
            "Click here to win a free phone today!",
            "Hot singles in your area are waiting for you!",
        ]
    )
    return "\n".join([line] * rng.randint(10, 20))


def gibberish(rng: random.Random) -> str:
    letters = "bcdfghjklmnpqrstvwxz" + "#%&*@$"
    return " ".join(
        "".join(rng.choice(letters) for _ in range(rng.randint(2, 14))) for _ in range(rng.randint(60, 120))
    )


DOMAINS = {
    "clean": "astro.example.org",
    "exact": "mirror.astro.example.org",
    "near": "astro.example.org",
    "offtopic": "food.example.net",
}


def planted_corpus(seed: int = 0, clean: int = 48, copies: int = 10, junk: int = 8, offtopic: int = 10) -> list[dict]:
    """The documents, shuffled (copies land far from their originals, in other files)."""
    rng = random.Random(seed)
    documents = [{"id": f"clean-{k}", "text": article(rng, ASTRONOMY_NOUNS)} for k in range(clean)]
    for j in range(copies):
        k = rng.randrange(clean)
        documents.append({"id": f"exact-{k}-{j}", "text": exact_copy(documents[k]["text"], rng)})
        k = rng.randrange(clean)
        documents.append({"id": f"near-{k}-{j}", "text": near_copy(documents[k]["text"], rng)})
    for n in range(junk):
        documents += [
            {"id": f"boilerplate-{n}", "text": boilerplate(rng)},
            {"id": f"spam-{n}", "text": spam(rng)},
            {"id": f"gibberish-{n}", "text": gibberish(rng)},
        ]
    documents += [{"id": f"offtopic-{n}", "text": article(rng, COOKING_NOUNS)} for n in range(offtopic)]
    rng.shuffle(documents)
    for document in documents:
        document["url"] = f"https://{DOMAINS.get(kind(document['id']), 'junk.example.com')}/{document['id']}"
    return documents


def write_corpus(folder: Path, documents: list[dict], files: int) -> list[Path]:
    """Round-robin the documents into ``files`` JSONL files."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"part-{i}.jsonl" for i in range(files)]
    for i, path in enumerate(paths):
        path.write_text("".join(json.dumps(doc) + "\n" for doc in documents[i::files]))
    return paths


def kind(document_id: str) -> str:
    return document_id.split("-")[0]


def group(document_id: str) -> str | None:
    """clean-K, exact-K-J and near-K-J all belong to group K."""
    parts = document_id.split("-")
    return parts[1] if parts[0] in ("clean", "exact", "near") else None
