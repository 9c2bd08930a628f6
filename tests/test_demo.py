"""The demo data splits, the pretrained demo base and the script that trains it."""

import dataclasses
import importlib.util
from pathlib import Path

import h5py
import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.neighbors import NearestCentroid

import ftwidgets  # noqa: F401  (selects the JAX backend)
import ftwidgets.demo as demo

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_demo_base.py"


def _numpy(tensor):
    """A numpy copy of a Keras variable or a JAX array."""
    return np.array(getattr(tensor, "value", tensor))


def _rows(x):
    return {image.tobytes() for image in x}


@pytest.fixture(scope="module")
def digit_of_image():
    """Map each image of load_digits, as bytes, to its digit."""
    raw = load_digits()
    images = (raw.images / 16.0).astype(np.float32).reshape(-1, 8, 8, 1)
    return {image.tobytes(): int(digit) for image, digit in zip(images, raw.target, strict=True)}


# --- digits_transfer -------------------------------------------------------------


@pytest.mark.unit
def test_transfer_split_sizes_are_per_class():
    data = demo.digits_transfer(per_class=7, seed=3, val_per_class=20, test_per_class=15)
    assert np.bincount(data.y_train).tolist() == [7] * 5
    assert np.bincount(data.y_val).tolist() == [20] * 5
    assert np.bincount(data.y_test).tolist() == [15] * 5
    # By default the test set takes the rest, balanced to the smallest class (174 eights).
    data = demo.digits_transfer()
    assert np.bincount(data.y_train).tolist() == [10] * 5
    assert np.bincount(data.y_val).tolist() == [30] * 5
    assert np.bincount(data.y_test).tolist() == [174 - 40] * 5


@pytest.mark.unit
def test_transfer_splits_are_disjoint():
    data = demo.digits_transfer(per_class=20, seed=1)
    train, val, test = _rows(data.x_train), _rows(data.x_val), _rows(data.x_test)
    assert len(train) == len(data.x_train)  # no image twice within a split
    assert len(val) == len(data.x_val)
    assert len(test) == len(data.x_test)
    assert not train & val
    assert not train & test
    assert not val & test


@pytest.mark.unit
def test_transfer_is_digits_five_to_nine_relabelled(digit_of_image):
    data = demo.digits_transfer(seed=2)
    assert data.class_names == ("5", "6", "7", "8", "9")
    for x, y in [
        (data.x_train, data.y_train),
        (data.x_val, data.y_val),
        (data.x_test, data.y_test),
    ]:
        assert y.dtype == np.int32
        assert set(np.unique(y).tolist()) == {0, 1, 2, 3, 4}
        digits = np.array([digit_of_image[image.tobytes()] for image in x])
        np.testing.assert_array_equal(digits, y + 5)


@pytest.mark.unit
def test_transfer_images_are_float32_in_unit_range():
    data = demo.digits_transfer()
    for x in (data.x_train, data.x_val, data.x_test):
        assert x.dtype == np.float32
        assert x.shape[1:] == (8, 8, 1)
        assert x.min() == 0.0
        assert x.max() == 1.0


@pytest.mark.unit
def test_transfer_is_deterministic_for_a_seed_and_differs_across_seeds():
    a = demo.digits_transfer(seed=5)
    b = demo.digits_transfer(seed=5)
    c = demo.digits_transfer(seed=6)
    for field in dataclasses.fields(demo.DigitsTransfer):
        np.testing.assert_array_equal(getattr(a, field.name), getattr(b, field.name))
    assert _rows(a.x_train) != _rows(c.x_train)
    assert _rows(a.x_val) != _rows(c.x_val)


@pytest.mark.unit
def test_transfer_labels_are_shuffled_not_sorted():
    data = demo.digits_transfer(seed=0)
    assert not np.all(np.diff(data.y_train) >= 0)


@pytest.mark.unit
def test_transfer_result_is_frozen():
    data = demo.digits_transfer()
    with pytest.raises(dataclasses.FrozenInstanceError):
        data.x_train = data.x_val


@pytest.mark.unit
@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"per_class": 0}, "per_class=0"),
        ({"per_class": -3}, "per_class=-3"),
        ({"per_class": 2.5}, "per_class=2.5"),
        ({"per_class": True}, "per_class=True"),
        ({"per_class": "10"}, "per_class='10'"),
        ({"seed": -1}, "seed=-1"),
        ({"val_per_class": 0}, "val_per_class=0"),
        ({"test_per_class": 0}, "test_per_class=0"),
        ({"per_class": 150, "val_per_class": 24}, "per_class=150, val_per_class=24"),
        ({"per_class": 10, "test_per_class": 135}, "test_per_class=135"),
    ],
)
def test_transfer_bad_arguments_name_the_value(kwargs, fragment):
    with pytest.raises(ValueError, match="Received: ") as info:
        demo.digits_transfer(**kwargs)
    assert fragment in str(info.value)


@pytest.mark.unit
def test_transfer_largest_split_that_fits_is_accepted():
    data = demo.digits_transfer(per_class=150, val_per_class=23)
    assert np.bincount(data.y_test).tolist() == [1] * 5


# --- digits_pretraining ----------------------------------------------------------


