"""The lm-eval adapter on the tiny export widened for GSM8K (``export``, eval/conftest.py): the
registered model, generate_until's rows, seeds and stop strings, the refused likelihoods, and the local GSM8K task
end to end, offline."""

import pytest
from lm_eval.api.instance import Instance

from mlfm_scale.eval.gsm8k import GSM8K_FILE, load_problems, prompt_of, score
from mlfm_scale.eval.harness import (
    MLFMHarnessLM,
    NoLikelihood,
    flexible_answers,
    run_harness,
    strict_answers,
)
from tests.mlfm_scale.eval.conftest import SEQ_LEN

FAST = {"steps": 2, "stop_at_eos": False}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(name, "1")


def requests(*prompts, **gen_kwargs):
    return [Instance("generate_until", {}, (p, dict(gen_kwargs)), 0, ("t", i, 1)) for i, p in enumerate(prompts)]


def test_the_model_is_found_by_lm_evals_registry():
    from lm_eval.api.registry import get_model

    assert get_model("mlfm") is MLFMHarnessLM
    assert get_model("dummy").__name__ == "DummyLM"  # lm-eval's own models are still found beside ours


def test_generate_until_fills_seeded_rows_and_cuts_at_the_stop_strings(export):
    from mlfm_scale.sample import generate
    from mlfm_scale.seeds import prompt_seed

    lm = MLFMHarnessLM(str(export), device="cpu", seed=5, **FAST)
    prompts = ("Story of Mila.", "The capital of", "12 plus")
    texts = lm.generate_until(requests(*prompts, until=[], max_gen_toks=6))
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
    tokenizer, cfg = lm.tokenizer, lm.sampler_for({}).model_copy(update={"length": 6})
    for i, (prompt, text) in enumerate(zip(prompts, texts)):  # doc i drawn from prompt_seed(seed, i), 6 to fill
        ids = tokenizer.encode(prompt, add_special_tokens=False).ids
        tokens = generate(lm.model, [ids], cfg, seeds=[prompt_seed(5, i)]).generated[0]
        assert len(tokens) == 6 and text == tokenizer.decode(tokens, skip_special_tokens=True)
    one_at_a_time = MLFMHarnessLM(str(export), device="cpu", seed=5, batch_size=1, **FAST)
    assert one_at_a_time.generate_until(requests(*prompts, until=[], max_gen_toks=6)) == texts

    stop = next(t for t in texts if len(t.strip()) > 3).strip()[2:4]  # a stop string some completion holds
    cut = lm.generate_until(requests(*prompts, until=[stop, "\x00never"], max_gen_toks=6))
    assert cut == [t[: t.find(stop)] if stop in t else t for t in texts] and cut != texts
    assert lm.generate_until(requests(*prompts, until=stop, max_gen_toks=6)) == cut  # a single string as well


def test_a_prompt_without_room_gets_empty_text_and_bad_settings_are_clear(export, capsys):
    lm = MLFMHarnessLM(str(export), device="cpu", **FAST)
    assert lm.generate_until(requests("word " * SEQ_LEN, until=[])) == [""]
    assert "leave no position to fill" in capsys.readouterr().err
    with pytest.raises(ValueError, match="not settings of the mlfm model; give pretrained"):
        MLFMHarnessLM(str(export), stepz=3)
    with pytest.raises(ValueError, match="steps: Input should be greater than or equal to 1"):
        MLFMHarnessLM(str(export), steps=0)


def test_likelihood_requests_raise_a_clear_error(export):
    lm = MLFMHarnessLM(str(export), device="cpu")
    for call in (lm.loglikelihood, lm.loglikelihood_rolling):
        with pytest.raises(NotImplementedError, match="no tractable per-token log-likelihood") as caught:
            call([Instance("loglikelihood", {}, ("2 + 2 =", " 4"), 0, ("t", 0, 1))])
        assert isinstance(caught.value, NoLikelihood) and isinstance(caught.value, ValueError)  # a UserError


def test_the_filters_score_answers_as_gsm8k_does():
    docs = [{"gold": "18"}, {"gold": "3/4"}, {"gold": "1234"}]
    completions = [["so 9 * 2 = 18\n#### 18"], ["it is 0.75 of it"], ["no number here"]]
    assert strict_answers(completions, docs) == [["18"], [""], [""]]
    assert flexible_answers(completions, docs) == [["18"], ["3/4"], [""]]  # 0.75 is 3/4: the gold's spelling


def logged(out, task, filter_name):
    return sorted((s for s in out["samples"][task] if s["filter"] == filter_name), key=lambda s: s["doc_id"])


def test_run_harness_scores_the_local_gsm8k_task_offline_as_mlfm_eval_does(export):
    out = run_harness(export, ["gsm8k_mlfm"], limit=2, model_args={"steps": 2, "promotion": False}, log_samples=True)
    problems = load_problems(GSM8K_FILE)[:2]
    samples = logged(out, "gsm8k_mlfm", "strict-match")
    assert [s["doc_id"] for s in samples] == [0, 1] and [s["target"] for s in samples] == [p.gold for p in problems]
    context, gen_kwargs = samples[0]["arguments"][0]
    assert context == prompt_of(problems[0]) and gen_kwargs["steps"] == 256  # the protocol (model_args over it)
    _, want = score(problems, {s["doc_id"]: s["resps"][0][0] for s in samples})
    metrics = out["results"]["gsm8k_mlfm"]
    assert metrics["exact_match,strict-match"] == want["accuracy_strict"]
    assert metrics["exact_match,flexible-extract"] == want["accuracy_flexible"]


def test_run_harness_exact_match_is_gsm8k_accuracy(export, monkeypatch):
    """Chosen completions through lm-eval's filters and metric: the accuracies `mlfm eval` reports for them."""
    completions = {0: "9 * 2 = 18 dollars\n#### $18.00", 1: "#### 2 bolts, or 3 in total", 2: "2 + 1 = 3"}
    monkeypatch.setattr(MLFMHarnessLM, "generate_until",
                        lambda self, requests: [completions[r.doc_id] for r in requests])
    out = run_harness(export, ["gsm8k_mlfm"], limit=3)
    _, want = score(load_problems(GSM8K_FILE)[:3], completions)
    metrics = out["results"]["gsm8k_mlfm"]
    assert metrics["exact_match,strict-match"] == want["accuracy_strict"] == pytest.approx(1 / 3)
    assert metrics["exact_match,flexible-extract"] == want["accuracy_flexible"] == pytest.approx(2 / 3)


def test_the_task_config_carries_mlfm_evals_protocol():
    import yaml

    from mlfm_scale.eval.harness import TASKS_DIR
    from mlfm_scale.eval.tasks import GSM8K_PROTOCOL

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
    task = yaml.load((TASKS_DIR / "gsm8k_mlfm.yaml").read_text(), Loader)
    settings = {k: v for k, v in task["generation_kwargs"].items() if k != "until"}
    assert settings == GSM8K_PROTOCOL  # the two definitions of the paper's sampler settings agree
