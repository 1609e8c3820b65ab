"""The subcommands of ``python -m tools.chaos``: each runs one part and may record it.

::

    python -m tools.chaos fuzz [--inputs N] [--seed S] [--workers W] [--record FILE]
    python -m tools.chaos fuzz --seed S --replay TARGET:INDEX
    python -m tools.chaos cycles [--cycles N] [--record FILE]
    python -m tools.chaos recovery [--tries N] [--record FILE]
    python -m tools.chaos hostile [--record FILE]
    python -m tools.chaos long [--record FILE]    # fuzz --inputs 1000000, cycles --cycles 200

Without a subcommand, ``python -m tools.chaos`` runs the faults through the proxy.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import attrs

from tools.chaos import _cycles, _fuzz, _hostile, _recovery
from tools.chaos._record import command_line, machine, now, record

LONG_FUZZ_INPUTS = 1_000_000
LONG_CYCLES = 200


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _header(command: str) -> dict[str, str]:
    """What every section's run line states: the machine, the date, the command."""
    return {"machine": machine(), "date": now(), "command": command}


def _finish(args: argparse.Namespace, key: str, text: str, raw: object, ok: bool) -> int:
    """Print the section, record it and the raw results where asked; the exit status."""
    print(text)
    if args.record:
        record(args.record, key, text)
    if args.json:
        args.json.write_text(json.dumps(raw, indent=2, default=str) + "\n")
    return 0 if ok else 1


def run_fuzz(args: argparse.Namespace, command: str) -> int:
    if args.replay:
        target, _, index = args.replay.partition(":")
        if target not in _fuzz.TARGETS or not index.isdigit():
            raise SystemExit(f"--replay TARGET:INDEX, TARGET among {', '.join(_fuzz.TARGETS)}")
        print(_fuzz.replay(args.seed, target, int(index)))
        return 0
    result = _fuzz.fuzz(args.inputs, seed=args.seed, workers=args.workers, report=_say)
    text = _fuzz.markdown(result, **_header(command))
    return _finish(args, "fuzz", text, attrs.asdict(result), result.unexpected == 0)


def run_cycles(args: argparse.Namespace, command: str) -> int:
    _need_root()
    result = _cycles.cycles(args.cycles, report=_say)
    text = _cycles.markdown(result, **_header(command))
    return _finish(args, "cycles", text, attrs.asdict(result), result.ok())


def run_recovery(args: argparse.Namespace, command: str) -> int:
    _need_root()
    result = _recovery.recovery(args.tries, report=_say)
    text = _recovery.markdown(result, **_header(command))
    return _finish(args, "recovery", text, attrs.asdict(result), result.ok())


def run_hostile(args: argparse.Namespace, command: str) -> int:
    _need_root()
    rows = _hostile.hostile(report=_say)
    text = _hostile.markdown(rows, **_header(command))
    return _finish(args, "hostile", text, [attrs.asdict(r) for r in rows], all(r.ok for r in rows))


def run_long(args: argparse.Namespace, command: str) -> int:
    args.inputs, args.seed, args.workers, args.replay = LONG_FUZZ_INPUTS, args.seed, 2, None
    status = run_fuzz(args, command)
    args.cycles = LONG_CYCLES
    return run_cycles(args, command) or status


def _need_root() -> None:
    if os.geteuid() != 0:
        raise SystemExit("this part mounts filesystems and runs containers: it needs root")


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.chaos", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = parser.add_subparsers(dest="part", required=True)
    parts: dict[str, Callable[[argparse.Namespace, str], int]] = {}

    def part(
        name: str, run: Callable[[argparse.Namespace, str], int], help: str
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        p.add_argument("--record", type=Path, metavar="FILE", help="write the section here")
        p.add_argument("--json", type=Path, metavar="FILE", help="write the raw results here")
        parts[name] = run
        return p

    p = part("fuzz", run_fuzz, "fuzz the footer and TOC parsers")
    p.add_argument("--inputs", type=int, default=20_000, help="how many (default 20000)")
    p.add_argument("--seed", type=int, default=0, help="the run's seed (default 0)")
    p.add_argument("--workers", type=int, default=2, help="processes (default 2)")
    p.add_argument("--replay", metavar="TARGET:INDEX", help="run one input again, here")
    p = part("cycles", run_cycles, "container start/stop cycles through containerd")
    p.add_argument("--cycles", type=int, default=5, help="how many (default 5)")
    p = part("recovery", run_recovery, "crash recovery times")
    p.add_argument("--tries", type=int, default=3, help="tries of each crash (default 3)")
    part("hostile", run_hostile, "hostile inputs to the blockfs command")
    p = part("long", run_long, "the long version: 1,000,000 fuzz inputs, 200 container cycles")
    p.add_argument("--seed", type=int, default=0, help="the fuzz seed (default 0)")
    args = parser.parse_args(argv)
    return parts[args.part](args, command_line(argv))
