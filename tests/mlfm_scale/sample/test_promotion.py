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


def separately(scores, eos, min_promote=1, threshold=2.0):
    """The positions rank_separately promotes in one row of ``scores`` whose EOS candidates are ``eos``."""
    score = torch.tensor([scores])
    is_eos = torch.tensor([[i in eos for i in range(len(scores))]])
    chosen = select_promotions(score, torch.ones_like(is_eos), is_eos, threshold, min_promote, "rank_separately")
    return chosen[0].nonzero().flatten().tolist()


def test_rank_separately_forces_an_eos_only_for_an_eos_majority():
    # one pick: EOS gets round(1 · n_eos / n) of it: 3 of 4 → the best EOS, though a non-EOS scores higher
    assert separately([0.9, 0.5, 0.4, 0.3], eos={1, 2, 3}) == [1]
    assert separately([0.2, 0.9, 0.5, 0.4], eos={1}) == [2]  # 1 of 4 → the best non-EOS, though EOS scores higher
    assert separately([0.9, 0.8, 0.3, 0.2], eos={0, 1}) == [2]  # 2 of 4: round(0.5) = 0, half to even


def test_rank_separately_splits_the_shortfall_with_half_to_even_rounding():
    # 5 picks over 3 EOS + 3 others: round(2.5) = 2 EOS (the best two), 3 others; half up would give 3 + 2
    assert separately([0.9, 0.8, 0.7, 0.3, 0.2, 0.1], eos={0, 1, 2}, min_promote=5) == [0, 1, 3, 4, 5]
    # 3 picks over 2 EOS + 2 others: round(1.5) = 2 EOS, though both score below both others
    assert separately([0.9, 0.8, 0.2, 0.1], eos={2, 3}, min_promote=3) == [0, 2, 3]
    # threshold picks count toward min_promote: 0.9 passes, the shortfall 2 splits over 2 EOS + 2 others
    assert separately([0.9, 0.8, 0.7, 0.1, 0.05], eos={1, 2}, min_promote=3, threshold=0.85) == [0, 1, 3]
    # confident EOS pass the threshold whatever the split
    assert separately([0.95, 0.9, 0.1], eos={0, 1}, threshold=0.85) == [0, 1]


def test_rank_separately_is_vectorised_over_rows_and_keeps_to_the_remaining():
    is_eos = torch.tensor([[True, False, False, False, False], [False, True, True, False, False]])
    chosen = select_promotions(SCORE, REMAINING, is_eos, threshold=2.0, min_promote=2, eos_policy="rank_separately")
    # row 0: candidates 0 (EOS), 1, 2, 4 → round(2 · 1/4) = 0 EOS → 2 (0.7), 1 (0.5);
    # row 1: candidates 0, 1 (EOS), 2 (EOS), 3 → round(2 · 2/4) = 1 → EOS 1 (0.6) and non-EOS 0 (0.3)
    assert chosen.nonzero().tolist() == [[0, 1], [0, 2], [1, 0], [1, 1]]
