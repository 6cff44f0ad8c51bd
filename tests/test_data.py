"""Examples, conversion from the seed's formats, and collation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from self_rewarding_lm_pytorch.data import (
    ListDataset,
    PreferenceExample,
    SFTExample,
    collate_preference,
    collate_sft,
    create_mock_dataset,
    materialize,
    to_preference_example,
    to_sft_example,
)


def test_collate_sft_ragged_shapes_and_masks():
    exs = [SFTExample([5, 6, 7], 1), SFTExample([1, 2, 3, 4, 9, 8], 4), SFTExample([3, 4], 1)]
    batch = collate_sft(exs)
    assert batch["input_ids"].shape == (3, 6) and batch["input_ids"].dtype == torch.long
    assert batch["attention_mask"].dtype == torch.bool
    assert batch["response_mask"].dtype == torch.bool
    assert batch["input_ids"][0].tolist() == [5, 6, 7, 0, 0, 0]
    assert batch["attention_mask"][0].tolist() == [True, True, True, False, False, False]
    assert batch["response_mask"][0].tolist() == [False, True, True, False, False, False]
    assert batch["response_mask"][1].tolist() == [False, False, False, False, True, True]
    assert batch["response_mask"][2].tolist() == [False, True, False, False, False, False]
    # the response mask never marks padding and never position 0
    assert not (batch["response_mask"] & ~batch["attention_mask"]).any()
    assert not batch["response_mask"][:, 0].any()


def test_collate_sft_truncates_response_from_the_end():
    exs = [SFTExample([1, 2, 3, 4, 5, 6, 7], 2), SFTExample([9, 8, 7], 1)]
    batch = collate_sft(exs, max_seq_len=4)
    assert batch["input_ids"].shape == (2, 4)
    assert batch["input_ids"][0].tolist() == [1, 2, 3, 4]
    assert batch["response_mask"][0].tolist() == [False, False, True, True]
    assert batch["input_ids"][1].tolist() == [9, 8, 7, 0]


def test_collate_prompt_filling_max_seq_len_is_an_error_naming_the_row():
    exs = [SFTExample([1, 2, 3], 1), SFTExample([1, 2, 3, 4, 5, 6], 4)]
    with pytest.raises(ValueError, match=r"row 1.*prompt of 4 tokens.*max_seq_len=4"):
        collate_sft(exs, max_seq_len=4)
    prefs = [PreferenceExample([1, 2, 3, 4], [5], [6, 7])]
    with pytest.raises(ValueError, match=r"example 0 \(chosen\).*max_seq_len=4"):
        collate_preference(prefs, max_seq_len=4)


def test_collate_preference_chosen_then_rejected():
    prefs = [
        PreferenceExample([1, 2], [3, 4, 5], [6]),
        PreferenceExample([7], [8], [9, 10, 11, 12]),
    ]
    batch = collate_preference(prefs)
    ids, rm = batch["input_ids"], batch["response_mask"]
    assert ids.shape == (4, 5)
    assert ids[0].tolist() == [1, 2, 3, 4, 5]
    assert ids[1].tolist() == [7, 8, 0, 0, 0]
    assert ids[2].tolist() == [1, 2, 6, 0, 0]
    assert ids[3].tolist() == [7, 9, 10, 11, 12]
    assert rm.sum(1).tolist() == [3, 1, 1, 4]
    assert rm[2].tolist() == [False, False, True, False, False]
    # truncation keeps the prompt and cuts the end of each response
    short = collate_preference(prefs, max_seq_len=3)
    assert short["input_ids"][3].tolist() == [7, 9, 10]
    assert short["response_mask"].sum(1).tolist() == [1, 1, 1, 2]


def test_seed_tuple_format_with_pad_stripping():
    seq = torch.tensor([4, 5, 6, 7, -1, -1])
    ex = to_sft_example((seq, torch.tensor(2)), pad_id=-1)
    assert ex == SFTExample([4, 5, 6, 7], 2)
    # float tensors holding integers (the seed's encode returns floats) and 1-element lengths
    ex = to_sft_example((torch.tensor([4.0, 5.0, 6.0]), torch.tensor([1])))
    assert ex == SFTExample([4, 5, 6], 1)
    # a boolean prompt mask is the seed's other form
    ex = to_sft_example((torch.tensor([1, 2, 3, 4]), torch.tensor([True, True, False, False])))
    assert ex.prompt_len == 2
    # numpy arrays
    ex = to_sft_example((np.array([3, 4, 5], dtype=np.int32), np.int64(1)))
    assert ex == SFTExample([3, 4, 5], 1)
    # the seed's mock item
    item = (torch.randint(0, 256, (256,)), torch.tensor(1))
    ex = to_sft_example(item, pad_id=-1)
    assert len(ex.input_ids) == 256 and ex.prompt_len == 1


def test_dict_forms_and_seed_dpo_triple():
    assert to_sft_example({"prompt_ids": [1, 2], "response_ids": [3]}) == SFTExample([1, 2, 3], 2)
    assert to_sft_example({"input_ids": [1, 2, 3], "prompt_len": 1}) == SFTExample([1, 2, 3], 1)
    pe = to_preference_example({"prompt_ids": [1], "chosen_ids": [2, 3], "rejected_ids": [4]})
    assert pe == PreferenceExample([1], [2, 3], [4])
    assert to_preference_example(([1], [2], torch.tensor([3]))) == PreferenceExample([1], [2], [3])
    seed = (torch.tensor([1, 2, 3, 4, -1]), torch.tensor([1, 2, 9, -1, -1]), torch.tensor(2))
    assert to_preference_example(seed, pad_id=-1) == PreferenceExample([1, 2], [3, 4], [9])
    with pytest.raises(ValueError, match="share the same prompt"):
        to_preference_example((torch.tensor([1, 2, 3]), torch.tensor([1, 5, 3]), 2))


def test_pad_collision_and_bad_prompt_len_errors():
    with pytest.raises(ValueError, match=r"pad id 0 collides with a real token .* position 1"):
        to_sft_example((torch.tensor([3, 0, 4, 0, 0]), 1), pad_id=0)
    with pytest.raises(ValueError, match=r"prompt_len=3 .* 3 tokens"):
        to_sft_example((torch.tensor([3, 5, 4, -1]), 3), pad_id=-1)
    with pytest.raises(ValueError, match=r"prompt_len=0"):
        to_sft_example(([1, 2, 3], 0))
    with pytest.raises(ValueError, match=r"negative token id -1 .* pass pad_id=-1"):
        to_sft_example(([1, 2, -1], 1))
    with pytest.raises(ValueError, match="non-integer"):
        to_sft_example((torch.tensor([1.5, 2.0]), 1))
    with pytest.raises(TypeError, match="tokenize text"):
        to_sft_example(("a prompt", 1))


def test_empty_inputs_raise():
    with pytest.raises(ValueError, match="is empty"):
        create_mock_dataset(0, 1)
    with pytest.raises(ValueError, match="is empty"):
        ListDataset([])
    with pytest.raises(ValueError, match="is empty"):
        collate_sft([])
    with pytest.raises(ValueError, match="is empty"):
        collate_preference([])
    with pytest.raises(ValueError, match="train_dataset is empty"):
        materialize([], to_sft_example, name="train_dataset")
    with pytest.raises(ValueError, match="is empty"):
        PreferenceExample([1], [], [2])


def test_mock_dataset_and_materialize_reads_each_item_once():
    calls = []

    def make():
        calls.append(1)
        return (torch.randint(0, 256, (8,)), torch.tensor(1))

    ds = create_mock_dataset(5, make)
    assert len(ds) == 5
    exs = materialize(ds, to_sft_example, name="sft")
    assert len(calls) == 5 and all(isinstance(e, SFTExample) for e in exs)
    assert create_mock_dataset(3, "mock prompt")[2] == "mock prompt"
    with pytest.raises(IndexError):
        ds[5]
    # conversion errors name the offending index
    with pytest.raises(ValueError, match=r"data\[1\]"):
        materialize([([1, 2], 1), ([1, 2], 2)], to_sft_example, name="data")
