import json
import subprocess

import numpy as np
import pytest
from tokenizers import Tokenizer

from data_prep.readers import CorpusError
from data_prep.shards import PrepError, is_validation, prepare_shards
from data_prep.synth import synth_documents
from data_prep.tokenizer import MASK, TokenizerError, train_bpe
from mlfm_scale.config import PrepSection
from mlfm_scale.data.manifest import ManifestError, check_compatible, read_manifest
from tests.conftest import REPO

SEQ = 64
OPTS = PrepSection(vocab_size=300, val_fraction=0.1, chunk_bytes=8192, shard_size_limit=1 << 14)


def read_split(root, split, num_workers=0, cache=None):
    """Every sample of ``root/split`` through StreamingDataset + DataLoader, in loader order; shards are
    read as a remote into a fresh local cache, so the prepared directory stays as prep wrote it."""
    import tempfile

    from streaming import StreamingDataset
    from streaming.base.util import clean_stale_shared_memory
    from torch.utils.data import DataLoader

    clean_stale_shared_memory()
    local = str(cache or tempfile.mkdtemp(dir=root.parent))
    ds = StreamingDataset(remote=str(root), local=local, split=split, shuffle=False, batch_size=1)
    samples = [{k: v[0].numpy() if hasattr(v[0], "numpy") else v[0] for k, v in b.items()}
               for b in DataLoader(ds, batch_size=1, num_workers=num_workers)]
    del ds
    clean_stale_shared_memory()
    return samples


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, synth_corpus):
    out = tmp_path_factory.mktemp("shards") / "w2"
    manifest = prepare_shards([synth_corpus], out, OPTS.model_copy(update={"workers": 2}), SEQ, progress=False)
    return out, manifest


def test_streaming_read_back_is_exactly_the_packed_stream(prepared, synth_corpus):
    out, manifest = prepared
    tok = Tokenizer.from_file(str(out / "tokenizer" / "tokenizer.json"))
    eos = manifest["tokenizer"]["eos_id"]
    docs = [json.loads(line)["text"] for line in synth_corpus.read_text().splitlines()]
    for split in ("train", "val"):
        mine = [d for d in docs if is_validation(d, OPTS.val_fraction) == (split == "val")]
        ids = [tok.encode(d, add_special_tokens=False).ids for d in mine]
        expected = np.concatenate([np.array(i + [eos]) for i in ids])
        for num_workers in (0, 2):
            samples = read_split(out, split, num_workers)
            samples.sort(key=lambda s: int(s["block_id"]))  # loader workers interleave; ids give chunk order
            got = np.concatenate([s["tokens"][: int(s["length"])] for s in samples])
            assert got.tolist() == expected.tolist(), (split, num_workers)
            # document boundaries: each recorded start follows an EOS (or starts the block)
            for s in samples:
                starts = s["doc_starts"]
                assert starts[0] == 0 and all(s["tokens"][p - 1] == eos for p in starts[1:])
        counts = manifest["splits"][split]
        assert counts["documents"] == len(mine) and counts["tokens"] == len(expected)
        assert counts["blocks"] == len(samples) and counts["padding"] == len(samples) * SEQ - len(expected)


def test_shards_are_identical_for_any_worker_count(prepared, synth_corpus, tmp_path):
    out2, manifest2 = prepared
    manifest1 = prepare_shards([synth_corpus], tmp_path / "w1", OPTS, SEQ, progress=False)
    files = sorted(p.relative_to(out2) for p in out2.rglob("*") if p.is_file() and p.name != "manifest.json")
    assert files == sorted(p.relative_to(tmp_path / "w1") for p in (tmp_path / "w1").rglob("*")
                           if p.is_file() and p.name != "manifest.json")
    assert len([f for f in files if f.name.startswith("shard.")]) > 4  # several chunks and shards
    for f in files:
        assert (out2 / f).read_bytes() == (tmp_path / "w1" / f).read_bytes(), f
    assert manifest1["splits"] == manifest2["splits"] and manifest1["tokenizer"] == manifest2["tokenizer"]


