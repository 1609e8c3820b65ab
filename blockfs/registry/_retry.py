"""How often and how long to retry a registry request that failed for a passing reason."""

from __future__ import annotations

import random

import attrs


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
