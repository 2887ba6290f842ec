"""`assets.extra/model_card.md` and `model_card.html`: the export's provenance, for people.

Why generated, and from the provenance only: a card written by hand drifts from the model it
describes; one rendered from `provenance.json` (the same facts a review can check against the
files' hashes) says exactly what trained this export and how it scored, and is rewritten when
the pipeline adds the evaluation. Sections follow Mitchell et al., "Model Cards for Model
Reporting" (FAT* 2019): model details, intended use, factors, metrics, training and
evaluation data, quantitative analyses, ethical considerations, caveats and recommendations;
plus what a generative recommender needs said: cold-start behaviour and the policy in force.
(model-card-toolkit itself pins protobuf < 3.20, which TensorFlow 2.21 cannot use.)
"""

from __future__ import annotations

import html
import posixpath
from collections.abc import Mapping, Sequence
from typing import Any

from recsys_cvae import html_page as page
from recsys_cvae import spec as S
from recsys_cvae.export.provenance import read_provenance

CARD_MARKDOWN, CARD_HTML = "model_card.md", "model_card.html"
# A group with fewer evaluated users than this is listed but not used for the largest gaps:
# its NDCG@10 moves by more than the gaps themselves.
MIN_GROUP_USERS = 10
COLD_PROTOCOL = "cold"

Table = tuple[Sequence[str], Sequence[Sequence[str]]]


def _number(value: Any, digits: int = 4) -> str:
    if value is None:
        return "—"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _interval(values: Mapping[str, Any], metric: str) -> str:
    ci = (values.get("ci") or {}).get(metric)
    text = _number(values.get(metric))
    return f"{text} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else text


Gap = tuple[str, str, float, str, float, bool]


def _gaps(segments: Mapping[str, Mapping[str, Any]]) -> list[Gap]:
    """(attribute, worst group, its NDCG@10, best group, its NDCG@10, intervals overlap) per
    attribute with two groups of at least MIN_GROUP_USERS users, largest gap first."""
    gaps = []
    for attribute, groups in segments.items():
        if attribute == "activity":
            continue
        sized = {g: v for g, v in groups.items()
                 if (v.get("users") or 0) >= MIN_GROUP_USERS and v.get("ndcg@10") is not None}
        if len(sized) < 2:
            continue
        worst = min(sized, key=lambda g: sized[g]["ndcg@10"])
        best = max(sized, key=lambda g: sized[g]["ndcg@10"])
        low, high = ((sized[g].get("ci") or {}).get("ndcg@10") for g in (worst, best))
        overlap = bool(low and high and low[1] >= high[0])
        gaps.append((attribute, worst, sized[worst]["ndcg@10"], best, sized[best]["ndcg@10"],
                     overlap))
    return sorted(gaps, key=lambda gap: gap[2] - gap[4])


