"""Command-line overrides checked before Hydra composes them.

Hydra refuses a misspelt key (`memroy=none`) or group choice (`model=wan`) with a stack of lines
and exit 1. This reads the same overrides with Hydra's own parser against the typed schema
(batch_runner.config) and the groups in conf/, and refuses the first wrong one with one sentence:
the valid choices of a group, the nearest valid key, a value of the wrong type (`seed=abc`,
`chunk_size=1e9`, `overwrite=maybe`, `ids=c`), or a value Hydra's grammar cannot read (a path with
`(` or `,`), saying how to quote it. Everything else is left to Hydra.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from pathlib import Path

from batch_runner.config import RunConfig
from batch_runner.errors import UserError

# Hydra's own options whose value is the next argument, not an override.
_OPTIONS_WITH_VALUE = {"-cn", "--config-name", "-cp", "--config-path", "-cd", "--config-dir", "--info", "-i"}


def check_overrides(args: list[str], conf_dir: Path) -> None:
    """Raise UserError naming the first override whose key or group choice does not exist."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    groups = {
        folder.name: sorted(p.stem for p in folder.glob("*.yaml"))
        for folder in conf_dir.iterdir()
        if folder.is_dir() and any(folder.glob("*.yaml"))
    }
    if "-m" in args or "--multirun" in args:
        raise UserError(
            "Hydra's multirun (-m) is not how batch_runner runs several settings: it would run one and write "
            "multirun/ folders here; run one command per setting, or vary the rows in the manifest."
        )
    skip_next = False
    for arg in args:
        if skip_next or arg.startswith("-"):
            skip_next = arg in _OPTIONS_WITH_VALUE
            continue
        try:
            (override,) = parser.parse_overrides([arg])
        except Exception:
            _refuse_unparsed(arg, unreadable=True)
            continue  # malformed otherwise: Hydra says what is wrong with it
        key = override.key_or_group
        if key.startswith("hydra") or override.package is not None or override.is_delete():
            continue
        if key in groups:
            value = override.value()
            if isinstance(value, str) and value not in groups[key]:
                near = difflib.get_close_matches(value, groups[key], n=1, cutoff=0.6)
                hint = f"did you mean {key}={near[0]}? " if near else ""
                raise UserError(
                    f"{key}={value} is not one of the {key} choices in conf/{key}/; {hint}"
                    f"the choices: {', '.join(groups[key])}."
                )
            continue
        leaf = _check_key(key, groups)
        if override.is_sweep_override():
            if leaf is not None and _is_list(leaf):
                raise UserError(f"{key} is a list; write {key}=[{arg.split('=', 1)[1]}].")
            if leaf in _KINDS and leaf is not str:
                raise UserError(f"{arg} gives {key} several values; it takes one ({_KINDS[leaf]}).")
            _refuse_unparsed(arg)  # a path with ',' reads as a sweep over its parts
        if leaf is not None and not override.is_sweep_override():
            _check_type(key, arg.split("=", 1)[1] if "=" in arg else "", override.value(), leaf)


def with_family_options(args: list[str]) -> list[str]:
    """`args` with each `model.options.<key>=<value>` made `++model.options.<key>=<value>`.

    A family's options are its own (the family refuses a key it does not have, naming the ones it
    has); a preset's YAML lists only those it changes, and Hydra would refuse any other key as not in
    its struct with a stack of lines. `++` sets the key whether the preset lists it or not.
    """
    return [f"++{arg}" if arg.startswith("model.options.") and "=" in arg else arg for arg in args]


def _refuse_unparsed(arg: str, unreadable: bool = False) -> None:
    """A key=value whose value Hydra's grammar cannot read (`unreadable`: its parser refused it), or
    reads as a sweep: how to quote it, in one sentence."""
    key, sep, value = arg.partition("=")
    if not sep or not key.replace(".", "").replace("_", "").lstrip("+~").isalnum():
        return
    special = sorted({c for c in value if c in "()[]{},:=\\'\" ~"})
    if not special and not unreadable:
        return
    reserved = f"holds characters Hydra's override grammar reserves ({' '.join(special)})"
    why = reserved if special else "is not one Hydra's override grammar reads"
    raise UserError(
        f"The value of {key.lstrip('+~')} {why}; quote it, "
        f"e.g. '{key}=\"{value}\"' (single quotes for the shell, double quotes for Hydra)."
    )


def _is_list(hint: object) -> bool:
    return any((typing.get_origin(h) or h) is list for h in (hint, *typing.get_args(hint)))


_KINDS = {int: "a whole number", float: "a number", bool: "true or false", str: "text"}


def _check_type(key: str, raw: str, value: object, hint: object) -> None:
    """Refuse a value Hydra parsed as the wrong type for the setting, before OmegaConf's four lines."""
    args = typing.get_args(hint)
    if type(None) in args:
        if value is None:
            return
        hint = next(a for a in args if a is not type(None))
    origin = typing.get_origin(hint) or hint
    if origin is list:
        if not isinstance(value, list):
            raise UserError(f"{key} is a list; write {key}=[{raw}] (several: {key}=[a,b]).")
        return
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        return  # text, or a type this check does not know: OmegaConf converts or refuses it
    if not ok:
        kind = _KINDS[hint]
        raise UserError(f"{key}={raw} is not {kind}; write {key}=<{kind}> (see batch_runner/config.py).")


def _check_key(key: str, groups: dict[str, list[str]]) -> object | None:
    """The setting's type hint, or None where it is a group of settings; refuses an unknown key."""
    schema: type = RunConfig
    parts = key.split(".")
    for depth, part in enumerate(parts):
        fields = typing.get_type_hints(schema)
        if part not in fields:
            prefix = ".".join(parts[:depth])
            near = difflib.get_close_matches(part, list(fields), n=1, cutoff=0.6)
            where = f"{prefix}'s settings" if prefix else "the settings"
            if near:
                hint = "did you mean " + ".".join([*parts[:depth], near[0], *parts[depth + 1 :]]) + "?"
            else:
                hint = "valid keys here: " + ", ".join(f"{prefix}.{name}" if prefix else name for name in fields) + "."
            raise UserError(f"There is no setting {key!r} among {where} (batch_runner/config.py); {hint}")
        hint = fields[part]
        if (typing.get_origin(hint) or hint) is dict:
            return None  # a family's own settings (model.options.<key>): the family validates them
        if not dataclasses.is_dataclass(hint):
            if depth + 1 < len(parts):
                leaf = ".".join(parts[: depth + 1])
                raise UserError(f"The setting {leaf!r} has no keys below it, so {key!r} does not exist.")
            return hint
        schema = hint  # type: ignore[assignment]
    return None
