"""Which positions a round promotes: threshold, the min_promote fill, EOS ranking."""
import torch

from mlfm_scale.sample.promotion import select_promotions

SCORE = torch.tensor([[0.9, 0.5, 0.7, 0.95, 0.1], [0.3, 0.6, 0.2, 0.1, 0.4]])
REMAINING = torch.tensor([[True, True, True, False, True], [True, True, True, True, False]])
NO_EOS = torch.zeros_like(REMAINING)


def test_threshold_promotes_remaining_confident_positions_only():
    chosen = select_promotions(SCORE, REMAINING, NO_EOS, threshold=0.65, min_promote=1)
    assert chosen.tolist() == [[True, False, True, False, False], [False, True, False, False, False]]


def test_min_promote_tops_up_with_the_best_remaining_and_never_more_than_remain():
    chosen = select_promotions(SCORE, REMAINING, NO_EOS, threshold=2.0, min_promote=2)
    assert chosen.tolist() == [[True, False, True, False, False], [True, True, False, False, False]]
    everything = select_promotions(SCORE, REMAINING, NO_EOS, threshold=2.0, min_promote=9)
    assert torch.equal(everything, REMAINING)


def test_eos_last_prefers_non_eos_for_forced_picks_but_keeps_confident_eos():
    is_eos = torch.tensor([[True, False, False, False, False], [False, True, False, False, False]])
    joint = select_promotions(SCORE, REMAINING, is_eos, threshold=2.0, min_promote=1, eos_policy="joint")
    last = select_promotions(SCORE, REMAINING, is_eos, threshold=2.0, min_promote=1, eos_policy="eos_last")
    assert joint.nonzero().tolist() == [[0, 0], [1, 1]] and last.nonzero().tolist() == [[0, 2], [1, 0]]
    confident = select_promotions(SCORE, REMAINING, is_eos, threshold=0.85, min_promote=1, eos_policy="eos_last")
    assert confident[0].tolist() == [True, False, False, False, False]
    only_eos = select_promotions(SCORE, REMAINING & is_eos, is_eos, threshold=2.0, min_promote=1,
                                 eos_policy="eos_last")
    assert only_eos.nonzero().tolist() == [[0, 0], [1, 1]]
