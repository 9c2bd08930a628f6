"""The notebook's user interface: the view model, formatting, charts, the panel, magics."""
