"""Each private upstream API ftwidgets uses still does what ftwidgets needs, on the
installed Keras, JAX, ipykernel, Grain and Python; and only ftwidgets.upstream uses them.

A failure names the package, its version and the attribute (`UpstreamChanged`).
"""

from __future__ import annotations

import ast
import inspect
import os
import pathlib
import subprocess
import sys
import textwrap
import threading
from types import SimpleNamespace

import grain
import keras
import numpy as np
import pytest

import ftwidgets
from ftwidgets import upstream
from ftwidgets.upstream import UpstreamChanged


def gone(package: str, what: str, shim: str) -> str:
    """The message for a private API that an upstream release removed."""
    return str(UpstreamChanged(package, what, shim))


def tiny_model() -> keras.Model:
    inputs = keras.Input((3,))
    return keras.Model(inputs, keras.layers.Dense(2, name="head")(inputs))


BATCH = (np.ones((4, 3), "float32"), np.eye(2, dtype="float32")[[0, 1, 0, 1]])


@pytest.mark.unit
def test_upstream_changed_names_the_package_its_version_the_attribute_and_the_shim():
    message = gone("keras", "Model._symbolic_build", "symbolic_build")
    assert message == (
        f"keras {keras.__version__}: Model._symbolic_build is gone; "
        "ftwidgets.upstream.symbolic_build needs updating"
    )


@pytest.mark.unit
def test_a_shim_whose_attribute_is_gone_raises_upstream_changed():
    with pytest.raises(UpstreamChanged, match=r"keras .*: object\._symbolic_build is gone"):
        upstream.symbolic_build(object(), BATCH)


# Keras


@pytest.mark.unit
def test_symbolic_build_builds_the_compiled_metrics_and_the_optimizer():
    model = tiny_model()
    model.compile(optimizer="adam", loss="mse", metrics=["mae"])
    upstream.symbolic_build(model, BATCH)
    assert sorted(model.get_metrics_result()) == ["loss", "mae"]
    assert model.optimizer.built


@pytest.mark.unit
def test_state_shardings_are_those_of_the_state_fit_passes_its_train_step():
    model = tiny_model()
    model.compile(optimizer="adam", loss="mse", metrics=["mae"])
    upstream.symbolic_build(model, BATCH)
    parts = (
        model.trainable_variables,
        model.non_trainable_variables,
        model.optimizer.variables,
        model.metrics_variables,
    )
    shardings = upstream.state_shardings(model)
    assert [len(s) for s in shardings] == [len(p) for p in parts]
    for variables, part in zip(parts, shardings, strict=True):
        assert all(s == v.value.sharding for v, s in zip(variables, part, strict=True))


@pytest.mark.keras
def test_make_function_makes_fit_call_the_step_once_per_batch():
    model = tiny_model()
    model.compile(optimizer="sgd", loss="mse")
    calls = []

    def step(state, data):
        calls.append(1)
        return model.train_step(state, data)

    model.train_function = upstream.make_function(model, step)
    model.fit(*BATCH, batch_size=2, epochs=1, verbose=0)
    assert len(calls) == 2


@pytest.mark.unit
def test_flatten_layers_walks_inside_nested_layers_unless_told_not_to():
    inner = keras.Sequential([keras.layers.Dense(2, name="inner_dense")], name="inner")
    inputs = keras.Input((3,))
    model = keras.Model(inputs, inner(inputs))
    deep = [layer.name for layer in upstream.flatten_layers(model, include_self=False)]
    shallow = upstream.flatten_layers(model, include_self=False, recursive=False)
    assert "inner_dense" in deep and "inner" in deep
    assert "inner_dense" not in [layer.name for layer in shallow]
    assert upstream.flatten_layers(model)[0] is model


@pytest.mark.unit
def test_compile_arguments_are_the_users_own_objects():
    model = tiny_model()
    assert upstream.compile_arguments(model) == {}
    optimizer, metric = keras.optimizers.SGD(0.1), keras.metrics.MeanAbsoluteError()
    model.compile(optimizer=optimizer, loss="mse", metrics=[metric])
    # The shim gives {} for a compiled model without it, as Keras's get_compile_config.
    assert hasattr(model, "_compile_config"), gone(
        "keras", "Trainer._compile_config", "compile_arguments"
    )
    arguments = upstream.compile_arguments(model)
    assert arguments["optimizer"] is optimizer
    assert arguments["metrics"][0] is metric
    assert arguments["loss"] == "mse"


