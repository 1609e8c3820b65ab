"""What one logical registry request is about, for choosing endpoints, auth scopes and
the errors it raises."""

from __future__ import annotations

from typing import Literal, TypeVar

import attrs

from blockfs.registry._errors import RegistryError

E = TypeVar("E", bound=RegistryError)
Kind = Literal["manifest", "blob", "upload"]


@attrs.frozen(slots=True)
class Target:
    """What one logical request is about: for choosing endpoints, auth scope and errors."""

    registry: str
    repository: str
    capability: Literal["pull", "resolve", "push"]
    kind: Kind
    digest: str | None = None
    scopes: tuple[str, ...] = ()

    def error(
        self,
        cls: type[E],
        message: str,
        host: str,
        *,
        status: int | None = None,
        hint: str | None = None,
    ) -> E:
        """A ``cls`` error about this target on ``host``."""
        return cls(
            message,
            host=host,
            repository=self.repository,
            digest=self.digest,
            status=status,
            hint=hint,
        )
