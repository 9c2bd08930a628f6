"""Epoch order with Grain: a user's dataset keeps its order; `shuffle_each_epoch` reshuffles."""

from __future__ import annotations

import warnings

import grain
import keras
import numpy as np
import pytest

import ftwidgets as ftw
from ftwidgets.engine.grain_data import shuffle_each_epoch

pytestmark = pytest.mark.keras
IMAGES = 12  # 3 classes of 4; image i has every pixel equal to 10 * i, its id


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    for i in range(IMAGES):
        class_dir = root / f"class_{i % 3}"
        class_dir.mkdir(exist_ok=True)
        keras.utils.save_img(
            class_dir / f"{i:02d}.png", np.full((4, 4, 3), 10 * i, "uint8"), scale=False
        )
    return root


def image_examples(folder) -> grain.MapDataset:
    """(image, label) examples of the folder, read as walkthrough 05 reads them."""
    paths = sorted(folder.glob("*/*.png"))
    classes = sorted({path.parent.name for path in paths})
    labels = [classes.index(path.parent.name) for path in paths]

    def load(example):
        path, label = example
        image = keras.utils.img_to_array(keras.utils.load_img(path, target_size=(4, 4)))
        return image, np.int32(label)

    return grain.MapDataset.source(list(zip(map(str, paths), labels, strict=True))).map(load)


def ids(batch) -> list[int]:
    return [round(float(v) / 10) for v in np.asarray(batch[0])[:, 0, 0, 0]]


def epochs_read(dataset, count: int) -> list[list[int]]:
    return [[i for batch in dataset for i in ids(batch)] for _ in range(count)]


class EpochReads(keras.callbacks.Callback):
    """With a map on the training data, what each epoch of fit read, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.read: list[list[int]] = []
        self.epoch: list[int] | None = None

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = []

    def on_epoch_end(self, epoch, logs=None):
        self.read.append(self.epoch)
        self.epoch = None

    def record(self, batch):
        if self.epoch is not None:  # not the peeks before training
            self.epoch.extend(ids(batch))
        return batch


def model_for(shape) -> keras.Model:
    keras.utils.set_random_seed(0)
    inputs = keras.Input(shape)
    base = keras.Model(inputs, keras.layers.Flatten()(keras.layers.Rescaling(1 / 255)(inputs)))
    return ftw.build_transfer_model(base, num_classes=3, dropout=0.0)


def train_reads(train, epochs: int = 3) -> list[list[int]]:
    reads = EpochReads()
    session = ftw.FineTuneSession(
        model_for((4, 4, 3)), train=train.map(reads.record), callbacks=[reads]
    )
    session.run(ftw.PhaseConfig(phase="head", epochs=epochs))
    assert len(session.history) == epochs
    return reads.read


def test_shuffle_each_epoch_gives_each_epoch_of_a_session_its_own_seeded_order(folder):
    read = train_reads(shuffle_each_epoch(image_examples(folder), batch_size=5, seed=7))
    assert all(sorted(epoch) == list(range(IMAGES)) for epoch in read)
    assert len({tuple(epoch) for epoch in read}) == 3  # a new order every epoch
    # The same seed, the same orders; another seed, others.
    again = shuffle_each_epoch(image_examples(folder), batch_size=5, seed=7)
    assert epochs_read(again, 3) == read
    other = shuffle_each_epoch(image_examples(folder), batch_size=5, seed=8)
    assert epochs_read(other, 3) != read


def test_a_dataset_the_user_built_keeps_its_order_in_every_epoch(folder):
    # Keras's own loader shuffles the files once: every epoch reads that one order.
    loaded = keras.utils.image_dataset_from_directory(
        folder, image_size=(4, 4), batch_size=5, seed=3, format="grain"
    )
    given = epochs_read(loaded, 1)[0]
    assert given != list(range(IMAGES))
    assert train_reads(loaded) == [given] * 3
    # A Grain dataset of batches in a fixed order is trained in that order. (An
    # IterDataset: a MapDataset's maps run on reading threads, out of order.)
    examples = image_examples(folder)
    reverse = grain.MapDataset.range(IMAGES).map(lambda i: examples[IMAGES - 1 - i])
    batches = reverse.batch(5).to_iter_dataset()
    order = [round(float(examples[j][0][0, 0, 0]) / 10) for j in reversed(range(IMAGES))]
    assert train_reads(batches) == [order] * 3


def test_a_peek_does_not_use_up_an_epoch_and_bad_arguments_are_refused(folder):
    examples = image_examples(folder)
    dataset = shuffle_each_epoch(examples, batch_size=5, seed=0)
    assert len(dataset) == 3
    first = ids(next(iter(dataset)))
    assert dataset.epoch == 0 and epochs_read(dataset, 1)[0][:5] == first
    assert dataset.epoch == 1
    assert len(shuffle_each_epoch(examples, batch_size=5, seed=0, drop_remainder=True)) == 2
    with pytest.raises(ValueError, match=r"needs a grain\.MapDataset .* Received: dataset of type"):
        shuffle_each_epoch(examples.to_iter_dataset(), batch_size=5, seed=0)
    with pytest.raises(ValueError, match="Received: batch_size=0"):
        shuffle_each_epoch(examples, batch_size=0, seed=0)
    with pytest.raises(ValueError, match="Received: seed=-1"):
        shuffle_each_epoch(examples, batch_size=5, seed=-1)


def test_a_grain_dataset_of_known_length_trains_without_keras_warning_each_epoch(folder):
    # Keras reads any Grain dataset until it runs out and then warns, from the worker
    # thread, into whichever cell ran last.
    train = shuffle_each_epoch(image_examples(folder), batch_size=5, seed=0)
    session = ftw.FineTuneSession(model_for((4, 4, 3)), train=train)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        session.run(ftw.PhaseConfig(phase="head", epochs=2))
    assert [str(w.message) for w in caught if "ran out of data" in str(w.message)] == []
