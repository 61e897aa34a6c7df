"""The run report: numbers in report.json and a page people can look at, report.html.

Previews (the input image and the first, middle and last frames, as small JPEGs under previews/)
are written by the video-writer thread while the frames are still in memory, so the report never
decodes hundreds of videos. report.html is static and self-contained apart from those JPEGs: it
opens offline, straight from the output folder.
"""

from __future__ import annotations

import html
import json
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from batch_runner.manifest import id_problem
from batch_runner.storage import atomic_path, atomic_write_text

PREVIEWS_DIR = "previews"
PREVIEW_WIDTH = 256
REPORT_JSON = "report.json"
REPORT_HTML = "report.html"
FRAME_NAMES = ("first", "middle", "last")


def preview_path(output_dir: Path, row_id: str, name: str) -> Path:
    return output_dir / PREVIEWS_DIR / f"{row_id}.{name}.jpg"


def existing_preview(output_dir: Path, row_id: str, name: str) -> Path | None:
    """The preview's path if it exists; None also for an id refused as a file name (a row recorded
    failed under on_invalid=skip may have an id too long or unsafe to name any file)."""
    if id_problem(row_id) is not None:
        return None
    path = preview_path(output_dir, row_id, name)
    return path if path.exists() else None


def save_previews(output_dir: Path, row_id: str, frames: np.ndarray, image: Image.Image | None) -> None:
    """Small JPEGs of the conditioning image and the first, middle and last frames."""
    picks = dict(zip(FRAME_NAMES, (frames[0], frames[len(frames) // 2], frames[-1]), strict=False))
    for name, frame in picks.items():
        _save_jpeg(Image.fromarray(frame), preview_path(output_dir, row_id, name))
    if image is not None:
        _save_jpeg(image, preview_path(output_dir, row_id, "input"))


def _save_jpeg(image: Image.Image, path: Path) -> None:
    scale = PREVIEW_WIDTH / max(1, image.width)
    small = image.convert("RGB").resize((PREVIEW_WIDTH, max(1, round(image.height * scale))))
    with atomic_path(path) as tmp:
        small.save(tmp, format="JPEG", quality=85)


def summarize(table: pd.DataFrame, started: float, run_id: str) -> dict[str, Any]:
    """The run's numbers: counts, throughput, GPU time, per-process time, slowest rows, failures."""
    finished = pd.to_datetime(table["finished_at"], utc=True, errors="coerce")
    this_run = finished >= pd.Timestamp(started, unit="s", tz="UTC")
    made = table[this_run & table["seconds"].notna()]
    wall_hours = max(time.time() - started, 1e-9) / 3600
    processes = int(made["rank"].max() + 1) if len(made) else 1
    ok = table["status"] == "ok"
    per_process = (
        made.groupby("rank")["seconds"].agg(["count", "sum"]).rename(columns={"count": "rows", "sum": "seconds"})
    )
    failed = table[~ok]
    reasons = failed["error"].fillna("unknown").map(_reason).value_counts()
    return {
        "run_id": run_id,
        "rows": len(table),
        "ok": int(ok.sum()),
        "failed": int((~ok).sum()),
        "skipped": int((ok & ~this_run).sum()),  # done by an earlier run, left untouched
        "made_this_run": int((this_run & ok).sum()),
        "wall_seconds": round(wall_hours * 3600, 1),
        "videos_per_hour": round(int((this_run & ok).sum()) / wall_hours, 2),
        "gpu_hours": round(wall_hours * processes, 4),
        "busy_gpu_hours": round(float(made["seconds"].sum()) / 3600, 4),
        "per_process": {
            int(rank): {"rows": int(r["rows"]), "seconds": round(float(r["seconds"]), 1)}
            for rank, r in per_process.iterrows()
        },
        "slowest": [
            {"id": r["id"], "seconds": r["seconds"]}
            for r in made.nlargest(5, "seconds")[["id", "seconds"]].to_dict("records")
        ],
        "failures": [
            {
                "reason": reason,
                "count": int(count),
                "ids": failed.loc[failed["error"].fillna("unknown").map(_reason) == reason, "id"].head(20).tolist(),
            }
            for reason, count in reasons.items()
        ],
    }


def _reason(error: str) -> str:
    """An error with its specifics (quoted names, numbers) blanked, to group alike failures."""
    text = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", str(error))
    return re.sub(r"\d+(\.\d+)?", "N", text)[:160]


def write(
    output_dir: Path, table: pd.DataFrame, manifest: Any, started: float, run_id: str, html: bool = True
) -> dict[str, Any]:
    summary = summarize(table, started, run_id)
    if html:
        _preview_failed_inputs(output_dir, table)
    atomic_write_text(json.dumps(summary, indent=2, default=str), output_dir / REPORT_JSON)
    if html:
        atomic_write_text(render_html(output_dir, table, summary), output_dir / REPORT_HTML)
    return summary


def _preview_failed_inputs(output_dir: Path, table: pd.DataFrame) -> None:
    """Failed rows have no frames; show their input image where it decodes at all."""
    for row in table[table["status"] != "ok"].to_dict("records"):
        path = preview_path(output_dir, row["id"], "input")
        if id_problem(row["id"]) or path.exists() or not isinstance(row.get("image"), str):
            continue
        try:
            with Image.open(row["image"]) as image:
                image.draft("RGB", (PREVIEW_WIDTH, PREVIEW_WIDTH))
                _save_jpeg(image, path)
        except Exception:
            continue


def summary_text(summary: dict[str, Any], output_dir: Path) -> str:
    lines = [
        f"{summary['ok']} of {summary['rows']} rows ok, {summary['failed']} failed, "
        f"{summary['skipped']} already done before this run; "
        f"{summary['videos_per_hour']} videos/hour, {summary['gpu_hours']} GPU-hours.",
    ]
    for failure in summary["failures"]:
        lines.append(f"  failed x{failure['count']}: {failure['reason']} (e.g. {', '.join(failure['ids'][:3])})")
    lines.append(f"Results: {output_dir / 'results.parquet'}; report: {output_dir / REPORT_HTML}")
    return "\n".join(lines)


# --- html -------------------------------------------------------------------------------------------

_STYLE = """
body{font-family:system-ui,sans-serif;margin:24px;background:#f6f6f4;color:#222}
h1{font-size:20px;margin:0 0 4px} .totals{margin:0 0 16px;color:#555}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(560px,1fr));gap:14px}
.card{background:#fff;border:2px solid #cfd8cf;border-radius:8px;padding:10px}
.card.failed{border-color:#d33;background:#fff3f3}
.frames{display:grid;grid-template-columns:repeat(4,1fr);gap:4px}
.frames figure{margin:0} .frames img{width:100%;display:block;background:#ddd;min-height:40px}
.frames .missing{aspect-ratio:3/2;background:#eee;color:#aaa;display:flex;align-items:center;justify-content:center}
.frames figcaption{font-size:11px;color:#777;text-align:center}
.meta{font-size:13px;margin-top:6px} .id{font-weight:600} .status{float:right;font-weight:600}
.ok .status{color:#2a7} .failed .status{color:#d33} .error{color:#b00;font-size:12px;white-space:pre-wrap}
.prompt{color:#333;margin-top:4px}
"""


def render_html(output_dir: Path, table: pd.DataFrame, summary: dict[str, Any]) -> str:
    cards = "\n".join(_card(output_dir, row) for row in table.to_dict("records"))
    totals = (
        f"{summary['ok']} ok · {summary['failed']} failed · {summary['skipped']} from earlier runs · "
        f"{summary['videos_per_hour']} videos/hour · {summary['gpu_hours']} GPU-hours"
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>batch_runner report</title>"
        f"<style>{_STYLE}</style></head><body><h1>batch_runner report</h1>"
        f"<p class='totals'>{html.escape(totals)}</p><div class='grid'>{cards}</div></body></html>"
    )


def _card(output_dir: Path, row: dict[str, Any]) -> str:
    status = row["status"]
    figures = []
    for name in ("input", *FRAME_NAMES):
        path = existing_preview(output_dir, row["id"], name)
        src = f"{PREVIEWS_DIR}/{path.name}" if path else ""
        # No picture (a row that failed before or while generating): an empty box, not a broken image.
        img = f"<img src='{html.escape(src)}' alt='{name}'>" if src else "<div class='missing'>—</div>"
        figures.append(f"<figure>{img}<figcaption>{name}</figcaption></figure>")
    seconds = row.get("seconds")
    timing = f" · {seconds:.1f} s" if isinstance(seconds, (int, float)) and not pd.isna(seconds) else ""
    error = f"<div class='error'>{html.escape(str(row['error']))}</div>" if status != "ok" and row.get("error") else ""
    prompt = row.get("prompt")
    prompt_html = f"<div class='prompt'>{html.escape(str(prompt))}</div>" if isinstance(prompt, str) else ""
    return (
        f"<div class='card {html.escape(status)}' data-id='{html.escape(row['id'])}'>"
        f"<div class='frames'>{''.join(figures)}</div><div class='meta'>"
        f"<span class='id'>{html.escape(row['id'])}</span>{html.escape(timing)}"
        f"<span class='status'>{html.escape(status)}</span>{prompt_html}{error}</div></div>"
    )
