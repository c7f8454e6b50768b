"""Command-line config overrides for every entry point (train, evaluate): absl's
``flags_parser`` that makes the documented override forms work and turns mistakes into one line.

- ``--config.model.kwargs.<any constructor argument>=<value>`` works even when the config file
  does not list the argument (ml_collections only overrides keys that exist); the value is read
  as a Python literal (:func:`literal`), else kept as a string. Whether the model takes the
  argument is checked with the rest of the config (flexvision.train.validate).
- An unknown key (``--config.totl_steps=5``) or a value of the wrong type ends the program with
  ``error: ...`` naming the key, the closest existing key and the keys accepted at that level,
  exit status 2, instead of a 57-line traceback.

Tuples for keys whose default is a tuple (``--config.eval.patch_sizes=(8,16)``) are parsed by
ml_collections itself; string-or-sequence keys such as ``flexi.probs`` are put in their meaning
by the config validation.
"""

from __future__ import annotations

import ast
import difflib
import sys
from typing import Any, Sequence

from absl import flags


def literal(text: str) -> Any:
    """A command-line value as a Python literal (``(1, 2)``, ``0.5``, ``None``, ``'a'``), or
    the text itself when it is not one (``gelu``)."""
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
        return text


def _die(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def _accepted(node) -> str:
    keys = sorted(node.keys())
    return ", ".join(keys)


def _explain_override(config, flag: str, arg: str) -> str | None:
    """Why ``arg`` (``--config.a.b=v``) does not fit ``config``, or None if its key exists."""
    body = arg[len(f"--{flag}."):]
    dotted, _, _ = body.partition("=")
    node, walked = config, flag
    for part in dotted.split("."):
        if node is None or not hasattr(node, "keys"):
            return (f"{arg}: {walked} holds {node!r}, not a group of keys; {dotted!r} cannot be "
                    f"set")
        if part not in node.keys():
            close = difflib.get_close_matches(part, list(node.keys()), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            return (f"{arg}: {walked} has no key {part!r}{hint}; its keys are: "
                    f"{_accepted(node)}")
        node, walked = node[part], f"{walked}.{part}"
    return None


def _parse_with_argv(flag_values: flags.FlagValues, argv: list[str]) -> list[str]:
    # ml_collections' config flag reads its overrides from sys.argv, not from the parsed list
    saved, sys.argv = sys.argv, list(argv)
    try:
        return flag_values(argv)
    finally:
        sys.argv = saved


def parse_flags(argv: Sequence[str], flag_values: flags.FlagValues = flags.FLAGS,
                config_flag: str = "config") -> list[str]:
    """absl ``flags_parser`` (``app.run(main, flags_parser=parse_flags)``); see the module
    docstring. Returns the remaining (non-flag) arguments."""
    kwargs_prefix = f"--{config_flag}.model.kwargs."
    argv = list(argv)
    kept, kwargs_args = argv[:1], []
    for arg in argv[1:]:
        key = arg[len(kwargs_prefix):].partition("=")[0]
        if arg.startswith(kwargs_prefix) and "=" in arg and key and "." not in key:
            kwargs_args.append(arg)
        else:
            kept.append(arg)
    try:
        rest = _parse_with_argv(flag_values, kept)
    except flags.Error as err:
        _die(str(err).strip().splitlines()[0])
    except (AttributeError, KeyError, TypeError, ValueError) as err:
        # an override of a key the config does not have: find it on the config as loaded
        overrides = [a for a in kept[1:] if a.startswith(f"--{config_flag}.")]
        try:
            _parse_with_argv(flag_values, [a for a in kept if a not in overrides])
            config = flag_values[config_flag].value
        except Exception:  # noqa: BLE001 -- the config file itself is broken: show why
            raise err from None
        for arg in overrides:
            message = _explain_override(config, config_flag, arg)
            if message:
                _die(message)
        _die(f"{' '.join(overrides)}: {str(err).strip().splitlines()[0]}")
    config = flag_values[config_flag].value
    for arg in kwargs_args:
        key, _, text = arg[len(kwargs_prefix):].partition("=")
        if config is None or config.get("model") is None:
            _die(f"{arg}: the config has no model block")
        with config.unlocked(), config.ignore_type():
            if config.model.get("kwargs") is None:
                config.model.kwargs = {}
            with config.model.kwargs.ignore_type():
                config.model.kwargs[key] = literal(text)
    return rest
