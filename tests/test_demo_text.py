"""The synthetic keyword task of ``ftwidgets.demo_text`` (walkthrough 06, the lora benchmark)."""

import numpy as np
import pytest

from ftwidgets.demo_text import CLASSES, keyword_sequences


@pytest.mark.unit
def test_each_sequence_holds_its_class_keyword_one_to_three_times_and_no_other():
    task = keyword_sequences(train=300, val=100, length=12, vocabulary_size=20, seed=4)
    for x, y in ((task.x_train, task.y_train), (task.x_val, task.y_val)):
        ids = x["token_ids"]
        assert ids.shape == (len(y), 12) and ids.dtype == np.int32 and y.dtype == np.int32
        assert (ids[:, 0] == 0).all() and (ids[:, 1:] != 0).all()
        assert ids.max() < 20
        for row, label in zip(ids, y, strict=True):
            counts = [int(np.sum(row == keyword)) for keyword in range(1, 1 + CLASSES)]
            assert 1 <= counts[label] <= 3 and sum(counts) == counts[label], (row, label)
        assert x["padding_mask"].all() and x["padding_mask"].dtype == bool
        assert (x["segment_ids"] == 0).all()
        assert set(np.unique(y).tolist()) == set(range(CLASSES))
    assert (task.vocabulary_size, task.sequence_length) == (20, 12)


@pytest.mark.unit
def test_the_same_seed_gives_the_same_arrays_and_validation_differs_from_training():
    one, two, other = (keyword_sequences(50, 20, seed=s) for s in (7, 7, 8))
    assert np.array_equal(one.x_train["token_ids"], two.x_train["token_ids"])
    assert np.array_equal(one.y_val, two.y_val)
    assert not np.array_equal(one.x_train["token_ids"], other.x_train["token_ids"])
    assert not np.array_equal(one.x_train["token_ids"][:20], one.x_val["token_ids"])


@pytest.mark.unit
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"train": 0}, "Received: train=0"),
        ({"val": 1.5}, "Received: val=1.5"),
        ({"length": 3}, "Received: length=3"),
        ({"vocabulary_size": 4}, "Received: vocabulary_size=4"),
        ({"seed": True}, "Received: seed=True"),
    ],
)
def test_sizes_below_their_minimum_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        keyword_sequences(**kwargs)
