import json
import os
import time
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch

from mlfm_scale.data.loader import collate, segment_ids


def test_segment_ids_per_document_and_padding():
    tokens = torch.zeros(2, 8, dtype=torch.long)
    lengths = torch.tensor([8, 6])
    starts = [np.array([0, 3, 5], np.int32), np.array([0], np.int32)]
    assert segment_ids(tokens, lengths, starts).tolist() == [[0, 0, 0, 1, 1, 2, 2, 2], [0, 0, 0, 0, 0, 0, 1, 1]]
    assert segment_ids(tokens, lengths, None).tolist() == [[0] * 8, [0] * 6 + [1, 1]]


def test_collate_builds_micro_batch_tensors():
    samples = [{"tokens": np.arange(4, dtype=np.uint16), "length": 4, "doc_starts": np.array([0, 2], np.int32),
                "block_id": 7},
               {"tokens": np.arange(4, 8, dtype=np.uint16), "length": 3, "doc_starts": np.array([0], np.int32),
                "block_id": 9}]
    batch = collate(samples, within_documents=True)
    assert batch["tokens"].dtype == torch.long and batch["tokens"][1].tolist() == [4, 5, 6, 7]
    assert batch["lengths"].tolist() == [4, 3] and batch["block_id"].tolist() == [7, 9]
    assert batch["segment_ids"].tolist() == [[0, 0, 1, 1], [0, 0, 0, 1]]


@pytest.mark.parametrize("mix", ["within", "per_micro_batch"])
def test_mixture_of_sources_follows_the_weights(tmp_path, mix):
    from data_prep.shards import prepare_shards
    from mlfm_scale.config import PrepSection, load_config
    from mlfm_scale.data.loader import TrainData, load_manifest

    opts = PrepSection(vocab_size=300, val_fraction=0.0, chunk_bytes=4096)
    tokenizer = None
    for name, seed in (("a", 1), ("b", 2)):
        from data_prep.synth import synth_documents

        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n"
                                                        for d in synth_documents(150, seed=seed)))
        prepare_shards([tmp_path / f"{name}.jsonl"], tmp_path / name, opts.model_copy(update={"tokenizer": tokenizer}),
                       32, progress=False)
        tokenizer = str(tmp_path / "a" / "tokenizer")
    sources = f"[{{path: {tmp_path / 'a'}, weight: 3}}, {{path: {tmp_path / 'b'}, weight: 1}}]"
    cfg = load_config(None, [f"out_dir={tmp_path}", "data.seq_len=32", "train.micro_batch_size=4",
                             f"data.sources={sources}", f"data.mix={mix}"])
    assert load_manifest(cfg)["seq_len"] == 32
    from streaming import StreamingDataset

    blocks = {name: {tuple(s["tokens"].tolist()) for s in StreamingDataset(local=str(tmp_path / name), split="train",
                                                                          batch_size=1)} for name in "ab"}
    only = {"a": blocks["a"] - blocks["b"], "b": blocks["b"] - blocks["a"]}  # a block can occur in both corpora
    data = TrainData(cfg)
    batches = [[tuple(t.tolist()) for t in next(data)["tokens"]] for _ in range(40)]
    rows = [r for batch in batches for r in batch]
    share = sum(r in only["a"] for r in rows) / sum(r in only["a"] or r in only["b"] for r in rows)
    assert 0.6 < share < 0.9, share  # weights 3 : 1
    mixed = sum(any(r in only["a"] for r in b) and any(r in only["b"] for r in b) for b in batches)
    assert mixed == 0 if mix == "per_micro_batch" else mixed > 0  # one source per micro-batch, or rows of both


def test_a_position_saved_at_the_end_of_an_epoch_resumes_into_the_next(tmp_path):
    """Saved after the last batch of an epoch (before the loader found the end), the position resumes into the
    next epoch; it is not mistaken for a split too small for one batch."""
    from data_prep.shards import prepare_shards
    from data_prep.synth import synth_documents
    from mlfm_scale.config import PrepSection, load_config
    from mlfm_scale.data.loader import TrainData

    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in synth_documents(60, seed=3)))
    prepare_shards([tmp_path / "c.jsonl"], tmp_path / "data", PrepSection(vocab_size=300, val_fraction=0.0),
                   32, progress=False)
    cfg = load_config(None, [f"out_dir={tmp_path}", "data.root=data", "data.seq_len=32", "train.micro_batch_size=4",
                             f"data.cache={tmp_path / 'cache'}"])
    data = TrainData(cfg)
    per_epoch = len(data.loader)
    first = [next(data)["block_id"].tolist() for _ in range(per_epoch)]
    state = data.state_dict()
    second = next(data)["block_id"].tolist()  # the first batch of epoch 2
    del data
    resumed = TrainData(cfg)
    resumed.load_state_dict(state)
    assert next(resumed)["block_id"].tolist() == second
    assert len(first) == per_epoch > 1


