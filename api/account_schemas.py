"""Request and response schemas of accounts, API keys, saved scripts and the audit log.

(Kept beside ``api/schemas.py``, which holds the job and calculation schemas, so that each resource's schemas
stay in one place; both feed the one OpenAPI document.)
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from api.schemas import StockSymbol

MAX_PAGE = 200


def _printable_name(value: str) -> str:
    value = value.strip()
    if not value:
        raise ValueError("must not be empty or blank")
    if not value.isprintable():
        raise ValueError("must contain only printable characters")
    return value


def _unique_symbols(value: list[str]) -> list[str]:
    return list(dict.fromkeys(value))


Name = Annotated[str, AfterValidator(_printable_name)]
Universe = Annotated[list[StockSymbol], AfterValidator(_unique_symbols)]


# --- accounts -----------------------------------------------------------------------------------------------


class Credentials(BaseModel):
    model_config = ConfigDict(extra="forbid")

    username: str = Field(min_length=1, max_length=64)
    password: str = Field(min_length=1, max_length=1024)


class RefreshBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    refresh_token: str = Field(min_length=1, max_length=4096)


class TokenPair(BaseModel):
    access_token: str
    refresh_token: str
    token_type: str
    expires_in: int = Field(description="seconds until the access token expires")


class UserView(BaseModel):
    id: str
    username: str
    role: str
    created_at: dt.datetime


class MeView(UserView):
    auth_method: str = Field(description="jwt or api_key")
    quotas: dict[str, Any] = Field(
        default_factory=dict,
        description="sandbox CPU seconds per budget today (UTC): `used_s`, `limit_s` and `left_s` (None: no limit)",
    )


# --- API keys -----------------------------------------------------------------------------------------------


class ApiKeyCreateBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Annotated[Name, Field(max_length=100)]
    expires_in_days: int | None = Field(default=None, ge=1, le=3650)


class ApiKeyView(BaseModel):
    id: str
    name: str
    prefix: str = Field(description="the key's first characters, to tell keys apart")
    created_at: dt.datetime
    expires_at: dt.datetime | None
    last_used_at: dt.datetime | None
    revoked_at: dt.datetime | None


class ApiKeyCreated(ApiKeyView):
    key: str = Field(description="the API key itself: shown this once, never again")


class ApiKeyList(BaseModel):
    api_keys: list[ApiKeyView]


class ApiKeyPath(BaseModel):
    key_id: str


# --- saved scripts ------------------------------------------------------------------------------------------


class ScriptCreateBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Annotated[Name, Field(max_length=100)]
    description: str = Field(default="", max_length=2000)
    code: Annotated[str, Field(min_length=1, description="Python source, compiled under the sandbox policy")]
    nightly: bool = Field(default=False, description="recalculate nightly over `universe` (scheduled later)")
    universe: Universe = Field(default_factory=list, description="symbols of the nightly recalculation")
    kind: Literal["calculation", "strategy"] = Field(
        default="calculation", description="a calculation assigns `result`; a strategy assigns signals (fixed)"
    )
    parameters: dict[str, Any] | None = Field(
        default=None,
        description="a strategy's declared parameters: name -> {type: int|float|bool, default, min, max, description}",
    )


class ScriptUpdateBody(BaseModel):
    """Fields to change; omitted fields keep their value. A new code text becomes the next version."""

    model_config = ConfigDict(extra="forbid")

    name: Annotated[Name, Field(max_length=100)] | None = None
    description: str | None = Field(default=None, max_length=2000)
    code: Annotated[str, Field(min_length=1)] | None = None
    nightly: bool | None = None
    universe: Universe | None = None
    expected_version: int | None = Field(
        default=None, ge=1, description="refuse (409) unless the script is still at this version"
    )
    parameters: dict[str, Any] | None = Field(
        default=None, description="a strategy's new declared parameters (a new version, like new code)"
    )


class ScriptPath(BaseModel):
    script_id: str


class ScriptVersionPath(BaseModel):
    script_id: str
    version: int = Field(ge=1)


class ScriptListQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    limit: int = Field(default=50, ge=1, le=MAX_PAGE)
    cursor: str | None = Field(default=None, max_length=500)
    name_prefix: str | None = Field(default=None, min_length=1, max_length=100)
    updated_since: dt.datetime | None = Field(default=None, description="ISO 8601 timestamp with a time zone")
    owner_id: str | None = Field(default=None, max_length=64, description="admins: list this user's scripts")


class VersionListQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    limit: int = Field(default=20, ge=1, le=100)
    cursor: str | None = Field(default=None, max_length=500)


class ScriptLinks(BaseModel):
    self: str
    versions: str


class ScriptView(BaseModel):
    script_id: str
    owner_id: str
    name: str
    description: str
    code: str
    version: int
    nightly: bool
    universe: list[str]
    kind: str
    parameters: dict[str, Any]
    created_at: dt.datetime
    updated_at: dt.datetime
    links: ScriptLinks


class ScriptSummary(BaseModel):
    script_id: str
    owner_id: str
    name: str
    description: str
    version: int
    nightly: bool
    universe_size: int
    kind: str
    created_at: dt.datetime
    updated_at: dt.datetime


class ScriptPage(BaseModel):
    scripts: list[ScriptSummary]
    next_cursor: str | None


class ScriptVersionView(BaseModel):
    script_id: str
    version: int
    code: str
    code_sha256: str
    parameters: dict[str, Any]
    created_at: dt.datetime


class ScriptVersionPage(BaseModel):
    versions: list[ScriptVersionView]
    next_cursor: str | None


# --- audit log ----------------------------------------------------------------------------------------------


class AuditQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    limit: int = Field(default=100, ge=1, le=MAX_PAGE)
    cursor: str | None = Field(default=None, max_length=100)
    action: str | None = Field(default=None, max_length=64)
    actor_id: str | None = Field(default=None, max_length=64, description="admins: another user's entries")
    request_id: str | None = Field(default=None, max_length=128)


class AuditEntry(BaseModel):
    id: int
    created_at: dt.datetime
    actor_id: str | None
    actor_username: str | None
    action: str
    resource_type: str | None
    resource_id: str | None
    request_id: str | None
    client_address: str | None
    details: dict[str, Any]


class AuditPage(BaseModel):
    entries: list[AuditEntry]
    next_cursor: str | None
