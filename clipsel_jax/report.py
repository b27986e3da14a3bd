"""What a run leaves for people and for other programs (README.md, "Outputs of a run"):

- ``selection.npz``: indices (kept, sorted), mask, ids, labels, kept_ids, preferred_class, preferred_confidence
  and the scores;
- ``scores.csv``: one row per sample: id, path, label, class, preferred class and its confidence, SAS, SDS,
  combined, kept, rank;
- ``meta.json``: settings, per-class kept fractions, timings, versions, unreadable images;
- ``report.html``: one self-contained page (plots and thumbnails inline as data: URIs): score histograms kept vs
  dropped, per-class kept fractions, and galleries of the lowest-alignment samples (likely mislabeled: shown with
  their given label and the class the adapted encoder prefers) and of the most redundant ones.

Directions: higher SAS = image agrees better with its label's prompt; higher SDS = farther from its class
neighbours (less redundant); higher combined = kept first. Rank 1 is the sample the method wants most.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
from pathlib import Path

import numpy as np

from clipsel_jax.workdir import RunDir

GALLERY = 24  # thumbnails per gallery


def write_outputs(workdir, sel, ids, labels, class_names, source=None, extra_meta: dict | None = None) -> dict:
    """selection.npz, scores.csv and meta.json under workdir; returns their paths by name."""
    out = RunDir(workdir).outputs
    Path(workdir).mkdir(parents=True, exist_ok=True)
    ids, labels = np.asarray(ids, np.int64), np.asarray(labels, np.int64)
    preferred = _preferred(sel, labels)
    confidence = getattr(sel, "preferred_confidence", None)
    confidence = np.full(len(ids), np.nan, np.float32) if confidence is None else np.asarray(confidence, np.float32)
    np.savez(out["selection"], indices=sel.indices, mask=sel.mask, ids=ids, labels=labels,
             kept_ids=ids[sel.indices], preferred_class=preferred, preferred_confidence=confidence, **sel.scores)
    rank = np.empty(len(ids), np.int64)  # 1 = first kept: kept samples by combined score, then the dropped ones
    order = np.lexsort((-sel.scores["combined"], ~sel.mask))
    rank[order] = np.arange(1, len(ids) + 1)
    paths = _paths(source, ids)
    with open(out["scores"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "path", "label", "class_name", "preferred_class", "preferred_confidence", "sas", "sds",
                    "combined", "kept", "rank"])
        for i in range(len(ids)):
            w.writerow([int(ids[i]), paths[i], int(labels[i]), class_names[labels[i]], class_names[preferred[i]],
                        f"{confidence[i]:.6f}", f"{sel.scores['sas'][i]:.6f}", f"{sel.scores['sds'][i]:.6f}",
                        f"{sel.scores['combined'][i]:.6f}", int(sel.mask[i]), int(rank[i])])
    meta = dict(sel.meta)
    meta.update(extra_meta or {})
    out["meta"].write_text(json.dumps(meta, indent=1, default=_json_default) + "\n")
    return {name: out[name] for name in ("selection", "scores", "meta")}


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def _preferred(sel, labels) -> np.ndarray:
    p = getattr(sel, "preferred_class", None)
    return labels if p is None else np.asarray(p, np.int64)


def _paths(source, ids) -> list[str]:
    if source is None:
        return [""] * len(ids)
    pos = _positions(source, ids)
    return [source.describe(int(p)) for p in pos]


def _positions(source, ids) -> np.ndarray:
    """Positions in the source of the given sample ids (ids are stable, positions are what read() takes)."""
    from clipsel_jax.data.sources import positions_of

    return positions_of(source, ids)


# -------------------------------------------------------------------------------------------------------------
# report.html


def load_outputs(workdir) -> tuple[dict, dict]:
    """The arrays of selection.npz and the dict of meta.json written by write_outputs."""
    out = RunDir(workdir).outputs
    missing = [out[n].name for n in ("selection", "meta") if not out[n].is_file()]
    if missing:
        raise FileNotFoundError(f"{workdir} has no {' or '.join(missing)}: run `clipsel select` with this --workdir "
                                "first")
    with np.load(out["selection"], allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    return arrays, json.loads(out["meta"].read_text())


def write_report(workdir, source=None, title: str = "clipsel_jax selection report") -> Path:
    """Build workdir/report.html from selection.npz and meta.json. With the source, galleries show the images."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a TPU VM or in CI
    # Class names are data: a "$" in one must be drawn as a "$", never parsed as mathtext (which fails or garbles).
    with matplotlib.rc_context({"text.parse_math": False}):
        return _write_report(Path(workdir), source, title)


