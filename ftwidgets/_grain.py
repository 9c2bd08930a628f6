"""Grain pieces, imported only once a Grain dataset is in use (so Grain is installed)."""

from __future__ import annotations

from typing import Any

import grain

from ftwidgets.inputs import class_weights_of


class ClassWeights(grain.transforms.Map):
    """Append the sample weights ``fit(class_weight=...)`` makes of each ``(x, y)`` batch.

    A module-level class, so a ``grain.DataLoader``'s worker processes can unpickle it.
    """

    def __init__(self, class_weight: dict[int, float]) -> None:
        self.class_weight = class_weight

    def map(self, element: Any) -> tuple[Any, Any, Any]:
        x, y, *weights = element
        return x, y, class_weights_of(y, weights[0] if weights else None, self.class_weight)


def with_class_weights(dataset: Any, class_weight: dict[int, float]) -> Any:
    """``dataset`` with every batch weighed by ``class_weight``, in the same order.

    A ``grain.DataLoader`` is rebuilt with the map as its last operation, as Keras's
    own Grain adapter rebuilds one.
    """
    weigh = ClassWeights(class_weight)
    if isinstance(dataset, grain.DataLoader):
        options = dataset._multiprocessing_options
        return grain.DataLoader(
            data_source=dataset._data_source,
            sampler=dataset._sampler,
            operations=[*dataset._operations, weigh],
            worker_count=options.num_workers,
            worker_buffer_size=options.per_worker_buffer_size,
            shard_options=dataset._shard_options,
            read_options=dataset._read_options,
            enable_profiling=options.enable_profiling,
        )
    return dataset.map(weigh)
