"""``report.html`` of a run: what a person looks at after ``r2f run``.

- a recall@N plot (PNG) of global retrieval and of reranking, and the same numbers as a table
  (each cell carries ``data-key`` / ``data-value`` with the exact metrics.json value);
- for a sample of queries, the query beside its top-5 before and after reranking, framed green
  when within the positive radius and red otherwise (the paper's qualitative figures);
- matched local-token pairs between a query and its top reranked candidate (mutual nearest
  neighbours, homography inliers in green).

Every picture is written into ``<out>/report_assets`` and linked relatively, so the folder can be
copied or served as is.
"""
from __future__ import annotations

import html
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)

from . import storage
from .log import get_logger

log = get_logger(__name__)

ASSETS = "report_assets"
THUMB_HEIGHT = 96
GREEN, RED = "#1a9641", "#d7191c"
MAX_REPORT_ROWS = 200_000


def _write_bytes(url: str, data: bytes) -> None:
    fs, path = storage.filesystem(url)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "wb") as f:
        f.write(data)


def _load_rgb(path: str):
    from PIL import Image

    from .images import read_bytes
    img = Image.open(io.BytesIO(read_bytes(path)))
    img.load()
    return img.convert("RGB")


def _thumbnail(src: str, dst_url: str, height: int = THUMB_HEIGHT) -> bool:
    try:
        img = _load_rgb(src)
    except Exception as exc:  # a vanished or unreadable image leaves a gap, not a failed report
        log.warning("report: cannot read %s: %s", src, exc)
        return False
    w = max(1, round(img.width * height / img.height))
    buf = io.BytesIO()
    img.resize((w, height)).save(buf, format="JPEG", quality=85)
    _write_bytes(dst_url, buf.getvalue())
    return True


def _recall_keys(d: dict) -> list[str]:
    return sorted(d, key=lambda k: int(k.split("@")[1]))


