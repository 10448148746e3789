"""Policies by name, built from `k=v` settings: what `--policy NAME --set k=v`, a sweep spec and a
trace's header all go through, so one name means one class with one set of typed fields.

Values are converted by the field's declared type (float, int, bool, an enum, or another policy
for a wrapper's `inner`, set as `inner=NAME` and `inner.k=v`); a bad key or value is a
`PolicyError` that names it and says what would be accepted.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import typing
from collections.abc import Iterable, Mapping
from typing import Any

from orchestrator.migration.engine.errors import PolicyError
from orchestrator.migration.engine.policies import DowntimeRamp, ProgressTimeouts, StallDetection
from orchestrator.migration.engine.policy import DowntimePolicy, Policy
from orchestrator.migration.engine.throttling import ThrottlingPolicy

#: Canonical name -> policy class. "downtime" is QEMU's threshold rule; "throttle" wraps another
#: (`inner=NAME`, `inner.KEY=VALUE`).
POLICIES: dict[str, type[Any]] = {
    "downtime": DowntimePolicy,
    "nova": DowntimeRamp,
    "kubevirt": ProgressTimeouts,
    "stall": StallDetection,
    "throttle": ThrottlingPolicy,  # QEMU's auto-converge around an inner policy
}
#: Other names people know the same rules by.
ALIASES: dict[str, str] = {"qemu": "downtime", "threshold": "downtime", "ramp": "nova"}

_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def policy_class(name: str) -> type[Any]:
    key = ALIASES.get(name, name)
    if key not in POLICIES:
        known = sorted([*POLICIES, *ALIASES])
        raise PolicyError(f"no policy named {name!r}; known: {', '.join(known)}")
    return POLICIES[key]


def policy_name(policy: Policy) -> str:
    """The canonical name of a policy object's class (`PolicyError` for one not registered)."""
    for name, cls in POLICIES.items():
        if type(policy) is cls:
            return name
    raise PolicyError(f"{type(policy).__name__} is not a registered policy")


def parse_settings(items: Iterable[str]) -> dict[str, str]:
    """`["k=v", ...]` as a dict; a word without `=`, an empty key or a key given twice is refused."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise PolicyError(f"--set takes KEY=VALUE, got {item!r}")
        if key in out:
            raise PolicyError(f"--set {key} given twice")
        out[key] = value.strip()
    return out


def fields_of(cls: type[Any]) -> dict[str, Any]:
    """Field name -> declared type, for a registered policy class."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _convert(key: str, kind: Any, value: object) -> object:
    wrong = f"{key}={value!r}"
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        try:
            return kind(value)
        except ValueError:
            raise PolicyError(f"{wrong}: must be one of {[m.value for m in kind]}") from None
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).lower()
        if text in _TRUE | _FALSE:
            return text in _TRUE
        raise PolicyError(f"{wrong}: must be true or false")
    if kind is int:
        if isinstance(value, bool):
            raise PolicyError(f"{wrong}: must be an integer")
        if isinstance(value, float) and value.is_integer():
            return int(value)
        try:
            return int(str(value))
        except ValueError:
            raise PolicyError(f"{wrong}: must be an integer") from None
    if kind is float:
        if isinstance(value, bool):
            raise PolicyError(f"{wrong}: must be a number")
        try:
            number = float(str(value)) if not isinstance(value, int | float) else float(value)
        except ValueError:
            raise PolicyError(f"{wrong}: must be a number") from None
        if not math.isfinite(number):
            raise PolicyError(f"{wrong}: must be finite")
        return number
    if kind is str:
        return str(value)
    raise PolicyError(f"{key} cannot be set from text")


def _default(cls: type[Any], key: str) -> Any:
    field = next(f for f in dataclasses.fields(cls) if f.name == key)
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    raise PolicyError(f"{cls.__name__}.{key} has no default: name one with {key}=NAME")


def make_policy(name: str, settings: Mapping[str, object] | None = None) -> Policy:
    """The policy `name` with its defaults, and `settings` (text or typed values) over them."""
    cls = policy_class(name)
    declared = fields_of(cls)
    given = dict(settings or {})
    nested = {k: v for k, v in given.items() if "." in k}
    flat = {k: v for k, v in given.items() if "." not in k}
    unknown = sorted(set(flat) - set(declared)) + sorted(
        {k.split(".", 1)[0] for k in nested} - {f for f, t in declared.items() if t is Policy}
    )
    if unknown:
        raise PolicyError(f"policy {name!r} has no setting {unknown[0]!r}; it has: {', '.join(declared)}")
    kwargs: dict[str, object] = {}
    for key, kind in declared.items():
        if kind is Policy:
            inner = {k.split(".", 1)[1]: v for k, v in nested.items() if k.split(".", 1)[0] == key}
            if key in flat or inner:
                inner_name = str(flat[key]) if key in flat else policy_name(_default(cls, key))
                kwargs[key] = make_policy(inner_name, inner)
        elif key in flat:
            try:
                kwargs[key] = _convert(key, kind, flat[key])
            except PolicyError as exc:
                raise PolicyError(f"policy {name!r}: {exc}") from None
    try:
        return typing.cast(Policy, cls(**kwargs))
    except PolicyError as exc:
        raise PolicyError(f"policy {name!r}: {exc}") from None


def describe(policy: Policy) -> dict[str, Any]:
    """`{"name", "params"}` with JSON-ready values: what a trace records, what `rebuild` reads."""
    params: dict[str, Any] = {}
    for key, kind in fields_of(type(policy)).items():
        value = getattr(policy, key)
        if kind is Policy:
            inner = describe(value)
            params[key] = inner["name"]
            params.update({f"{key}.{k}": v for k, v in inner["params"].items()})
        else:
            params[key] = value.value if isinstance(value, enum.Enum) else value
    return {"name": policy_name(policy), "params": params}


def rebuild(description: Mapping[str, Any]) -> Policy:
    """The policy a `describe` result (a trace header's `policy`) names."""
    if not isinstance(description.get("name"), str) or not isinstance(description.get("params", {}), Mapping):
        raise PolicyError(f"a policy description has a name and params, got {dict(description)!r}")
    return make_policy(description["name"], description.get("params", {}))
