"""Fuzzing campaigns: ``python -m tests.fuzz --graphs 10000`` checks every property (properties.py)
on that many random nets, CNNs, transformers and IR graphs drawn from the op registry in turn
(``--mix cnn=2,transformer=1,ir=3`` weighs them); ``--kind cnn --seed 17`` reproduces one net.
``--files 10000`` feeds that many mutated ONNX files (onnx_files.py) to the importer; a
disallowed outcome's file is saved under ``--save``.
Failures print one line each, with what reproduces them."""

from __future__ import annotations

import argparse
import collections
import signal
import sys
import time
import traceback

import torch

from tests.fuzz.properties import KINDS, PROPERTIES, make_case


class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang("took longer than the time limit")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__)
    parser.add_argument("--graphs", type=int, default=100, help="random nets to check, of each kind in turn")
    parser.add_argument("--start", type=int, default=0, help="first seed")
    parser.add_argument("--kind", choices=KINDS, help="only this kind of net")
    parser.add_argument("--seed", type=int, help="one net (with --kind)")
    parser.add_argument("--properties", default=",".join(PROPERTIES),
                        help="comma-separated, of " + ", ".join(PROPERTIES))
    parser.add_argument("--mix", default="cnn=1,transformer=1,ir=1", help="how many of each kind in turn")
    parser.add_argument("--timeout", type=int, default=300, help="seconds one net or file may take")
    parser.add_argument("--files", type=int, default=0, help="mutated ONNX files to check (no nets unless --graphs)")
    parser.add_argument("--save", default="fuzz-failures", help="folder for files with disallowed outcomes")
    args = parser.parse_args(argv)
    if args.files:
        return files_campaign(args.files, args.timeout, args.save)
    torch.set_num_threads(1)
    chosen = [p for p in args.properties.split(",") if p]
    unknown = [p for p in chosen if p not in PROPERTIES]
    if unknown:
        parser.error(f"unknown properties {unknown}")
    if args.seed is not None:
        nets = [(args.kind or "cnn", args.seed)]
    else:
        weights = {k: int(w) for k, w in (part.split("=") for part in args.mix.split(","))}
        turn = [args.kind] if args.kind else [k for k in KINDS for _ in range(weights.get(k, 0))]
        seeds = collections.Counter()
        nets = []
        for i in range(args.graphs):
            kind = turn[i % len(turn)]
            nets.append((kind, args.start + seeds[kind]))
            seeds[kind] += 1
    signal.signal(signal.SIGALRM, _alarm)
    failures: list[str] = []
    counts = collections.Counter()
    seconds = collections.Counter()  # per property
    began = time.time()
    for n, (kind, seed) in enumerate(nets, 1):
        signal.alarm(args.timeout)
        try:
            case = make_case(kind, seed)
            counts["nets"] += 1
            for name in chosen:
                counts["checks"] += 1
                began_check = time.time()
                try:
                    PROPERTIES[name](case)
                except Exception as exc:
                    failures.append(f"{kind} {seed} {name}: {type(exc).__name__}: {_first_line(exc)}")
                    print(f"FAIL {failures[-1]}\n  python -m tests.fuzz --kind {kind} --seed {seed} "
                          f"--properties {name}", flush=True)
                    if not isinstance(exc, AssertionError):
                        traceback.print_exc(limit=-3)
                seconds[name] += time.time() - began_check
        except Exception as exc:  # the net does not import
            failures.append(f"{kind} {seed} import: {type(exc).__name__}: {_first_line(exc)}")
            print(f"FAIL {failures[-1]}", flush=True)
        finally:
            signal.alarm(0)
        if n % 100 == 0:
            print(f"{n} nets, {counts['checks']} checks, {len(failures)} failures, {time.time() - began:.0f} s",
                  flush=True)
    print(f"done: {counts['nets']} nets, {counts['checks']} checks, "
          f"{len(failures)} failures, {time.time() - began:.0f} s; per property: "
          + ", ".join(f"{name} {seconds[name]:.0f} s" for name in chosen))
    return 1 if failures else 0


def files_campaign(count: int, timeout: int, save: str) -> int:
    """``count`` mutated files drawn by hypothesis (no shrinking: every outcome is counted)."""
    import hashlib
    import os

    from hypothesis import HealthCheck, Phase, given, settings

    from tests.fuzz.onnx_files import Disallowed, Hang, check_file, mutated_files

    outcomes = collections.Counter()
    failures: list[str] = []
    began = time.time()

    def alarm(signum, frame):
        raise Hang(f"took over {timeout} s")

    @settings(max_examples=count, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(mutated_files())
    def one(drawn):
        what, data = drawn
        signal.signal(signal.SIGALRM, alarm)
        signal.alarm(timeout)
        try:
            outcomes[check_file(data)] += 1
        except (Disallowed, Hang) as exc:
            os.makedirs(save, exist_ok=True)
            path = os.path.join(save, hashlib.sha1(data).hexdigest()[:12] + ".onnx")
            with open(path, "wb") as f:
                f.write(data)
            failures.append(f"{what}: {type(exc).__name__}: {_first_line(exc)} ({path})")
            print(f"FAIL {failures[-1]}", flush=True)
        finally:
            signal.alarm(0)
        total = sum(outcomes.values()) + len(failures)
        if total % 500 == 0:
            print(f"{total} files, {len(failures)} disallowed, {time.time() - began:.0f} s", flush=True)

    one()
    total = sum(outcomes.values()) + len(failures)
    print(f"done: {total} files, {len(failures)} disallowed outcomes, {time.time() - began:.0f} s; outcomes: "
          + ", ".join(f"{k} {v}" for k, v in outcomes.most_common()))
    return 1 if failures else 0


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:300]


if __name__ == "__main__":
    sys.exit(main())
