"""Command-line overrides checked before Hydra composes them.

Hydra refuses a misspelt key (`memroy=none`) or group choice (`model=wan`) with a stack of lines
and exit 1. This reads the same overrides with Hydra's own parser against the typed schema
(batch_runner.config) and the groups in conf/, and refuses the first wrong one with one sentence:
the valid choices of a group, or the nearest valid key. Everything else is left to Hydra.
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
    skip_next = False
    for arg in args:
        if skip_next or arg.startswith("-"):
            skip_next = arg in _OPTIONS_WITH_VALUE
            continue
        try:
            (override,) = parser.parse_overrides([arg])
        except Exception:
            continue  # malformed: Hydra says what is wrong with it
        key = override.key_or_group
        if key.startswith("hydra") or override.package is not None or override.is_delete():
            continue
        if key in groups:
            value = override.value()
            if isinstance(value, str) and value not in groups[key]:
                raise UserError(
                    f"{key}={value} is not one of the {key} choices in conf/{key}/: {', '.join(groups[key])}."
                )
            continue
        _check_key(key, groups)


def _check_key(key: str, groups: dict[str, list[str]]) -> None:
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
        if not dataclasses.is_dataclass(hint):
            if depth + 1 < len(parts):
                leaf = ".".join(parts[: depth + 1])
                raise UserError(f"The setting {leaf!r} has no keys below it, so {key!r} does not exist.")
            return
        schema = hint  # type: ignore[assignment]
