
from dare.data import DataOrder, Encoded, collate, left_pad, row_seed


def test_collate_pads_with_eos_and_masks_response():
    b = collate([Encoded([1, 2, 3, 4], 2), Encoded([5, 6, 7], 1)], 6, pad_id=0, seeds=[11, 12])
    assert b.input_ids.tolist() == [[1, 2, 3, 4, 0, 0], [5, 6, 7, 0, 0, 0]]
    assert b.loss_mask.tolist() == [[False, False, True, True, True, True], [False, True, True, True, True, True]]
    assert b.noise_seeds.tolist() == [11, 12]
    halves = b.chunk(2)
    assert halves[1].input_ids.tolist() == [[5, 6, 7, 0, 0, 0]]


def test_left_pad():
    p = left_pad([[1, 2, 3], [4]], pad_id=9)
    assert p.input_ids.tolist() == [[1, 2, 3], [9, 9, 4]]
    assert p.attention_mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert left_pad([[1], [2]], 9).attention_mask is None


def test_data_order_is_a_pure_function_of_seed_and_step():
    a, b = DataOrder(10, 4, seed=3), DataOrder(10, 4, seed=3)
    assert [a.indices(s) for s in range(6)] == [b.indices(s) for s in range(6)]
    epoch0 = a.indices(0) + a.indices(1)
    assert len(set(epoch0)) == 8
    assert a.indices(2) != a.indices(0)  # a new permutation in epoch 1
    assert row_seed(0, 1, 2) != row_seed(0, 2, 1)
