"""A labelled evaluation set for curation rules, built from text found on a Debian/Ubuntu machine
with Python: clean prose of five genres, and defects planted from it.

Clean genres (each chunked at paragraph boundaries into documents of 80-600 words):
    docstrings  Python standard-library docstrings, per module        (technical documentation)
    reference   pydoc_data.topics, the Python language reference       (manual with code samples)
    licenses    /usr/share/common-licenses                             (legal prose)
    man         man pages of /usr/share/man/man1, rendered by man(1)   (hard-wrapped manuals)
    readmes     /usr/share/doc/*/README*                               (project READMEs, Markdown)
Defects: ``exact`` (a clean document, re-spaced and re-cased), ``near`` (a few words changed, a
header line added), ``spam`` (repeated lines, keyword-stuffed templates, templated prose with
its stop words and its template two to six times, caught only by the repetition rules),
``gibberish`` (random characters, base64 and hex blobs, word salad), ``short`` (a sentence or
two), ``table`` (rows of numbers) and ``boilerplate`` (navigation and cookie banners). A document's id is
``KIND-GENRE-N`` for clean ones and ``KIND-N-of-CLEANID`` for copies. Deterministic per seed on
a given machine; near-identical clean documents (LGPL-2 and 2.1, say) are kept once.
"""

import ast
import base64
import gzip
import inspect
import random
import re
import subprocess
import sysconfig
from pathlib import Path

GENRES = ("docstrings", "reference", "licenses", "man", "readmes")
DEFECTS = ("exact", "near", "spam", "gibberish", "short", "table", "boilerplate")
MIN_WORDS, TARGET_WORDS, MAX_WORDS = 80, 200, 600


def chunks(text: str) -> list[str]:
    """Paragraph groups of TARGET_WORDS words or more (longer paragraphs are cut at sentence ends)."""
    out, current, words = [], [], 0
    for paragraph in re.split(r"\n\s*\n", text):
        for piece in _cut(paragraph.strip("\n")):
            current.append(piece)
            words += len(piece.split())
            if words >= TARGET_WORDS:
                out.append("\n\n".join(current))
                current, words = [], 0
    if words >= MIN_WORDS:
        out.append("\n\n".join(current))
    return [chunk for chunk in out if MIN_WORDS <= len(chunk.split()) <= MAX_WORDS]


def _cut(paragraph: str) -> list[str]:
    """A long paragraph cut after lines that end a sentence."""
    pieces, current = [], []
    for line in paragraph.split("\n"):
        current.append(line)
        if sum(len(item.split()) for item in current) >= TARGET_WORDS and line.rstrip().endswith((".", "!", "?")):
            pieces.append("\n".join(current))
            current = []
    return pieces + (["\n".join(current)] if any(line.strip() for line in current) else [])


def docstrings() -> list[str]:
    texts = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        nodes = [tree, *(n for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef)))]
        docs = [inspect.cleandoc(d) for d in map(ast.get_docstring, nodes) if d]
        texts.append("\n\n".join(dict.fromkeys(docs)))  # a docstring shared by methods once
    return texts


def reference() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)]


def licenses() -> list[str]:
    return [
        path.read_text(errors="replace")
        for path in sorted(Path("/usr/share/common-licenses").iterdir())
        if path.is_file() and not path.is_symlink()
    ]


