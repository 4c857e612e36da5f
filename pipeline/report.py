"""``report.html`` of a run: what a person looks at after ``r2f run``.

    metrics.json ──> recall@N plot (one curve per method) + table (one column per method;
                     per-tag tables when metrics carry ``by_tag``)
    results ───────> per sampled query: one row per method, its top-5 framed green / red
                     ("No reranking" = global order, then every reranker the run listed)
    tokens (+model) > matched local pairs of a sampled pair: RANSAC's homography inliers beside
                     the learned reranker's most relied-on token pairs (``model.explain``)
    metrics.json ──> recall@1 against mean pairs scored per query, per reranker (one plot): fixed
                     K = 1, 5, 10, 20, 50, 100 and the adaptive rules on the Pareto front
                     (``pairs_study``, fitted on the run's own full top-K scores), or the run's own
                     adaptive point; the paper's Table 2 (R@1/5/10 per K) with an adaptive row

- Every table cell carries ``data-key`` (its path in metrics.json, joined by ".") and
  ``data-value`` (the exact value); method rows, columns and curves carry ``data-method``
  (``none`` for global order, else the reranker's name).
- Methods: results with per-reranker columns (``rank_<name>``, issue 15) give one row each; old
  results give the single reranker their manifest names, read from ``rank``.
- Queries whose results carry a ``query_tag`` (night, season, ...) are grouped by tag, as the
  paper's figures group by challenge.
- Samples: per group, queries whose top-1 the first reranker fixed first, then broke, then the rest.

Every picture is written into ``<out>/report_assets`` and linked relatively, so the folder can be
copied or served as is.
"""
from __future__ import annotations

import html
import io
import json
import math

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
NO_RERANKING = "none"
LEARNED = "r2former"     # the reranker whose reliance ``explain`` shows
METHOD_LABELS = {NO_RERANKING: "No reranking", "ransac": "RANSAC", LEARNED: "R²Former (learned)"}
UNTAGGED = None


def method_label(name: str) -> str:
    return METHOD_LABELS.get(name, name)


def rerankers_in(results: pa.Table, names: list[str] | None, metrics: dict) -> list[str]:
    """The rerankers of a result set, in the run's order, without ``none`` (always shown, as
    global order). ``names``: what the results folder records (``rerank.results.rerankers_of``);
    for a table, its ``rank_<name>`` columns, else the single reranker the settings name."""
    names = list(names or [])
    if not names:
        names = [c[len("rank_"):] for c in results.column_names if c.startswith("rank_")]
    if not names:
        settings = metrics.get("settings", {})
        one = settings.get("reranker_used") or settings.get("reranker")
        names = list(metrics.get("rerankers") or {}) or [one or "reranked"]
    return [n for n in names if n != NO_RERANKING]


def rank_of(name: str, names: list[str], columns: list[str]) -> str:
    """The column ranking ``name``'s candidates (``global_rank`` for no reranking)."""
    from .rerank.results import rank_column
    return "global_rank" if name == NO_RERANKING else rank_column(name, names, columns)


def _write_bytes(url: str, data: bytes) -> None:
    fs, path = storage.filesystem(url)
    storage.makedirs(fs, path.rsplit("/", 1)[0])
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
    """The recall@N keys of a metrics block (a reranker's also holds its pairs scored), by N."""
    return sorted((k for k in d if k.startswith("recall@")), key=lambda k: int(k.split("@")[1]))


def recall_columns(metrics: dict, names: list[str]) -> list[tuple[str, str, dict]]:
    """``(method, metrics.json path, recalls)`` per method: global, then every reranker of
    ``metrics["rerankers"]`` (issue 15), else the single ``reranked`` (old metrics)."""
    cols = [(NO_RERANKING, "global", metrics["global"])]
    if metrics.get("rerankers"):
        cols += [(n, f"rerankers.{n}", d) for n, d in metrics["rerankers"].items() if n != NO_RERANKING]
    elif "reranked" in metrics:
        cols.append((names[0] if names else "reranked", "reranked", metrics["reranked"]))
    return cols


