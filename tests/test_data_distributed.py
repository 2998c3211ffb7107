"""Rank 0 builds the dataset indices first, the others load them; failures reach every rank.

One 2-process gloo job (spawned once for the module) plays three scenarios in turn; each test
checks one of them from the results the ranks wrote.
"""

import json
import os
import socket
import time

import pytest
import torch.multiprocessing as mp

from test_data_support import corpus_texts, indexed_recipe, make_tokenizer, write_jsonl

WORLD_SIZE = 2


def build_with_cache(rank, directory, cache_dir):
    from bigpt.data import build_datasets

    recipe = indexed_recipe(directory / f"rank{rank}", directory / "tokenizer.model", [str(directory / "corpus")])
    recipe.data.cache_dir = str(cache_dir)
    train, valid = build_datasets(recipe, world_rank=rank, train_samples=24, valid_samples=4)
    return {"first_tokens": train[0]["tokens"].tolist(), "train": len(train), "valid": len(valid)}


def scenario_shared_build(rank, directory):
    return build_with_cache(rank, directory, directory / "shared_cache")


def scenario_cache_not_shared(rank, directory):
    # As if each node had its own disk: rank 1 cannot see what rank 0 wrote.
    return build_with_cache(rank, directory, directory / f"node{rank}_cache")


def scenario_rank_zero_fails(rank, directory):
    from bigpt.data.rank_zero_first import build_rank_zero_first

    def build():
        if rank == 0:
            raise OSError("disk full while writing the index cache")
        return "built"

    return build_rank_zero_first(build, world_rank=rank, cache_dir=str(directory), timeout_minutes=1)


def scenario_rank_zero_too_slow(rank, directory):
    from bigpt.data.rank_zero_first import build_rank_zero_first

    def build():
        if rank == 0:
            time.sleep(4)
        return "built"

    return build_rank_zero_first(build, world_rank=rank, cache_dir=str(directory), timeout_minutes=1 / 30)  # 2 s


SCENARIOS = (scenario_shared_build, scenario_cache_not_shared, scenario_rank_zero_fails, scenario_rank_zero_too_slow)


def rank_main(rank, directory, port):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    results = {}
    for scenario in SCENARIOS:
        try:
            results[scenario.__name__] = {"value": scenario(rank, directory)}
        except Exception as err:
            results[scenario.__name__] = {"error": type(err).__name__, "message": str(err)}
    (directory / f"results{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from bigpt.data.preprocess import preprocess

    directory = tmp_path_factory.mktemp("distributed")
    tokenizer = make_tokenizer(directory)
    preprocess(write_jsonl(directory / "corpus.jsonl", corpus_texts(120)), str(directory / "corpus"), tokenizer)
    mp.start_processes(rank_main, args=(directory, free_port()), nprocs=WORLD_SIZE, start_method="spawn")
    return [json.loads((directory / f"results{rank}.json").read_text()) for rank in range(WORLD_SIZE)]


@pytest.mark.slow
def test_every_rank_gets_the_datasets_rank_zero_built(results):
    rank0, rank1 = (ranks["scenario_shared_build"] for ranks in results)
    assert "value" in rank0 and "value" in rank1, (rank0, rank1)
    assert rank0["value"] == rank1["value"]


@pytest.mark.slow
def test_a_cache_dir_other_nodes_cannot_see_is_named(results):
    rank0, rank1 = (ranks["scenario_cache_not_shared"] for ranks in results)
    assert "value" in rank0
    assert rank1["error"] == "BigptError"
    assert "rank 1 cannot see the dataset index files rank 0 wrote" in rank1["message"]
    assert "node1_cache" in rank1["message"]


@pytest.mark.slow
def test_a_failure_on_rank_zero_stops_the_others_with_its_message(results):
    rank0, rank1 = (ranks["scenario_rank_zero_fails"] for ranks in results)
    assert rank0["error"] == "OSError"
    assert rank1["error"] == "BigptError"
    assert "rank 0 failed to build the datasets" in rank1["message"]
    assert "disk full while writing the index cache" in rank1["message"]


@pytest.mark.slow
def test_waiting_for_rank_zero_has_a_time_limit(results):
    rank1 = results[1]["scenario_rank_zero_too_slow"]
    assert rank1["error"] == "BigptError"
    assert "waited up to 0.0333333 min for rank 0" in rank1["message"]
    assert "data.build_timeout_minutes" in rank1["message"]
