"""Trained tiny checkpoints shared by the export and reshard tests (each run is seconds of 2-process training), and
a tiny export shared by the sampler and evaluation CLI tests."""
import json

import pytest
import torch

from tests.mlfm_scale.train.test_training import train


@pytest.fixture(scope="session")
def tp2_run(tmp_path_factory, shards):
    """TP=2 × DP=1, ZeRO-3, 8 steps, checkpoints at 4 and 8."""
    out = tmp_path_factory.mktemp("tp2")
    train(out, shards, 2, "parallel.tp=2")
    return out


@pytest.fixture(scope="session")
def dp2_run(tmp_path_factory, shards):
    """TP=1 × DP=2, ZeRO-3, 8 steps, checkpoints at 4 and 8."""
    out = tmp_path_factory.mktemp("dp2")
    train(out, shards, 2)
    return out


# A pipeline run's settings: ZeRO-1, 4 micro-batches per step; crops change the sequence length between
# micro-batches (DeepSpeed's dynamic shapes) and the γ curve moves every 2 steps.
PIPELINE = ("parallel.zero_stage=1", "train.grad_accum=4", "train.micro_batch_size=2",
            "objective.crop_probability=0.3", "objective.active.update_every=2")


@pytest.fixture(scope="session")
def pp2_run(tmp_path_factory, shards):
    """PP=2 (two processes, one layer per stage), ZeRO-1, 8 steps, checkpoints at 4 and 8."""
    out = tmp_path_factory.mktemp("pp2")
    train(out, shards, 2, *PIPELINE, "parallel.pp=2")
    return out


@pytest.fixture(scope="session")
def export_dir(tmp_path_factory, process_group):
    """A small export (a random 1-layer network with a real BPE tokenizer, seq_len 32); tests copy it to change it."""
    from data_prep.synth import synth_documents
    from data_prep.tokenizer import ensure_special_tokens, train_bpe
    from mlfm_scale.config import Config, ModelSection, SampleSection
    from mlfm_scale.export import export_config, export_tensors, write_safetensors
    from mlfm_scale.model.mlfm import MLFMModel
    from mlfm_scale.train.universal import canonical_name
    from tests.mlfm_scale.sample.test_denoiser import CFG

    out = tmp_path_factory.mktemp("export")
    tok = train_bpe(synth_documents(200), 300)
    ids = ensure_special_tokens(tok)
    tok.save(str(out / "tokenizer.json"))
    vocab = tok.get_vocab_size()
    torch.manual_seed(0)
    model = MLFMModel(CFG, vocab)
    full = {canonical_name(n): p.detach() for n, p in model.named_parameters()}
    tensors = export_tensors(full, vocab)
    write_safetensors(tensors, out, torch.float32, 1 << 30)
    cfg = Config(model=ModelSection(**CFG.model_dump()), data={"seq_len": 32},
                 sample=SampleSection(steps=3, length=6, temperature=1.0))
    tokenizer = {"vocab_size": vocab, "mask_id": ids.mask, "eos_id": ids.eos, "pad_id": ids.pad}
    config = export_config(cfg, tokenizer, {"objective": {"curve": None}}, tensors["embedding.weight"], out, "raw",
                           "fp32")
    (out / "config.json").write_text(json.dumps(config))
    (out / "generation_config.json").write_text(json.dumps(cfg.sample.model_dump(mode="json")))
    return out
