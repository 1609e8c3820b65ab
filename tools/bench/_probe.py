"""One measured TOC parse in a fresh process: ``python -m tools.bench._probe MODE TOC PAYLOAD_END``.

MODE ``json`` only decodes the JSON (the baseline); ``parse_toc`` runs blockfs's parser.
Prints one JSON line: the wall time of the call, the process's peak RSS (``VmHWM``)
after imports and at the end, and the number of entries. Both modes import the same
modules, so the difference of their peaks is what ``parse_toc`` adds over ``json.loads``.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

from blockfs.estargz import parse_toc


def _peak_kib() -> int:
    # VmHWM, the high-water mark of this process's own memory, rather than ru_maxrss:
    # Linux carries ru_maxrss over exec from the forking parent, so a child of a big
    # benchmark process would report the parent's size.
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def main(argv: list[str]) -> int:
    mode, path, payload_end = argv
    after_imports = _peak_kib()
    data = Path(path).read_bytes()
    start = time.perf_counter()
    if mode == "json":
        entries = len(json.loads(data)["entries"])
    elif mode == "parse_toc":
        entries = len(parse_toc(data, payload_end=int(payload_end)).entries)
    else:
        print(f"unknown mode {mode!r}: use json or parse_toc", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    result = {
        "seconds": seconds,
        "after_imports_kib": after_imports,
        "peak_kib": _peak_kib(),
        "entries": entries,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
