"""The run report: numbers in report.json and a page people can look at, report.html.

Previews (the input image and the first, middle and last frames, as small JPEGs under previews/)
are written by the video-writer thread while the frames are still in memory, so the report never
decodes hundreds of videos. report.html is static and self-contained apart from those JPEGs: it
opens offline, straight from the output folder.
"""

from __future__ import annotations

import html
import io
import json
import os
import re
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import pandas as pd
from PIL import Image

from batch_runner.inputs.ids import id_problem
from batch_runner.outputs.storage import atomic_write_bytes, atomic_write_text

PREVIEWS_DIR = "previews"
PREVIEW_WIDTH = 256
REPORT_JSON = "report.json"
REPORT_HTML = "report.html"
# Cards a page of the report holds; report.html is the first page, report-0002.html the second...
# A browser handles a few thousand pictures on a page, not the 800,000 of a 200,000-row run.
PAGE_ROWS = 500
FRAME_NAMES = ("first", "middle", "last")
MAX_REASON_CHARS = 300
FAILED_IDS_SHOWN = 5  # ids the failures table names per reason, each linked to its card


def preview_file(row_id: str, name: str) -> str:
    """The file name of a row's preview `name` (input, first, middle or last) under previews/."""
    return f"{row_id}.{name}.jpg"


def preview_path(output_dir: Path, row_id: str, name: str) -> Path:
    return output_dir / PREVIEWS_DIR / preview_file(row_id, name)


def existing_previews(output_dir: Path) -> frozenset[str]:
    """The file names under previews/, read once: a report of 200,000 rows would otherwise ask the
    file system about 800,000 paths one by one."""
    folder = output_dir / PREVIEWS_DIR
    return frozenset(entry.name for entry in os.scandir(folder)) if folder.is_dir() else frozenset()


def preview_name(row_id: str, name: str, existing: frozenset[str]) -> str | None:
    """The preview's file name if it exists; None also for an id refused as a file name (a row
    recorded failed under on_invalid=skip may have an id too long or unsafe to name any file)."""
    if id_problem(row_id) is not None:
        return None
    file_name = preview_file(row_id, name)
    return file_name if file_name in existing else None


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
    # Encoded in memory, then written by Python, which raises on a short write: Pillow's encoder
    # writing to a file takes a short write on a full disk for a whole one (Pillow 13), and a
    # truncated preview would be published under its name.
    encoded = io.BytesIO()
    small.save(encoded, format="JPEG", quality=85)
    atomic_write_bytes(encoded.getvalue(), path)


def summarize(table: pd.DataFrame, started: float, run_id: str) -> dict[str, Any]:
    """The run's numbers: counts, throughput, device time, per-process time, slowest rows, failures.

    Device time is in GPU-hours, or CPU-hours for a run without CUDA (the `gpu` provenance column
    says "cpu" there), so a CPU try is never reported as GPU time.
    """
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
    errors = failed["error"].fillna("unknown").astype(str)
    groups = errors.map(_reason_key)
    return {
        "run_id": run_id,
        "rows": len(table),
        "ok": int(ok.sum()),
        "failed": int((~ok).sum()),
        "skipped": int((ok & ~this_run).sum()),  # done by an earlier run, left untouched
        "made_this_run": int((this_run & ok).sum()),
        "wall_seconds": round(wall_hours * 3600, 1),
        "videos_per_hour": round(int((this_run & ok).sum()) / wall_hours, 2),
        "device": _device(made),
        "device_hours": round(wall_hours * processes, 4),
        "busy_device_hours": round(float(made["seconds"].sum()) / 3600, 4),
        "per_process": {
            int(rank): {"rows": int(r["rows"]), "seconds": round(float(r["seconds"]), 1)}
            for rank, r in per_process.iterrows()
        },
        "slowest": [
            {"id": r["id"], "seconds": r["seconds"]}
            for r in made.nlargest(5, "seconds")[["id", "seconds"]].to_dict("records")
        ],
        # Alike failures (the same error with other names or numbers in it) are counted together;
        # `reason` is the first one's own message, as it was raised.
        "failures": [
            {
                "reason": errors[groups == key].iloc[0][:MAX_REASON_CHARS],
                "count": int(count),
                "ids": failed.loc[groups == key, "id"].head(20).tolist(),
            }
            for key, count in groups.value_counts().items()
        ],
    }


