"""The layout-free form's pure pieces: canonical names, TP merge/split (incl. SwiGLU's stride-2 fc1)."""
import pytest
import torch

from mlfm_scale.train.universal import canonical_name, merge_tp, split_tp, tp_partition


def test_canonical_names_drop_the_engine_and_megatron_nesting():
    assert canonical_name("model.decoder.layers.3.mlp.linear_fc1.weight") == "layers.3.mlp.linear_fc1.weight"
    assert canonical_name("model.decoder.final_layernorm.weight") == "final_norm.weight"
    assert canonical_name("embedding.weight") == "embedding.weight"
    assert tp_partition("layers.0.mlp.linear_fc2.weight") == (1, 1)
    assert tp_partition("layers.0.modulation.weight") is None


@pytest.mark.parametrize("partition", [(0, 1), (1, 1), (0, 2), None])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_split_then_merge_is_the_identity(partition, tp):
    full = torch.arange(8 * 12, dtype=torch.float32).view(8, 12)
    pieces = torch.stack([split_tp(full, partition, tp, r) for r in range(tp)])
    assert torch.equal(merge_tp(pieces, partition), full)


def test_fc1_ranks_hold_their_slice_of_both_gate_and_up():
    gate, up = torch.arange(8.0)[:, None].expand(8, 3), 100 + torch.arange(8.0)[:, None].expand(8, 3)
    rank1 = split_tp(torch.cat([gate, up]), (0, 2), 2, 1)  # megatron's TP-local fc1: [gate_1; up_1]
    assert torch.equal(rank1, torch.cat([gate[4:], up[4:]]))
