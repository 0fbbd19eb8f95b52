"""The BI-RADS concept tree of DeepMiner's annotation form (see the seed notes).

Concept ids are stable strings stored in annotations (``mass.shape.irregular``); the labels are
what people read and what the consensus export writes into ``unit_labels.json``, so served
explanations show e.g. "mass margin: spiculated".
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Group:
    id: str
    title: str
    options: tuple[tuple[str, str], ...]  # (id suffix, label)


@dataclass(frozen=True)
class Section:
    title: str
    groups: tuple[Group, ...]


TREE: tuple[Section, ...] = (
    Section("Masses", (
        Group("mass.shape", "mass shape", (("oval", "oval"), ("round", "round"), ("irregular", "irregular"))),
        Group("mass.margin", "mass margin", (("circumscribed", "circumscribed"), ("obscured", "obscured"),
                                             ("microlobulated", "microlobulated"), ("indistinct", "indistinct"),
                                             ("spiculated", "spiculated"))),
    )),
    Section("Calcifications", (
        Group("calc.benign", "calcification, typically benign", (
            ("skin", "skin"), ("vascular", "vascular"), ("coarse_popcorn", "coarse or popcorn-like"),
            ("large_rod", "large rod-like"), ("round", "round"), ("rim", "rim"), ("dystrophic", "dystrophic"),
            ("milk_of_calcium", "milk of calcium"), ("suture", "suture"))),
        Group("calc.suspicious", "calcification, suspicious", (
            ("amorphous", "amorphous"), ("coarse_heterogeneous", "coarse heterogeneous"),
            ("fine_pleomorphic", "fine pleomorphic"), ("fine_linear", "fine linear or fine-linear branching"))),
    )),
    Section("Other findings", (
        Group("lymph_node", "lymph node", (("intramammary", "intramammary lymph node"),)),
    )),
)

CONCEPTS: dict[str, str] = {f"{g.id}.{opt}": f"{g.title}: {label}" if g.id != "lymph_node" else label
                            for s in TREE for g in s.groups for opt, label in g.options}


def label(concept_id: str) -> str:
    """Readable label of a concept id (unknown ids are shown as they are)."""
    return CONCEPTS.get(concept_id, concept_id)


def validate(concept_ids: list[str]) -> list[str]:
    unknown = [c for c in concept_ids if c not in CONCEPTS]
    if unknown:
        raise ValueError(f"unknown concepts: {', '.join(unknown)}")
    return sorted(set(concept_ids), key=list(CONCEPTS).index)
