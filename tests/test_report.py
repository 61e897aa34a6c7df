"""report.json, report.html and the console summary, from a results table built in memory."""

from __future__ import annotations

import time
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np
import pandas as pd

from batch_runner.outputs import report

IDS = ["a#1", "50%", "two words", "plain"]


def table(device: str = "NVIDIA H100 80GB HBM3") -> pd.DataFrame:
    now = pd.Timestamp.now(tz="UTC").isoformat()
    rows = [
        {"id": row_id, "status": "ok", "seconds": float(i + 1), "rank": i % 2, "error": None}
        for i, row_id in enumerate(IDS)
    ] + [
        {"id": row_id, "status": "failed", "seconds": seconds, "rank": rank, "error": error}
        for row_id, seconds, rank, error in [
            ("bad1", None, 0, "image: cannot decode image 'x_17.png'"),
            ("bad2", None, 1, "image: cannot decode image 'y_2.png'"),
            ("bad3", 0.5, 1, "RuntimeError: step 3 gave NaN"),
        ]
    ]
    frame = pd.DataFrame(rows)
    return frame.assign(finished_at=now, gpu=device, prompt="the sea", image=None)


def summary(device: str = "NVIDIA H100 80GB HBM3") -> dict:
    return report.summarize(table(device), started=time.time() - 60, run_id="r")


class Sources(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.sources: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag == "img":
            self.sources.append(dict(attrs)["src"])


def test_preview_urls_find_their_files_whatever_the_id_holds(tmp_path: Path) -> None:
    frames = np.zeros((3, 8, 8, 3), np.uint8)
    for row_id in IDS:
        report.save_previews(tmp_path, row_id, frames, None)
    page = report.render_pages(tmp_path, table(), summary())[0]
    parser = Sources()
    parser.feed(page)
    assert len(parser.sources) == 3 * len(IDS)
    for src in parser.sources:
        url = urlsplit(src)  # as a browser reads it: '#' starts a fragment, '%' an escape
        assert not url.fragment and not url.query, src
        assert (tmp_path / unquote(url.path)).is_file(), src


def test_report_html_shows_the_slowest_rows_and_failures_by_reason(tmp_path: Path) -> None:
    page = report.render_pages(tmp_path, table(), summary())[0]
    slowest = page[page.index("Slowest rows") : page.index("Failures by reason")]
    assert [slowest.index(row_id) for row_id in ("plain", "two words", "50%", "a#1")] == sorted(
        slowest.index(row_id) for row_id in ("plain", "two words", "50%", "a#1")
    )
    assert "4.0" in slowest
    failures = page[page.index("Failures by reason") : page.index("class='grid'")]
    assert "image: cannot decode image &#x27;x_17.png&#x27;" in failures  # the real message, escaped
    assert "RuntimeError: step 3 gave NaN" in failures
    # Each id links to its card: rows 5 and 6 of the table (from 0).
    assert "<a href='report.html#row4'>bad1</a>, <a href='report.html#row5'>bad2</a>" in failures
    assert "<div class='card failed' id='row4' data-id='bad1'>" in page


def test_alike_failures_are_counted_together_and_shown_as_raised() -> None:
    failures = summary()["failures"]
    assert failures == [
        {"reason": "image: cannot decode image 'x_17.png'", "count": 2, "ids": ["bad1", "bad2"]},
        {"reason": "RuntimeError: step 3 gave NaN", "count": 1, "ids": ["bad3"]},
    ]
    text = report.summary_text(summary(), Path("/out"))
    assert "failed x2: image: cannot decode image 'x_17.png' (e.g. bad1, bad2)" in text
    assert "failed x1: RuntimeError: step 3 gave NaN (e.g. bad3)" in text
    assert "…" not in text


def test_a_cpu_run_counts_cpu_hours_and_a_gpu_run_gpu_hours(tmp_path: Path) -> None:
    on_cpu = summary(device="cpu")
    assert on_cpu["device"] == "CPU"
    assert "CPU-hours" in report.summary_text(on_cpu, tmp_path) and "GPU" not in report.summary_text(on_cpu, tmp_path)
    assert "CPU-hours" in report.render_pages(tmp_path, table("cpu"), on_cpu)[0]
    assert "GPU-hours" in report.summary_text(summary(), tmp_path)


class Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []
        self.cards: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        found = dict(attrs)
        if tag == "a":
            self.links.append(found["href"])
        if tag == "div" and "data-id" in found:
            self.cards.append(found["data-id"])


def pages_written(folder: Path) -> list[Path]:
    return sorted(folder.glob("report*.html"), key=lambda p: (p.name != "report.html", p.name))


def test_a_long_table_is_paged_every_row_once_in_order_and_every_page_linked(tmp_path: Path, monkeypatch) -> None:
    """A browser cannot open 200,000 cards of 4 pictures on one page: the report pages them."""
    monkeypatch.setattr(report, "PAGE_ROWS", 3)
    rows = table()  # 7 rows: pages of 3, 3 and 1
    report.write(tmp_path, rows, None, started=time.time() - 60, run_id="r")
    pages = pages_written(tmp_path)
    assert [p.name for p in pages] == ["report.html", "report-0002.html", "report-0003.html"]
    seen, linked, texts = [], set(), [p.read_text() for p in pages]
    for number, (page, text) in enumerate(zip(pages, texts, strict=True), 1):
        parser = Links()
        parser.feed(text)
        seen += parser.cards
        pages_linked = [href for href in parser.links if "#" not in href]
        linked |= set(pages_linked)
        assert page.name not in pages_linked and f"page {number} of 3" in text
        for href in (h for h in parser.links if "#" in h):  # a failed row's id, linked to its card
            file_name, anchor = href.split("#")
            row_id = rows["id"].tolist()[int(anchor.removeprefix("row"))]
            assert f"id='{anchor}' data-id='{row_id}'" in (tmp_path / file_name).read_text(), href
    assert linked == {p.name for p in pages}  # each page reachable from another, no link to nothing
    assert "report-0002.html#row4" in texts[0] and "report-0003.html#row6" in texts[0]  # bad1, bad3
    assert seen == rows["id"].tolist()  # every row once, in the table's order
    assert "Failures by reason" in texts[0] and all("Failures by reason" not in t for t in texts[1:])
    assert "rows 7-7 of 7" in texts[2]

    # A shorter table later: the pages it no longer needs go, the report is one page without links.
    report.write(tmp_path, rows.head(2), None, started=time.time() - 60, run_id="r2")
    [only] = pages_written(tmp_path)
    assert only.name == "report.html" and "<nav" not in only.read_text()


def test_report_pictures_load_as_the_page_scrolls_to_them(tmp_path: Path) -> None:
    report.save_previews(tmp_path, "plain", np.zeros((3, 8, 8, 3), np.uint8), None)
    page = report.render_pages(tmp_path, table(), summary())[0]
    pictures = [tag for tag in page.split("<img")[1:]]
    assert len(pictures) == 3 and all("loading='lazy'" in tag.split(">")[0] for tag in pictures)
