"""Who is asking, and what they may do with a resource that has an owner.

Reading: the owner, or an admin. Changing (update, delete, execute, cancel): the owner only. A resource the
caller may not read is reported exactly like one that does not exist (404), so ids cannot be probed; an admin,
who can see it anyway, gets a plain 403 for changes.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.errors import Forbidden, NotFound
from shared.infra.models import UserRole


@dataclass(frozen=True)
class Principal:
    """The authenticated caller of one request."""

    user_id: str
    username: str
    role: str
    auth_method: str  # "jwt" or "api_key"
    token_jti: str | None = None  # JWT only: to revoke this token on logout
    token_family: str | None = None  # JWT only: the login session the token belongs to
    api_key_id: str | None = None

    @property
    def is_admin(self) -> bool:
        return self.role == UserRole.ADMIN.value


def can_read(principal: Principal, owner_id: str | None) -> bool:
    return principal.is_admin or (owner_id is not None and owner_id == principal.user_id)


def require_read(principal: Principal, owner_id: str | None, not_found: NotFound) -> None:
    if not can_read(principal, owner_id):
        raise not_found


def require_owner(principal: Principal, owner_id: str | None, not_found: NotFound) -> None:
    if owner_id is not None and owner_id == principal.user_id:
        return
    if principal.is_admin:
        raise Forbidden("admins may read other users' resources but not change or run them")
    raise not_found
