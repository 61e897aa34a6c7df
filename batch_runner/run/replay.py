"""`from_run=DIR`: each row is made again from the parameters saved with it in DIR, exactly as it was made.

A folder's results log (parts/, merged into results.parquet) keeps every row's parameters (prompt,
seed, frames, size, steps, guidance, images) and `params_hash`, their fingerprint with the image
files' size and time and the settings that change a video (`output_salt` of DIR's config.yaml). The
manifest is still read, for the rows' order and their passthrough columns, but a row is made from
its saved parameters, and only once the manifest's row and the files it names still match them; a
row that changed since (an edited prompt, another seed, a replaced image) refuses the whole run,
naming each such row and what changed. A row with no saved parameters in DIR (never made there) is
made from the manifest, as a rerun would make it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from batch_runner.config import RunConfig
from batch_runner.errors import UserError
from batch_runner.inputs.manifest import Job, Manifest
from batch_runner.outputs.provenance import CONFIG_FILE, load_saved_config, output_salt
from batch_runner.outputs.results import PARTS_DIR

log = logging.getLogger(__name__)

# A row's parameters, as the results log records them (ResultRow.from_job) and a Job holds them.
PARAMETERS = (
    "image",
    "last_image",
    "prompt",
    "negative_prompt",
    "seed",
    "num_frames",
    "height",
    "width",
    "fps",
    "num_inference_steps",
    "guidance_scale",
)
_SHOWN = 60  # characters of a value shown in a refusal


def replayed(cfg: RunConfig, manifest: Manifest) -> Manifest:
    """`manifest` whose jobs are the rows as DIR (cfg.from_run) made them; UserError naming every row
    that the manifest or its files no longer match."""
    folder = Path(str(cfg.from_run))
    salt = output_salt(saved_config(folder))
    records = saved_records(folder)
    jobs, changed, fresh = [], [], 0
    for job in manifest.jobs:
        record = records.get(job.id)
        if record is None:
            fresh += 1
            jobs.append(job)
            continue
        saved = replace(job, **{name: _as(getattr(job, name), record.get(name)) for name in PARAMETERS})
        differ = [name for name in PARAMETERS if getattr(saved, name) != getattr(job, name)]
        if differ:
            changed.extend(_difference(job, name, getattr(saved, name), getattr(job, name)) for name in differ)
        elif saved.params_hash(salt) != record["params_hash"]:
            changed.append(_unseen_change(job, saved, record, folder))
        else:
            jobs.append(saved)
    if changed:
        lines = "\n".join(f"  - {line}" for line in changed)
        rows = len({line.split(",")[0].split(":")[0] for line in changed})
        raise UserError(
            f"from_run={str(folder)!r}: the manifest {str(manifest.path)!r} no longer matches how {rows} row(s) "
            f"were made there, so they cannot be made again exactly; nothing was run or written:\n{lines}\n"
            "Restore those rows (or files) as they were, or make them as they are now with manifest= and "
            "output_dir= instead of from_run=."
        )
    if fresh:
        log.info("%d row(s) have no saved parameters in %s (never made there): made from the manifest", fresh, folder)
    return replace(manifest, jobs=jobs)


def saved_config(folder: Path) -> RunConfig:
    """DIR's config.yaml as the typed config that made its rows."""
    saved = load_saved_config(folder / CONFIG_FILE)
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RunConfig), saved))


def saved_records(folder: Path) -> dict[str, dict[str, Any]]:
    """Id -> the newest record with parameters in DIR's results logs, read as written (JSON keeps a
    64-bit seed exact) and without touching the files (another process may be reading them too)."""
    newest: dict[str, dict[str, Any]] = {}
    for part in sorted((folder / PARTS_DIR).glob("*.jsonl")):
        for line in part.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill: its row was not finished
            if not isinstance(record, dict) or not record.get("params_hash") or "id" not in record:
                continue  # a row refused as invalid was recorded without parameters
            kept = newest.get(record["id"])
            if kept is None or str(record.get("finished_at") or "") >= str(kept.get("finished_at") or ""):
                newest[record["id"]] = record
    return newest


def _as(like: Any, value: Any) -> Any:
    """A saved value as the Job field's own type (JSON writes 8.0 as 8.0 but a float column may hold 8)."""
    if value is None or like is None:
        return value
    if isinstance(like, bool):
        return bool(value)
    if isinstance(like, int):
        return int(value)
    if isinstance(like, float):
        return float(value)
    return value


def _who(job: Job) -> str:
    return f"row {job.row} (id {job.id!r})"


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _SHOWN else text[: _SHOWN - 4] + "...'"


def _difference(job: Job, name: str, saved: Any, now: Any) -> str:
    return f"{_who(job)}, column '{name}': made with {_shown(saved)}, the manifest now gives {_shown(now)}"


def _unseen_change(job: Job, saved: Job, record: dict[str, Any], folder: Path) -> str:
    """Same parameters, another fingerprint: an image file changed, or the row was made under other settings."""
    made = _timestamp(record.get("finished_at"))
    for name in ("image", "last_image"):
        path = getattr(saved, name)
        try:
            modified = Path(path).stat().st_mtime if path else None
        except OSError:
            return f"{_who(job)}, column '{name}': the file {path!r} it was made from is gone"
        if modified is not None and made is not None and modified > made:
            return f"{_who(job)}, column '{name}': the file {path!r} changed after the row was made"
    return (
        f"{_who(job)}: it was made under other settings than {str(folder / CONFIG_FILE)!r} holds (a later run into "
        "that folder changed them), or from an image file of another size or time"
    )


def _timestamp(text: Any) -> float | None:
    try:
        return datetime.fromisoformat(str(text)).timestamp()
    except ValueError:
        return None
