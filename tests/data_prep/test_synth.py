import pytest

from data_prep.synth import check, is_valid, synth_document, synth_documents


def test_deterministic_and_independent_of_position():
    assert list(synth_documents(5, seed=3)) == list(synth_documents(5, seed=3))
    assert list(synth_documents(2, seed=3, start=3)) == [synth_document(3, 3), synth_document(4, 3)]
    assert synth_document(0, 0) != synth_document(0, 1)


def test_every_generated_document_is_valid():
    docs = list(synth_documents(300, seed=0))
    assert all(is_valid(d) for d in docs)
    kinds = " ".join(docs)
    for marker in (" plus ", "The capital of", "Counting from", " from ", "The end of"):
        assert marker in kinds


@pytest.mark.parametrize("text", [
    "Omar flew from New Diego to Santa Fe.",          # a city made of two halves
    "Omar flew from Santa Fe to Santa Fe.",           # same city twice
    "12 plus 30 equals 43.",                          # wrong sum
    "The capital of France is Tokyo.",                # capital of another country
    "Counting from 5 : 5 6 8.",                       # not consecutive
    "Counting from 5 : 6 7 8.",                       # wrong start
    "Story of Mila. The end of Omar's story.",        # the end names another hero
    "Story of Mila. Omar drove from Cape Town to Hong Kong.",  # trip by someone else
    "Colourless green ideas sleep.",                  # no rule matches
])
def test_broken_sentences_are_caught(text):
    assert not is_valid(text)
    assert check(text).errors


def test_trailing_fragment_is_ignored_and_counts_are_exact():
    result = check("12 plus 30 equals 42. 1 plus 1 equals 3. The capital of Pe")
    assert (result.sentences, result.valid, result.errors) == (2, 1, ["1 plus 1 equals 3"])
    assert result.rate == 0.5
    assert not is_valid("") and not is_valid("The capital of")