def test_a_prefix_claim_skips_used_prefixes_and_survives_losing_a_race(monkeypatch):
    """A PREFIX with any of a dataset's names is skipped; a PREFIX whose ``_locals`` another job creates between
    our look and our claim is given up for the next one."""
    import streaming.base.shared as shared

    from mlfm_scale.data.loader import SHM_PREFIXES, claim_shm_prefix

    first = SHM_PREFIXES.stop - 2
    expected = [first, first + 1, SHM_PREFIXES.start]  # the search wraps around
    taken = shared.SharedMemory(f"{expected[0]:06}_barrier", True, 8)  # a live dataset's memory
    real, rival = shared.SharedMemory, []

    def rival_claims_first(name, create=None, size=0, auto_cleanup=True):
        if create is True and name == f"{expected[1]:06}_locals":
            rival.append(real(name, True, 8))  # another job, between our look and our claim
        return real(name, create, size, auto_cleanup)

    monkeypatch.setattr(shared, "SharedMemory", rival_claims_first)
    try:
        prefix, shm = claim_shm_prefix(["/cache/train"], first=first)
        assert prefix == expected[2] and bytes(shm.buf[4:]).startswith(b"/cache/train")
        shm.cleanup()
    finally:
        for s in (taken, *rival):
            s.cleanup()


def _job_rank(barrier, rank: int, world: int, port: int, overrides: list[str], rounds: int, result: str) -> None:
    """One rank of a training job on this node: ``rounds`` times, build the job's TrainData at the same moment
    as every other job, read a batch, and keep the dataset alive until all did; writes its prefixes or its error."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist

    from mlfm_scale.config import load_config
    from mlfm_scale.data.loader import TrainData

    dist.init_process_group("gloo", rank=rank, world_size=world)
    prefixes = []
    try:
        cfg = load_config(None, overrides)
        for _ in range(rounds):
            barrier.wait(timeout=300)
            data = TrainData(cfg)
            assert next(data)["tokens"].shape == (4, 32)
            prefixes.append(data.dataset._shm_prefix_int)
            barrier.wait(timeout=300)  # every job's dataset is alive here
            del data
        outcome = {"prefixes": prefixes}
    except BaseException:
        barrier.abort()
        outcome = {"error": traceback.format_exc()}
    Path(result).write_text(json.dumps(outcome))


@pytest.mark.multiprocess
def test_jobs_starting_together_on_one_node_all_build_their_data(shards, tmp_path):
    """Three 2-rank jobs on this node — two on the same shards, one on other shards — build their datasets at the
    same instant, four times over: all succeed, each job's ranks share one PREFIX and the jobs' PREFIXes differ.
    (Streaming's own registration fails here: the two jobs on the same shards share a cache directory, and
    concurrent ones claim the same PREFIX.)"""
    import multiprocessing as mp

    from data_prep.shards import prepare_shards
    from data_prep.synth import write_synth_jsonl
    from mlfm_scale.config import PrepSection
    from tests.distributed import free_port

    write_synth_jsonl(tmp_path / "other.jsonl", 200, seed=5)
    prepare_shards([tmp_path / "other.jsonl"], tmp_path / "other", PrepSection(vocab_size=300, chunk_bytes=16384),
                   32, progress=False)
    jobs = {"a": shards, "b": shards, "c": tmp_path / "other"}
    ctx = mp.get_context("spawn")
    barrier, rounds = ctx.Barrier(2 * len(jobs)), 4
    procs = {}
    for job, data in jobs.items():
        port = free_port()
        overrides = [f"out_dir={tmp_path / job}", f"data.root={data}", f"data.cache={tmp_path / 'cache'}",
                     "data.seq_len=32", "train.micro_batch_size=4"]
        for rank in range(2):
            procs[job, rank] = ctx.Process(target=_job_rank, args=(barrier, rank, 2, port, overrides, rounds,
                                                                    str(tmp_path / f"{job}{rank}.json")))
            procs[job, rank].start()
    deadline = time.monotonic() + 600
    for p in procs.values():
        p.join(max(1.0, deadline - time.monotonic()))
    hung = [key for key, p in procs.items() if p.is_alive()]
    for key in hung:
        procs[key].kill()
        procs[key].join()
    results = {key: json.loads(f.read_text()) if (f := tmp_path / f"{key[0]}{key[1]}.json").exists()
               else {"error": "no result (killed)"} for key in procs}
    errors = [f"job {job} rank {rank}: {r['error'][-1200:]}" for (job, rank), r in results.items() if "error" in r]
    assert not hung and not errors, f"hung: {hung}\n" + "\n".join(errors)
    for i in range(rounds):
        per_job = {job: {results[job, rank]["prefixes"][i] for rank in range(2)} for job in jobs}
        assert all(len(p) == 1 for p in per_job.values()), per_job  # one PREFIX per job and node
        assert len(set.union(*per_job.values())) == len(jobs), per_job  # no two jobs share one
