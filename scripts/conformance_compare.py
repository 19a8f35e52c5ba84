#!/usr/bin/env python3
"""Compare a kosoku (Autobahn TestSuite) report with the expected results.

Usage:
    conformance_compare.py INDEX_JSON EXPECTED_JSON [--label server]
        [--agent NAME] [--cases '1.*,2.*'] [--update]

INDEX_JSON is the index.json kosoku writes into its report directory:
    {AGENT: {CASE_ID: {"behavior": "OK", "behaviorClose": "OK",
                       "remoteCloseCode": 1000, "duration": 3,
                       "reportfile": "..."}}}
EXPECTED_JSON maps CASE_ID -> {"behavior": ..., "behaviorClose": ...}.

Prints one summary line and every difference. Exits 1 on any difference
(changed verdict, expected case missing from the report, reported case
missing from the expectations) or on any FAILED case; exits 2 on bad input.
With --update, (re)writes EXPECTED_JSON from the report instead of comparing
(only the selected cases when --cases is given; the others are kept), and
still exits 1 if any case FAILED.

A case counts as FAILED when its behavior is FAILED, or when its closing
behavior is FAILED or UNCLEAN. kosoku's own ERROR verdict (the case could not
run: connect/handshake failure, crash) is counted separately and also fails.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import sys
import tempfile

ACCEPTABLE = ("OK", "NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED")
CATEGORIES = ("OK", "NON-STRICT", "INFORMATIONAL", "FAILED", "UNIMPLEMENTED")
FAILING_CLOSE = ("FAILED", "UNCLEAN")


def case_key(case_id: str) -> list:
    """Natural order: 1.1.2 < 1.1.10 < 1.2.1 < 10.1.1."""
    return [int(p) if p.isdigit() else p for p in case_id.split(".")]


def category(entry: dict) -> str:
    behavior = entry.get("behavior")
    if behavior == "UNIMPLEMENTED":
        return "UNIMPLEMENTED"
    if behavior == "ERROR":
        return "ERROR"
    if behavior not in ACCEPTABLE or entry.get("behaviorClose") in FAILING_CLOSE:
        return "FAILED"
    return behavior


def verdict(entry: dict | None) -> str:
    if entry is None:
        return "(absent)"
    text = f"behavior={entry.get('behavior')} behaviorClose={entry.get('behaviorClose')}"
    if entry.get("remoteCloseCode", "-") != "-":
        text += f" remoteCloseCode={entry.get('remoteCloseCode')}"
    return text


def die(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def load_report(path: str, agent: str | None) -> dict[str, dict]:
    try:
        with open(path) as f:
            index = json.load(f)
    except FileNotFoundError:
        die(f"report {path} not found (did kosoku run and finish?)")
    except json.JSONDecodeError as e:
        die(f"report {path} is not valid JSON: {e}")
    if not isinstance(index, dict):
        die(f"report {path}: expected an object keyed by agent")
    if agent is not None:
        if agent not in index:
            die(
                f"agent {agent!r} not in {path}; agents present: "
                + (", ".join(repr(a) for a in index) or "none")
            )
        return dict(index[agent])
    # kosoku keys fuzzingclient results by the server's `Server` header, but
    # files cases that could not run (ERROR) under the URL's host:port, so one
    # testee can show up as several agents: merge them.
    merged: dict[str, dict] = {}
    for name, cases in index.items():
        for case_id, entry in cases.items():
            if case_id in merged:
                print(
                    f"warning: case {case_id} reported for several agents; using {name!r}",
                    file=sys.stderr,
                )
            merged[case_id] = entry
    if len(index) > 1:
        print(
            "note: report has several agents (" + ", ".join(repr(a) for a in index)
            + "); merged them",
            file=sys.stderr,
        )
    return merged


def select(ids, patterns: list[str] | None) -> set[str]:
    if not patterns:
        return set(ids)
    return {i for i in ids if any(fnmatch.fnmatchcase(i, p) for p in patterns)}


def write_json_atomic(path: str, data: dict) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".conformance-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("index", help="kosoku index.json")
    ap.add_argument("expected", help="expected-results JSON file")
    ap.add_argument("--label", default="conformance", help="name printed in the summary")
    ap.add_argument("--agent", help="agent section of index.json to read (default: all, merged)")
    ap.add_argument(
        "--cases",
        help="comma-separated case ids or globs (e.g. '1.*,2.*'): compare only these",
    )
    ap.add_argument("--update", action="store_true", help="rewrite EXPECTED from the report")
    args = ap.parse_args()

    patterns = [p.strip() for p in (args.cases or "").split(",") if p.strip()] or None
    report_all = load_report(args.index, args.agent)
    report = {i: report_all[i] for i in select(report_all, patterns)}

    counts = {c: 0 for c in CATEGORIES}
    counts["ERROR"] = 0
    failing = []
    for case_id in sorted(report, key=case_key):
        cat = category(report[case_id])
        counts[cat] += 1
        if cat in ("FAILED", "ERROR"):
            failing.append(case_id)
    summary = f"{args.label}: {len(report)} cases, " + ", ".join(
        f"{counts[c]} {c}" for c in CATEGORIES
    )
    if counts["ERROR"]:
        summary += f", {counts['ERROR']} ERROR"
    print(summary)
    for case_id in failing:
        print(f"  FAILED {case_id}: {verdict(report[case_id])}")

    def strip(entry: dict) -> dict:
        return {"behavior": entry.get("behavior"), "behaviorClose": entry.get("behaviorClose")}

    if args.update:
        expected: dict[str, dict] = {}
        if patterns and os.path.exists(args.expected):
            with open(args.expected) as f:
                expected = {
                    k: v for k, v in json.load(f).items() if k not in select([k], patterns)
                }
        expected.update({k: strip(v) for k, v in report.items()})
        ordered = {k: expected[k] for k in sorted(expected, key=case_key)}
        write_json_atomic(args.expected, ordered)
        print(f"{args.label}: wrote {len(report)} case(s) to {args.expected} ({len(ordered)} in total)")
        return 1 if failing else 0

    if not os.path.exists(args.expected):
        print(
            f"{args.label}: expected-results file {args.expected} is missing.\n"
            "  Create it from this run (review the report first), with either:\n"
            "    CONFORMANCE_UPDATE=1 scripts/conformance.sh\n"
            f"    {sys.argv[0]} {args.index} {args.expected} --update"
        )
        return 1
    try:
        with open(args.expected) as f:
            expected_all = json.load(f)
    except json.JSONDecodeError as e:
        die(f"{args.expected} is not valid JSON: {e}")
    expected = {i: expected_all[i] for i in select(expected_all, patterns)}

    diffs = []
    for case_id in sorted(set(expected) | set(report), key=case_key):
        exp, got = expected.get(case_id), report.get(case_id)
        if exp is not None and got is not None and strip(exp) == strip(got):
            continue
        diffs.append(case_id)
        print(
            f"  DIFF {case_id}: expected "
            + (verdict(strip(exp)) if exp is not None else "(absent)")
            + ", got "
            + (verdict(got) if got is not None else "(not run / not in report)")
        )
    if diffs:
        print(f"{args.label}: {len(diffs)} difference(s) from {args.expected}")
    else:
        print(f"{args.label}: matches {args.expected}")
    return 1 if diffs or failing else 0


if __name__ == "__main__":
    sys.exit(main())
