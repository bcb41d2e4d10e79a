"""How a setting is declared, read from the environment, handed to child processes and documented.

A setting is a field of a frozen dataclass (``shared/infra/config.py``) whose default is :func:`setting`: its
environment variable, default, bounds, check and one-line doc in one place. From those declarations:

* :func:`read_env` builds the dataclass tree from an environment mapping with pydantic-settings (one flat
  ``BaseSettings`` model whose fields are the variables), and turns every validation error into a
  :class:`~shared.errors.ConfigError` that names the variable and the problem;
* :func:`child_env` gives the variables that make a child process see the same settings;
* :func:`markdown_table` renders README's *Configuration* table (a test keeps README equal to it).

The dataclasses stay plain: tests build them with explicit values (``dataclasses.replace`` included), and only
the environment is parsed and checked here.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import re
import typing
from collections.abc import Callable, Iterator, Mapping
from typing import Annotated, Any, TypeVar

from pydantic import AfterValidator, AliasChoices, Field, ValidationError, create_model
from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict
from pydantic_settings.sources.utils import parse_env_vars

from shared.errors import ConfigError

T = TypeVar("T")
SETTING = "alphaforge.setting"  # the key of a setting's declaration in its dataclass field's metadata


@dataclasses.dataclass(frozen=True)
class Setting:
    """What one environment variable means (see :func:`setting`)."""

    env: str
    doc: str
    fallbacks: tuple[str, ...] = ()  # further variables read when ``env`` is unset, in order
    ge: float | None = None
    gt: float | None = None
    check: Callable[[Any], Any] | None = None  # parsed value -> value, or ValueError("must be ...") (name prefixed)
    derive: Callable[[Mapping[str, Any]], Any] | None = None  # the default from the group's other values, when unset
    shown: str | None = None  # the default as README shows it (markdown), when not the value itself
    child: bool = True  # handed to child processes by child_env() (secrets that go to one child only: False)


def setting(
    env: str,
    default: Any,
    doc: str,
    *,
    fallbacks: tuple[str, ...] = (),
    ge: float | None = None,
    gt: float | None = None,
    check: Callable[[Any], Any] | None = None,
    derive: Callable[[Mapping[str, Any]], Any] | None = None,
    shown: str | None = None,
    secret: bool = False,
    child: bool = True,
) -> Any:
    """A dataclass field that is a setting. Without ``ge``/``gt`` an ``int`` setting must be >= 1 and a ``float``
    one > 0 (``ge=0`` allows zero); ``secret`` keeps the value out of ``repr``."""
    if ge is None and gt is None:
        if type(default) is int:
            ge = 1
        elif type(default) is float:
            gt = 0.0
    declared = Setting(env, doc, fallbacks, ge, gt, check, derive, shown, child)
    return dataclasses.field(default=default, repr=not secret, metadata={SETTING: declared})


@dataclasses.dataclass(frozen=True)
class Declared:
    path: tuple[str, ...]  # attribute names from the root, e.g. ("maintenance", "shard_lease_s")
    setting: Setting
    type: Any
    default: Any


def declared(cls: type) -> Iterator[Declared]:
    """Every setting of the dataclass ``cls`` and of its nested groups, in declaration order."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if SETTING in f.metadata:
            yield Declared((f.name,), f.metadata[SETTING], tp, f.default)
        elif isinstance(tp, type) and dataclasses.is_dataclass(tp):
            for inner in declared(tp):
                yield dataclasses.replace(inner, path=(f.name, *inner.path))


# --- reading ------------------------------------------------------------------------------------------------

_ENVIRONMENT: contextvars.ContextVar[Mapping[str, str]] = contextvars.ContextVar("alphaforge_environment")


class _MappingSource(EnvSettingsSource):
    """pydantic-settings' environment source over the mapping :func:`read_env` was given (``os.environ`` or a
    test's dict) instead of always ``os.environ``; empty values count as unset."""

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return parse_env_vars(_ENVIRONMENT.get(), case_sensitive=True, ignore_empty=True)


