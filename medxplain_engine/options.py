"""Request parameters: parsed once, validated strictly, typed.

Parameters arrive as multipart fields (strings), in a ``params`` JSON field, or in a JSON body;
TorchServe drops URL query strings before the handler, so they are not read. Unknown names are
rejected so a typo ("explian") is an error, not a silently ignored option.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass

from medxplain_contract.errors import InputError

ENCODINGS = ("png", "float16")
OUTPUTS = ("json", "dicom")  # dicom: the derived DICOM objects (SR, Parametric Maps, overlays) instead of JSON


@dataclass(frozen=True)
class RequestOptions:
    top_k: int = 8
    target: int | None = None  # class index; default: the predicted class
    explain: tuple[str, ...] = ()
    unit_maps: bool = False
    encoding: str = "png"  # 2D maps: quantised PNG or raw float16
    occlusion_size: int | None = None
    occlusion_stride: int | None = None
    ig_steps: int = 16
    output: str = "json"
    gradcam_layer: str | None = None  # None: the engine's last conv block


_FIELDS = set(RequestOptions.__dataclass_fields__) | {"k"}
_INT_TEXT = re.compile(r"[+-]?[0-9]{1,9}")
_TRUE, _FALSE = ("1", "true", "yes"), ("0", "false", "no", "")
MAX_METHOD_NAMES = 32


def parse_options(params: dict, class_names: list[str], methods: dict[str, object], default_methods: tuple[str, ...],
                  num_units: int, gradcam_layers: tuple[str, ...] = ()) -> RequestOptions:
    """Any JSON type in any field is checked here; messages name the field and what it takes, never the value."""
    if not isinstance(params, dict):
        raise InputError("bad_params", "parameters must be a JSON object of name: value")
    unknown = [name for name in params if name not in _FIELDS]
    if unknown:
        hint = _close_match(unknown[0])
        raise InputError("unknown_parameter", f"{len(unknown)} unknown parameter name(s){hint}; "
                         f"allowed: {', '.join(sorted(_FIELDS))}")
    top_k = _int(params.get("top_k", params.get("k", 8)), "top_k", 0, num_units)
    options = RequestOptions(
        top_k=top_k,
        target=_target(params.get("target"), class_names),
        explain=_methods(params.get("explain"), methods, default_methods),
        unit_maps=_bool(params.get("unit_maps", False), "unit_maps"),
        encoding=_choice(params.get("encoding", "png"), "encoding", ENCODINGS),
        occlusion_size=_optional_int(params.get("occlusion_size"), "occlusion_size", 1, 256),
        occlusion_stride=_optional_int(params.get("occlusion_stride"), "occlusion_stride", 1, 256),
        ig_steps=_int(params.get("ig_steps", 16), "ig_steps", 2, 128),
        output=_choice(params.get("output", "json"), "output", OUTPUTS),
        gradcam_layer=_optional_choice(params.get("gradcam_layer"), "gradcam_layer", gradcam_layers),
    )
    if options.output == "dicom" and options.unit_maps:
        raise InputError("bad_parameter", "unit_maps are not rendered as DICOM objects: ask for them with output=json")
    return options


def _close_match(name) -> str:
    match = difflib.get_close_matches(name, sorted(_FIELDS), n=1) if isinstance(name, str) and len(name) < 64 else []
    return f" (did you mean {match[0]!r}?)" if match else ""


def _int(value, name: str, lo: int, hi: int) -> int:
    """int, integral finite float, or decimal text; never a bool (JSON true is not 1 here)."""
    number: int | None = None
    if isinstance(value, bool):
        number = None
    elif isinstance(value, int):
        number = value
    elif isinstance(value, float) and math.isfinite(value) and value.is_integer():
        number = int(value)
    elif isinstance(value, str) and _INT_TEXT.fullmatch(value.strip()):
        number = int(value.strip())
    if number is None or not lo <= number <= hi:
        raise InputError("bad_parameter", f"{name} must be an integer from {lo} to {hi}")
    return number


def _optional_int(value, name: str, lo: int, hi: int) -> int | None:
    return None if value is None or value == "" else _int(value, name, lo, hi)


def _bool(value, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise InputError("bad_parameter", f"{name} must be true or false")


def _choice(value, name: str, allowed: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise InputError("bad_parameter", f"{name} must be one of {', '.join(allowed)}")
    return value


def _optional_choice(value, name: str, allowed: tuple[str, ...]) -> str | None:
    return None if value is None or value == "" else _choice(value, name, allowed)


def _target(value, class_names: list[str]) -> int | None:
    if value is None or value == "":
        return None
    if isinstance(value, str) and value in class_names:
        return class_names.index(value)
    if isinstance(value, str) and not _INT_TEXT.fullmatch(value.strip()):
        raise InputError("bad_parameter", f"target must be a class name ({', '.join(class_names)}) or index")
    return _int(value, "target", 0, len(class_names) - 1)


def _methods(value, methods: dict[str, object], default: tuple[str, ...]) -> tuple[str, ...]:
    if value is None or value is False or value == "" or value == []:
        return ()
    if value == "default":
        return default
    if isinstance(value, str):
        names = [v.strip() for v in value.split(",")]
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        names = [v.strip() for v in value]
    else:
        raise InputError("bad_parameter", "explain must be a method name, a comma-separated list or a list of names")
    names = [n for n in names if n]
    if len(names) > MAX_METHOD_NAMES:
        raise InputError("bad_parameter", f"explain names more than {MAX_METHOD_NAMES} methods")
    unknown = [n for n in names if n not in methods]
    if unknown:
        raise InputError("unknown_method", f"{len(unknown)} unknown explanation method(s); "
                         f"available: {', '.join(sorted(methods))}")
    return tuple(dict.fromkeys(names))
