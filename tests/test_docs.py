"""Every measured figure in README.md and docs/ names the script or test that printed it.

A figure is a number with a unit (%, s, ms, min, GB, MB, GiB, MiB, x, img/s, images/s, pairs/s,
GFLOP/s, queries/s). Its source is a ``bench/...py`` or ``tests/...py`` path, a ``test_...`` name,
``make demo`` or ``r2f ...`` output, named in the same paragraph or list item; for a table or a code
block, in the block itself or in its caption (the paragraph just above it). Bounds that are not
measurements (``>= 20x``, ``target 90 %``, ``under 4 GB``) are not figures.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "infra").glob("*.md"))]

FIGURE = re.compile(
    r"(?<![\w.\-/])(\d[\d,]*(?:\.\d+)?)(?:\s?[–-]\s?\d[\d,]*(?:\.\d+)?)?"
    r"(?:\s?(%|ms|min|s|GB|MB|GiB|MiB|KB|TB|img/s|images/s|pairs/s|queries/s|GFLOP/s|GFLOPs)(?![\w/])"
    r"|(x)(?![\w]))")
BOUND = re.compile(r"(>=|<=|≥|≤|<|>|~|goal|target|under|at most|at least|up to|about|limit|budget|default|every|per)\W*$",
                   re.IGNORECASE)
SOURCE = re.compile(r"bench/[\w/.-]+\.py|tests/[\w/.-]+\.py|\btest_\w+|\bbench_\w+|make demo|`r2f [a-z]+")


def blocks(text: str) -> list[tuple[str, str, int]]:
    """(kind, text, first line) of each paragraph / list item / table / code block."""
    out, cur, kind, start = [], [], None, 0
    lines = text.splitlines()

    def flush():
        nonlocal cur, kind
        if cur:
            out.append((kind, "\n".join(cur), start))
        cur, kind = [], None

    in_code = False
    for i, line in enumerate(lines, 1):
        if line.strip().startswith("```"):
            if in_code:
                cur.append(line)
                flush()
                in_code = False
            else:
                flush()
                kind, start, cur, in_code = "code", i, [line], True
            continue
        if in_code:
            cur.append(line)
            continue
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            flush()
            continue
        this = "table" if stripped.startswith("|") else "text"
        item = re.match(r"^\s*([-*]|\d+\.)\s", line) is not None
        if kind != this or (this == "text" and item and not line.startswith("  ")):
            flush()
            kind, start = this, i
        cur.append(line)
    flush()
    return out


def figures(text: str) -> list[str]:
    text = re.sub(r"`[^`\n]*`", "``", text)  # option values and code (`--max-failures 5%`) are not figures
    found = []
    for m in FIGURE.finditer(text):
        before = text[max(0, m.start() - 12):m.start()]
        if BOUND.search(before):
            continue
        found.append(m.group(0))
    return found


def unsourced(path: Path) -> list[str]:
    bad = []
    bl = blocks(path.read_text())
    for j, (kind, text, line) in enumerate(bl):
        figs = figures(text)
        if not figs or SOURCE.search(text):
            continue
        caption = bl[j - 1][1] if j and bl[j - 1][0] == "text" and kind in ("table", "code") else ""
        if kind == "table" and not caption:  # a table split by its header rule: look further up
            k = j - 1
            while k >= 0 and bl[k][0] == "table":
                k -= 1
            caption = bl[k][1] if k >= 0 else ""
        if SOURCE.search(caption):
            continue
        bad.append(f"{path.relative_to(ROOT)}:{line}: {', '.join(figs[:4])} in: {text[:120]!r}")
    return bad


def test_the_figure_finder_sees_figures_and_skips_bounds():
    assert figures("official 3.66–3.75 s, ours 0.47 s: 6.3x; R@1 56.5 %") == ["3.66–3.75 s", "0.47 s", "6.3x", "56.5 %"]
    assert figures("goal >= 20x, target >= 90 %, under 4 GB, images 480x640, 1280 x 320, v0003, `5%`") == []
    assert unsourced_text("R@1 was 51 %.") and not unsourced_text("R@1 was 51 % (`tests/test_run_e2e.py`).")


def unsourced_text(text: str) -> list[str]:
    tmp = ROOT / ".pytest_cache" / "_doc_probe.md"
    tmp.parent.mkdir(exist_ok=True)
    tmp.write_text(text)
    try:
        return unsourced(tmp)
    finally:
        tmp.unlink()


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_figure_names_its_source(path):
    bad = unsourced(path)
    assert not bad, "figures without the script or test that printed them:\n" + "\n".join(bad)