def card_sections(provenance: Mapping[str, Any]) -> list[tuple[str, list[str], list[Table]]]:
    """(title, paragraphs, tables) of the card, in order; both renderings are made of these."""
    code, data, trained = provenance["code"], provenance["data"], provenance["trained_on"]
    training = provenance.get("training") or {}
    evaluation = provenance.get("evaluation") or {}
    window = data.get("time_window")
    commit = code.get("git_commit")
    details = [
        f"A conditional variational autoencoder (Mult-VAE-style multinomial decoder; encoder, "
        f"prior and decoder conditioned on user attributes), exported for TF Serving by "
        f"{code['package']} {code['version']}"
        + (f" at commit `{commit}`{' with local changes' if code.get('git_dirty') else ''}."
           if commit else " (installed package, no checkout)."),
        f"Created {provenance['created']}. Signatures: `recommend` (history + attributes → "
        "top-K), `generate` (attributes only), `encode` (user embedding), "
        "`recommend_excluding` / `generate_excluding` (with a request's exclusions) and "
        "`sample` (synthetic users' items).",
    ]
    if trained.get("refit_of"):
        details.append(
            f"This is the served refit: trained on every user's full history "
            f"({trained.get('users')} users, splits {', '.join(trained.get('splits', []))}) with "
            f"the settings selected on the `{trained['refit_of']}` protocol "
            f"({trained.get('epochs')} epochs).")
    elif trained.get("history_held_out"):
        details.append(
            f"A protocol model: {trained['history_held_out']:.0%} of each training user's "
            "history was held out of training to choose the EASE and low-pass blend on.")
    intended = [
        "Intended use: ranking catalogue items for known users from their interaction history "
        "and profile (`recommend`), and for users with a profile but no history (`generate`: "
        "cold start, what-if exploration of attribute changes), as candidates for a downstream "
        "ranker or a human-reviewed surface.",
        "Out of scope: decisions with legal or similarly significant effects on a person "
        "(credit, employment, housing, health); inferring protected attributes from behaviour; "
        "users, items or attribute values outside the training vocabularies (unknown items are "
        "ignored, unknown attribute values fall back to an out-of-vocabulary bucket); "
        "catalogues or populations that changed since the time window below.",
    ]
    inputs_table: Table = (
        ("role", "file", "bytes", "SHA-256", "rows read", "valid", "dead-lettered"),
        [(i["role"], i["path"], f"{i['bytes']:,}", f"`{i['sha256'][:16]}…`",
          *((f"{i['rows_read']:,}", f"{i['rows_valid']:,}", f"{i['rows_dead_lettered']:,}")
            if i["role"] != "items" else ("metadata", "—", "—")))
         for i in data.get("inputs", [])])
    training_data = [
        f"{_number(data.get('users'))} users and {_number(data.get('items'))} items after "
        f"filtering; {_number(data.get('rows_valid'))} valid rows of "
        f"{_number(data.get('rows_read'))} read ({_number(data.get('rows_dead_lettered'))} "
        "dead-lettered with a reason in the features folder).",
        (f"Interactions from {window['first']} to {window['last']}." if window
         else "The interactions carry no timestamps."),
        f"Feature spec SHA-256 `{provenance['features'].get('feature_spec_sha256')}`.",
    ]
    factors = [
        "Factors: the user attributes the model conditions on, and history length (activity). "
        "Quality is reported per attribute group below; groups with fewer than "
        f"{MIN_GROUP_USERS} evaluated users are not used for the gaps.",
    ]
    own = (training.get("validation") or {}).get("ndcg@10")
    selected = ((evaluation.get(trained.get("refit_of") or "") or {}).get("validation")
                or {}).get("ndcg@10")
    if own is not None:
        validation = (f"Validation NDCG@10 {own:.4f} at epoch {training.get('best_epoch')} of "
                      "the run that trained this export.")
    elif selected is not None:
        validation = (f"The refit has no validation users; the {trained['refit_of']} "
                      f"protocol's run that chose its settings scored {selected:.4f} "
                      "validation NDCG@10.")
    else:
        validation = "No validation score is recorded for this export."
    metrics_text = [
        "Metrics: NDCG@10 (selection metric), Recall@20 and @50 on held-out interactions, "
        "catalogue coverage@10; intervals are bootstrap 95% intervals over users. "
        + validation,
    ]
    sections = [
        ("Model details", details, []),
        ("Intended use", intended, []),
        ("Factors", factors, []),
        ("Metrics", metrics_text, []),
        ("Training data", training_data, [inputs_table]),
    ]
    if not evaluation:
        sections.append(("Evaluation data and quantitative analyses", [
            "Not evaluated yet: `recsys-cvae pipeline` (or `evaluate`) adds the test metrics "
            "per protocol to this export's provenance and rewrites this card."], []))
    else:
        sections += _evaluation_sections(evaluation, bool(provenance.get("policy")))
    sections.append(_policy_section(provenance.get("policy")))
    sections.append(("Ethical considerations", [
        "Recommendations reflect the training population: groups that are thin in the data get "
        "rankings closer to overall popularity, and conditioning on attributes can reproduce "
        "differences in past exposure between groups. Review the gaps above before serving a "
        "population that differs from the training one, and monitor what is recommended.",
    ], []))
    sections.append(("Caveats and recommendations", [
        "Scores are log-probabilities over the whole catalogue, comparable within one user's "
        "ranking, not across users. Histories longer than the serving input width are cut. "
        "Figures move by about ±0.02 NDCG@10 between random splits of the same data: compare "
        "models on the same split, and re-evaluate after retraining.",
    ], []))
    return sections


def _policy_section(policy: Mapping[str, Any] | None) -> tuple[str, list[str], list[Table]]:
    if not policy:
        return ("Policy in force", [
            "No serving-time policy is baked into this export: every catalogue item may be "
            "recommended to every user (`export --policy` adds one)."], [])
    text = [f"Baked into every ranking signature (not `sample`, which writes synthetic "
            f"interaction logs) from `{policy['source']}`: "
            f"{policy['denied_items']} items are never recommended"
            + (f" ({policy['denied_not_in_catalogue']} more denied ids are not in the "
               "catalogue)" if policy.get("denied_not_in_catalogue") else "")
            + f", and {len(policy['rules'])} rule(s) remove item categories for some users. "
            "Stock TF Serving and the candidates job enforce it; request-level exclusions go "
            "through `recommend_excluding` / `generate_excluding`."]
    rules: Table = (("rule", "users it applies to", "item categories removed", "items"),
                    [(r["name"], r["applies_to"], ", ".join(r["item_categories"]),
                      str(r["items"])) for r in policy["rules"]])
    return ("Policy in force", text, [rules])