@pytest.mark.unit
def test_pretraining_is_digits_zero_to_four_only(digit_of_image):
    data = demo.digits_pretraining(orientations=1)
    assert data.class_names == ("0", "1", "2", "3", "4")
    for x, y in [(data.x_train, data.y_train), (data.x_val, data.y_val)]:
        digits = np.array([digit_of_image[image.tobytes()] for image in x])
        np.testing.assert_array_equal(digits, y)
    assert not _rows(data.x_train) & _rows(data.x_val)
    assert len(data.y_train) + len(data.y_val) == 901  # every 0-4 image, once


@pytest.mark.unit
def test_pretraining_orientation_views_share_a_split():
    data = demo.digits_pretraining(orientations=4)
    assert len(data.class_names) == 20
    assert data.class_names[5] == "0 flipped left-right"
    assert np.bincount(data.y_train, minlength=20).min() > 100
    upright = data.x_train[data.y_train < 5]
    flipped = data.x_train[(data.y_train >= 5) & (data.y_train < 10)]
    assert _rows(upright[:, :, ::-1]) == _rows(flipped)
    # An image in val never shows up in train in any orientation.
    val_views = _rows(data.x_val)
    for view in (upright, upright[:, :, ::-1], upright[:, ::-1, :], upright[:, ::-1, ::-1]):
        assert not _rows(view) & val_views


@pytest.mark.unit
@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"val_fraction": 0}, "val_fraction=0"),
        ({"val_fraction": 1.0}, "val_fraction=1.0"),
        ({"orientations": 3}, "orientations=3"),
        ({"seed": -2}, "seed=-2"),
    ],
)
def test_pretraining_bad_arguments_name_the_value(kwargs, fragment):
    with pytest.raises(ValueError, match="Received: ") as info:
        demo.digits_pretraining(**kwargs)
    assert fragment in str(info.value)


# --- the pretrained base ---------------------------------------------------------


@pytest.mark.unit
def test_weights_file_ships_with_the_package():
    path = demo.weights_path()
    assert path.is_file()
    assert path.parent.name == "data"
    assert path.parent.parent == Path(demo.__file__).parent
    assert path.stat().st_size < 1_000_000


@pytest.fixture(scope="module")
def base():
    return demo.pretrained_base()


def _file_arrays():
    arrays = []
    with h5py.File(demo.weights_path(), "r") as file:
        file.visititems(
            lambda _, item: arrays.append(item[()]) if isinstance(item, h5py.Dataset) else None
        )
    return arrays


@pytest.mark.keras
def test_pretrained_base_is_a_small_cnn_with_batchnorm(base):
    import keras

    assert isinstance(base, keras.Model)
    assert base.name == "base"
    names = [layer.name for layer in base.layers]
    assert [n for n in names if n.startswith("conv")] == ["conv1", "conv2", "conv3"]
    batchnorms = [
        layer for layer in base.layers if isinstance(layer, keras.layers.BatchNormalization)
    ]
    assert [layer.name for layer in batchnorms] == ["bn1", "bn2", "bn3"]
    assert tuple(base.input.shape) == (None, 8, 8, 1)
    assert tuple(base.output.shape) == (None, 4, 4, 128)
    assert base.count_params() < 100_000


@pytest.mark.keras
def test_pretrained_base_holds_the_weights_of_the_file(base):
    arrays = _file_arrays()
    assert len(arrays) == len(base.weights)
    for variable in base.weights:
        value = _numpy(variable)
        assert any(a.shape == value.shape and np.array_equal(a, value) for a in arrays), (
            variable.path
        )
    # ... and they are not what a fresh build starts with.
    fresh = demo.build_base()
    for variable in fresh.weights:
        if "kernel" in variable.path or "moving" in variable.path:
            value = _numpy(variable)
            assert not any(a.shape == value.shape and np.array_equal(a, value) for a in arrays)


@pytest.mark.keras
def test_pretrained_base_is_new_on_every_call(base):
    other = demo.pretrained_base()
    assert other is not base
    kernel = other.get_layer("conv1").kernel
    kernel.assign(np.zeros(kernel.shape, dtype="float32"))
    assert np.any(_numpy(base.get_layer("conv1").kernel) != 0)
    assert np.any(_numpy(demo.pretrained_base().get_layer("conv1").kernel) != 0)


@pytest.mark.keras
@pytest.mark.filterwarnings("ignore:self.within_class_std_dev_:UserWarning")
def test_pretrained_features_separate_new_digits_better_than_random_ones(base):
    import keras

    data = demo.digits_transfer(per_class=10, seed=0)

    def probe(model):
        def pooled(x):
            return _numpy(model(x, training=False)).mean(axis=(1, 2))

        centroids = NearestCentroid().fit(pooled(data.x_train), data.y_train)
        return centroids.score(pooled(data.x_val), data.y_val)

    keras.utils.set_random_seed(0)
    pretrained, random = probe(base), probe(demo.build_base())
    assert pretrained >= 0.8, (pretrained, random)
    assert pretrained >= random + 0.1, (pretrained, random)


@pytest.mark.unit
def test_training_script_writes_the_shipped_file():
    spec = importlib.util.spec_from_file_location("train_demo_base", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)  # imports only; training runs under __main__
    shipped = SCRIPT.parents[1] / "ftwidgets" / "data" / demo.WEIGHTS_FILE
    assert shipped == script.DEFAULT_OUT
    assert script.DEFAULT_OUT.is_file()