@pytest.mark.unit
def test_metric_direction_is_up_for_accuracy_and_down_for_an_error():
    metrics = keras.metrics.Accuracy(), keras.metrics.MeanSquaredError()
    directions = [upstream.metric_direction(metric) for metric in metrics]
    # The shim gives None for a metric that does not say: None for both is a change.
    assert directions == ["up", "down"], gone("keras", "Metric._direction", "metric_direction")
    assert upstream.metric_direction("mae") is None


@pytest.mark.unit
def test_is_compile_container_finds_the_metrics_compile_wraps():
    model = tiny_model()
    model.compile(optimizer="adam", loss="mse", metrics=["mae"])
    upstream.symbolic_build(model, BATCH)
    containers = [m for m in model.metrics if upstream.is_compile_container(m)]
    assert [m.name for m in containers] == ["compile_metrics"]
    assert [m.name for m in containers[0].metrics] == ["mae"]
    assert not upstream.is_compile_container(keras.metrics.Mean())


@pytest.mark.unit
def test_learning_rate_of_is_the_rate_variable_or_the_schedule():
    optimizer = keras.optimizers.SGD(0.25)
    optimizer.build([keras.Variable(np.zeros(2))])
    rate = upstream.learning_rate_of(optimizer)
    assert any(variable is rate for variable in optimizer.variables)
    assert float(keras.ops.convert_to_numpy(rate.value)) == 0.25
    schedule = keras.optimizers.schedules.ExponentialDecay(0.1, 10, 0.5)
    assert upstream.learning_rate_of(keras.optimizers.Adam(schedule)) is schedule
    assert upstream.learning_rate_of("adam") is None


@pytest.mark.unit
def test_created_trainable_variables_are_there_while_the_layer_is_frozen():
    dense, norm = keras.layers.Dense(2), keras.layers.BatchNormalization()
    dense.build((None, 3))
    norm.build((None, 3))
    dense.trainable = norm.trainable = False
    assert [v.name for v in upstream.created_trainable_variables(dense)] == ["kernel", "bias"]
    # The moving statistics were never trainable.
    assert [v.name for v in upstream.created_trainable_variables(norm)] == ["gamma", "beta"]


@pytest.mark.unit
def test_unlocked_state_lets_a_built_layer_track_new_state_then_locks_it():
    layer = keras.layers.Dropout(0.0)
    layer.build((None, 3))
    with pytest.raises(ValueError, match="state"):
        layer.seed_generator = keras.random.SeedGenerator(1)
    with upstream.unlocked_state(layer):
        layer.seed_generator = keras.random.SeedGenerator(1)
    assert layer.seed_generator is not None
    with pytest.raises(ValueError, match="state"):
        layer.other_generator = keras.random.SeedGenerator(2)


@pytest.mark.unit
def test_drop_variable_untracks_a_variable_from_every_list_of_the_layer():
    layer = keras.layers.Dense(2)
    layer.build((None, 3))
    layer.enable_lora(1)
    upstream.drop_variable(layer, "lora_kernel_a")
    assert not hasattr(layer, "lora_kernel_a")
    assert [v.name for v in layer.trainable_weights] == ["bias", "lora_kernel_b"]
    assert [v.name for v in upstream.created_trainable_variables(layer)] == [
        "kernel",
        "bias",
        "lora_kernel_b",
    ]


@pytest.mark.unit
def test_output_layer_of_is_the_layer_that_made_a_symbolic_tensor():
    model = tiny_model()
    assert hasattr(model.outputs[0], "_keras_history"), gone(
        "keras", "KerasTensor._keras_history", "output_layer_of"
    )
    assert upstream.output_layer_of(model.outputs[0]) is model.get_layer("head")
    assert upstream.output_layer_of(np.zeros(2)) is None


@pytest.mark.unit
def test_thread_settings_carry_the_dtype_policy_to_another_thread():
    keras.mixed_precision.set_dtype_policy("mixed_float16")
    try:
        settings = upstream.thread_settings(["dtype_policy", "no_such_setting"])
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    assert list(settings) == ["dtype_policy"]
    seen = []

    def work():
        seen.append(keras.mixed_precision.dtype_policy().name)
        upstream.set_thread_settings(settings)
        seen.append(keras.mixed_precision.dtype_policy().name)

    worker = threading.Thread(target=work)
    worker.start()
    worker.join()
    assert seen == ["float32", "mixed_float16"]