def _reason_key(error: str) -> str:
    """An error with its specifics (quoted names, numbers) blanked: the key that groups alike failures."""
    text = re.sub(r"'[^']*'|\"[^\"]*\"", "''", error)
    return re.sub(r"\d+(\.\d+)?", "0", text)[:MAX_REASON_CHARS]


def _device(made: pd.DataFrame) -> str:
    """GPU, or CPU when the rows of this run were made without CUDA."""
    if len(made) and "gpu" in made.columns:
        return "CPU" if (made["gpu"] == "cpu").all() else "GPU"
    import torch

    return "GPU" if torch.cuda.is_available() else "CPU"


def write(
    output_dir: Path, table: pd.DataFrame, manifest: Any, started: float, run_id: str, html: bool = True
) -> dict[str, Any]:
    summary = summarize(table, started, run_id)
    if html:
        _preview_failed_inputs(output_dir, table)
    atomic_write_text(json.dumps(summary, indent=2, default=str), output_dir / REPORT_JSON)
    if html:
        pages = render_pages(output_dir, table, summary)
        for number, page in enumerate(pages, 1):
            atomic_write_text(page, output_dir / page_name(number))
        _remove_pages_after(output_dir, len(pages))
    return summary


def page_name(number: int) -> str:
    """The file of the report's page `number` (1: report.html)."""
    return REPORT_HTML if number == 1 else f"report-{number:04d}.html"


def _remove_pages_after(output_dir: Path, last: int) -> None:
    """An earlier report's pages beyond this one's last (the table got shorter, or PAGE_ROWS grew)."""
    for entry in os.scandir(output_dir):
        match = re.fullmatch(r"report-(\d{4,})\.html", entry.name)
        if match and int(match.group(1)) > last:
            os.unlink(entry.path)


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
        f"{summary['videos_per_hour']} videos/hour, {_hours(summary)}.",
    ]
    for failure in summary["failures"]:
        lines.append(f"  failed x{failure['count']}: {failure['reason']} (e.g. {', '.join(failure['ids'][:3])})")
    lines.append(f"Results: {output_dir / 'results.parquet'}; report: {output_dir / REPORT_HTML}")
    return "\n".join(lines)


