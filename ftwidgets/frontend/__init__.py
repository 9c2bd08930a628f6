"""The kernel's side of the JupyterLab extension: the comm bridge, its protocol, and the
Interrupt button.
"""