@pytest.mark.unit
def test_class_weight_to_sample_weights_weighs_integer_and_one_hot_labels():
    weights = {0: 1.0, 1: 3.0}
    labels = np.array([0, 1, 1])
    assert upstream.class_weight_to_sample_weights(labels, weights).tolist() == [1, 3, 3]
    one_hot = np.eye(2)[labels]
    assert upstream.class_weight_to_sample_weights(one_hot, weights).tolist() == [1, 3, 3]


@pytest.mark.unit
def test_data_adapter_batches_as_fit_does():
    adapter = upstream.data_adapter(np.zeros((5, 3)), np.zeros(5), None, batch_size=2)
    assert (adapter.num_batches, adapter.partial_batch_size) == (3, 1)
    shapes = [x.shape for x, *_ in adapter.get_jax_iterator()]
    assert shapes == [(2, 3), (2, 3), (1, 3)]


# JAX


@pytest.mark.kernel
def test_reset_compilation_cache_makes_jax_write_to_a_new_folder(tmp_path):
    code = textwrap.dedent(
        """
        import sys, jax, jax.numpy as jnp
        from ftwidgets import upstream
        first, second = sys.argv[1:]
        jax.config.update("jax_enable_compilation_cache", True)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
        jax.config.update("jax_compilation_cache_dir", first)
        jax.jit(lambda x: x + 1)(jnp.ones(3)).block_until_ready()
        jax.config.update("jax_compilation_cache_dir", second)
        upstream.reset_compilation_cache()
        jax.jit(lambda x: x * 3)(jnp.ones(3)).block_until_ready()
        """
    )
    first, second = tmp_path / "first", tmp_path / "second"
    env = {"KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu", "FTWIDGETS_COMPILATION_CACHE": "off"}
    subprocess.run(
        [sys.executable, "-c", code, str(first), str(second)],
        check=True,
        timeout=120,
        env={**os.environ, **env},
    )
    assert any(first.iterdir()) and any(second.iterdir())


# ipykernel


@pytest.mark.unit
def test_route_replies_as_requested_answers_the_front_ends_subshell():
    from ipykernel.comm.comm import BaseComm

    comm = BaseComm(target_name="ftwidgets.test", primary=False)
    comm._reply_subshell_id = "busy-main-shell"  # what ipykernel records when it sends
    assert comm._reply_subshell_for({}, "requested") == "busy-main-shell"
    assert upstream.route_replies_as_requested(comm), gone(
        "ipykernel", "BaseComm._reply_subshell_for", "route_replies_as_requested"
    )
    assert comm._reply_subshell_for({}, "requested") == "requested"
    assert upstream.route_replies_as_requested(object()) is False


@pytest.mark.unit
def test_kernel_supports_subshells_reads_the_kernels_property():
    from ipykernel.kernelbase import Kernel

    assert isinstance(getattr(Kernel, "_supports_kernel_subshells", None), property), gone(
        "ipykernel", "Kernel._supports_kernel_subshells", "kernel_supports_subshells"
    )
    assert upstream.kernel_supports_subshells(SimpleNamespace(_supports_kernel_subshells=1))
    assert upstream.kernel_supports_subshells(SimpleNamespace()) is False


@pytest.mark.unit
def test_replace_cell_sigint_handler_wraps_what_the_kernel_restores_after_a_cell():
    from ipykernel.kernelbase import Kernel

    restores = "signal(SIGINT, self.saved_sigint_handler)"
    assert restores in inspect.getsource(Kernel.post_handler_hook), gone(
        "ipykernel", "Kernel.saved_sigint_handler", "replace_cell_sigint_handler"
    )

    def saved(signum, frame):
        pass

    kernel = SimpleNamespace(saved_sigint_handler=saved)
    assert upstream.replace_cell_sigint_handler(kernel, lambda previous: (previous, "wrapped"))
    assert kernel.saved_sigint_handler == (saved, "wrapped")
    assert upstream.replace_cell_sigint_handler(SimpleNamespace(), lambda p: p) is False


# Grain


@pytest.mark.unit
def test_append_data_loader_operation_keeps_the_loaders_source_sampler_and_operations():
    loader = grain.DataLoader(
        data_source=[1, 2, 3, 4],
        sampler=grain.samplers.IndexSampler(4, shuffle=False, num_epochs=1),
        operations=[grain.transforms.Batch(2)],
    )

    class Double(grain.transforms.Map):
        def map(self, element):
            return element * 2

    rebuilt = upstream.append_data_loader_operation(loader, Double())
    assert [batch.tolist() for batch in rebuilt] == [[2, 4], [6, 8]]
    assert [batch.tolist() for batch in loader] == [[1, 2], [3, 4]]


