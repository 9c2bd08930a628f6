"""Pretrain the demo base on the digits 0-4 and save its weights into the package.

Regenerates ``ftwidgets/data/demo_base.weights.h5`` deterministically (same seed,
same CPU build of JAX -> same weights). Only the base's weights are saved; the
temporary classification head used for pretraining is thrown away.

Usage (from the repository root):

    KERAS_BACKEND=jax JAX_PLATFORMS=cpu .venv/bin/python scripts/train_demo_base.py
"""

from __future__ import annotations

import argparse
from pathlib import Path

import ftwidgets  # noqa: F401  (selects the JAX backend before Keras loads)
from ftwidgets.demo import WEIGHTS_FILE, build_base, digits_pretraining

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "ftwidgets" / "data" / WEIGHTS_FILE


def main(argv: list[str] | None = None) -> float:
    """Pretrain, print the val accuracy, save the base's weights; return the accuracy."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)

    import keras

    keras.utils.set_random_seed(args.seed)
    data = digits_pretraining(seed=args.seed)
    base = build_base()
    head = keras.Sequential(
        [
            keras.layers.GlobalAveragePooling2D(name="pool"),
            keras.layers.Dropout(0.3, name="dropout"),
            keras.layers.Dense(len(data.class_names), activation="softmax", name="predictions"),
        ],
        name="pretrain_head",
    )
    model = keras.Sequential([base, head], name="pretrain")
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
        shuffle=True,
        verbose=2,
    )
    _, val_accuracy = model.evaluate(data.x_val, data.y_val, verbose=0)
    print(f"pretraining val accuracy (digits 0-4): {val_accuracy:.4f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    base.save_weights(args.out)
    print(
        f"saved {base.count_params()} base parameters to {args.out} "
        f"({args.out.stat().st_size} bytes)"
    )
    return float(val_accuracy)


if __name__ == "__main__":
    main()
