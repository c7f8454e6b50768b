"""Config files that build on each other: ``configs/vit_digits.py`` is
``configs/flexivit_digits.py`` with two keys changed, and so on.

A config file is loaded by path (``--config configs/NAME.py``), so its directory is not on
``sys.path``; :func:`sibling` loads another file of the same directory by path instead, from
any working directory and without touching ``sys.path``.
"""

from __future__ import annotations

import importlib.util
import os
import types


def load_config_module(path: str) -> types.ModuleType:
    """The Python module in file ``path`` (a config file), executed fresh; FileNotFoundError
    naming the path when there is no such file."""
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config file {path}")
    name = "flexvision_config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sibling(config_file: str, name: str) -> types.ModuleType:
    """The config module ``name`` (without .py) next to ``config_file`` (pass ``__file__``)."""
    return load_config_module(os.path.join(os.path.dirname(os.path.abspath(config_file)),
                                           f"{name}.py"))


def get_config(path: str, arg=None):
    """``get_config(arg)`` of the config file at ``path``."""
    return load_config_module(path).get_config(arg)