# Python


@pytest.mark.kernel
def test_register_atexit_runs_before_python_joins_its_threads():
    assert hasattr(threading, "_register_atexit"), gone(
        "python", "threading._register_atexit", "register_atexit"
    )
    # A non-daemon thread waits for the hook: with plain atexit, exit would hang.
    code = textwrap.dedent(
        """
        import threading
        from ftwidgets import upstream
        done = threading.Event()
        threading.Thread(target=done.wait).start()
        upstream.register_atexit(done.set)
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# Nobody else uses them


PRIVATE_MODULES = ("keras.src", "jax._src", "jax.experimental", "jax.lib", "jax.interpreters")
UPSTREAM_MODULES = {"keras", "jax", "grain", "ipykernel", "comm", "IPython", "threading", "sys"}
UPSTREAM_PRIVATE_NAMES = {
    "_symbolic_build",
    "_make_function",
    "_compile_config",
    "_flatten_layers",
    "_direction",
    "_learning_rate",
    "_trainable_variables",
    "_tracker",
    "_lock_state",
    "_keras_history",
    "_reply_subshell_for",
    "_supports_kernel_subshells",
    "saved_sigint_handler",
    "_register_atexit",
    "_multiprocessing_options",
    "_data_source",
    "_sampler",
    "_operations",
    "_shard_options",
    "_read_options",
    "global_state",
}


def private_uses(source: str) -> list[str]:
    """Where ``source`` uses a private upstream API: a line number and what."""
    found = []
    for node in ast.walk(ast.parse(source)):
        where = getattr(node, "lineno", 0)
        if isinstance(node, ast.Import | ast.ImportFrom):
            modules = [alias.name for alias in node.names]
            if isinstance(node, ast.ImportFrom):
                modules = [node.module or ""] + [f"{node.module}.{m}" for m in modules]
            found += [f"{where}: import {m}" for m in modules if m.startswith(PRIVATE_MODULES)]
        elif isinstance(node, ast.Attribute) and ast.unparse(node.value) not in ("self", "cls"):
            root = ast.unparse(node.value).split(".")[0]
            on_module = root in UPSTREAM_MODULES and (
                node.attr == "src" or (node.attr.startswith("_") and not node.attr.endswith("__"))
            )
            if node.attr in UPSTREAM_PRIVATE_NAMES or on_module:
                found.append(f"{where}: {ast.unparse(node)}")
        elif isinstance(node, ast.Constant) and node.value in UPSTREAM_PRIVATE_NAMES:
            found.append(f"{where}: {node.value!r}")
    return sorted(found, key=lambda use: int(use.split(":", 1)[0]))


@pytest.mark.unit
def test_the_scan_finds_each_kind_of_private_use():
    source = textwrap.dedent(
        """
        from keras.src.trainers import compile_utils
        import jax._src.compiler
        from jax.experimental.compilation_cache import compilation_cache
        model._symbolic_build(data_batch=batch)
        getattr(tensor, "_keras_history", None)
        threading._register_atexit(stop)
        keras.src.ops.add(1, 2)
        kernel.saved_sigint_handler = handler
        """
    )
    assert private_uses(source) == [
        "2: import keras.src.trainers",
        "2: import keras.src.trainers.compile_utils",
        "3: import jax._src.compiler",
        "4: import jax.experimental.compilation_cache",
        "4: import jax.experimental.compilation_cache.compilation_cache",
        "5: model._symbolic_build",
        "6: '_keras_history'",
        "7: threading._register_atexit",
        "8: keras.src",
        "9: kernel.saved_sigint_handler",
    ]
    assert private_uses("self._tracker = x; keras.layers.Dense; x.__class__") == []


@pytest.mark.unit
def test_only_the_upstream_module_uses_private_upstream_apis():
    package = pathlib.Path(ftwidgets.__file__).parent
    found = {
        str(path.relative_to(package)): uses
        for path in sorted(package.rglob("*.py"))
        if path.name != "upstream.py" and (uses := private_uses(path.read_text("utf-8")))
    }
    assert found == {}, "use ftwidgets.upstream for these: " + repr(found)