def recall_plot(metrics: dict, names: list[str] | None = None) -> bytes:
    """PNG of recall@N, one curve per method of ``recall_columns``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=100)
    styles = ["o--", "s-", "^-", "d-", "v-", "x-"]
    for i, (method, _, d) in enumerate(recall_columns(metrics, names or [])):
        keys = [k for k in _recall_keys(d) if d[k] is not None]
        ns = [int(k.split("@")[1]) for k in keys]
        ax.plot(ns, [100 * d[k] for k in keys], styles[i % len(styles)], label=method_label(method))
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


def pairs_points(metrics: dict, study: dict | None = None) -> dict[str, dict]:
    """Per reranker: ``fixed`` [(K, block)] and ``rules`` [block] of the pairs study
    (``evaluate.pairs_study``: ``pairs_study.json`` of a run; cells say ``pairs_study.<path>``), and
    ``adaptive``: the block of the adaptive row (the run itself when it ran a rule, else the rule
    the study chose), each block with recall@1/5/10 and pairs_per_query (mean)."""
    study = study or {}
    adaptive_run = bool((metrics.get("settings") or {}).get("adaptive"))
    out: dict[str, dict] = {}
    for name, block in (metrics.get("rerankers") or {}).items():
        if name == NO_RERANKING or "pairs_per_query" not in block:
            continue
        st = study.get(name) or {}
        own = {**{k: block.get(k) for k in ("recall@1", "recall@5", "recall@10")},
               "pairs_per_query": (block["pairs_per_query"] or {}).get("mean"), "path": f"rerankers.{name}"}
        chosen = next((dict(r, path=f"pairs_study.{name}.rules.{i}") for i, r in enumerate(st.get("rules") or [])
                       if r.get("chosen")), None)
        out[name] = {"fixed": [(r["candidates"], dict(r, path=f"pairs_study.{name}.fixed.{i}"))
                               for i, r in enumerate(st.get("fixed") or [])],
                     "rules": list(st.get("rules") or []),
                     "adaptive": own if adaptive_run else chosen,
                     "adaptive_label": "this run's rule" if adaptive_run else "fitted rule (replayed)",
                     "run": None if adaptive_run else own}
    return out


def pairs_plot(metrics: dict, study: dict | None = None) -> bytes | None:
    """PNG: recall@1 against mean pairs scored per query, one colour per reranker: fixed K as a
    line, the Pareto rules as dots, the adaptive row as a star. None without pairs data."""
    points = pairs_points(metrics, study)
    if not any(p["fixed"] or p["adaptive"] for p in points.values()):
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=100)
    for i, (name, p) in enumerate(points.items()):
        colour = f"C{i}"
        if p["fixed"]:
            xs = [b["pairs_per_query"] for _, b in p["fixed"]]
            ys = [100 * (b["recall@1"] or 0) for _, b in p["fixed"]]
            ax.plot(xs, ys, "o-", color=colour, label=f"{method_label(name)}, fixed K")
            for (k, _), x, y in zip(p["fixed"], xs, ys):
                ax.annotate(str(k), (x, y), textcoords="offset points", xytext=(3, -10), fontsize=7)
        if p["rules"]:
            ax.plot([r["pairs_per_query"] for r in p["rules"]], [100 * (r["recall@1"] or 0) for r in p["rules"]],
                    ".", color=colour, alpha=0.6, label=f"{method_label(name)}, adaptive rules (Pareto)")
        a = p["adaptive"]
        if a and a.get("pairs_per_query") is not None:
            ax.plot([a["pairs_per_query"]], [100 * (a["recall@1"] or 0)], "*", color=colour, markersize=12,
                    label=f"{method_label(name)}, {p['adaptive_label']}")
    ax.set_xscale("log")
    ax.set_xlabel("pairs scored per query (mean)")
    ax.set_ylabel("Recall@1 (%)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _table2(metrics: dict, study: dict | None = None) -> str:
    """The paper's Table 2: R@1/5/10 and mean pairs per query for each fixed K, per reranker, and an
    adaptive row; each cell's ``data-pairs-key`` is its path in metrics.json (``rerankers.``) or
    pairs_study.json (``pairs_study.``), apart from the recall tables' ``data-key``."""
    points = pairs_points(metrics, study)
    names = [n for n, p in points.items() if p["fixed"] or p["adaptive"]]
    if not names:
        return ""
    keys = ("recall@1", "recall@5", "recall@10", "pairs_per_query")
    head = "".join(f'<th colspan="4" data-method="{html.escape(n)}">{html.escape(method_label(n))}</th>' for n in names)
    sub = "".join("<th>R@1</th><th>R@5</th><th>R@10</th><th>pairs/query</th>" for _ in names)
    ks = sorted({k for n in names for k, _ in points[n]["fixed"]})

    def cells(block: dict | None) -> str:
        if not block:
            return "<td>–</td>" * 4
        out = []
        for key in keys:
            v = block.get(key)
            text = "–" if v is None else (f"{v:.2f}" if key == "pairs_per_query" else f"{100 * v:.1f}")
            path = block["path"] + (".pairs_per_query.mean" if key == "pairs_per_query" and
                                    block["path"].startswith("rerankers.") else f".{key}")
            out.append(f'<td data-pairs-key="{html.escape(path)}" data-value="{json.dumps(v)}">{text}</td>')
        return "".join(out)
    rows = [f"<tr><th>K = {k}</th>{''.join(cells(dict(points[n]['fixed']).get(k)) for n in names)}</tr>" for k in ks]
    rows.append(f"<tr><th>adaptive</th>{''.join(cells(points[n]['adaptive']) for n in names)}</tr>")
    rules = "; ".join(f"{method_label(n)}: {html.escape(points[n]['adaptive'].get('describe') or 'this run')}"
                      for n in names if points[n]["adaptive"])
    return (f'<table class="table2" id="table2"><tr><th rowspan="2">candidates</th>{head}</tr><tr>{sub}</tr>'
            f'{"".join(rows)}</table><p>Adaptive row: {rules or "none"}.</p>')