class _Environment(BaseSettings):
    model_config = SettingsConfigDict(case_sensitive=True, extra="ignore", frozen=True, validate_default=False)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (_MappingSource(settings_cls),)


_MODELS: dict[type, type[_Environment]] = {}


def _environment_model(cls: type) -> type[_Environment]:
    """One flat pydantic-settings model for ``cls``: a field per variable, typed, bounded and checked as declared
    (built once per class)."""
    if cls in _MODELS:
        return _MODELS[cls]
    fields: dict[str, Any] = {}
    for item in declared(cls):
        s = item.setting
        tp: Any = Annotated[item.type, Field(ge=s.ge, gt=s.gt)]
        if s.check is not None:
            tp = Annotated[tp, AfterValidator(s.check)]
        default = None if s.derive is not None else item.default
        if s.derive is not None:
            tp = tp | None
        fields[s.env] = (tp, Field(default, validation_alias=AliasChoices(s.env, *s.fallbacks)))
    model: type[_Environment] = create_model(f"{cls.__name__}Environment", __base__=_Environment, **fields)
    _MODELS[cls] = model
    return model


def _problem(env: str, error: Mapping[str, Any]) -> str:
    raw, ctx, kind = error.get("input"), error.get("ctx") or {}, error["type"]
    if kind in ("int_parsing", "int_from_float"):
        return f"{env} must be an integer, got {raw!r}"
    if kind == "float_parsing":
        return f"{env} must be a number, got {raw!r}"
    if kind == "bool_parsing":
        return f"{env} must be true or false, got {raw!r}"
    if kind == "greater_than_equal":
        return f"{env} must be >= {ctx['ge']}, got {raw}"
    if kind == "greater_than":
        return f"{env} must be > {ctx['gt']}, got {raw}"
    if kind == "value_error" and "error" in ctx:
        return f"{env} {ctx['error']}"
    return f"{env}: {error['msg']} (got {raw!r})"


