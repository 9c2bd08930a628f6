"""The engine: configs, data, the transfer model, jobs on a worker thread, the session.

Nothing here imports ipywidgets, bqplot or IPython (tests/test_layout.py).
"""
