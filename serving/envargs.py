"""Command-line flags from ``ISFE_*`` environment variables (as container deployments set them).

Every long flag ``--some-flag`` can also be given as ``ISFE_SOME_FLAG``; a
flag on the command line wins over its variable.  Repeatable flags
(``--api-key``, ``--cors-origin``) take a comma-separated list.  A value the
flag would refuse is refused the same way, in one line naming the variable:

    serving: error: environment variable ISFE_PORT='80a': expected a TCP port ...

Variables of other programs (``ISFE_SERVE_CONFIG``, the worker hand-over) are
not flags and are left alone.
"""

from __future__ import annotations

import argparse
import os
from typing import Any, Mapping

__all__ = ["EnvError", "ReplaceAction", "apply_env", "env_name"]

PREFIX = "ISFE_"


class EnvError(ValueError):
    """An ``ISFE_*`` variable whose value its flag refuses (the message names the variable)."""


class ReplaceAction(argparse.Action):
    """A repeatable flag (append/extend) whose first use on the command line replaces the default (e.g. from the
    environment)."""

    def __init__(self, option_strings: list[str], dest: str, nargs: Any = None, **kwargs: Any):
        self.extend = kwargs.pop("extend", False)
        super().__init__(option_strings, dest, nargs=nargs, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        items = getattr(namespace, self.dest, None)
        items = [] if items is None or items is self.default else list(items)
        if self.extend and isinstance(values, list):
            items.extend(values)
        else:
            items.append(values)
        setattr(namespace, self.dest, items)


def env_name(action: argparse.Action) -> str | None:
    """``--max-batch-size`` -> ``ISFE_MAX_BATCH_SIZE`` (the first long option string; None for positionals/help)."""
    longs = [o for o in action.option_strings if o.startswith("--")]
    if not longs or isinstance(action, argparse._HelpAction):
        return None
    return PREFIX + longs[0][2:].upper().replace("-", "_")


def _convert(parser: argparse.ArgumentParser, action: argparse.Action, var: str, text: str) -> Any:
    def one(t: str) -> Any:
        try:
            v = action.type(t) if action.type is not None else t  # type: ignore[misc]
        except (argparse.ArgumentTypeError, TypeError, ValueError) as e:
            raise EnvError(f"environment variable {var}={text!r}: {e}; fix or unset it") from None
        if action.choices is not None and v not in action.choices:
            choices = ", ".join(map(str, action.choices))
            raise EnvError(f"environment variable {var}={text!r}: must be one of {choices}; fix or unset it")
        return v

    if isinstance(action, ReplaceAction):
        parts = [p.strip() for p in text.split(",") if p.strip()]
        if not parts:
            raise EnvError(f"environment variable {var} is set but empty; unset it or give a value")
        out: list[Any] = []
        for p in parts:
            v = one(p)
            out.extend(v if action.extend and isinstance(v, list) else [v])
        return out
    return one(text)


def apply_env(parser: argparse.ArgumentParser, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Make each set ``ISFE_<FLAG>`` the default of its flag (required flags become optional); returns {var: dest} used.

    Raises :class:`EnvError` (one line naming the variable) for a value the flag refuses.
    """
    env = os.environ if environ is None else environ
    used: dict[str, str] = {}
    for action in parser._actions:
        var = env_name(action)
        if var is None or var not in env:
            continue
        text = env[var]
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            raise EnvError(f"environment variable {var}: switches cannot come from the environment; pass "
                           f"{action.option_strings[0]}")
        if not text.strip() and not isinstance(action, ReplaceAction):
            raise EnvError(f"environment variable {var} is set but empty; unset it or give a value")
        action.default = _convert(parser, action, var, text.strip())
        action.required = False
        used[var] = action.dest
    return used
