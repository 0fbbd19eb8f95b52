"""Coded concepts of the DICOM outputs: BI-RADS terms in SNOMED CT / DCM, our own terms in ``99MEDXPLAIN``.

Expert concept labels of DeepMiner units are BI-RADS lexicon terms (``ui/lexicon.py`` ids such as
``mass.margin.spiculated``). The DICOM mammography context groups already code them: CID 6004
(shape), CID 6006 (margin), CID 6010 (calcification type), CID 6014 (single image finding, for the
intramammary lymph node); the codes here are taken from pydicom's code dictionary so they match
those CIDs exactly. Terms without standard codes (unit activation, class probability, relevance, ...)
live in the private scheme ``99MEDXPLAIN`` (the ``99`` prefix is DICOM's reserved private
designator form, PS3.16 8.2), declared in every object that uses it through
:data:`CODING_SCHEME`.

``TABLE_MARKDOWN`` renders which scheme codes which term, for ``docs/api.md``.
"""

from __future__ import annotations

import hashlib

from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr import CodedConcept
from pydicom.sr.codedict import codes

SCHEME = "99MEDXPLAIN"
CODING_SCHEME = CodingSchemeIdentificationItem(
    designator=SCHEME, name="MedXplain explanation terms",
    responsible_organization="MedXplain project (docs/api.md lists the codes)")


def private(value: str, meaning: str) -> CodedConcept:
    """A concept of our own scheme (code values are SH: at most 16 characters)."""
    return CodedConcept(value[:16], SCHEME, meaning[:64])


# --- what the report measures (no standard code exists for these) -------------------------------
UNIT_ACTIVATION = private("unit-activation", "Unit activation")
UNIT_WEIGHT = private("unit-weight", "Unit weight")
UNIT_CONTRIBUTION = private("unit-contrib", "Unit contribution")
UNIT_RANK = private("unit-rank", "Unit rank")
NETWORK_UNIT = private("network-unit", "Network unit (last convolutional layer channel)")
EXPERT_LABEL = private("expert-label", "Expert concept label")
PREDICTED_CLASS = private("predicted-class", "Predicted class")
CALIBRATED_DECISION = private("decision", "Calibrated decision")
LESION_SCORE = private("lesion-score", "Lesion score")
DECISION_THRESHOLD = private("threshold", "Decision threshold")
RELEVANCE = private("relevance", "Relevance")
REGION_RELEVANCE_SUM = private("region-sum", "Region relevance sum")
REGION_RELEVANCE_MEAN = private("region-mean", "Region relevance per voxel")
REGION_RANK = private("region-rank", "Region rank")
REGION_VOXELS = private("region-voxels", "Region voxel count")
MODEL_PREDICTION = private("model-prediction", "Model prediction")

NO_UNITS = codes.UCUM.NoUnits  # UCUM "1": activations, contributions, probabilities are ratios
VOXELS = CodedConcept("{voxels}", "UCUM", "voxels")

# --- BI-RADS concept ids (ui/lexicon.py) -> (label, concept name, value) --------------------------
_SHAPE = CodedConcept.from_code(codes.SCT.Shape)  # 300842002, the name CID 6004 values answer
_MARGIN = CodedConcept.from_code(codes.DCM.Margins)  # 111037
_CALCIFICATION = CodedConcept.from_code(codes.DCM.CalcificationType)  # 111009
_FINDING = CodedConcept.from_code(codes.DCM.SingleImageFinding)  # 111059, the name CID 6014 values answer

_S, _D = codes.SCT, codes.DCM
_LEXICON: dict[str, tuple[str, CodedConcept, object]] = {
    "mass.shape.oval": ("mass shape: oval", _SHAPE, _S.OvoidShapeOval),
    "mass.shape.round": ("mass shape: round", _SHAPE, _S.RoundShape),
    "mass.shape.irregular": ("mass shape: irregular", _SHAPE, _S.Irregular),
    "mass.margin.circumscribed": ("mass margin: circumscribed", _MARGIN, _S.CircumscribedLesion),
    "mass.margin.obscured": ("mass margin: obscured", _MARGIN, _S.ObscuredLesion),
    "mass.margin.microlobulated": ("mass margin: microlobulated", _MARGIN, _S.MicrolobulatedLesion),
    "mass.margin.indistinct": ("mass margin: indistinct", _MARGIN, _S.IndistinctLesion),
    "mass.margin.spiculated": ("mass margin: spiculated", _MARGIN, _S.SpiculatedLesion),
    "calc.benign.skin": ("calcification, typically benign: skin", _CALCIFICATION, _S.CalcifiedSkinOfBreast),
    "calc.benign.vascular": ("calcification, typically benign: vascular", _CALCIFICATION,
                             _S.VascularCalcificationRadiographicFinding),
    "calc.benign.coarse_popcorn": ("calcification, typically benign: coarse or popcorn-like", _CALCIFICATION,
                                   _S.CoarsePopcornLikeCalcification),
    "calc.benign.large_rod": ("calcification, typically benign: large rod-like", _CALCIFICATION,
                              _S.LargeRodLikeCalcification),
    "calc.benign.round": ("calcification, typically benign: round", _CALCIFICATION, _S.RoundShapedCalcification),
    # BI-RADS 5th edition "rim" replaces "eggshell or rim"; CID 6010 keeps the older term's code
    "calc.benign.rim": ("calcification, typically benign: rim", _CALCIFICATION, _S.EggshellCalcification),
    "calc.benign.dystrophic": ("calcification, typically benign: dystrophic", _CALCIFICATION,
                               _S.DystrophicCalcification),
    "calc.benign.milk_of_calcium": ("calcification, typically benign: milk of calcium", _CALCIFICATION,
                                    _S.MilkOfCalciumCalcification),
    "calc.benign.suture": ("calcification, typically benign: suture", _CALCIFICATION, _S.CalcifiedSutureMaterial),
    "calc.suspicious.amorphous": ("calcification, suspicious: amorphous", _CALCIFICATION, _S.AmorphousCalcification),
    "calc.suspicious.coarse_heterogeneous": ("calcification, suspicious: coarse heterogeneous", _CALCIFICATION,
                                             _S.HeterogeneousCalcification),
    "calc.suspicious.fine_pleomorphic": ("calcification, suspicious: fine pleomorphic", _CALCIFICATION,
                                         _D.FinePleomorphicCalcification),
    "calc.suspicious.fine_linear": ("calcification, suspicious: fine linear or fine-linear branching",
                                    _CALCIFICATION, _S.FineLinearBranchingCastingCalcification),
    "lymph_node.intramammary": ("intramammary lymph node", _FINDING, _S.IntramammaryLymphNode),
}

