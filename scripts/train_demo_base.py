"""Pretrain the demo base on the digits 0-4 and save its weights into the package.

Rerun this to regenerate ``ftwidgets/data/demo_base.weights.h5``: the seed is fixed,
so the same versions of Keras and JAX on the CPU give the same file, byte for byte.

The base (``ftwidgets.demo.build_base``) learns, through a temporary head
(global average pooling, dropout, dense softmax), to tell the digits 0-4 apart in
four orientations (20 classes; see ``ftwidgets.demo.digits_pretraining``). Only the
base's weights are saved; the head is thrown away. The digits 5-9 are never seen.

Usage, from the repository root:

    JAX_PLATFORMS=cpu .venv/bin/python scripts/train_demo_base.py
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

import ftwidgets  # noqa: F401  (selects the JAX backend before Keras loads)
from ftwidgets.demo import WEIGHTS_FILE, build_base, digits_pretraining

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "ftwidgets" / "data" / WEIGHTS_FILE


def main(argv: list[str] | None = None) -> float:
    """Pretrain, print the val accuracies, save the base's weights.

    Returns:
        The accuracy on upright validation images of the digits 0-4.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--orientations", type=int, default=4, choices=(1, 2, 4))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)

    import keras

    keras.utils.set_random_seed(args.seed)
    data = digits_pretraining(seed=args.seed, orientations=args.orientations)
    base = build_base()
    head = keras.Sequential(
        [
            keras.layers.GlobalAveragePooling2D(name="pool"),
            keras.layers.Dropout(0.3, name="dropout"),
            keras.layers.Dense(len(data.class_names), activation="softmax", name="predictions"),
        ],
        name="pretraining_head",
    )
    model = keras.Sequential([base, head], name="pretraining")
    model.compile(
        optimizer=keras.optimizers.Adam(args.learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    model.fit(
        data.x_train,
        data.y_train,
        batch_size=args.batch_size,
        epochs=args.epochs,
        validation_data=(data.x_val, data.y_val),
        verbose=2,
    )
    _, view_accuracy = model.evaluate(data.x_val, data.y_val, verbose=0)

    # The same images, upright only: which digit is it, whatever orientation is guessed?
    upright = digits_pretraining(seed=args.seed, orientations=1)
    probabilities = model.predict(upright.x_val, verbose=0)
    digit = probabilities.reshape(len(upright.y_val), args.orientations, -1).sum(axis=1)
    digit_accuracy = float(np.mean(digit.argmax(axis=1) == upright.y_val))
    classes = len(data.class_names)
    print(f"val accuracy, {classes} classes (digit x orientation): {view_accuracy:.4f}")
    print(f"val accuracy, upright digits 0-4: {digit_accuracy:.4f}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    base.save_weights(args.out)
    size = args.out.stat().st_size
    print(f"saved the {base.count_params()} weights of the base to {args.out} ({size} bytes)")
    return digit_accuracy


if __name__ == "__main__":
    main()
