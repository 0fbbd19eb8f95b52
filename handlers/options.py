"""Request parameters: parsed once, validated strictly, typed.

Parameters arrive as multipart fields (strings), in a ``params`` JSON field, or in a JSON body;
TorchServe drops URL query strings before the handler, so they are not read. Unknown names are
rejected so a typo ("explian") is an error, not a silently ignored option.
"""

from __future__ import annotations

from dataclasses import dataclass

from handlers.errors import InputError

ENCODINGS = ("png", "float16")


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


_FIELDS = set(RequestOptions.__dataclass_fields__) | {"k"}


def parse_options(params: dict, class_names: list[str], methods: dict[str, object], default_methods: tuple[str, ...],
                  num_units: int) -> RequestOptions:
    unknown = set(params) - _FIELDS
    if unknown:
        raise InputError("unknown_parameter", f"unknown parameter(s) {sorted(unknown)}; allowed: {sorted(_FIELDS)}")
    top_k = _int(params.get("top_k", params.get("k", 8)), "top_k", 0, num_units)
    return RequestOptions(
        top_k=top_k,
        target=_target(params.get("target"), class_names),
        explain=_methods(params.get("explain"), methods, default_methods),
        unit_maps=_bool(params.get("unit_maps", False), "unit_maps"),
        encoding=_choice(params.get("encoding", "png"), "encoding", ENCODINGS),
        occlusion_size=_optional_int(params.get("occlusion_size"), "occlusion_size", 1, 256),
        occlusion_stride=_optional_int(params.get("occlusion_stride"), "occlusion_stride", 1, 256),
        ig_steps=_int(params.get("ig_steps", 16), "ig_steps", 2, 128),
    )


def _int(value, name: str, lo: int, hi: int) -> int:
    try:
        number = int(value)
        if isinstance(value, float) and number != value:
            raise ValueError
    except (TypeError, ValueError):
        raise InputError("bad_parameter", f"{name} must be an integer, got {value!r}") from None
    if not lo <= number <= hi:
        raise InputError("bad_parameter", f"{name} must be between {lo} and {hi}, got {number}")
    return number


def _optional_int(value, name: str, lo: int, hi: int) -> int | None:
    return None if value in (None, "") else _int(value, name, lo, hi)


def _bool(value, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("1", "true", "yes"):
        return True
    if str(value).lower() in ("0", "false", "no", ""):
        return False
    raise InputError("bad_parameter", f"{name} must be true or false, got {value!r}")


def _choice(value, name: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise InputError("bad_parameter", f"{name} must be one of {list(allowed)}, got {value!r}")
    return value


def _target(value, class_names: list[str]) -> int | None:
    if value in (None, ""):
        return None
    if isinstance(value, str) and value in class_names:
        return class_names.index(value)
    return _int(value, "target", 0, len(class_names) - 1)


def _methods(value, methods: dict[str, object], default: tuple[str, ...]) -> tuple[str, ...]:
    if value in (None, "", [], False):
        return ()
    if value == "default":
        return default
    names = [v.strip() for v in value.split(",")] if isinstance(value, str) else list(value)
    if not all(isinstance(n, str) for n in names):
        raise InputError("bad_parameter", "explain must be a list of method names")
    unknown = [n for n in names if n not in methods]
    if unknown:
        raise InputError("unknown_method", f"unknown explanation method(s) {unknown}; available: {sorted(methods)}")
    return tuple(dict.fromkeys(names))