def _recall_table(cols: list[tuple[str, str, dict]], prefix: str = "", attrs: str = "") -> str:
    """One row per N, one column per method; cells keyed by their metrics.json path."""
    head = "".join(f'<th data-method="{html.escape(m)}">{html.escape(method_label(m))}</th>' for m, _, _ in cols)
    rows = []
    for n in _recall_keys(cols[0][2]):
        cells = []
        for _, path, d in cols:
            v = d.get(n)
            text = "–" if v is None else f"{100 * v:.2f}"
            cells.append(f'<td data-key="{html.escape(prefix + path)}.{n}" data-value="{json.dumps(v)}">{text}</td>')
        rows.append(f"<tr><th>{html.escape(n.replace('recall', 'R'))}</th>{''.join(cells)}</tr>")
    return f'<table class="recalls"{attrs}><tr><th>N</th>{head}</tr>{"".join(rows)}</table>'


class _PairCanvas:
    """A query and a candidate image side by side, and token (x, y) -> pixel on either side."""

    def __init__(self, query_path: str, cand_path: str, image_size: tuple[int, int], height: int):
        import cv2
        panels = []
        for p in (query_path, cand_path):
            img = np.asarray(_load_rgb(p))
            w = max(1, round(img.shape[1] * height / img.shape[0]))
            panels.append(cv2.resize(img, (w, height), interpolation=cv2.INTER_AREA))
        gap = 8
        self.canvas = np.full((height, panels[0].shape[1] + gap + panels[1].shape[1], 3), 255, np.uint8)
        self.canvas[:, :panels[0].shape[1]] = panels[0]
        self.off = panels[0].shape[1] + gap
        self.canvas[:, self.off:] = panels[1]
        self.panels, self.image_size = panels, image_size

    def px(self, xy, side: int) -> tuple[int, int]:
        # Token x, y are normalised by max(H, W) of the (aspect-squashing) model input.
        H, W = self.image_size
        scale, panel = max(H, W), self.panels[side]
        return (int(side * self.off + xy[0] * scale / W * panel.shape[1]), int(xy[1] * scale / H * panel.shape[0]))

    def line(self, q_xy, c_xy, colour: tuple[int, int, int], thickness: int = 1) -> None:
        import cv2
        a, b = self.px(q_xy, 0), self.px(c_xy, 1)
        cv2.line(self.canvas, a, b, colour, thickness, cv2.LINE_AA)
        cv2.circle(self.canvas, a, 2 + thickness, colour, -1, cv2.LINE_AA)
        cv2.circle(self.canvas, b, 2 + thickness, colour, -1, cv2.LINE_AA)

    def png(self) -> bytes:
        import cv2
        ok, png = cv2.imencode(".png", cv2.cvtColor(self.canvas, cv2.COLOR_RGB2BGR))
        return png.tobytes()