def test_manifest_contents_and_compatibility(prepared):
    out, manifest = prepared
    assert read_manifest(out) == manifest
    tok = manifest["tokenizer"]
    assert manifest["kind"] == "pretrain" and manifest["seq_len"] == SEQ and manifest["token_dtype"] == "uint16"
    assert tok["vocab_size"] == 300 and len({tok["eos_id"], tok["pad_id"], tok["mask_id"]}) == 3
    assert manifest["sources"][0]["bytes"] > 0 and manifest["prep"]["workers"] == 2
    check_compatible(manifest, seq_len=SEQ, vocab_size=300)
    with pytest.raises(ManifestError, match="seq_len 64, config data.seq_len is 128"):
        check_compatible(manifest, seq_len=128, vocab_size=300)
    with pytest.raises(ManifestError, match="model.vocab_size is 256"):
        check_compatible(manifest, seq_len=SEQ, vocab_size=256)


def test_existing_output_is_refused_unless_overwrite(prepared, synth_corpus):
    out, _ = prepared
    with pytest.raises(PrepError, match="--overwrite"):
        prepare_shards([synth_corpus], out, OPTS, SEQ, progress=False)


def test_failure_midway_leaves_no_output(tmp_path, synth_corpus):
    bad = tmp_path / "bad.jsonl"
    lines = synth_corpus.read_text().splitlines()
    bad.write_text("\n".join(lines[:500] + ["{broken"] + lines[500:]) + "\n")
    opts = OPTS.model_copy(update={"tokenizer": None, "vocab_size": 300})
    out = tmp_path / "out"
    # the tokenizer pass reads everything first, so give a tokenizer to fail in the sharding pass
    tok = train_bpe(synth_documents(50), 300)
    tok.save(str(tmp_path / "tok.json"))
    with pytest.raises(CorpusError, match=r"bad\.jsonl:501: malformed JSON"):
        prepare_shards([bad], out, opts.model_copy(update={"tokenizer": str(tmp_path / "tok.json")}), SEQ,
                       progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "tok.json"]  # no out, no temporary
    with pytest.raises(ManifestError, match="no manifest.json"):
        read_manifest(out)
    manifest = prepare_shards([bad], out, opts.model_copy(update={"skip_bad": True}), SEQ, progress=False)
    assert manifest["skipped"]["bad"] == 1


# ------------------------------------------------------------------ replacing a previous prep (--overwrite)
SMALL = OPTS.model_copy(update={"workers": 1})


def snapshot(directory):
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in directory.rglob("*") if p.is_file()}


@pytest.fixture
def previous(tmp_path):
    """A finished prep of 300 documents in ``tmp_path/data``, with its corpus beside it."""
    from data_prep.synth import write_synth_jsonl

    write_synth_jsonl(tmp_path / "raw.jsonl", 300, seed=3)
    prepare_shards([tmp_path / "raw.jsonl"], tmp_path / "data", SMALL, SEQ, progress=False)
    return tmp_path / "data"


def test_input_inside_out_is_refused_and_nothing_deleted(tmp_path, previous, monkeypatch):
    # the case: `mlfm prep corpus data/raw.jsonl --out data --overwrite`
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "raw.jsonl").write_bytes((tmp_path / "raw.jsonl").read_bytes())
    with pytest.raises(PrepError, match=r"input .*raw\.jsonl lies inside the output directory"):
        prepare_shards([fresh / "raw.jsonl"], fresh, SMALL, SEQ, overwrite=True, progress=False)
    assert [p.name for p in fresh.iterdir()] == ["raw.jsonl"]
    # ... and inside a previous prep, named through a symlink, a relative path or a directory
    (previous / "raw.jsonl").write_bytes((tmp_path / "raw.jsonl").read_bytes())
    (tmp_path / "link.jsonl").symlink_to(previous / "raw.jsonl")
    before = snapshot(previous)
    monkeypatch.chdir(tmp_path)
    for given, out in [(tmp_path / "link.jsonl", previous), ("fresh/../data/raw.jsonl", "data"), (previous, "data")]:
        with pytest.raises(PrepError, match="lies inside the output directory"):
            prepare_shards([given], out, SMALL, SEQ, overwrite=True, progress=False)
    assert snapshot(previous) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "fresh", "link.jsonl", "raw.jsonl"]


def test_tokenizer_inside_out_is_refused(tmp_path, previous):
    before = snapshot(previous)
    for given in (previous / "tokenizer", previous / "tokenizer" / "tokenizer.json"):
        with pytest.raises(PrepError, match="--tokenizer .* lies inside the output directory"):
            prepare_shards([tmp_path / "raw.jsonl"], previous, SMALL.model_copy(update={"tokenizer": str(given)}),
                           SEQ, overwrite=True, progress=False)
    assert snapshot(previous) == before


