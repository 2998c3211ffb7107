"""The perplexity stage: a reference model trained by bigpt on trusted text (astronomy articles)
keeps held-out articles like it and drops gibberish and off-domain text; its scores match the
same checkpoint exported to Hugging Face transformers; the band is the percentile band of all
scores; and every missing or mismatched reference file is refused before any work starts.
"""

import json
import math
import random
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("datatrove", reason="the curation extra is not installed: pip install -e '.[curate]'")

from bigpt.curate import load_curation_recipe  # noqa: E402
from bigpt.curate.run import curate  # noqa: E402
from bigpt.errors import BigptError  # noqa: E402
from curate_corpus import ASTRONOMY_NOUNS, COOKING_NOUNS, article, gibberish, kind, write_corpus  # noqa: E402
from multirank import MOCK_RECIPE, run_bigpt  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ASTRONOMY = ROOT / "recipes/data/astronomy.toml"
REFERENCE_STEPS = 40


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A 4-layer model trained by bigpt on 300 astronomy articles, and its tokenizer."""
    from bigpt.data.preprocess import preprocess
    from bigpt.data.tokenizer import load_tokenizer
    from bigpt.data.tokenizer_training import train_tokenizer

    folder = tmp_path_factory.mktemp("reference")
    rng = random.Random(11)
    trusted = folder / "trusted.jsonl"
    trusted.write_text("".join(json.dumps({"text": article(rng, ASTRONOMY_NOUNS)}) + "\n" for _ in range(300)))
    tokenizer = train_tokenizer([trusted], 400, folder / "tokenizer")
    preprocess(trusted, str(folder / "trusted"), tokenizer)
    recipe = folder / "reference.toml"
    recipe.write_text(
        f'base = "{MOCK_RECIPE}"\nname = "reference"\nrun_dir = "{folder / "run"}"\n'
        f"[model]\nvocab_size = {load_tokenizer(tokenizer).vocab_size}\n"
        f"[train]\ntrain_iters = {REFERENCE_STEPS}\n"
        f'[data]\nsource = "indexed"\ntokenizer = "{tokenizer}"\n'
        f'blend = [{{ path = "{folder / "trusted"}" }}]\nsplit = "100,0,0"\n'
        f"[checkpoint]\nsave_interval = {REFERENCE_STEPS}\n"
    )
    run_bigpt(recipe)
    return SimpleNamespace(checkpoint=folder / "run" / "checkpoints", tokenizer=tokenizer, folder=folder)


def perplexity_recipe(folder: Path, raw: Path, text: str = "") -> Path:
    path = folder / "perplexity.toml"
    path.write_text(
        f'base = "{ASTRONOMY}"\nstages = ["perplexity"]\n[input]\npath = "{raw}"\n'
        f'[output]\ndir = "{folder / "out"}"\n[report]\npng = false\n{text}\n'
    )
    return path


@pytest.fixture(scope="module")
def scored(reference, tmp_path_factory):
    """24 held-out astronomy articles, 8 gibberish pages and 8 cooking articles in 2 files,
    through a band that keeps the lowest 60 %: exactly as many documents as the articles."""
    folder = tmp_path_factory.mktemp("scored")
    rng = random.Random(5)
    documents = (
        [{"id": f"astronomy-{i}", "text": article(rng, ASTRONOMY_NOUNS)} for i in range(24)]
        + [{"id": f"gibberish-{i}", "text": gibberish(rng)} for i in range(8)]
        + [{"id": f"cooking-{i}", "text": article(rng, COOKING_NOUNS)} for i in range(8)]
    )
    rng.shuffle(documents)
    write_corpus(folder / "raw", documents, files=2)
    recipe = perplexity_recipe(
        folder,
        folder / "raw",
        f'[stage.perplexity]\ncheckpoint = "{reference.checkpoint}"\nmax_percentile = 60\nbatch_size = 5\n',
    )
    report = curate(load_curation_recipe(recipe, ["executor.workers=2"])).report
    kept = [json.loads(line) for line in (folder / "out" / "curated.jsonl").read_text().splitlines()]
    return SimpleNamespace(folder=folder, documents=documents, report=report, kept=kept)


def test_the_reference_model_keeps_text_like_its_training_text(scored):
    assert Counter(kind(doc["id"]) for doc in scored.kept) == {"astronomy": 24}
    (stage,) = scored.report["stages"]
    assert stage["stage"] == "perplexity"
    assert stage["dropped_by_rule"] == {"perplexity_above_band": stage["dropped"]}
    assert stage["dropped"]["documents"] == 16
    assert stage["band"]["percentiles"] == [0, 60] and stage["band"]["documents"] == 40


def test_the_band_is_the_percentile_band_of_all_scores(scored):
    band = json.loads(next((scored.folder / "out/work/stages").glob("*_perplexity/band.json")).read_text())
    scores = sorted(
        score
        for path in (scored.folder / "out/work/stages").glob("*_perplexity/scores/*.json")
        for score in json.loads(path.read_text())
    )
    assert len(scores) == band["documents"] == 40
    # 60th percentile of 40 values, linear interpolation: between the 24th and 25th smallest
    assert band["perplexity"] == pytest.approx([scores[0], scores[23] + 0.4 * (scores[24] - scores[23])], rel=1e-12)
    assert max(doc["metadata"]["perplexity"] for doc in scored.kept) == scores[23]


def test_scores_match_the_checkpoint_exported_to_transformers(reference, scored, tmp_path):
    """The perplexity each kept document carries, recomputed by transformers' Llama on the same
    tokens ([eod] + text + [eod], in the reference model's 64-token windows)."""
    import torch
    import transformers

    from bigpt.checkpoint import store
    from bigpt.data.tokenizer import load_tokenizer
    from bigpt.hf.convert import export_hf
    from bigpt.runtime.distributed import process_group_of_one

    with process_group_of_one():
        export_hf(store.latest_in(reference.checkpoint), tmp_path / "hf")
    model = transformers.LlamaForCausalLM.from_pretrained(
        tmp_path / "hf", torch_dtype=torch.float32, attn_implementation="eager"
    ).eval()
    tokenizer = load_tokenizer(reference.tokenizer)
    for doc in scored.kept[:6]:
        ids = [tokenizer.eod] + tokenizer.encode(doc["text"]) + [tokenizer.eod]
        total, count = 0.0, 0
        for start in range(0, len(ids) - 1, 64):
            window = torch.tensor([ids[start : start + 65]])
            with torch.no_grad():
                logits = model(window[:, :-1]).logits.double()
            total += torch.nn.functional.cross_entropy(logits[0], window[0, 1:], reduction="sum").item()
            count += window.shape[1] - 1
        assert doc["metadata"]["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5), doc["id"]


def refused(recipe: Path) -> str:
    with pytest.raises(BigptError) as info:
        curate(load_curation_recipe(recipe))
    assert not (recipe.parent / "out").exists()
    assert "\n" not in str(info.value)
    return str(info.value)


@pytest.fixture
def raw(tmp_path):
    write_corpus(tmp_path / "raw", [{"id": "a", "text": "The star and the planet."}], files=1)
    return tmp_path / "raw"


def test_missing_reference_checkpoint_is_refused(tmp_path, raw):
    message = refused(perplexity_recipe(tmp_path, raw, '[stage.perplexity]\ncheckpoint = "nowhere"\n'))
    assert 'stage.perplexity.checkpoint = "' in message and "no such directory" in message
    message = refused(perplexity_recipe(tmp_path, raw))
    assert "stage.perplexity.checkpoint is not set" in message


def test_damaged_reference_checkpoint_is_refused(reference, tmp_path, raw):
    import shutil

    from bigpt.checkpoint import store

    damaged = tmp_path / "iter_0000040"
    shutil.copytree(store.latest_in(reference.checkpoint), damaged)
    shard = next(damaged.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    message = refused(perplexity_recipe(tmp_path, raw, f'[stage.perplexity]\ncheckpoint = "{damaged}"\n'))
    assert "truncated or damaged" in message


def test_missing_or_mismatched_reference_tokenizer_is_refused(reference, tmp_path, raw):
    from bigpt.data.tokenizer_training import train_tokenizer

    stage = f'[stage.perplexity]\ncheckpoint = "{reference.checkpoint}"\n'
    message = refused(perplexity_recipe(tmp_path, raw, stage + 'tokenizer = "no.model"\n'))
    assert "stage.perplexity.tokenizer" in message and "does not exist" in message
    big = train_tokenizer([reference.folder / "trusted.jsonl"], 500, tmp_path / "big")
    message = refused(perplexity_recipe(tmp_path, raw, stage + f'tokenizer = "{big}"\n'))
    assert "stage.perplexity.tokenizer" in message and "model.vocab_size" in message


def test_an_empty_band_is_refused_by_the_recipe(tmp_path, raw):
    recipe = perplexity_recipe(
        tmp_path, raw, '[stage.perplexity]\ncheckpoint = "x"\nmin_percentile = 50\nmax_percentile = 50\n'
    )
    with pytest.raises(BigptError, match=r"stage.perplexity.min_percentile \(50.0\) must be below"):
        load_curation_recipe(recipe)
    recipe.write_text(recipe.read_text().replace("max_percentile = 50", "max_percentile = 101"))
    with pytest.raises(BigptError, match=r"stage.perplexity.max_percentile.*between 0 and 100"):
        load_curation_recipe(recipe)
