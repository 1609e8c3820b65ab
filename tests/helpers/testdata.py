"""Where the reference eStargz vectors are, and what their build reports say."""

import json
from pathlib import Path

# Copied from the reference implementation's output; tests/data/estargz/README.md says how
# they were made. A missing file fails the test that needs it: nothing here skips.
TESTDATA = Path(__file__).resolve().parents[1] / "data" / "estargz"
LAYER_TAR = TESTDATA / "layer.tar"
# Blobs whose chunks all carry digests (legacy stargz has none, so it is not served lazily).
VERIFIABLE_BLOBS = ["gzip-64k.esgz", "gzip-default.esgz", "gzip-prio.esgz", "zstd-64k.esgz"]


def build_report(blob: str) -> dict[str, object]:
    """The reference writer's report for ``blob``."""
    data: dict[str, object] = json.loads((TESTDATA / f"{blob}.build.json").read_text())
    return data


def toc_digest_of(blob: str) -> str:
    return str(build_report(blob)["tocDigest"])