def _build(cls: type, values: Mapping[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    derived: list[tuple[str, Setting]] = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if SETTING in f.metadata:
            s: Setting = f.metadata[SETTING]
            if s.derive is not None and values[s.env] is None:
                derived.append((f.name, s))
            else:
                kwargs[f.name] = values[s.env]
        elif isinstance(tp, type) and dataclasses.is_dataclass(tp):
            kwargs[f.name] = _build(tp, values)
    for name, s in derived:
        assert s.derive is not None
        kwargs[name] = s.derive(kwargs)
    return cls(**kwargs)


def read_env(cls: type[T], env: Mapping[str, str]) -> T:
    """``cls`` (a dataclass of settings) from ``env``: unset or empty variables keep their defaults; a bad value is
    a ConfigError naming the variable (all of them, when several are bad)."""
    model = _environment_model(cls)
    token = _ENVIRONMENT.set(env)
    try:
        values = model().model_dump()
    except ValidationError as exc:
        problems = [_problem(str(error["loc"][0]) if error["loc"] else "?", error) for error in exc.errors()]
        raise ConfigError("; ".join(problems)) from None
    finally:
        _ENVIRONMENT.reset(token)
    built: T = _build(cls, values)
    return built


# --- child processes and documentation ----------------------------------------------------------------------


def as_text(value: Any) -> str:
    """A value as its environment variable spells it (what :func:`read_env` reads back to the same value)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def child_env(settings: Any) -> dict[str, str]:
    """The variables that make a child process see ``settings`` (unset optional ones left out)."""
    env: dict[str, str] = {}
    for item in declared(type(settings)):
        if not item.setting.child:
            continue
        value = functools.reduce(getattr, item.path, settings)
        if value is not None:
            env[item.setting.env] = as_text(value)
    return env


def _shown(item: Declared) -> str:
    if item.setting.shown is not None:
        return item.setting.shown
    value = item.default
    text = f"{value:g}" if isinstance(value, float) else as_text(value)
    return f"`{text}`"


def markdown_table(cls: type) -> str:
    """README's *Configuration* table: every variable, its default and its doc, in declaration order."""
    rows = ["| variable | default | meaning |", "| --- | --- | --- |"]
    for item in declared(cls):
        doc = item.setting.doc.replace("|", "\\|")
        rows.append(f"| `{item.setting.env}` | {_shown(item)} | {doc} |")
    return "\n".join(rows)


# --- checks (``check=`` of a setting: the parsed value in, the value to keep out, ValueError for a bad one) ------


def rate(raw: str) -> str:
    """A flask-limiter rate string (``"30/minute"``, ``"5 per 15 minutes;100/day"``)."""
    from limits import parse_many

    value = raw.strip()
    try:
        parse_many(value)
    except ValueError:
        raise ValueError(f"is not a rate limit like '30/minute' or '5 per 15 minutes': {raw!r}") from None
    return value


def single_rate(raw: str) -> str:
    """One rate (``"20 per 15 minutes"``): a count within a window, not a list of limits."""
    from limits import parse_many

    value = rate(raw)
    if len(parse_many(value)) != 1:
        raise ValueError(f"must be one rate like '20 per 15 minutes', not a list: {raw!r}")
    return value


def cron(raw: str) -> str:
    """Five cron fields (checked by Celery's own parser), or ``off``."""
    from celery.schedules import crontab

    value = " ".join(raw.split())
    if value.lower() == "off":
        return "off"
    fields = value.split(" ")
    if len(fields) != 5:
        raise ValueError(f"must be 5 cron fields (minute hour day-of-month month day-of-week) or off: {value!r}")
    try:
        minute, hour, day_of_month, month_of_year, day_of_week = fields
        crontab(minute, hour, day_of_week, day_of_month, month_of_year)
    except (ValueError, IndexError) as exc:
        raise ValueError(f"is not a valid cron schedule: {value!r} ({exc})") from None
    return value


def timezone(raw: str) -> str:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    value = raw.strip()
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"is not a known time zone: {value!r}") from None
    return value


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def log_level(raw: str) -> str:
    value = raw.strip().upper()
    if value not in LOG_LEVELS:
        raise ValueError(f"must be DEBUG, INFO, WARNING, ERROR or CRITICAL: {value!r}")
    return value


_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


def s3_url(raw: str) -> str | None:
    """``s3://bucket[/prefix]`` with a valid bucket name, normalised without trailing slash (blank: unset)."""
    value = raw.strip()
    if not value:
        return None
    scheme, _, rest = value.partition("://")
    bucket, _, prefix = rest.partition("/")
    if scheme != "s3" or not _BUCKET.fullmatch(bucket) or ".." in bucket:
        raise ValueError(f"must be s3://bucket[/prefix] (unset: the data directory), got {value!r}")
    prefix = prefix.strip("/")
    if prefix and any(part in ("", ".", "..") for part in prefix.split("/")):
        raise ValueError(f"has an empty, '.' or '..' part in its prefix: {value!r}")
    return f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"


def http_url(raw: str) -> str | None:
    value = raw.strip().rstrip("/")
    if value and not value.startswith(("http://", "https://")):
        raise ValueError(f"must be an http:// or https:// URL, got {value!r}")
    return value or None


def one_of(*choices: str) -> Callable[[str], str]:
    """One of ``choices`` (case and surrounding space ignored)."""

    def check(raw: str) -> str:
        value = raw.strip().lower()
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}: {raw!r}")
        return value

    return check


def at_most(limit: float) -> Callable[[Any], Any]:
    """A number no larger than ``limit`` (with ``ge``/``gt`` for the lower bound)."""

    def check(value: Any) -> Any:
        if value > limit:
            raise ValueError(f"must be at most {limit:,}, got {value:,}")
        return value

    return check
