"""Generative perplexity under a tiny GPT-2 judge built here: a word-level tokenizer over 20 letters and a 2-layer
model trained for 30 steps on one repeated 4-word cycle, so repeated text is likely and random words are not."""
import json
import math
import random

import pytest
import torch

from mlfm_scale.errors import UserError
from mlfm_scale.eval.genppl import cut_at_first_eos, load_judge, score_samples, score_windows, unigram_entropy

transformers = pytest.importorskip("transformers")

WORDS = [chr(ord("a") + i) for i in range(20)]
CYCLE = "a b c d"
CONTEXT = 16  # the judge's n_positions: a 40-word sample takes several windows


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers

    out = tmp_path_factory.mktemp("judge")
    vocab = {w: i for i, w in enumerate(["<|endoftext|>", "[UNK]", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                                                     eos_token="<|endoftext|>", unk_token="[UNK]")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_head=2, n_embd=32, vocab_size=len(vocab), n_positions=CONTEXT, bos_token_id=0, eos_token_id=0))
    cycle = tokenizer(" ".join([CYCLE] * 8))["input_ids"]
    batch = torch.tensor([cycle[k:k + CONTEXT] for k in range(8)])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(30):
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def judge(judge_dir):
    return load_judge(judge_dir, "cpu", torch.float32)


def test_the_first_eos_rule():
    assert cut_at_first_eos([5, 6, 0, 7, 0], 0) == [5, 6, 0]  # through the first EOS, the EOS kept
    assert cut_at_first_eos([5, 6, 7], 0) == [5, 6, 7]  # no EOS: all of it
    assert cut_at_first_eos([0, 5], 0) == [0] and cut_at_first_eos([], 0) == []


def test_a_sample_with_an_eos_scores_the_judges_eos_once_after_its_text(judge):
    model, tokenizer = judge
    records, metrics = score_samples(["a b c", "a b c"], model, tokenizer, ends_with_eos=[False, True])
    assert [r["tokens"] for r in records] == [3, 4]  # BOS conditions; each word, and the EOS, predicted once
    assert records[1]["nll_sum"] > records[0]["nll_sum"]
    assert records[0]["entropy"] == records[1]["entropy"] == pytest.approx(math.log(3))  # the EOS is not text
    assert (metrics["tokens"], metrics["eos_fraction"]) == (7, 0.5)


def test_repeated_text_scores_a_lower_perplexity_than_random_words(judge):
    model, tokenizer = judge
    rng = random.Random(0)
    noise = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(4)]
    repeated, _ = score_samples([" ".join([CYCLE] * 3)], model, tokenizer)
    scrambled, metrics = score_samples(noise, model, tokenizer)
    assert repeated[0]["ppl"] < 4 < 100 < min(r["ppl"] for r in scrambled)  # ~2 and ~2000 when written
    total = sum(r["nll_sum"] for r in scrambled) / sum(r["tokens"] for r in scrambled)
    assert metrics["gen_ppl"] == pytest.approx(math.exp(total))  # token-weighted over the samples


def test_unigram_entropy_of_the_judges_ids():
    assert unigram_entropy([7, 7, 7]) == 0 and unigram_entropy([]) == 0
    assert unigram_entropy([3, 4]) == pytest.approx(math.log(2))


def test_entropy_per_sample_and_its_mean(judge):
    model, tokenizer = judge
    records, metrics = score_samples(["a a a", "a b", ""], model, tokenizer)
    assert records[0]["entropy"] == 0 and records[1]["entropy"] == pytest.approx(math.log(2))
    assert (records[2]["tokens"], records[2]["ppl"], records[2]["entropy"]) == (0, None, None)  # nothing to score
    assert metrics["mean_entropy"] == pytest.approx(math.log(2) / 2)  # over the samples with a token


def test_scores_do_not_depend_on_batching_and_long_samples_are_windowed(judge):
    model, tokenizer = judge
    rng = random.Random(1)
    texts = [" ".join(rng.choice(WORDS) for _ in range(n)) for n in (2, 9, 40, 15)]
    alone = [score_samples([t], model, tokenizer, batch_size=1)[0][0] for t in texts]
    together, _ = score_samples(texts, model, tokenizer, ends_with_eos=[False] * 4, batch_size=8)
    assert [r["tokens"] for r in together] == [2, 9, 40, 15]  # 40 words > the 16-id context: every one counted
    for a, b in zip(alone, together):
        assert a["nll_sum"] == pytest.approx(b["nll_sum"], rel=1e-5)  # right padding reaches no real position


@pytest.mark.parametrize("length", [1, 2, 16, 17, 41])
def test_windows_predict_every_id_once_with_at_least_half_a_context(length):
    spans = score_windows(length, CONTEXT)
    predicted = [i for _, first, end in spans for i in range(first, end)]
    assert predicted == list(range(1, length))
    for start, first, end in spans:
        assert end - start <= CONTEXT and (first == 1 or first - start >= CONTEXT // 2)


def test_a_missing_or_wrong_judge_directory_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no such directory.*gpt2-large"):
        load_judge(tmp_path / "gpt2-large")
    with pytest.raises(UserError, match="no config.json"):
        load_judge(tmp_path)
    transformers.T5Config(d_model=8, d_ff=8, num_layers=1, num_heads=1, d_kv=8).save_pretrained(tmp_path / "t5")
    with pytest.raises(UserError, match="not a causal language model"):
        load_judge(tmp_path / "t5")


def test_the_genppl_task_scores_each_setting_of_a_sweep_with_one_judge(judge_dir, export_dir, tmp_path):
    from mlfm_scale.cli import main
    from mlfm_scale.eval.tasks import judge_model

    judge_model.cache_clear()
    assert main(["eval", "genppl", "--model", str(export_dir), "--out", str(tmp_path), "--judge", str(judge_dir),
                 "--samples", "3", "--steps", "1", "2"]) == 0
    for steps in (1, 2):
        metrics = json.loads((tmp_path / f"steps{steps}" / "genppl" / "metrics.json").read_text())
        assert metrics["n"] == 3 and len(metrics["samples"]) == 3 and metrics["nfe"] > 0
        assert math.isfinite(metrics["gen_ppl"]) and metrics["gen_ppl"] > 1 and metrics["mean_entropy"] >= 0
    assert judge_model.cache_info().misses == 1  # loaded once for both settings