def test_failed_overwrite_leaves_the_previous_prep_intact_and_loadable(tmp_path, previous):
    before, samples = snapshot(previous), read_split(previous, "train", cache=tmp_path / "cache1")
    bad = tmp_path / "bad.jsonl"
    lines = (tmp_path / "raw.jsonl").read_text().splitlines()
    bad.write_text("\n".join(lines[:200] + ["{broken"] + lines[200:]) + "\n")
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text("{not a tokenizer")
    (tmp_path / "tok2").mkdir()
    (tmp_path / "tok2" / "tokenizer.json").write_bytes(before["tokenizer/tokenizer.json"])  # a valid one
    failing = [([bad], SMALL.model_copy(update={"tokenizer": str(tmp_path / "tok2")}), CorpusError),  # midway
               ([tmp_path / "raw.jsonl"], SMALL.model_copy(update={"tokenizer": str(tmp_path / "tok")}),
                TokenizerError)]
    for inputs, opts, error in failing:
        with pytest.raises(error):
            prepare_shards(inputs, previous, opts, SEQ, overwrite=True, progress=False)
        assert snapshot(previous) == before
    assert not any(p.name.startswith(".data.tmp-") for p in tmp_path.iterdir())
    assert read_manifest(previous)["files"] == sorted(set(before) - {"manifest.json"})
    again = read_split(previous, "train", cache=tmp_path / "cache2")
    assert [s["tokens"].tolist() for s in again] == [s["tokens"].tolist() for s in samples]


def test_overwrite_replaces_only_the_previous_prep_files(tmp_path, previous):
    from data_prep.synth import write_synth_jsonl

    old = read_manifest(previous)
    (previous / "NOTES.md").write_text("mine")
    (previous / "train" / "keep.txt").write_text("mine too")
    write_synth_jsonl(tmp_path / "small.jsonl", 30, seed=4)  # one chunk, where the previous prep had several
    new = prepare_shards([tmp_path / "small.jsonl"], previous, SMALL, 32, overwrite=True, progress=False)
    assert new["seq_len"] == 32 and new["splits"]["train"]["blocks"] < old["splits"]["train"]["blocks"]
    assert read_manifest(previous) == new
    assert sorted(snapshot(previous)) == sorted([*new["files"], "manifest.json", "NOTES.md", "train/keep.txt"])
    assert (previous / "NOTES.md").read_text() == "mine" and (previous / "train" / "keep.txt").read_text() == "mine too"
    gone = {f.split("/")[1] for f in old["files"]} - {f.split("/")[1] for f in new["files"]}
    assert "c000001" in gone and not any((previous / s / c).exists() for s in ("train", "val") for c in gone)
    assert len(read_split(previous, "train")) == new["splits"]["train"]["blocks"]


def test_overwrite_refuses_a_directory_without_a_file_list(tmp_path, previous):
    manifest = read_manifest(previous)
    del manifest["files"]  # as written before manifests listed their files
    (previous / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "results.csv").write_text("mine")
    for out in (previous, tmp_path / "mine"):  # an old prep; a directory that holds no prep at all
        before = snapshot(out)
        with pytest.raises(PrepError, match="empty the directory yourself"):
            prepare_shards([tmp_path / "raw.jsonl"], out, SMALL, SEQ, overwrite=True, progress=False)
        assert snapshot(out) == before


def test_overwrite_refuses_to_replace_a_file_the_previous_prep_did_not_write(tmp_path, previous):
    manifest = read_manifest(previous)
    manifest["files"].remove("val/index.json")  # so val/index.json is the user's, where the new prep writes
    (previous / "manifest.json").write_text(json.dumps(manifest))
    (previous / "val" / "index.json").write_text("mine")
    before = snapshot(previous)
    with pytest.raises(PrepError, match=r"val/index\.json was not written by a previous prep"):
        prepare_shards([tmp_path / "raw.jsonl"], previous, SMALL, SEQ, overwrite=True, progress=False)
    assert snapshot(previous) == before