def _write_report(workdir: Path, source, title: str) -> Path:
    a, meta = load_outputs(workdir)
    names = meta.get("class_names") or [str(i) for i in range(meta["num_classes"])]
    kept, labels, ids = a["mask"].astype(bool), a["labels"], a["ids"]
    pref = a.get("preferred_class", labels)
    pos = _positions(source, ids) if source is not None else None

    parts = [f"<h1>{html.escape(title)}</h1>", _summary(meta, kept, labels, pref, names)]
    parts.append("<h2>Scores, kept vs dropped</h2><p>SAS: cosine between an image and its label's prompt after "
                 "adaptation (higher = better aligned). SDS: mean distance to its K nearest same-class neighbours "
                 "(higher = less redundant). The combined score ranks the samples (higher = kept first).</p>")
    parts.append(_img_tag(_histograms(a, kept), "score histograms"))
    parts.append("<h2>Kept fraction per class</h2>")
    parts.append(_img_tag(_class_bars(meta, names), "kept fraction per class"))

    low = np.argsort(a["sas"], kind="stable")[:GALLERY]
    parts.append("<h2>Lowest alignment: likely mislabeled</h2><p>The samples whose image agrees least with their "
                 "label's prompt. <b>given</b> is the label in the data; <b>prefers</b> is the class whose prompt the "
                 "adapted image embedding is closest to.</p>")
    parts.append(_gallery(source, pos, low, lambda i: [f"given: {names[labels[i]]}",
                                                       f"prefers: {names[pref[i]]}",
                                                       f"SAS {a['sas'][i]:.3f}",
                                                       "kept" if kept[i] else "dropped"],
                          lambda i: pref[i] != labels[i]))
    red = np.argsort(a["sds"], kind="stable")[:GALLERY]
    parts.append("<h2>Most redundant</h2><p>The samples closest to their own class neighbours (lowest SDS).</p>")
    parts.append(_gallery(source, pos, red, lambda i: [names[labels[i]], f"SDS {a['sds'][i]:.3f}",
                                                       "kept" if kept[i] else "dropped"], lambda i: False))
    unreadable = meta.get("unreadable") or []
    if unreadable:
        rows = "".join(f"<tr><td>{u['id']}</td><td>{html.escape(str(u['path']))}</td>"
                       f"<td>{html.escape(str(u['reason']))}</td></tr>" for u in unreadable[:200])
        parts.append(f"<h2>Unreadable images ({len(unreadable)}), excluded</h2><table><tr><th>id</th><th>path</th>"
                     f"<th>reason</th></tr>{rows}</table>")
    parts.append("<p class=foot>Files beside this report: selection.npz (indices of the kept samples, mask, scores), "
                 "scores.csv (one row per sample), meta.json (settings, per-class fractions, timings).</p>")
    page = (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body>{''.join(parts)}</body></html>")
    out = RunDir(workdir).outputs["report"]
    out.write_text(page, encoding="utf-8")
    return out


_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}
.gallery{display:flex;flex-wrap:wrap;gap:10px}.card{width:128px;font-size:12px;border:1px solid #ddd;padding:4px}
.card img{width:128px;height:128px;image-rendering:pixelated;object-fit:contain;background:#eee}
.card.flag{border:2px solid #c0392b}.foot{color:#666;font-size:13px;margin-top:2em}"""


def _summary(meta, kept, labels, pref, names) -> str:
    t = meta.get("timings", {})
    rows = [("samples", meta.get("n")), ("kept", f"{int(kept.sum())} ({meta.get('ratio', 0):.0%} requested)"),
            ("classes", len(names)), ("balance", meta.get("balance")),
            ("data", meta.get("source") or meta.get("embeddings") or "-"),
            ("encoder", _encoder_name(meta.get("encoder"))),
            ("seed", meta.get("seed")),
            ("label disagrees with preferred class", f"{int((pref != labels).sum())} samples, "
                                                     f"{int((kept & (pref != labels)).sum())} of them kept"),
            ("unreadable images", len(meta.get("unreadable") or [])),
            ("time (adapt / score / select)", " / ".join(f"{t.get(k, 0):.1f} s"
                                                         for k in ("adapt_s", "score_s", "select_s")))]
    for k, v in (meta.get("report_extra") or {}).items():
        rows.append((k, v))
    body = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def _encoder_name(identity) -> str:
    if not isinstance(identity, dict):
        return str(identity or "-")
    keys = ("kind", "name", "spec", "source", "image_model", "text_model", "dtype")
    return ", ".join(f"{k}: {identity[k]}" for k in keys if k in identity) or json.dumps(identity)[:200]


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _img_tag(b64: str, alt: str) -> str:
    return f'<p><img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}"></p>'


def _histograms(a, kept) -> str:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.2))
    for ax, (key, label) in zip(axes, [("sas", "SAS (alignment)"), ("sds", "SDS (diversity)"),
                                        ("combined", "combined score")]):
        v = a[key]
        bins = np.linspace(float(v.min()), float(v.max()) + 1e-9, 41)
        ax.hist(v[kept], bins, alpha=0.7, label=f"kept ({int(kept.sum())})", color="#2e86de")
        ax.hist(v[~kept], bins, alpha=0.7, label=f"dropped ({int((~kept).sum())})", color="#e67e22")
        ax.set_xlabel(label)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def _class_bars(meta, names) -> str:
    import matplotlib.pyplot as plt

    frac = np.asarray(meta["kept_fraction_per_class"])
    shown = np.arange(len(frac)) if len(frac) <= 60 else np.argsort(frac)[np.linspace(0, len(frac) - 1, 60).astype(int)]
    fig, ax = plt.subplots(figsize=(min(13, 2 + 0.3 * len(shown)), 3.2))
    ax.bar(range(len(shown)), frac[shown], color="#2e86de")
    ax.axhline(meta.get("ratio", 0), color="k", ls="--", lw=1, label="requested ratio")
    ax.set_xticks(range(len(shown)))
    ax.set_xticklabels([names[i] for i in shown], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("kept fraction")
    ax.legend(fontsize=8)
    if len(shown) < len(frac):
        ax.set_title(f"60 of {len(frac)} classes, spread from lowest to highest kept fraction", fontsize=9)
    fig.tight_layout()
    return _png(fig)


def _thumbnail(source, p) -> str:
    from PIL import Image

    try:
        img = Image.fromarray(np.asarray(source.read(int(p))))
    except Exception as e:  # an image that cannot be shown must not stop the report
        return f"<div>(cannot read: {html.escape(type(e).__name__)})</div>"
    img.thumbnail((128, 128))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return f'<img alt="sample" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _gallery(source, pos, rows, caption, flag) -> str:
    if source is None:
        return "<p><i>Images not shown: the report was built without the data source (pass --data).</i></p>"
    cards = []
    for i in rows:
        text = "<br>".join(html.escape(s) for s in caption(i))
        where = html.escape(source.describe(int(pos[i])))
        cards.append(f'<div class="card{" flag" if flag(i) else ""}" title="{where}">{_thumbnail(source, pos[i])}'
                     f"<br>{text}</div>")
    return f'<div class="gallery">{"".join(cards)}</div>'
