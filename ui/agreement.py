"""Inter-annotator agreement (Cohen's and Fleiss' kappa) and the consensus unit-label export.

The export is the ``unit_labels.json`` that ``python -m model_store archive --unit-labels FILE``
puts into the next model version; the engine reads ``units[<unit>]["labels"]`` from it and returns
those labels with every ranked unit, so served explanations carry the experts' words.

Only answers of logged-in (OIDC) annotators count unless demo-mode answers are included
explicitly; the export records which (``answers``), and the archive step refuses a file with demo
answers unless told ``--include-demo-answers``.
"""

from __future__ import annotations

import itertools
from collections import Counter
from datetime import UTC, datetime

import numpy as np

from ui import lexicon
from ui.annotations import Annotation

NOT_RECOGNISABLE = "not recognisable"


def category(ann: Annotation, question: str) -> str:
    """The nominal answer compared across annotators for one question."""
    if question == "recognisable":
        return "yes" if ann.recognisable else "no"
    if question == "concept group":
        if not ann.recognisable:
            return NOT_RECOGNISABLE
        groups = sorted({c.rsplit(".", 1)[0] for c in ann.concepts})
        return " + ".join(groups) or "recognisable, no concept"
    raise ValueError(f"unknown question {question!r}")


QUESTIONS = ("recognisable", "concept group")


def is_authenticated(ann: Annotation) -> bool:
    """Made by a logged-in annotator: the flag and the OIDC-derived id must both say so."""
    return ann.authenticated is True and ann.annotator_id.startswith("oidc-")


def select(latest: dict[int, dict[str, Annotation]], include_demo: bool = False) -> dict[int, dict[str, Annotation]]:
    """The answers that count: authenticated ones, plus demo-mode ones only when asked for."""
    out = {}
    for unit, answers in latest.items():
        kept = {who: a for who, a in answers.items() if include_demo or is_authenticated(a)}
        if kept:
            out[unit] = kept
    return out


def cohen_kappa(a: list[str], b: list[str]) -> float:
    """Cohen's kappa of two raters over the same subjects (nan with fewer than 2 subjects)."""
    if len(a) != len(b):
        raise ValueError("both raters need the same subjects")
    if len(a) < 2:
        return float("nan")
    cats = sorted(set(a) | set(b))
    idx = {c: i for i, c in enumerate(cats)}
    table = np.zeros((len(cats), len(cats)))
    for x, y in zip(a, b):
        table[idx[x], idx[y]] += 1
    n = table.sum()
    observed = np.trace(table) / n
    expected = float((table.sum(0) * table.sum(1)).sum()) / n**2
    return 1.0 if expected == 1 else float((observed - expected) / (1 - expected))


def fleiss_kappa(ratings: list[list[str]]) -> float:
    """Fleiss' kappa; ``ratings[i]`` = the answers for subject i (subjects with < 2 answers are skipped).

    Uses the per-subject agreement with each subject's own number of raters, so units annotated by
    different numbers of experts still count.
    """
    rows = [r for r in ratings if len(r) >= 2]
    if not rows:
        return float("nan")
    cats = sorted({c for r in rows for c in r})
    counts = np.array([[Counter(r)[c] for c in cats] for r in rows], dtype=np.float64)
    n_i = counts.sum(1)
    p_i = ((counts**2).sum(1) - n_i) / (n_i * (n_i - 1))
    p_bar = p_i.mean()
    p_j = counts.sum(0) / n_i.sum()
    p_e = float((p_j**2).sum())
    return 1.0 if p_e == 1 else float((p_bar - p_e) / (1 - p_e))


def agreement_table(latest: dict[int, dict[str, Annotation]], question: str) -> dict:
    """Pairwise Cohen's kappa (with the number of shared units) and Fleiss' kappa over all units."""
    annotators = sorted({a for answers in latest.values() for a in answers})
    pairs = []
    for x, y in itertools.combinations(annotators, 2):
        shared = [u for u, answers in latest.items() if x in answers and y in answers]
        pairs.append({"annotator A": x, "annotator B": y, "shared units": len(shared),
                      "Cohen's kappa": cohen_kappa([category(latest[u][x], question) for u in shared],
                                                   [category(latest[u][y], question) for u in shared])})
    fleiss = fleiss_kappa([[category(a, question) for a in answers.values()] for answers in latest.values()])
    multi = sum(1 for answers in latest.values() if len(answers) >= 2)
    return {"annotators": annotators, "pairs": pairs, "fleiss": fleiss, "units_with_2plus": multi}


def consensus(latest: dict[int, dict[str, Annotation]], model: str, version_key: str,
              min_annotators: int = 1, min_share: float = 0.5, include_demo: bool = False) -> dict:
    """Unit labels agreed by the experts, in the bundle's ``unit_labels.json`` format.

    A unit is labelled when at least ``min_annotators`` answered, more than half said it shows a
    recognisable concept, and a concept was chosen by at least ``min_share`` of those answering.
    Demo-mode (unauthenticated) answers count only with ``include_demo``.
    """
    everything = [a for answers in latest.values() for a in answers.values()]
    latest = select(latest, include_demo)
    used = [a for answers in latest.values() for a in answers.values()]
    units: dict[str, dict] = {}
    for unit in sorted(latest):
        answers = list(latest[unit].values())
        n = len(answers)
        if n < min_annotators:
            continue
        yes = sum(a.recognisable for a in answers)
        if yes * 2 <= n:
            continue
        votes = Counter(c for a in answers if a.recognisable for c in a.concepts)
        concepts = [c for c in lexicon.CONCEPTS if votes[c] >= min_share * n and votes[c] > 0]
        if not concepts:
            continue
        units[str(unit)] = {"labels": [lexicon.label(c) for c in concepts], "concepts": concepts,
                            "annotators": n, "recognisable_share": round(yes / n, 3),
                            "mean_confidence": round(float(np.mean([a.confidence for a in answers])), 2)}
    return {"format": 1, "model": model, "version_key": version_key,
            "created_at": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
            "rule": {"min_annotators": min_annotators, "recognisable": "> 1/2 of answers",
                     "concept_min_share": min_share},
            "answers": {"authenticated_only": not include_demo,
                        "authenticated": sum(map(is_authenticated, used)),
                        "demo": sum(not is_authenticated(a) for a in used),
                        "demo_left_out": sum(not is_authenticated(a) for a in everything) if not include_demo else 0},
            "units": units}