def _evaluation_sections(evaluation: Mapping[str, Any], has_policy: bool = False
                         ) -> list[tuple[str, list[str], list[Table]]]:
    rows = []
    for protocol, record in evaluation.items():
        for model, values in sorted(record["test"].items(),
                                    key=lambda item: -(item[1].get("ndcg@10") or 0.0)):
            rows.append((protocol, record["split"], _number(record.get("users")), model,
                         _interval(values, "ndcg@10"), _interval(values, "recall@20"),
                         _number(values.get("coverage@10"), 3)))
    quantitative: Table = (("protocol", "test split", "users", "model", "NDCG@10 [95% CI]",
                            "Recall@20 [95% CI]", "coverage@10"), rows)
    gap_rows, group_rows = [], []
    for protocol, record in evaluation.items():
        segments = record.get("segments") or {}
        for attribute, worst, low, best, high, overlap in _gaps(segments):
            gap_rows.append((protocol, attribute, f"{worst} ({low:.3f})", f"{best} ({high:.3f})",
                             f"{high - low:.3f}", "yes" if overlap else "no"))
        for attribute, groups in segments.items():
            for group, values in sorted(groups.items()):
                group_rows.append((protocol, attribute, group, _number(values.get("users")),
                                   _interval(values, "ndcg@10")))
    gaps: Table = (("protocol", "attribute", "worst group", "best group", "gap",
                    "intervals overlap"), gap_rows)
    groups: Table = (("protocol", "factor", "group", "users", "CVAE NDCG@10 [95% CI]"),
                     group_rows)
    cold = evaluation.get(COLD_PROTOCOL, {}).get("test", {})
    cvae_cold = cold.get("cvae", {}).get("ndcg@10")
    baseline = max(((name, v.get("ndcg@10")) for name, v in cold.items()
                    if name != "cvae" and v.get("ndcg@10") is not None),
                   key=lambda item: item[1], default=None)
    cold_text = [
        "Cold start (`generate`): users with a profile and no history get a ranking decoded "
        "from the attribute-conditioned prior, blended with per-attribute popularity lift."
        + (f" On the held-out cold users: NDCG@10 {cvae_cold:.4f}"
           + (f" against {baseline[0]}'s {baseline[1]:.4f}." if baseline else ".")
           if cvae_cold is not None else " No cold users were evaluated."),
    ]
    largest = (f"Largest gap between attribute groups: {gap_rows[0][1]} on the "
               f"{gap_rows[0][0]} protocol, {gap_rows[0][4]} NDCG@10 between {gap_rows[0][2]} "
               f"and {gap_rows[0][3]}." if gap_rows else
               f"No attribute has two groups of {MIN_GROUP_USERS}+ evaluated users.")
    return [
        ("Evaluation data and quantitative analyses", [
            "Each protocol holds out users or interactions the model did not train on "
            "(strong: unseen users; weak: unseen interactions of known users; temporal: later "
            "interactions; cold: users with no history); baselines ran on the same splits. The "
            "figures are those of each protocol's own model, which this export's settings were "
            "selected with" + ("; they carry no policy, so the figures do not include this "
                               "export's" if has_policy else "") + "."],
         [quantitative]),
        ("Per-group quality", [largest], [gaps, groups]),
        ("Cold-start behaviour", cold_text, []),
    ]


def render_markdown(sections: list[tuple[str, list[str], list[Table]]]) -> str:
    lines = ["# Model card: recsys-cvae export", ""]
    for title, paragraphs, tables in sections:
        lines += [f"## {title}", ""]
        for paragraph in paragraphs:
            lines += [paragraph, ""]
        for header, rows in tables:
            if not rows:
                continue
            lines.append("| " + " | ".join(header) + " |")
            lines.append("|" + "---|" * len(header))
            lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
            lines.append("")
    return "\n".join(lines)


def _inline(text: str) -> str:
    """Escaped text with `code` spans (the only markup the paragraphs use)."""
    parts = html.escape(str(text)).split("`")
    return "".join(f"<code>{part}</code>" if i % 2 else part for i, part in enumerate(parts))


def render_html(sections: list[tuple[str, list[str], list[Table]]]) -> str:
    """One self-contained page: inline style, no script, no external resource."""
    body = ["<h1>Model card: recsys-cvae export</h1>"]
    for title, paragraphs, tables in sections:
        body.append(f"<h2>{html.escape(title)}</h2>")
        body += [f"<p>{_inline(p)}</p>" for p in paragraphs]
        body += [page.table(header, [[_inline(c) for c in row] for row in rows])
                 for header, rows in tables if rows]
    return page.document("Model card", "\n".join(body))


def write_model_card(export_dir: str) -> tuple[str, str]:
    """Renders the export's provenance into `assets.extra/model_card.{md,html}`; returns the
    two paths."""
    provenance = read_provenance(export_dir)
    if provenance is None:
        raise FileNotFoundError(f"{export_dir}: no assets.extra/provenance.json to card")
    sections = card_sections(provenance)
    folder = posixpath.join(export_dir, "assets.extra")
    markdown, page = posixpath.join(folder, CARD_MARKDOWN), posixpath.join(folder, CARD_HTML)
    S.write_text(markdown, render_markdown(sections))
    S.write_text(page, render_html(sections))
    return markdown, page
