"""What `flickd demo` shows: the ground truth its searches are judged by, and its HTML report.

The synthetic catalog knows every product's category and colour, so each hit can be marked
right or wrong without trusting the models: a text hit is right when its product is the garment
and colour family the query names (the catalog's "teal" and "light blue" are both blue, as a
shopper would say and as flickd names crops), an image hit when it is the product the query
image shows. The report leads with those searches as a gallery, then the fine-tuning's held-out
recall, then the numbers, all rounded.
"""

from __future__ import annotations

import base64
import html
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from models.colour import PLAIN_FAMILIES
from models.labels import LABELS, label_by_name, label_for_feed_category
from models.prompts import noun_phrase
from synthetic.catalog.vocabulary import CATEGORIES

# The demo's fixed text queries, in the form shoppers type and the fine-tuning is measured on
# ("a/an {colour family} {garment}"); the first always runs, the others when the catalog has a
# product they describe (see text_queries).
TEXT_QUERIES = (
    "a red dress",
    "a pair of black shoes",
    "a navy jacket",
    "a white top",
    "a brown bag",
)
N_TEXT_QUERIES = 6
# Held-out text → image recall@5 the fine-tuned tiny CLIP should reach on the demo catalog.
RECALL_TARGET = 0.9

Truth = tuple[str | None, str | None]  # (category, colour family); None: the query does not say
LABEL_NAMES = frozenset(label.name for label in LABELS)


@dataclass
class DemoResult:
    report: Path
    summary: dict[str, Any]
    finalize: dict[str, Any]
    searches: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    products: int = 0
    detector: bool = False
    match_exact: float = 0.9
    match_similar: float = 0.75
    image_states: dict[str, int] = field(default_factory=dict)
    finalize_status: str | None = None
    index: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    explore: list[str] = field(default_factory=list)


# --- ground truth ------------------------------------------------------------------------------
def describe(category: str | None, family: str | None) -> str:
    """A shopper's query for a catalog product, worded as flickd's prompts word it: "a red
    dress", "a pair of grey shoes", "black pants" ("a fashion item" when neither is known)."""
    return noun_phrase(label_for_feed_category(category), family)


@lru_cache(maxsize=1)
def _category_words() -> dict[str, str]:
    """Each word a query may name a catalog category by: the category ("trousers") and the
    noun flickd's prompts use for it ("pants")."""
    words = {category: category for category in CATEGORIES}
    for category in CATEGORIES:
        label = label_for_feed_category(category)
        if label is not None:
            words.setdefault(label.noun, category)
    return words


def query_truth(text: str) -> Truth:
    """The garment and colour family a text query names."""
    lowered = text.lower()
    family = next((f for f in PLAIN_FAMILIES if re.search(rf"\b{re.escape(f)}\b", lowered)), None)
    category = next(
        (
            category
            for word, category in _category_words().items()
            if re.search(rf"\b{re.escape(word)}(s|es)?\b", lowered)
        ),
        None,
    )
    return category, family


def text_queries(truths: Iterable[Truth]) -> list[str]:
    """The first fixed query, the other fixed ones the catalog can answer, then queries for
    the catalog's most common (garment, colour family) products, six in all."""
    pairs = Counter(truths)
    queries = [TEXT_QUERIES[0]] + [q for q in TEXT_QUERIES[1:] if pairs[query_truth(q)]]
    for (category, family), _ in pairs.most_common():
        if len(queries) >= N_TEXT_QUERIES:
            break
        if category and family and (category, family) not in map(query_truth, queries):
            queries.append(describe(category, family))
    return queries[:N_TEXT_QUERIES]


def wanted(truth: Truth, actual: Truth) -> bool:
    """Whether a product of ``actual`` (category, colour) is what ``truth`` asks for."""
    return all(want is None or want == got for want, got in zip(truth, actual, strict=True))


def judge(search: dict[str, Any], catalog: dict[str, Truth]) -> None:
    """Mark each hit of ``search`` right or wrong against the catalog's records, in place."""
    if search["kind"] == "text":
        truth = query_truth(search["query"])
        search["matching_products"] = sum(wanted(truth, t) for t in catalog.values())
        search["wants"] = _truth_words(truth)
    for hit in search["hits"]:
        actual = catalog.get(hit["product_id"], (None, None))
        hit["truth"] = _truth_words(actual)
        if search["kind"] == "image":
            hit["right"] = hit["product_id"] == search["expected"]
        else:
            hit["right"] = actual != (None, None) and wanted(truth, actual)


def _truth_words(truth: Truth) -> str:
    category, family = truth
    return " ".join(part for part in (family, category) if part) or "anything"