def man_pages(pages: int = 150) -> list[str]:
    families: dict[str, list[Path]] = {}  # gcloud-* alone has thousands of pages: 3 per family
    for path in sorted(Path("/usr/share/man/man1").glob("*.1.gz")):
        families.setdefault(re.split(r"[_.-]", path.name)[0], []).append(path)
    files = [path for paths in families.values() for path in paths[:3]]
    texts = []
    for path in files[:: max(1, len(files) // pages)]:
        rendered = subprocess.run(
            ["man", "-l", str(path)],
            capture_output=True,
            text=True,
            env={"MANWIDTH": "80", "MAN_KEEP_FORMATTING": "0", "PATH": "/usr/bin:/bin"},
        )
        texts.append(re.sub(r".\x08", "", rendered.stdout))  # overstrike bold/underline
    return texts


def readmes() -> list[str]:
    texts = []
    for path in sorted(Path("/usr/share/doc").glob("*/README*")):
        opener = gzip.open if path.suffix == ".gz" else open
        try:
            with opener(path, "rt", encoding="utf-8") as f:
                texts.append(f.read())
        except (OSError, UnicodeDecodeError):
            continue
    return texts


SOURCES = {"docstrings": docstrings, "reference": reference, "licenses": licenses, "man": man_pages, "readmes": readmes}


def shingles(text: str, n: int = 5) -> set[str]:
    words = text.lower().split()
    return {" ".join(words[i : i + n]) for i in range(max(1, len(words) - n + 1))}


def distinct(texts: list[str], threshold: float = 0.3) -> list[str]:
    """Texts less similar than ``threshold`` (5-gram Jaccard) to every earlier one."""
    kept, seen = [], []
    for text in texts:
        mine = shingles(text)
        if all(len(mine & other) / len(mine | other) < threshold for other in seen):
            kept.append(text)
            seen.append(mine)
    return kept


# ------------------------------------------------------------------------------- defects


def exact_copy(text: str, rng: random.Random) -> str:
    return "  ".join(w.upper() if rng.random() < 0.05 else w for w in text.split(" "))


def near_copy(text: str, rng: random.Random, vocabulary: list[str]) -> str:
    words = text.split(" ")
    for _ in range(rng.randint(2, 5)):
        words[rng.randrange(len(words))] = rng.choice(vocabulary)
    header = rng.choice(["", f"Posted by admin on 2024-03-0{rng.randint(1, 9)}\n", "Share this page\n"])
    return header + " ".join(words)


def spam(rng: random.Random, vocabulary: list[str]) -> str:
    style = rng.randrange(4)
    if style == 3:  # templated SEO prose: stop words, no repeated line, the same sentences per keyword
        keywords = rng.randint(2, 6)  # two copies of the template are the hardest to tell from clean text
        return "\n\n".join(
            f"Looking for the best {w}? Our store has the largest selection of {w} and {v} with free "
            f"shipping to your door. Buy {w} online today and save up to {rng.randint(10, 70)}% on all "
            f"{v}. We are the number one choice for {w} in your area, with thousands of happy customers."
            for w, v in zip(rng.sample(vocabulary, keywords), rng.sample(vocabulary, keywords))
        )
    if style == 0:  # one line, repeated
        line = f"Buy cheap {rng.choice(vocabulary)} online now, best prices guaranteed!"
        return "\n".join([line] * rng.randint(8, 25))
    if style == 1:  # a few lines, cycled
        lines = [f"Click here for free {rng.choice(vocabulary)} today!" for _ in range(3)]
        return "\n".join(lines * rng.randint(4, 8))
    keywords = rng.sample(vocabulary, 15)  # keyword-stuffed template
    return "\n".join(f"Best {w} deals online - buy cheap {w} now and save big on {w}!" for w in keywords)


def gibberish(rng: random.Random, vocabulary: list[str]) -> str:
    style = rng.randrange(4)
    if style == 0:
        letters = "bcdfghjklmnpqrstvwxz#%&*@$"
        return " ".join(
            "".join(rng.choice(letters) for _ in range(rng.randint(2, 14))) for _ in range(rng.randint(60, 150))
        )
    if style == 1:
        blob = base64.b64encode(rng.randbytes(rng.randint(600, 2000))).decode()
        return "\n".join(blob[i : i + 76] for i in range(0, len(blob), 76))
    if style == 2:
        return "\n".join(" ".join(rng.randbytes(16).hex(" ", 2).split()) for _ in range(rng.randint(20, 60)))
    return " ".join(rng.choice(vocabulary) for _ in range(rng.randint(80, 200)))  # word salad


def short(rng: random.Random, clean: list[str]) -> str:
    sentences = re.findall(r"[A-Z][^.!?\n]{10,120}[.!?]", rng.choice(clean))
    return " ".join(sentences[: rng.randint(1, 2)]) or "See the manual for details."


def table(rng: random.Random) -> str:
    columns = rng.randint(3, 8)
    return "\n".join(
        " ".join(f"{rng.uniform(-1e4, 1e4):.{rng.randint(0, 3)}f}" for _ in range(columns))
        for _ in range(rng.randint(20, 60))
    )


def boilerplate(rng: random.Random) -> str:
    menu = [
        "Home",
        "About us",
        "Products",
        "Contact",
        "Login",
        "Sign up",
        "Cart",
        "Search",
        "Careers",
        "Blog",
        "Help",
        "Pricing",
        "Support",
        "Newsletter",
    ]
    lines = rng.sample(menu, rng.randint(6, 12))
    lines += [
        "This website uses cookies to improve your experience",
        "Accept all cookies",
        "Read our privacy policy and terms of use",
        f"Copyright {rng.randint(1998, 2024)} All rights reserved",
    ]
    rng.shuffle(lines)
    return "\n".join(lines)


def evaluation_set(seed: int = 0, per_genre: int = 100, per_defect: int = 60) -> list[dict]:
    """Clean documents, then defects; shuffled (copies may come before their originals)."""
    rng = random.Random(seed)
    documents = []
    for genre in GENRES:
        pool = [chunk for text in SOURCES[genre]() for chunk in chunks(text)]
        picked = distinct(rng.sample(pool, min(len(pool), 3 * per_genre)))[:per_genre]
        documents += [{"id": f"clean-{genre}-{n}", "text": text} for n, text in enumerate(picked)]
    clean = [doc for doc in documents]
    vocabulary = sorted({w for doc in clean for w in re.findall(r"[a-z]{4,12}", doc["text"])})
    for n in range(per_defect):
        original, other = rng.choice(clean), rng.choice(clean)
        documents += [
            {"id": f"exact-{n}-of-{original['id']}", "text": exact_copy(original["text"], rng)},
            {"id": f"near-{n}-of-{other['id']}", "text": near_copy(other["text"], rng, vocabulary)},
            {"id": f"spam-{n}", "text": spam(rng, vocabulary)},
            {"id": f"gibberish-{n}", "text": gibberish(rng, vocabulary)},
            {"id": f"short-{n}", "text": short(rng, [doc["text"] for doc in clean])},
            {"id": f"table-{n}", "text": table(rng)},
            {"id": f"boilerplate-{n}", "text": boilerplate(rng)},
        ]
    rng.shuffle(documents)
    return documents


def kind(document_id: str) -> str:
    return document_id.split("-")[0]


def genre(document_id: str) -> str:
    """The genre of a clean document or of the original a copy was made from."""
    return document_id.split("-of-")[-1].split("-")[1]


def original(document_id: str) -> str:
    return document_id.split("-of-")[-1]
