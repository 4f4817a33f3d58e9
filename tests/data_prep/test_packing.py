import numpy as np

from data_prep.packing import pack_documents, pack_sft

EOS, PAD = 0, 1


def test_pack_documents_joins_with_eos_and_records_boundaries():
    docs = [[5, 6, 7], [8, 9], [10, 11, 12, 13, 14, 15, 16], [17]]
    blocks = pack_documents(docs, seq_len=4, eos_id=EOS, pad_id=PAD)
    stream = [5, 6, 7, 0, 8, 9, 0, 10, 11, 12, 13, 14, 15, 16, 0, 17, 0]
    assert len(blocks) == 5 and blocks.tokens.shape == (5, 4)
    flat = np.concatenate([blocks.tokens[i, :blocks.lengths[i]] for i in range(len(blocks))])
    assert flat.tolist() == stream
    assert blocks.lengths.tolist() == [4, 4, 4, 4, 1]
    assert blocks.tokens[-1].tolist() == [0, PAD, PAD, PAD]
    # documents start at stream offsets 0, 4, 7, 15; each block also starts a segment at 0
    assert [s.tolist() for s in blocks.doc_starts] == [[0], [0, 3], [0], [0, 3], [0]]


def test_pack_documents_exact_fit_and_empty():
    blocks = pack_documents([[3, 3, 3]], seq_len=4, eos_id=EOS, pad_id=PAD)
    assert blocks.tokens.tolist() == [[3, 3, 3, 0]] and blocks.lengths.tolist() == [4]
    assert len(pack_documents([], seq_len=4, eos_id=EOS, pad_id=PAD)) == 0


def test_pack_sft_masks_the_response_and_drops_overlong():
    blocks, dropped = pack_sft([([2, 3], [4, 5]), ([2] * 4, [4]), ([7], [8, 8, 8, 8, 8, 8])],
                               seq_len=6, eos_id=EOS)
    assert dropped == 1
    assert blocks.tokens.tolist() == [[2, 3, 4, 5, 0, 0], [2, 2, 2, 2, 4, 0]]
    assert blocks.response_mask.tolist() == [[0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1]]
    assert blocks.lengths.tolist() == [6, 6]