def _hours(summary: dict[str, Any]) -> str:
    return f"{summary['device_hours']} {summary['device']}-hours"


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
.prompt{color:#333;margin-top:4px} .player{width:100%;margin-top:6px;display:block}
.tables{display:flex;flex-wrap:wrap;gap:24px;margin:0 0 18px} .tables h2{font-size:15px;margin:0 0 6px}
.tables table{border-collapse:collapse;font-size:13px;background:#fff}
.tables td,.tables th{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
.tables td.num{text-align:right} .tables .reason{max-width:640px;white-space:pre-wrap;color:#b00}
.pages{margin:12px 0;color:#555} .pages a{color:#247}
"""


def render_pages(output_dir: Path, table: pd.DataFrame, summary: dict[str, Any]) -> list[str]:
    """The report's pages, PAGE_ROWS cards each in the table's order: the first holds the slowest rows
    and the failures by reason; every page the totals and links to the others."""
    existing = existing_previews(output_dir)
    records = table.to_dict("records")
    count = max(1, -(-len(records) // PAGE_ROWS))
    totals = (
        f"{summary['ok']} ok · {summary['failed']} failed · {summary['skipped']} from earlier runs · "
        f"{summary['videos_per_hour']} videos/hour · {_hours(summary)}"
    )
    # Where the cards of the ids the failures table names are (page file and anchor), to link them.
    named = {str(row_id) for failure in summary["failures"] for row_id in failure["ids"][:FAILED_IDS_SHOWN]}
    where = {
        row["id"]: f"{page_name(i // PAGE_ROWS + 1)}#row{i}" for i, row in enumerate(records) if row["id"] in named
    }
    pages = []
    for number in range(1, count + 1):
        first = (number - 1) * PAGE_ROWS
        cards = "\n".join(_card(row, existing, first + i) for i, row in enumerate(records[first : first + PAGE_ROWS]))
        navigation = _navigation(number, count, first, min(first + PAGE_ROWS, len(records)), len(records))
        pages.append(
            "<!doctype html><html><head><meta charset='utf-8'><title>batch_runner report</title>"
            f"<style>{_STYLE}</style></head><body><h1>batch_runner report</h1>"
            f"<p class='totals'>{html.escape(totals)}</p>{_tables(summary, where) if number == 1 else ''}"
            f"{navigation}<div class='grid'>{cards}</div>{navigation}</body></html>"
        )
    return pages


def _navigation(number: int, count: int, first: int, end: int, rows: int) -> str:
    """Which rows this page shows, and links to the first, previous, next and last pages (none for one page)."""
    if count == 1:
        return ""
    links = [
        f"<a href='{page_name(target)}'>{label}</a>"
        for label, target, shown in (
            ("first", 1, number > 1),
            ("previous", number - 1, number > 1),
            ("next", number + 1, number < count),
            ("last", count, number < count),
        )
        if shown
    ]
    return (
        f"<nav class='pages'>rows {first + 1:,}-{end:,} of {rows:,} · page {number} of {count} · "
        + " · ".join(links)
        + "</nav>"
    )


def _tables(summary: dict[str, Any], where: dict[str, str]) -> str:
    """The slowest rows of this run and the failures grouped by reason, above the grid."""
    parts = []
    if summary["slowest"]:
        rows = "".join(
            f"<tr><td>{html.escape(str(r['id']))}</td><td class='num'>{float(r['seconds']):.1f}</td></tr>"
            for r in summary["slowest"]
        )
        parts.append(
            "<section class='slowest'><h2>Slowest rows</h2>"
            f"<table><tr><th>id</th><th>seconds</th></tr>{rows}</table></section>"
        )
    if summary["failures"]:
        rows = "".join(
            f"<tr><td class='num'>{f['count']}</td><td class='reason'>{html.escape(f['reason'])}</td>"
            f"<td>{', '.join(_link(str(i), where) for i in f['ids'][:FAILED_IDS_SHOWN])}"
            f"{' …' if f['count'] > FAILED_IDS_SHOWN else ''}</td></tr>"
            for f in summary["failures"]
        )
        parts.append(
            "<section class='failures'><h2>Failures by reason</h2>"
            f"<table><tr><th>rows</th><th>reason</th><th>ids</th></tr>{rows}</table></section>"
        )
    return f"<div class='tables'>{''.join(parts)}</div>" if parts else ""


def _player(row: dict[str, Any]) -> str:
    """A video with sound plays in the page, with its sound (controls, not muted; loaded on demand).
    A silent video needs no player: its stills say what it shows."""
    has_audio = row.get("has_audio")
    if row["status"] != "ok" or not isinstance(row.get("video_path"), str) or pd.isna(has_audio) or not has_audio:
        return ""
    src = quote(row["video_path"])
    return f"<video class='player' controls preload='metadata' src='{html.escape(src)}'></video>"


def _link(row_id: str, where: dict[str, str]) -> str:
    """A row's id, linked to its card (which may be on another page of the report)."""
    text = html.escape(row_id)
    return f"<a href='{html.escape(where[row_id])}'>{text}</a>" if row_id in where else text


def _card(row: dict[str, Any], existing: frozenset[str], position: int) -> str:
    status = row["status"]
    figures = []
    for name in ("input", *FRAME_NAMES):
        file_name = preview_name(row["id"], name, existing)
        # A URL, not a file name: ids may hold '#', '%', '?' or spaces, which a browser reads as URL syntax.
        src = quote(f"{PREVIEWS_DIR}/{file_name}") if file_name else ""
        # No picture (a row that failed before or while generating): an empty box, not a broken image.
        # Loaded as the page scrolls to it: a page of 500 cards holds 2,000 pictures.
        img = f"<img src='{html.escape(src)}' alt='{name}' loading='lazy'>" if src else "<div class='missing'>—</div>"
        figures.append(f"<figure>{img}<figcaption>{name}</figcaption></figure>")
    seconds = row.get("seconds")
    timing = f" · {seconds:.1f} s" if isinstance(seconds, (int, float)) and not pd.isna(seconds) else ""
    error = f"<div class='error'>{html.escape(str(row['error']))}</div>" if status != "ok" and row.get("error") else ""
    prompt = row.get("prompt")
    prompt_html = f"<div class='prompt'>{html.escape(str(prompt))}</div>" if isinstance(prompt, str) else ""
    return (
        f"<div class='card {html.escape(status)}' id='row{position}' data-id='{html.escape(row['id'])}'>"
        f"<div class='frames'>{''.join(figures)}</div>{_player(row)}<div class='meta'>"
        f"<span class='id'>{html.escape(row['id'])}</span>{html.escape(timing)}"
        f"<span class='status'>{html.escape(status)}</span>{prompt_html}{error}</div></div>"
    )
