"""How often and how long to retry a registry request that failed for a passing reason."""

from __future__ import annotations

import email.utils
import logging
import random
import time
from collections.abc import Callable
from typing import TypeVar

import attrs

from blockfs.registry._errors import RegistryError, RegistryUnavailable

log = logging.getLogger("blockfs.registry")

T = TypeVar("T")


def _positive(_: object, attribute: attrs.Attribute[float], value: float) -> None:
    if value <= 0:
        raise ValueError(f"{attribute.name} must be positive, not {value}")


@attrs.frozen(slots=True)
class RetryPolicy:
    """Bounded retries with exponential backoff and jitter.

    A request is tried at most ``max_attempts`` times and never past ``total_timeout``
    seconds after its first attempt (per registry endpoint). The n-th wait is drawn from
    [d/2, d] with d = min(max_delay, base_delay * 2**(n-1)); a 429's ``Retry-After`` is
    honoured up to ``max_retry_after`` seconds.
    """

    max_attempts: int = attrs.field(default=5, validator=attrs.validators.ge(1))
    base_delay: float = attrs.field(default=0.2, validator=_positive)
    max_delay: float = attrs.field(default=5.0, validator=_positive)
    total_timeout: float = attrs.field(default=60.0, validator=_positive)
    max_retry_after: float = attrs.field(default=30.0, validator=_positive)

    def delay(self, attempt: int, retry_after: float | None = None, *, rng: random.Random) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.max_retry_after)
        ceiling = min(self.max_delay, self.base_delay * 2 ** (attempt - 1))
        return rng.uniform(ceiling / 2, ceiling)


class Transient(Exception):
    """A failure worth retrying; ``error`` is raised if the retries run out.

    ``connect`` marks a failure to connect at all, after which a mirror is skipped at once.
    """

    def __init__(
        self, error: RegistryError, *, retry_after: float | None = None, connect: bool = False
    ) -> None:
        super().__init__(str(error))
        self.error = error
        self.retry_after = retry_after
        self.connect = connect


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from now that a ``Retry-After`` header (seconds or an HTTP date) asks for."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class Retrier:
    """Runs a request again after passing failures, as far as a :class:`RetryPolicy` allows.

    Thread-safe.
    """

    def __init__(self, policy: RetryPolicy) -> None:
        self._policy = policy
        self._rng = random.Random()

    def run(self, attempt: Callable[[], T], *, fast_fail: bool) -> T:
        """``attempt`` until it succeeds, fails for good, or the policy is exhausted.

        A :class:`Transient` or :class:`RegistryUnavailable` is retried with backoff; the
        last one's error is raised when the policy runs out. With ``fast_fail``, a failure
        to connect is raised at once (another endpoint waits).
        """
        policy = self._policy
        deadline = time.monotonic() + policy.total_timeout
        attempts = 0
        while True:
            attempts += 1
            try:
                return attempt()
            except Transient as t:
                failure = t
            except RegistryUnavailable as e:
                failure = Transient(e)
            if failure.connect and fast_fail:
                raise failure.error
            if attempts >= policy.max_attempts:
                break
            delay = policy.delay(attempts, failure.retry_after, rng=self._rng)
            if time.monotonic() + delay > deadline:
                break
            log.info("%s (attempt %d); retrying in %.2f s", failure.error, attempts, delay)
            time.sleep(delay)
        error = failure.error
        error.message += f" (gave up after {attempts} attempt{'s' if attempts > 1 else ''})"
        raise error
