"""Accounts: creation with validated usernames and argon2 password hashes, and password login."""

from __future__ import annotations

import re

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from shared.accounts import passwords
from shared.errors import Conflict, ValidationFailed
from shared.infra.models import User, UserRole

USERNAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9_.-]{2,63}")
MIN_PASSWORD_CHARS = 8
MAX_PASSWORD_CHARS = 256  # argon2 copes with more; this bounds the work one request can ask for


def normalize_username(raw: str) -> str:
    """Usernames compare case-insensitively: stored lower-cased, 3 to 64 of a-z 0-9 _ . - (letter/digit first)."""
    username = raw.strip().lower()
    if not USERNAME_PATTERN.fullmatch(username):
        raise ValidationFailed.for_field(
            "username", "use 3 to 64 characters: letters, digits, '_', '.', '-', starting with a letter or digit"
        )
    return username


def check_password(password: str, username: str) -> None:
    if len(password) < MIN_PASSWORD_CHARS:
        raise ValidationFailed.for_field("password", f"must be at least {MIN_PASSWORD_CHARS} characters")
    if len(password) > MAX_PASSWORD_CHARS:
        raise ValidationFailed.for_field("password", f"must be at most {MAX_PASSWORD_CHARS} characters")
    if password.strip().lower() == username:
        raise ValidationFailed.for_field("password", "must not be the username")


def create_user(session: Session, username: str, password: str, *, role: UserRole = UserRole.USER) -> User:
    """Add an account (in the caller's transaction); Conflict if the username is taken."""
    username = normalize_username(username)
    check_password(password, username)
    user = User(username=username, password_hash=passwords.hash_password(password), role=role.value)
    try:
        with session.begin_nested():  # a savepoint: a duplicate must not spoil the caller's transaction
            session.add(user)
            session.flush()
    except IntegrityError:
        raise Conflict(f"username {username!r} is taken", details={"field": "username"}) from None
    return user


def set_password(session: Session, user: User, password: str) -> None:
    check_password(password, user.username)
    user.password_hash = passwords.hash_password(password)


def find_user(session: Session, username: str) -> User | None:
    return session.scalar(select(User).where(User.username == username.strip().lower()))


def authenticate(session: Session, username: str, password: str) -> User | None:
    """The active account with this username and password, or None. Takes the same time for unknown names.
    Upgrades the stored hash when argon2's parameters have moved on (the caller commits)."""
    user = find_user(session, username) if len(password) <= MAX_PASSWORD_CHARS else None
    if user is None:
        passwords.spend_verification_time(password[:MAX_PASSWORD_CHARS])
        return None
    if not passwords.verify_password(user.password_hash, password) or not user.is_active:
        return None
    if passwords.needs_rehash(user.password_hash):
        user.password_hash = passwords.hash_password(password)
    return user