# --- numbers -----------------------------------------------------------------------------------
def fmt(value: Any, digits: int = 3) -> str:
    """A value as a person reads it: floats rounded, no JSON."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {fmt(v, digits)}" for k, v in value.items()) or "none"
    if isinstance(value, list | tuple):
        return ", ".join(fmt(v, digits) for v in value) or "none"
    return str(value)


def recall(metrics: dict[str, Any], stage: str, direction: str, k: int) -> float | None:
    value = metrics.get(stage, {}).get(direction, {}).get(f"recall@{k}")
    return float(value) if isinstance(value, int | float) else None


# --- the HTML report ---------------------------------------------------------------------------
def render(result: DemoResult) -> str:
    searches = "".join(_search_html(s) for s in result.searches)
    return f"""<!doctype html><meta charset=utf-8><title>flickd demo</title>
<style>{_CSS}</style>
<h1>flickd demo</h1>
<p class=lead>{_lead(result)}</p>
{_disclaimer(result)}
<h2>Searches</h2>
<p class=tally>{_tally(result.searches)}</p>
<div class=gallery>{searches}</div>
{_recall_html(result)}
{_numbers_html(result)}
"""


_CSS = """body{font:14px/1.35 system-ui,sans-serif;margin:16px 24px;color:#222;max-width:1180px}
h1{margin:0 0 4px;font-size:22px}h2{margin:22px 0 6px;font-size:18px}
.lead{margin:0 0 8px;color:#444}
.note{background:#fff8e1;border:1px solid #e8d48a;padding:6px 10px;margin:0 0 6px;font-size:13px}
.tally{margin:0 0 8px;color:#444}
.search{display:flex;gap:10px;align-items:flex-start;margin:0 0 12px;padding:0 0 10px;
border-bottom:1px solid #eee}
.query{width:150px;flex:none;font-size:13px}
.query .text{background:#eef3fb;border:1px solid #c8d6ee;padding:8px;min-height:60px;
font-weight:600;font-size:15px}
.query img{width:150px;height:150px;object-fit:contain;background:#f4f4f4;display:block}
.query small,.hits small{color:#666}
.hits{display:flex;gap:8px;flex-wrap:wrap}
.hits figure{margin:0;width:150px;font-size:12px;border:3px solid #ccc;border-radius:4px}
.hits figure img{width:144px;height:144px;object-fit:contain;background:#f4f4f4;display:block}
.hits figcaption{padding:3px 4px}
.hits figure:has(.mark.right){border-color:#2e9d3a}.hits figure:has(.mark.wrong){border-color:#d33}
.mark{font-weight:700;float:right}.mark.right{color:#1d7a28}.mark.wrong{color:#c22}
.badge{padding:0 4px;border-radius:3px;color:#fff;font-size:11px}
.badge.exact{background:#2b6cb0}.badge.similar{background:#b7791f}.badge.weak{background:#888}
table{border-collapse:collapse;margin:4px 0 10px;font-size:13px}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
td.n{text-align:right;font-variant-numeric:tabular-nums}th{background:#f6f6f6}
.tables{display:flex;gap:24px;flex-wrap:wrap;align-items:flex-start}
.tables h3{margin:6px 0 2px;font-size:15px}
img.chart{max-width:100%;width:900px;display:block;margin:4px 0}"""


def _lead(result: DemoResult) -> str:
    states = result.image_states
    analysed = states.get("analyzed", sum(states.values()))
    index = result.index.get("vectors")
    finalize = result.finalize
    tuned = (
        f"CLIP fine-tuned, {'promoted' if finalize.get('promoted') else 'not promoted'}"
        if finalize
        else f"final task: {result.finalize_status or 'none'}"
    )
    parts = [
        f"{result.products} products",
        f"{result.summary.get('accepted', 0)} images ingested ({analysed} analysed)",
        f"{index} crops indexed" if index is not None else "no index",
        tuned,
        f"{result.seconds:.0f} s on this machine",
    ]
    return " · ".join(html.escape(p) for p in parts)


def _disclaimer(result: DemoResult) -> str:
    exact, similar = fmt(result.match_exact), fmt(result.match_similar)
    detection = (
        "The offline detector's boxes carry no meaning either."
        if result.detector
        else "Detection is off: each image is one whole-image crop, labelled from its feed "
        "category."
    )
    tuned = " (the CLIP one briefly fine-tuned on this catalog)" if result.finalize else ""
    return f"""<div class=note><b>These are offline models with random weights</b>{tuned},
not the real detector and CLIP: the scores show the
machinery working, not the quality of the real models. {detection}</div>
<div class=note>The badge comes from the score alone (<span class="badge exact">exact</span>
&ge; {exact}, <span class="badge similar">similar</span> &ge; {similar}, else
<span class="badge weak">weak</span>); <b>RIGHT</b> / <b>WRONG</b> comes from the synthetic
catalog's own records (category and colour for a text query, the same product for an image
query). A hit on a different product is WRONG whatever its badge: an image encoder with random
weights maps nearly every picture to the same direction, so two different products can score
1.000.</div>"""


def _tally(searches: Sequence[dict[str, Any]]) -> str:
    parts = []
    for kind in ("text", "image"):
        group = [s for s in searches if s["kind"] == kind]
        if not group:
            continue
        top = sum(bool(s["hits"]) and s["hits"][0]["right"] for s in group)
        hits = [h for s in group for h in s["hits"]]
        right = sum(h["right"] for h in hits)
        parts.append(
            f"{kind} searches: top hit right in {top} of {len(group)}, "
            f"{right} of {len(hits)} hits right"
        )
    return html.escape(" · ".join(parts))


def _search_html(search: dict[str, Any]) -> str:
    esc = html.escape
    if search["kind"] == "image":
        expected = esc(search["expected"])
        query = (
            f'<img src="{search["image"]}" alt="query image">'
            f"<div>image of <b>{expected}</b> <small>({esc(search.get('shows', ''))})</small>"
            f"<br><small>RIGHT = product {expected}</small></div>"
        )
        attrs = f'data-kind="image" data-expected="{expected}"'
    else:
        count, size = search.get("matching_products", 0), search.get("catalog_size", "?")
        have = (
            f"the catalog has {count} of {size} products"
            if count
            else f"none of the catalog's {size} products is: no hit can be right"
        )
        query = (
            f"<div class=text>&ldquo;{esc(search['query'])}&rdquo;</div>"
            f"<small>RIGHT = any {esc(search.get('wants', ''))} ({esc(have)})</small>"
        )
        attrs = 'data-kind="text"'
    hits = "".join(_hit_html(hit) for hit in search["hits"]) or "<p>no hits</p>"
    return (
        f"<section class=search {attrs}><div class=query>{query}</div>"
        f"<div class=hits>{hits}</div></section>"
    )


def hit_words(hit: dict[str, Any]) -> str:
    """What a hit is, as flickd analysed it: its colour family and garment ("navy jacket")."""
    label = hit.get("label")
    noun = label_by_name(label).noun if label in LABEL_NAMES else label
    return " ".join(str(part) for part in (hit.get("colour_family"), noun) if part) or "?"


def _hit_html(hit: dict[str, Any]) -> str:
    esc = html.escape
    right = "right" if hit["right"] else "wrong"
    mark = "&check; RIGHT" if hit["right"] else "&cross; WRONG"
    score, match = fmt(float(hit["score"])), esc(str(hit["match"]))
    fine = f" <small>({esc(str(hit['colour']))})</small>" if hit.get("colour") else ""
    return (
        f'<figure><img src="{hit["thumb"]}" alt="{esc(hit["product_id"])}">'
        f'<figcaption data-product="{esc(hit["product_id"])}" data-score="{score}" '
        f'data-match="{match}" data-mark="{right}">'
        f'<span class="mark {right}">{mark}</span><b>{esc(hit["product_id"])}</b>'
        f"<br><b>{esc(hit_words(hit))}</b>{fine}"
        f'<br>{score} <span class="badge {match}">{match}</span>'
        f"<br><small>catalog: {esc(hit['truth'])}</small></figcaption></figure>"
    )


def _recall_html(result: DemoResult) -> str:
    finalize = result.finalize
    head = "<h2>Fine-tuning: held-out recall before / after</h2>"
    if not finalize:
        status = html.escape(str(result.finalize_status))
        return head + f"<p>No fine-tuned model (final task: {status}).</p>"
    plot = Path(str(finalize.get("model_dir", ""))) / "training-report" / "report.png"
    chart = (
        f'<img class=chart alt="training loss and held-out recall" src="data:image/png;base64,'
        f'{base64.b64encode(plot.read_bytes()).decode()}">'
        if plot.is_file()
        else "<p>(no chart: the training report's PNG is missing)</p>"
    )
    rows = []
    for direction, name in (("text_to_image", "text → image"), ("image_to_image", "image → image")):
        info = finalize.get("before", {}).get(direction, {})
        size = f"{info.get('queries', '?')} queries, gallery of {info.get('gallery', '?')}"
        for stage in ("before", "after"):
            cells = "".join(
                f"<td class=n>{fmt(recall(finalize, stage, direction, k))}</td>" for k in (1, 5, 10)
            )
            rows.append(
                f"<tr><td>{name}</td><td>{stage}</td>{cells}<td>{html.escape(size)}</td></tr>"
            )
    table = (
        "<table><tr><th>direction</th><th></th><th>recall@1</th><th>recall@5</th>"
        f"<th>recall@10</th><th>held-out set</th></tr>{''.join(rows)}</table>"
    )
    queries = finalize.get("text_queries") or {}
    shown = queries.get("examples", [])
    examples = ", ".join(f"&ldquo;{html.escape(q)}&rdquo;" for q in shown)
    if examples and len(shown) < (queries.get("count") or 0):
        examples += ", …"
    note = (
        f"<p>Fine-tuned on {fmt(finalize.get('train_pairs'))} image–text pairs of the products "
        f"it trains on, measured on {fmt(finalize.get('eval_pairs'))} crops of products it never "
        "saw (a small set: recall moves in large steps). Text → image asks what shoppers type, "
        f"{html.escape(str(queries.get('form', 'a/an {colour family} {garment}')))} "
        f"({fmt(queries.get('count'))} queries: {examples or 'none'}), and a hit is right when "
        "its colour family and garment are the query's; the target for recall@5 is "
        f"{fmt(RECALL_TARGET, 1)}.</p>"
    )
    return head + note + chart + table


def _numbers_html(result: DemoResult) -> str:
    summary, finalize = result.summary, result.finalize
    ingest = [
        ("status", summary.get("status")),
        ("feed rows", summary.get("rows")),
        ("accepted", summary.get("accepted")),
        ("invalid", summary.get("invalid")),
        ("invalid by reason", summary.get("invalid_by_reason")),
        ("duplicates", summary.get("duplicates")),
        ("enqueued", summary.get("enqueued")),
        ("messages", summary.get("messages")),
        ("not sent", summary.get("not_sent")),
        ("images by state", result.image_states),
        ("error", summary.get("error") or summary.get("broker_error")),
    ]
    rule = finalize.get("rule") or {}
    final = [
        ("final task", result.finalize_status),
        ("model", Path(str(finalize["model"])).name if finalize.get("model") else None),
        ("base model", finalize.get("base_model")),
        ("training pairs", finalize.get("train_pairs")),
        ("held-out pairs", finalize.get("eval_pairs")),
        ("catalog crops", finalize.get("catalog_crops")),
        ("promotion score before", finalize.get("score_before")),
        ("promotion score after", finalize.get("score_after")),
        ("promotion score is the mean of", _rule_metrics(rule.get("metrics"))),
        ("improvement needed", rule.get("min_improvement")),
        ("promoted", finalize.get("promoted")),
        ("active", finalize.get("active")),
        ("index vectors", result.index.get("vectors")),
        ("index model", result.index.get("model_version")),
    ]
    timings: list[tuple[str, Any]] = [
        (name, _Measure(f"{seconds:.1f} s")) for name, seconds in result.timings.items()
    ]
    timings.append(("total", _Measure(f"{result.seconds:.1f} s")))
    timings += [
        (f"search “{s['query']}”", _Measure(f"{s['took_ms']:.0f} ms"))
        for s in result.searches
        if "took_ms" in s
    ]
    return (
        "<h2>Numbers</h2><div class=tables>"
        + _table("Ingest", ingest)
        + _table("Final task and index", [row for row in final if row[1] is not None])
        + _table("Timings", timings)
        + "</div>"
    )


def _table(title: str, rows: Sequence[tuple[str, Any]]) -> str:
    body = "".join(
        f"<tr><th>{html.escape(name)}</th><td{' class=n' if _numeric(v) else ''}>"
        f"{html.escape(fmt(v))}</td></tr>"
        for name, v in rows
    )
    return f"<div><h3>{html.escape(title)}</h3><table>{body}</table></div>"


class _Measure(str):
    """A number already written with its unit ("1.9 s"): right-aligned like the others."""


def _numeric(value: Any) -> bool:
    return isinstance(value, int | float | _Measure) and not isinstance(value, bool)


def _rule_metrics(metrics: Any) -> str | None:
    if not isinstance(metrics, list):
        return None
    names = {"text_to_image": "text → image", "image_to_image": "image → image"}
    return ", ".join(
        f"{names.get(str(m[0]), str(m[0]))} {m[1]}"
        for m in metrics
        if isinstance(m, list | tuple) and len(m) == 2
    )