def test_given_tokenizer_gets_a_mask_token_appended(tmp_path, synth_corpus):
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator(synth_documents(50), trainers.BpeTrainer(vocab_size=280, special_tokens=["</s>"]))
    (tmp_path / "tok").mkdir()
    tok.save(str(tmp_path / "tok" / "tokenizer.json"))
    manifest = prepare_shards([synth_corpus], tmp_path / "out", OPTS.model_copy(
        update={"tokenizer": str(tmp_path / "tok")}), SEQ, progress=False)
    t = manifest["tokenizer"]
    assert (t["eos_id"], t["pad_id"], t["mask_id"], t["vocab_size"]) == (0, 0, 280, 281)
    saved = Tokenizer.from_file(str(tmp_path / "out" / "tokenizer" / "tokenizer.json"))
    assert saved.token_to_id(MASK) == 280
    with pytest.raises(TokenizerError, match="no EOS token.*--eos-token"):
        prepare_shards([synth_corpus], tmp_path / "o2", OPTS.model_copy(
            update={"tokenizer": str(tmp_path / "tok"), "eos_token": "<nope>"}), SEQ, progress=False)
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        prepare_shards([synth_corpus], tmp_path / "o3", OPTS.model_copy(update={"tokenizer": str(tmp_path)}),
                       SEQ, progress=False)


def test_sft_shards_carry_the_response_mask(tmp_path):
    f = tmp_path / "sft.jsonl"
    rows = [{"prompt": f"What is {i} plus {i}?", "response": f"{i} plus {i} equals {2 * i}."} for i in range(40)]
    rows.append({"prompt": "long " * 200, "response": "too long to fit"})
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    manifest = prepare_shards([f], out, PrepSection(format="sft", vocab_size=260, val_fraction=0.0), SEQ,
                              progress=False)
    assert manifest["kind"] == "sft" and manifest["skipped"]["too_long"] == 1 and "val" not in manifest["splits"]
    tok = Tokenizer.from_file(str(out / "tokenizer" / "tokenizer.json"))
    samples = sorted(read_split(out, "train"), key=lambda s: int(s["block_id"]))
    assert len(samples) == 40
    for row, s in zip(rows, samples):
        prompt = tok.encode(row["prompt"], add_special_tokens=False).ids
        response = tok.encode(row["response"], add_special_tokens=False).ids
        assert s["tokens"][: len(prompt)].tolist() == prompt
        assert s["tokens"][len(prompt): len(prompt) + len(response)].tolist() == response
        assert s["response_mask"].tolist() == [0] * len(prompt) + [1] * (SEQ - len(prompt))
        assert (s["tokens"][len(prompt) + len(response):] == manifest["tokenizer"]["eos_id"]).all()


def test_cli_end_to_end(tmp_path, mlfm_cmd):
    corpus = tmp_path / "c.jsonl"
    def run(*a):
        return subprocess.run([*mlfm_cmd, *a], capture_output=True, text=True, timeout=300, cwd=REPO)
    synth = run("prep", "synth", str(corpus), "--documents", "200", "--seed", "4")
    assert synth.returncode == 0, synth.stderr
    out = run("prep", "corpus", str(corpus), "--out", str(tmp_path / "s"), "--train-tokenizer", "260",
              "--seq-len", "32", "--workers", "2", "--val-fraction", "0.2", "--no-progress")
    assert out.returncode == 0, out.stderr
    manifest = json.loads(out.stdout)
    assert manifest["tokenizer"]["vocab_size"] == 260 and manifest["seq_len"] == 32
    assert "tokens/s" in out.stderr
    with corpus.open("a") as f:
        f.write('{"text": "fine"}\n{"txt": "oops"}\n')
    bad = run("prep", "corpus", str(corpus), "--out", str(tmp_path / "s2"), "--no-progress")
    assert bad.returncode == 1 and "c.jsonl:202: no field 'text'" in bad.stderr and "Traceback" not in bad.stderr
    again = run("prep", "corpus", str(corpus), "--out", str(tmp_path / "s"), "--no-progress")
    assert again.returncode == 1 and "--overwrite" in again.stderr
    (tmp_path / "s" / "raw.jsonl").write_bytes(corpus.read_bytes())
    inside = run("prep", "corpus", str(tmp_path / "s" / "raw.jsonl"), "--out", str(tmp_path / "s"), "--overwrite")
    assert inside.returncode == 1 and "lies inside the output directory" in inside.stderr
    assert "Traceback" not in inside.stderr and (tmp_path / "s" / "raw.jsonl").is_file()
