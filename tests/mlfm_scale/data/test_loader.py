import numpy as np
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


def test_mixture_of_sources_follows_the_weights(tmp_path):
    import json

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
                             f"data.sources={sources}"])
    assert load_manifest(cfg)["seq_len"] == 32
    from streaming import StreamingDataset
    from streaming.base.util import clean_stale_shared_memory

    clean_stale_shared_memory()
    source_a = StreamingDataset(local=str(tmp_path / "a"), split="train", batch_size=1)
    a_blocks = {tuple(s["tokens"].tolist()) for s in source_a}
    clean_stale_shared_memory()
    data = TrainData(cfg)
    rows = [tuple(t.tolist()) for _ in range(40) for t in next(data)["tokens"]]
    share = sum(r in a_blocks for r in rows) / len(rows)
    assert 0.6 < share < 0.9, share  # weights 3 : 1


def test_a_position_saved_at_the_end_of_an_epoch_resumes_into_the_next(tmp_path):
    """Saved after the last batch of an epoch (before the loader found the end), the position resumes into the
    next epoch; it is not mistaken for a split too small for one batch."""
    import json

    from streaming.base.util import clean_stale_shared_memory

    from data_prep.shards import prepare_shards
    from data_prep.synth import synth_documents
    from mlfm_scale.config import PrepSection, load_config
    from mlfm_scale.data.loader import TrainData

    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in synth_documents(60, seed=3)))
    prepare_shards([tmp_path / "c.jsonl"], tmp_path / "data", PrepSection(vocab_size=300, val_fraction=0.0),
                   32, progress=False)
    cfg = load_config(None, [f"out_dir={tmp_path}", "data.root=data", "data.seq_len=32", "train.micro_batch_size=4",
                             f"data.cache={tmp_path / 'cache'}"])
    clean_stale_shared_memory()
    data = TrainData(cfg)
    per_epoch = len(data.loader)
    first = [next(data)["block_id"].tolist() for _ in range(per_epoch)]
    state = data.state_dict()
    second = next(data)["block_id"].tolist()  # the first batch of epoch 2
    del data
    clean_stale_shared_memory()
    resumed = TrainData(cfg)
    resumed.load_state_dict(state)
    assert next(resumed)["block_id"].tolist() == second
    assert len(first) == per_epoch > 1