def recall_plot(metrics: dict) -> bytes:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=100)
    for kind, style in (("global", "o--"), ("reranked", "s-")):
        keys = [k for k in _recall_keys(metrics[kind]) if metrics[kind][k] is not None]
        ns = [int(k.split("@")[1]) for k in keys]
        ax.plot(ns, [100 * metrics[kind][k] for k in keys], style, label=kind)
    ax.set_xscale("log")
    ax.set_xlabel("N")
    ax.set_ylabel("Recall@N (%)")
    ax.set_ylim(0, 101)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def match_figure(query_path: str, cand_path: str, q_tokens: np.ndarray, c_tokens: np.ndarray,
                 image_size: tuple[int, int], ransac_cfg=None, height: int = 270,
                 max_lines: int = 40) -> tuple[bytes, int, int]:
    """Side-by-side PNG with lines between mutually-nearest token pairs (inliers green, others
    red); at most ``max_lines`` inliers are drawn. Returns ``(png, matches, inliers)``."""
    import cv2

    from .ransac import RansacConfig, match_tokens
    cfg = ransac_cfg or RansacConfig(image_scale=float(max(image_size)))
    inliers, q_xy, c_xy, mask = match_tokens(q_tokens, c_tokens, cfg)
    H, W = image_size
    scale = max(H, W)
    panels = []
    for p in (query_path, cand_path):
        img = np.asarray(_load_rgb(p))
        w = max(1, round(img.shape[1] * height / img.shape[0]))
        panels.append(cv2.resize(img, (w, height), interpolation=cv2.INTER_AREA))
    gap = 8
    canvas = np.full((height, panels[0].shape[1] + gap + panels[1].shape[1], 3), 255, np.uint8)
    canvas[:, :panels[0].shape[1]] = panels[0]
    off = panels[0].shape[1] + gap
    canvas[:, off:] = panels[1]

    def to_px(xy, panel, x0):
        # Token x, y are normalised by max(H, W) of the (aspect-squashing) model input.
        return (int(x0 + xy[0] * scale / W * panel.shape[1]), int(xy[1] * scale / H * panel.shape[0]))

    # Hundreds of lines hide each other: draw an even subsample (the caption gives the counts).
    idx_in, idx_out = np.flatnonzero(mask), np.flatnonzero(~mask)
    idx_in = idx_in[np.linspace(0, len(idx_in) - 1, min(len(idx_in), max_lines)).astype(int)] if len(idx_in) else idx_in
    idx_out = idx_out[np.linspace(0, len(idx_out) - 1, min(len(idx_out), max_lines // 3)).astype(int)] \
        if len(idx_out) else idx_out
    for sel, colour in ((idx_out, (215, 25, 28)), (idx_in, (26, 150, 65))):
        for i in sel:
            pa_, pb_ = to_px(q_xy[i], panels[0], 0), to_px(c_xy[i], panels[1], off)
            cv2.line(canvas, pa_, pb_, colour, 1, cv2.LINE_AA)
            cv2.circle(canvas, pa_, 3, colour, -1, cv2.LINE_AA)
            cv2.circle(canvas, pb_, 3, colour, -1, cv2.LINE_AA)
    ok, png = cv2.imencode(".png", cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR))
    return png.tobytes(), len(q_xy), int(inliers)


def _pick_queries(results: pa.Table, radius: float, samples: int) -> list[int]:
    """Queries whose top-1 reranking fixed first, then broke, then the rest, in query order."""
    df = results.select(["query_id", "rank", "global_rank", "query_utm_east", "query_utm_north",
                         "candidate_utm_east", "candidate_utm_north"]).to_pandas()
    df = df.fillna({"query_utm_north": 0.0, "candidate_utm_north": 0.0})
    d = np.hypot(df["candidate_utm_east"] - df["query_utm_east"], df["candidate_utm_north"] - df["query_utm_north"])
    df["ok"] = np.nan_to_num(d.to_numpy(), nan=np.inf) <= radius
    g = df[df["global_rank"] == 1].set_index("query_id")["ok"]
    r = df[df["rank"] == 1].set_index("query_id")["ok"]
    qids = list(dict.fromkeys(df["query_id"].tolist()))
    fixed = [q for q in qids if r.get(q, False) and not g.get(q, False)]
    broke = [q for q in qids if g.get(q, False) and not r.get(q, False)]
    rest = [q for q in qids if q not in set(fixed) | set(broke)]
    picked = fixed[: (samples + 1) // 2] + broke[: samples // 4 or 1] if samples > 1 else fixed[:1]
    for q in fixed + broke + rest:
        if len(picked) >= samples:
            break
        if q not in picked:
            picked.append(q)
    return picked[:samples]


def write_report(out: str, metrics: dict, results: "pa.Table | str", radius: float, image_size: tuple[int, int],
                 query_store: str | None = None, database_store: str | None = None, samples: int = 6,
                 match_pairs: int = 2, title: str = "R²Former run") -> str:
    """Write ``<out>/report.html`` and its assets; returns the HTML's URL. ``results`` is a table,
    or a results folder / legacy file (then only its first parts are read, up to MAX_REPORT_ROWS,
    and the database rows come from the state the run recorded, ``published.from_metadata``)."""
    state = None
    if isinstance(results, str):
        from .evaluate import results_state
        from .rerank.results import read_results
        state, _ = results_state(results)
        results = read_results(results, max_rows=MAX_REPORT_ROWS)
    assets = storage.join(out, ASSETS)
    fs, apath = storage.filesystem(assets)
    if fs.exists(apath):
        fs.rm(apath, recursive=True)  # a rerun replaces the pictures, never mixes two runs
    _write_bytes(storage.join(assets, "recall.png"), recall_plot(metrics))

    ns = _recall_keys(metrics["global"])
    rows = []
    for n in ns:
        cells = []
        for kind in ("global", "reranked"):
            v = metrics[kind].get(n)
            text = "–" if v is None else f"{100 * v:.2f}"
            cells.append(f'<td data-key="{kind}.{n}" data-value="{json.dumps(v)}">{text}</td>')
        rows.append(f"<tr><th>{html.escape(n.replace('recall', 'R'))}</th>{''.join(cells)}</tr>")

    def framed(url_rel: str | None, ok: bool | None, label: str) -> str:
        colour = GREEN if ok else RED if ok is not None else "#888"
        if url_rel is None:
            return f'<figure class="miss" style="border-color:{colour}"><figcaption>{html.escape(label)}</figcaption></figure>'
        return (f'<figure style="border-color:{colour}" data-correct="{str(bool(ok)).lower()}">'
                f'<img src="{url_rel}" alt="{html.escape(label)}"><figcaption>{html.escape(label)}</figcaption></figure>')

    thumbs: dict[tuple[str, int], str | None] = {}

    def thumb(kind: str, image_id: int, path: str) -> str | None:
        key = (kind, int(image_id))
        if key not in thumbs:
            rel = f"{ASSETS}/{kind}_{int(image_id)}.jpg"
            thumbs[key] = rel if _thumbnail(path, storage.join(out, rel)) else None
        return thumbs[key]

    sample_html = []
    if results.num_rows > MAX_REPORT_ROWS:
        # City-scale runs: pick the samples among the first queries; the recalls cover all of them.
        first = results.column("query_id").unique()[: max(1, MAX_REPORT_ROWS // 100)]
        results = results.filter(pa.compute.is_in(results.column("query_id"), value_set=first))
    picked = _pick_queries(results, radius, samples) if results.num_rows else []
    df = results.to_pandas()
    df["ok"] = np.nan_to_num(np.hypot(df["candidate_utm_east"] - df["query_utm_east"],
                                      df["candidate_utm_north"].fillna(0) - df["query_utm_north"].fillna(0)),
                             nan=np.inf) <= radius
    for qid in picked:
        sub = df[df["query_id"] == qid]
        qpath = sub["query_path"].iloc[0]
        before = sub.sort_values("global_rank").head(5)
        after = sub.sort_values("rank").head(5)
        line = [framed(thumb("q", qid, qpath), None, "query " + qpath.rsplit("/", 1)[-1])]
        for label, part in (("global", before), ("reranked", after)):
            figs = [framed(thumb("d", r.image_id, r.candidate_path), bool(r.ok),
                           f"{label} #{int(r.rank if label == 'reranked' else r.global_rank)} "
                           f"{r.candidate_path.rsplit('/', 1)[-1]}") for r in part.itertuples()]
            line.append(f'<div class="group"><div class="glabel">{label} top-5</div>{"".join(figs)}</div>')
        sample_html.append(f'<div class="sample">{"".join(line)}</div>')

    match_html = []
    if query_store and database_store and picked and match_pairs > 0:
        try:
            qt = storage.read_global_table(query_store, ["image_id", "row"]).to_pandas().set_index("image_id")
            if state:
                from .published import from_metadata
                dt = from_metadata(state, store=database_store).read_global_table(["image_id", "row"])
            else:
                dt = storage.read_global_table(database_store, ["image_id", "row"])
            dt = dt.to_pandas().set_index("image_id")
            for i, qid in enumerate(picked[:match_pairs]):
                top = df[(df["query_id"] == qid)].sort_values("rank").iloc[0]
                qtok = storage.read_local_tokens(query_store, np.array([qt.loc[qid, "row"]]))[0]
                ctok = storage.read_local_tokens(database_store, np.array([dt.loc[top.image_id, "row"]]))[0]
                png, matches, inliers = match_figure(top.query_path, top.candidate_path, qtok, ctok, image_size)
                rel = f"{ASSETS}/matches_{i}.png"
                _write_bytes(storage.join(out, rel), png)
                match_html.append(
                    f'<figure class="match"><img src="{rel}" alt="matched tokens"><figcaption>'
                    f'{html.escape(top.query_path.rsplit("/", 1)[-1])} ↔ {html.escape(top.candidate_path.rsplit("/", 1)[-1])}: '
                    f'{matches} mutual nearest-neighbour token pairs, {inliers} homography inliers (green; '
                    f'at most 40 drawn), outliers red'
                    f'</figcaption></figure>')
        except Exception as exc:  # the match drawing is an illustration; never lose the report for it
            log.warning("report: matched-token figure skipped: %s", exc)

    settings = metrics.get("settings", {})
    settings_rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(json.dumps(v))}</td></tr>"
                            for k, v in settings.items())
    seconds = "".join(f"<tr><th>{html.escape(k)}</th><td>{v:.1f}</td></tr>"
                      for k, v in metrics.get("stage_seconds", {}).items())
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 24px; color: #222; background: #fff; }}
table {{ border-collapse: collapse; margin: 8px 0 16px; }}
td, th {{ border: 1px solid #ccc; padding: 3px 10px; text-align: right; }}
.sample {{ display: grid; grid-template-columns: auto 1fr; gap: 4px 14px; margin: 14px 0; align-items: start; }}
.sample > figure {{ grid-row: span 2; }}
.group {{ display: flex; gap: 4px; align-items: flex-start; }}
.glabel {{ writing-mode: vertical-rl; transform: rotate(180deg); font-size: 12px; color: #555; }}
figure {{ margin: 0; border: 4px solid #888; font-size: 10px; max-width: 190px; }}
figure.miss {{ width: 120px; height: {THUMB_HEIGHT}px; }}
figure img {{ display: block; height: {THUMB_HEIGHT}px; }}
figure.match {{ border: none; max-width: none; }}
figure.match img {{ height: auto; }}
figcaption {{ padding: 2px; overflow-wrap: anywhere; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p>{metrics.get('num_queries', 0)} queries, {metrics.get('num_queries_without_positive', 0)} without a database
image within the positive radius ({radius:g}), excluded from the recalls.</p>
<h2>Recall@N</h2>
<img id="recall-plot" src="{ASSETS}/recall.png" alt="recall@N plot">
<table id="recalls"><tr><th>N</th><th>global</th><th>reranked</th></tr>{''.join(rows)}</table>
<h2>Queries: top-5 before and after reranking</h2>
<p>Green frame: within the positive radius; red: not.</p>
{''.join(sample_html) or '<p>(no queries)</p>'}
<h2>Matched local tokens</h2>
{''.join(match_html) or '<p>(not available)</p>'}
<h2>Settings</h2><table>{settings_rows}</table>
<h2>Stage seconds</h2><table>{seconds}</table>
</body></html>
"""
    url = storage.join(out, "report.html")
    _write_bytes(url, page.encode())
    log.info("report written to %s", url)
    return url
