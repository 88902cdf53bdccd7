"""molting's built-in plugins, one module per method.

Each module is registered in molting's own pyproject.toml under the
``molting`` entry-point group and loads exactly as a third-party plugin does.
"""
