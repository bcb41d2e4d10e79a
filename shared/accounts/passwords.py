"""Password hashing with argon2id (argon2-cffi's RFC 9106 defaults).

Verification of an unknown username still spends the time of one argon2 verification (against a fixed
dummy hash), so response time does not tell which usernames exist.
"""

from __future__ import annotations

import functools

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

_HASHER = PasswordHasher()  # immutable parameters: safe to share


def hash_password(password: str) -> str:
    return _HASHER.hash(password)


def verify_password(password_hash: str, password: str) -> bool:
    try:
        return _HASHER.verify(password_hash, password)
    except (VerificationError, InvalidHashError):
        return False


def needs_rehash(password_hash: str) -> bool:
    """True when the stored hash used weaker parameters than today's (rehash after a successful login)."""
    try:
        return _HASHER.check_needs_rehash(password_hash)
    except InvalidHashError:
        return True


@functools.cache
def _dummy_hash() -> str:
    return _HASHER.hash("alphaforge-dummy-password-for-timing")


def spend_verification_time(password: str) -> None:
    """Do the work of one verification for a login whose username does not exist (always fails)."""
    verify_password(_dummy_hash(), password)