CONCEPT_CODES: dict[str, tuple[CodedConcept, CodedConcept]] = {
    cid: (name, CodedConcept.from_code(value)) for cid, (_, name, value) in _LEXICON.items()}
"""concept id -> (concept name, coded value), e.g. ``mass.margin.spiculated`` -> (Margins, Spiculated lesion)."""
LABELS: dict[str, str] = {cid: label for cid, (label, _, _) in _LEXICON.items()}
"""concept id -> the label the lexicon shows (units' ``labels`` carry these strings)."""
_BY_LABEL = {label: cid for cid, label in LABELS.items()}


def concept(term: str) -> tuple[CodedConcept, CodedConcept]:
    """(name, value) of a unit's concept id or label; a term outside the lexicon gets a private code.

    Private codes of free terms are hashed from the text so the same term always gets the same code.
    """
    cid = term if term in CONCEPT_CODES else _BY_LABEL.get(term)
    if cid is not None:
        return CONCEPT_CODES[cid]
    digest = hashlib.sha256(term.encode("utf-8")).hexdigest()[:12]
    return EXPERT_LABEL, private(f"L{digest}", term)


def class_code(index: int, label: str) -> CodedConcept:
    """A model output class (``normal``, ``malignant``, ``AD``, ...): private, the class name as meaning."""
    return private(f"class-{index}", label)


def probability_code(index: int, label: str) -> CodedConcept:
    """The measurement "probability of class <label>" (one concept per output class)."""
    return private(f"prob-{index}", f"Probability of {label}")


def region_code(index: int, name: str) -> CodedConcept:
    """An atlas region of the MRI model's region table (atlas label index and name)."""
    return private(f"atlas-{index}", name)


def method_code(method: str) -> CodedConcept:
    """An attribution method by its API name (``gradcam``, ``occlusion``, ...)."""
    return private(f"m-{method}", method)


def _row(term: str, concept_: CodedConcept) -> str:
    return f"| {term} | {concept_.scheme_designator} | {concept_.value} | {concept_.meaning} |"


def table_markdown() -> str:
    """Which scheme codes which term: the table ``docs/api.md`` shows."""
    rows = ["| term | scheme | code | meaning |", "| --- | --- | --- | --- |"]
    names = sorted({(n.value, n.scheme_designator): n for n, _ in CONCEPT_CODES.values()}.values(),
                   key=lambda c: c.meaning)
    rows += [_row(f"concept name ({n.meaning})", n) for n in names]
    rows += [_row(f"`{cid}`", value) for cid, (_, value) in CONCEPT_CODES.items()]
    for term, code in (("unit activation", UNIT_ACTIVATION), ("unit weight", UNIT_WEIGHT),
                       ("unit contribution", UNIT_CONTRIBUTION), ("unit rank", UNIT_RANK),
                       ("network unit", NETWORK_UNIT), ("free-text expert label", EXPERT_LABEL),
                       ("predicted class", PREDICTED_CLASS),
                       ("calibrated decision", CALIBRATED_DECISION), ("lesion score", LESION_SCORE),
                       ("decision threshold", DECISION_THRESHOLD), ("relevance (map values)", RELEVANCE),
                       ("region relevance sum", REGION_RELEVANCE_SUM),
                       ("region relevance per voxel", REGION_RELEVANCE_MEAN), ("region rank", REGION_RANK),
                       ("region voxel count", REGION_VOXELS), ("the prediction group's finding", MODEL_PREDICTION)):
        rows.append(_row(term, code))
    rows.append("| output class *i* / its probability / atlas region *i* / method *m* | 99MEDXPLAIN | "
                "`class-i` / `prob-i` / `atlas-i` / `m-<method>` | the class name / Probability of <class> / "
                "the region name / the method name |")
    rows.append("| free-text unit label outside the lexicon | 99MEDXPLAIN | `L<12 hex of its sha256>` | the label |")
    return "\n".join(rows)