def match_figure(query_path: str, cand_path: str, q_tokens: np.ndarray, c_tokens: np.ndarray,
                 image_size: tuple[int, int], ransac_cfg=None, height: int = 270,
                 max_lines: int = 40) -> tuple[bytes, int, int]:
    """Side-by-side PNG with lines between mutually-nearest token pairs (RANSAC's homography
    inliers green, others red); at most ``max_lines`` inliers are drawn. Returns
    ``(png, matches, inliers)``."""
    from .ransac import RansacConfig, match_tokens
    cfg = ransac_cfg or RansacConfig(image_scale=float(max(image_size)))
    inliers, q_xy, c_xy, mask = match_tokens(q_tokens, c_tokens, cfg)
    pc = _PairCanvas(query_path, cand_path, image_size, height)
    # Hundreds of lines hide each other: draw an even subsample (the caption gives the counts).
    idx_in, idx_out = np.flatnonzero(mask), np.flatnonzero(~mask)
    idx_in = idx_in[np.linspace(0, len(idx_in) - 1, min(len(idx_in), max_lines)).astype(int)] if len(idx_in) else idx_in
    idx_out = idx_out[np.linspace(0, len(idx_out) - 1, min(len(idx_out), max_lines // 3)).astype(int)] \
        if len(idx_out) else idx_out
    for sel, colour in ((idx_out, (215, 25, 28)), (idx_in, (26, 150, 65))):
        for i in sel:
            pc.line(q_xy[i], c_xy[i], colour)
    return pc.png(), len(q_xy), int(inliers)


def reliance_figure(query_path: str, cand_path: str, q_tokens: np.ndarray, c_tokens: np.ndarray,
                    pairs, image_size: tuple[int, int], height: int = 270) -> tuple[bytes, int]:
    """Side-by-side PNG of the learned reranker's most relied-on token pairs (``TokenPairs`` of
    ``explain``): pairs with positive weight only, the strongest thickest and most saturated.
    Returns ``(png, pairs drawn)``."""
    pc = _PairCanvas(query_path, cand_path, image_size, height)
    keep = np.flatnonzero(np.asarray(pairs.weight) > 0)
    wmax = float(np.max(pairs.weight[keep])) if len(keep) else 1.0
    for i in keep[::-1]:  # weakest first, so the strongest lines are drawn on top
        s = float(pairs.weight[i]) / wmax                       # (0, 1]
        colour = (int(253 - 36 * s), int(204 - 132 * s), int(138 - 137 * s))  # pale to deep orange
        pc.line(q_tokens[pairs.query_index[i], :2], c_tokens[pairs.candidate_index[i], :2], colour,
                1 + int(2 * s))
    return pc.png(), len(keep)


def _pick_queries(df, samples: int) -> list[int]:
    """Queries whose top-1 the first reranker fixed first, then broke, then the rest, in query
    order. ``df``: one row per (query, candidate) with ``ok`` (within the positive radius)."""
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


def _tag_groups(df, samples: int) -> list[tuple[str | None, list[int]]]:
    """``[(tag, sampled query ids)]``: one group (tag None) without tags; else one per tag, in
    tag order (untagged last), the samples split evenly over the tags."""
    if "query_tag" not in df or df["query_tag"].isna().all():
        return [(UNTAGGED, _pick_queries(df, samples))]
    tags = sorted(t for t in df["query_tag"].dropna().unique())
    if df["query_tag"].isna().any():
        tags.append(UNTAGGED)
    each = max(1, math.ceil(samples / len(tags)))
    out = []
    for t in tags:
        sub = df[df["query_tag"].isna()] if t is UNTAGGED else df[df["query_tag"] == t]
        out.append((t, _pick_queries(sub, each)))
    return out


def _tag_attr(tag: str | None) -> str:
    return "" if tag is UNTAGGED else f' data-tag="{html.escape(str(tag))}"'


def _unit(metrics: dict) -> str:
    unit = (metrics.get("settings") or {}).get("positive_radius_unit")
    return f" {unit}" if unit else ""


def _sample_sections(groups, df, methods, rank_cols, framed, thumb) -> list[str]:
    """One section per tag group: each picked query beside each method's top 5."""
    sections = []
    for tag, qids in groups:
        block = []
        for qid in qids:
            sub = df[df["query_id"] == qid]
            qpath = sub["query_path"].iloc[0]
            line = [framed(thumb("q", qid, qpath), None, "query " + qpath.rsplit("/", 1)[-1])
                    .replace("<figure", f'<figure style="grid-row: span {len(methods)}"', 1)]
            for m in methods:
                col = rank_cols[m]
                top5 = sub.sort_values(col).head(5)
                figs = [framed(thumb("d", r.image_id, r.candidate_path), bool(r.ok),
                               f"#{int(getattr(r, col))} {r.candidate_path.rsplit('/', 1)[-1]}")
                        for r in top5.itertuples()]
                line.append(f'<div class="group" data-method="{html.escape(m)}"><div class="glabel">'
                            f'{html.escape(method_label(m))}</div>{"".join(figs)}</div>')
            block.append(f'<div class="sample" data-query="{int(qid)}"{_tag_attr(tag)}>{"".join(line)}</div>')
        head = "" if tag is UNTAGGED and len(groups) == 1 else \
            f'<h3>{html.escape("untagged" if tag is UNTAGGED else str(tag))}</h3>'
        sections.append(f'<section class="tag-group"{_tag_attr(tag)}>{head}{"".join(block)}</section>')
    return sections


def _pairs_section(assets: str, metrics: dict, pairs_study: dict | None) -> str:
    """The recall-against-pairs plot and Table 2 (written to ``assets``), or "" when there is none."""
    png = pairs_plot(metrics, pairs_study)
    if png is None:
        return ""
    _write_bytes(storage.join(assets, "pairs.png"), png)
    return (f'<h2>Recall@1 against pairs scored</h2><img id="pairs-plot" src="{ASSETS}/pairs.png" '
            f'alt="recall@1 against pairs scored per query">{_table2(metrics, pairs_study)}')


def write_report(out: str, metrics: dict, results: pa.Table | str, radius: float, image_size: tuple[int, int],
                 query_store: str | None = None, database_store: str | None = None, samples: int = 6,
                 match_pairs: int = 2, title: str = "R²Former run", model=None, explain_top: int = 20,
                 pairs_study: dict | None = None) -> str:
    """Write ``<out>/report.html`` and its assets; returns the HTML's URL. ``results`` is a table,
    or a results folder / legacy file (then only its first parts are read, up to MAX_REPORT_ROWS,
    and the database rows come from the state the run recorded, ``published.from_metadata``).

    ``model``: the model whose learned reranker ran (anything with ``explain`` and
    ``has_trained_reranker``, e.g. ``R2Former``); given, and ``r2former`` among the results'
    rerankers, each matched-pairs panel adds the ``explain_top`` token pairs it relies on most.
    Without it only RANSAC's inliers are drawn.

    ``pairs_study`` (``evaluate.pairs_study`` of the run's full top-K scores): the fixed-K and
    adaptive points of the recall-against-pairs plot and Table 2; without it they show the run's
    own point (an adaptive run), or nothing."""
    state, recorded = None, None
    if isinstance(results, str):
        from .evaluate import results_state
        from .rerank.results import read_results, rerankers_of
        state, _ = results_state(results)
        recorded = rerankers_of(results)
        results = read_results(results, max_rows=MAX_REPORT_ROWS)
    names = rerankers_in(results, recorded, metrics)
    methods = [NO_RERANKING] + names
    assets = storage.join(out, ASSETS)
    fs, apath = storage.filesystem(assets)
    if fs.exists(apath):
        fs.rm(apath, recursive=True)  # a rerun replaces the pictures, never mixes two runs
    _write_bytes(storage.join(assets, "recall.png"), recall_plot(metrics, names))
    pairs_html = _pairs_section(assets, metrics, pairs_study)
    cols = recall_columns(metrics, names)
    curves = ",".join(m for m, _, _ in cols)
    tables = [_recall_table(cols, attrs=' id="recalls"')]
    for tag, t in sorted((metrics.get("by_tag") or {}).items()):
        tcols = [(NO_RERANKING, "global", t["global"])] + [(n, f"rerankers.{n}", d)
                                                          for n, d in (t.get("rerankers") or {}).items()
                                                          if n != NO_RERANKING]
        tables.append(f'<h3>tag {html.escape(str(tag))} ({t.get("num_queries", 0)} queries)</h3>'
                      + _recall_table(tcols, prefix=f"by_tag.{tag}.", attrs=_tag_attr(tag)))

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

    if results.num_rows > MAX_REPORT_ROWS:
        # City-scale runs: pick the samples among the first queries; the recalls cover all of them.
        first = results.column("query_id").unique()[: max(1, MAX_REPORT_ROWS // 100)]
        results = results.filter(pa.compute.is_in(results.column("query_id"), value_set=first))
    df = results.to_pandas()
    df["ok"] = np.nan_to_num(np.hypot(df["candidate_utm_east"] - df["query_utm_east"],
                                      df["candidate_utm_north"].fillna(0) - df["query_utm_north"].fillna(0)),
                             nan=np.inf) <= radius
    groups = _tag_groups(df, samples) if len(df) else []
    rank_cols = {m: rank_of(m, names, list(df.columns)) for m in methods}

    sample_html = _sample_sections(groups, df, methods, rank_cols, framed, thumb)

    learned = (model is not None and LEARNED in names and bool(getattr(model, "has_trained_reranker", False))
               and hasattr(model, "explain"))
    picked = [q for _, qids in groups for q in qids]
    match_html = []
    if query_store and database_store and picked and match_pairs > 0:
        try:
            qt = storage.read_global_table(query_store, ["image_id", "row"]).to_pandas().set_index("image_id")
            if state:
                from .index.published import from_metadata
                dt = from_metadata(state, store=database_store).read_global_table(["image_id", "row"])
            else:
                dt = storage.read_global_table(database_store, ["image_id", "row"])
            dt = dt.to_pandas().set_index("image_id")
            for i, qid in enumerate(picked[:match_pairs]):
                # One pair for both panels: the query and the first reranker's top-1.
                top = df[(df["query_id"] == qid)].sort_values("rank").iloc[0]
                qtok = storage.read_local_tokens(query_store, np.array([qt.loc[qid, "row"]]))[0]
                ctok = storage.read_local_tokens(database_store, np.array([dt.loc[top.image_id, "row"]]))[0]
                names_txt = (f'{html.escape(top.query_path.rsplit("/", 1)[-1])} ↔ '
                             f'{html.escape(top.candidate_path.rsplit("/", 1)[-1])}')
                png, matches, inliers = match_figure(top.query_path, top.candidate_path, qtok, ctok, image_size)
                rel = f"{ASSETS}/matches_{i}.png"
                _write_bytes(storage.join(out, rel), png)
                panels = [f'<figure class="match" data-panel="ransac"><img src="{rel}" alt="RANSAC inliers">'
                          f'<figcaption>RANSAC, {names_txt}: {matches} mutual nearest-neighbour token pairs, '
                          f'{inliers} homography inliers (green; at most 40 drawn), outliers red</figcaption></figure>']
                if learned:
                    try:
                        pairs = model.explain(qtok, ctok, top=explain_top)
                        png, drawn = reliance_figure(top.query_path, top.candidate_path, qtok, ctok, pairs, image_size)
                        rel = f"{ASSETS}/reliance_{i}.png"
                        _write_bytes(storage.join(out, rel), png)
                        panels.append(
                            f'<figure class="match" data-panel="{LEARNED}"><img src="{rel}" alt="learned reranker pairs">'
                            f'<figcaption>{html.escape(method_label(LEARNED))}, same pair: the {drawn} token pairs '
                            f'(of the top {explain_top}) that raise its match logit most (gradient x input of the '
                            f'logit margin {pairs.margin:.2f} per correspondence; thicker and darker = more)'
                            f'</figcaption></figure>')
                    except Exception as exc:  # an illustration; never lose the RANSAC panel for it
                        log.warning("report: learned-reranker pairs skipped: %s", exc)
                match_html.append(f'<div class="matchpair" data-query="{int(qid)}">{"".join(panels)}</div>')
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
.group {{ display: flex; gap: 4px; align-items: flex-start; }}
.glabel {{ writing-mode: vertical-rl; transform: rotate(180deg); font-size: 12px; color: #555; }}
figure {{ margin: 0; border: 4px solid #888; font-size: 10px; max-width: 190px; }}
figure.miss {{ width: 120px; height: {THUMB_HEIGHT}px; }}
figure img {{ display: block; height: {THUMB_HEIGHT}px; }}
.matchpair {{ display: flex; gap: 16px; margin: 10px 0; align-items: flex-start; }}
figure.match {{ border: none; max-width: none; flex: 1 1 0; min-width: 0; }}
figure.match img {{ height: auto; width: 100%; }}
figcaption {{ padding: 2px; overflow-wrap: anywhere; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p>{metrics.get('num_queries', 0)} queries, {metrics.get('num_queries_without_positive', 0)} without a database
image within the positive radius ({radius:g}{html.escape(_unit(metrics))}), excluded from the recalls.</p>
<h2>Recall@N</h2>
<img id="recall-plot" src="{ASSETS}/recall.png" alt="recall@N plot" data-methods="{html.escape(curves)}">
{''.join(tables)}
{pairs_html}
<h2>Queries: top-5 per method</h2>
<p>One row per method: {html.escape(', '.join(method_label(m) for m in methods))}. Green frame: within the
positive radius; red: not.</p>
{''.join(sample_html) or '<p>(no queries)</p>'}
<h2 id="matched">Matched local tokens</h2>
{''.join(match_html) or '<p>(not available)</p>'}
<h2>Settings</h2><table>{settings_rows}</table>
<h2>Stage seconds</h2><table>{seconds}</table>
</body></html>
"""
    url = storage.join(out, "report.html")
    _write_bytes(url, page.encode())
    log.info("report written to %s", url)
    return url
