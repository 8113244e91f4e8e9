"""The regression suite: the benchmarks a refactoring must leave "within noise", A/B in one run.

    python benchmarks/suite.py [--tree before=/old/checkout/src --tree after=src]
        [--reps 5] [--quick] [--only stream_mss1408,connect,...] [--out FILE]

Runs each case below as its own child process (its own spawned processes inside) with
``PYTHONPATH`` set to a tree's ``src/``, interleaved: for every repetition, every case
runs once per tree, in the order the trees were given (A, B, A, B, ...), so that load
that comes and goes on the machine falls on both. The benchmark scripts are this
checkout's for every tree; they use only ``pyserval``'s public API, ``pyserval.sal`` and
``pyserval.naming`` (and ``pyserval.runtime.udp`` for the bare relay), so they run against
trees with another internal layout. Without ``--tree`` the suite measures this checkout
(``this=<checkout>/src``).

Cases (the figures of issue 13's "benchmarks/ figures within noise of before"):

* ``stream_mss1408``, ``stream_default``: one stream, 1,408-byte segments and the host
  default, checked by SHA-256 (``suite_cases.py stream``): MB/s and CPU per MB;
* ``connect``: sequential connections per second, their median set-up time and CPU per
  connection (``suite_cases.py connect``);
* ``forwarding``: SYNs/s through a one-rule router and a bare relay with the same batched
  reads, the ratio by rate and by CPU per SYN (``suite_cases.py forwarding``);
* ``service_table``: lookups/s at 1M rules (200,000 with ``--quick``), load rate, table
  bytes per rule (``service_table.py --one``) and bytes per rule all in (``--all-in``);
* ``syn_flood``: a forged-SYN flood straight at an instance and through a router:
  legitimate connects that succeeded during and after it, the instance's RSS growth
  (``syn_flood.py``);
* ``scaling``: ``scaling.py --quick`` (1 to 1,000 streams, a 100,000-rule router).

Printed and written (``--out``) as one JSON document: per case and figure, per tree the
values, median, min, max and spread (max - min, in % of the median), and for two or more
trees the ratio of each later tree's median to the first's (B/A): "within noise" when it
is inside the larger of the two spreads (or ``--noise-floor``, 2%), else "better" or
"worse". Rates (MB/s, per second) move with whatever else runs on the machine; the CPU
time per unit of work (``cpu_us_per_*``, both processes, over the measured interval) moves
much less, and is the figure to read on a busy machine. A summary table goes to stderr.
A run that fails (a crash, a failed data check) is listed under ``failures`` and leaves
its figures out; the suite goes on.

``--quick`` shortens every case (1 s runs, smaller flood and table; 3 repetitions by
default): about a minute per repetition and tree on a quiet 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from report import emit

HERE = Path(__file__).resolve().parent
Figures = dict[str, tuple[float, str]]  # name -> (value, "higher" or "lower" is better)


@dataclass(frozen=True)
class Case:
    """One benchmark process to run per tree and repetition, and how to read its JSON."""

    name: str
    argv: Callable[[bool], list[list[str]]]  # quick -> the commands (script, args...)
    figures: Callable[[list[Any]], Figures]  # the parsed outputs, in order -> figures
    timeout: float = 600.0


def _stream(mss: int) -> Case:
    def argv(quick: bool) -> list[list[str]]:
        seconds = "1" if quick else "3"
        return [["suite_cases.py", "stream", "--mss", str(mss), "--seconds", seconds]]

    def figures(outs: list[Any]) -> Figures:
        return {
            "mb_per_s": (outs[0]["mb_per_s"], "higher"),
            "cpu_us_per_mb": (outs[0]["cpu_us_per_mb"], "lower"),
        }

    return Case(f"stream_mss{mss}" if mss else "stream_default", argv, figures)


def _connect_figures(outs: list[Any]) -> Figures:
    o = outs[0]
    return {
        "per_s": (o["per_s"], "higher"),
        "median_us": (o["latency_us"]["median"], "lower"),
        "cpu_us_per_connection": (o["cpu_us_per_connection"], "lower"),
    }


def _forwarding_figures(outs: list[Any]) -> Figures:
    o = outs[0]
    return {
        "router_per_s": (o["router"]["per_s"], "higher"),
        "relay_per_s": (o["relay"]["per_s"], "higher"),
        "router_vs_relay": (o["router_vs_relay"], "higher"),
        "router_vs_relay_by_cpu": (o["router_vs_relay_by_cpu"], "higher"),
        "router_cpu_us_per_syn": (o["router"]["dut_cpu_us_per_syn"], "lower"),
    }


def _table_size(quick: bool) -> str:
    return "200000" if quick else "1000000"


def _table_argv(quick: bool) -> list[list[str]]:
    size = _table_size(quick)
    return [
        ["service_table.py", "--one", size, "--lookups", "200000", "--repeat", "3"],
        ["service_table.py", "--all-in", size],
    ]


def _table_figures(outs: list[Any]) -> Figures:
    one, all_in = outs
    return {
        "lookup_int_hit_per_s": (one["lookup_int_hit"]["median_per_s"], "higher"),
        "lookup_serviceid_hit_per_s": (one["lookup_serviceid_hit"]["median_per_s"], "higher"),
        "load_rules_per_s": (one["load_rules_per_s"], "higher"),
        "table_bytes_per_rule": (one["memory"]["table_bytes_per_rule"], "lower"),
        "all_in_bytes_per_rule": (all_in["bytes_per_rule"], "lower"),
    }


def _flood_argv(quick: bool) -> list[list[str]]:
    if quick:
        return [["syn_flood.py", "--syns", "20000", "--seconds", "2"]]
    return [["syn_flood.py", "--syns", "100000", "--seconds", "5"]]


def _flood_figures(outs: list[Any]) -> Figures:
    out: Figures = {}
    for run in outs[0]:
        via = run["via"]
        out[f"{via}_legit_during_ok_share"] = (
            run["legit_during_ok"] / max(run["legit_during"], 1),
            "higher",
        )
        out[f"{via}_legit_after_ok_share"] = (
            run["legit_after_ok"] / max(run["legit_after"], 1),
            "higher",
        )
        out[f"{via}_instance_rss_growth_mb"] = (run["instance_rss_growth"] / 1e6, "lower")
    return out


def _scaling_figures(outs: list[Any]) -> Figures:
    o = outs[0]
    out: Figures = {}
    for n, s in o["streams_summary"].items():
        out[f"streams{n}_mb_per_s"] = (s["mb_per_s"], "higher")
        out[f"streams{n}_cpu_us_per_mb"] = (s["cpu_us_per_mb"], "lower")
        if s["ping_p99_us"] is not None:
            out[f"streams{n}_ping_p99_us"] = (s["ping_p99_us"], "lower")
        if int(n) >= 100:  # RSS moves in 4 KiB pages: per connection of a few, noise
            out[f"streams{n}_rss_per_conn_client"] = (s["rss_per_conn_client_idle"], "lower")
            out[f"streams{n}_rss_per_conn_server"] = (s["rss_per_conn_server_idle"], "lower")
    r = o["router_summary"]
    out["router_big_per_s"] = (r["per_s_big"], "higher")
    out["router_big_vs_one_rule"] = (r["big_vs_one_rule"], "higher")
    out["router_big_cpu_us_per_syn"] = (r["cpu_us_per_syn_big"], "lower")
    out["router_rss_bytes_per_rule"] = (r["rss_bytes_per_rule"], "lower")
    return out


CASES: list[Case] = [
    _stream(1408),
    _stream(0),
    Case(
        "connect",
        lambda q: [["suite_cases.py", "connect", "--seconds", "1" if q else "3"]],
        _connect_figures,
    ),
    Case(
        "forwarding",
        lambda q: [["suite_cases.py", "forwarding", "--seconds", "1" if q else "3"]],
        _forwarding_figures,
    ),
    Case("service_table", _table_argv, _table_figures),
    Case("syn_flood", _flood_argv, _flood_figures),
    Case("scaling", lambda q: [["scaling.py", "--quick"]], _scaling_figures),
]


# -- trees and runs -------------------------------------------------------------------------


def tree_src(path: str) -> Path:
    """The ``src/`` directory for a ``--tree`` path: given as ``src/`` or as the checkout."""
    p = Path(path).expanduser().resolve()
    if (p / "pyserval" / "__init__.py").is_file():
        return p
    if (p / "src" / "pyserval" / "__init__.py").is_file():
        return p / "src"
    raise SystemExit(f"no pyserval package under {path} (give a checkout or its src/)")


def child_env(src: Path) -> dict[str, str]:
    """The environment of a benchmark process for the tree at ``src``: its ``src`` first
    on PYTHONPATH, no PYSERVAL_* settings of the caller's (a host reads them)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYSERVAL_")}
    env["PYTHONPATH"] = str(src)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def describe_tree(src: Path) -> dict[str, Any]:
    """Where the tree's pyserval is imported from (checked) and its git commit if any."""
    done = subprocess.run(
        [sys.executable, "-c", "import pyserval; print(pyserval.__file__)"],
        env=child_env(src),
        capture_output=True,
        text=True,
        cwd=HERE,
        timeout=60,
    )
    if done.returncode:
        raise SystemExit(f"import pyserval from {src} failed:\n{done.stderr}")
    imported = Path(done.stdout.strip()).resolve()
    if src not in imported.parents:
        raise SystemExit(f"PYTHONPATH={src} imports pyserval from {imported}, not from the tree")
    commit = subprocess.run(
        ["git", "-C", str(src), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
    )
    dirty = subprocess.run(
        ["git", "-C", str(src), "status", "--porcelain", "--", "."],
        capture_output=True,
        text=True,
    )
    return {
        "src": str(src),
        "pyserval": str(imported),
        "git_commit": commit.stdout.strip() or None,
        "git_uncommitted_changes": bool(dirty.stdout.strip()) if not commit.returncode else None,
    }


def run_case(case: Case, src: Path, quick: bool) -> tuple[Figures | None, str | None, float]:
    """Run ``case`` against the tree at ``src``: (figures, None) or (None, why it failed),
    and the wall-clock seconds it took."""
    t0 = time.monotonic()
    outs: list[Any] = []
    for command in case.argv(quick):
        script, *args = command
        try:
            done = subprocess.run(
                [sys.executable, str(HERE / script), *args],
                env=child_env(src),
                capture_output=True,
                text=True,
                cwd=HERE,
                timeout=case.timeout,
            )
        except subprocess.TimeoutExpired:
            return None, f"{script} timed out after {case.timeout} s", time.monotonic() - t0
        try:
            parsed = json.loads(done.stdout)
        except json.JSONDecodeError:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            why = f"{script} exited {done.returncode}: {' | '.join(tail)}"
            return None, why, time.monotonic() - t0
        if done.returncode:
            return (
                None,
                f"{script} exited {done.returncode} (a data check failed)",
                (time.monotonic() - t0),
            )
        outs.append(parsed)
    try:
        figures = case.figures(outs)
    except (KeyError, TypeError, ZeroDivisionError) as exc:
        return None, f"unexpected output ({type(exc).__name__}: {exc})", time.monotonic() - t0
    return figures, None, time.monotonic() - t0


def summarize(values: list[float]) -> dict[str, Any]:
    """Median, range and spread (range in % of the median) of one figure's values."""
    med = statistics.median(values)
    lo, hi = min(values), max(values)
    return {
        "values": values,
        "median": round(med, 4),
        "min": lo,
        "max": hi,
        "spread_pct": round((hi - lo) / abs(med) * 100, 1) if med else None,
    }


def compare(
    per_tree: dict[str, list[float]], better: str, trees: list[str], floor: float = 2.0
) -> dict[str, Any]:
    """Per tree summaries and, against the first tree, each other tree's ratio of medians."""
    out: dict[str, Any] = {"better": better}
    stats = {t: summarize(v) for t, v in per_tree.items() if v}
    out["trees"] = stats
    base = trees[0]
    for other in trees[1:]:
        if base not in stats or other not in stats or not stats[base]["median"]:
            continue
        ratio = stats[other]["median"] / stats[base]["median"]
        spreads = [stats[t]["spread_pct"] for t in (base, other)]
        noise = max((s for s in spreads if s is not None), default=floor)
        noise = max(noise, floor)
        # Which way is good depends on the figure: show it as "better"/"worse".
        gain = ratio - 1 if better == "higher" else 1 - ratio
        out[f"ratio_{other}_vs_{base}"] = round(ratio, 3)
        out[f"change_{other}_vs_{base}"] = (
            "within noise" if abs(ratio - 1) * 100 <= noise else ("better" if gain > 0 else "worse")
        )
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the suite; print the JSON (and a table on stderr); exit 1 if any run failed."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--tree",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="a source tree to measure (its src/ or checkout); repeat for A/B; the first"
        " is the base of the ratios",
    )
    parser.add_argument("--reps", type=int, default=None, help="repetitions (5; quick: 3)")
    parser.add_argument("--quick", action="store_true", help="short runs (see the docstring)")
    parser.add_argument(
        "--only", default=None, help=f"comma-separated subset of {','.join(c.name for c in CASES)}"
    )
    parser.add_argument(
        "--noise-floor",
        type=float,
        default=2.0,
        help="a change of at most this many %% is always 'within noise' (default 2)",
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    reps = args.reps if args.reps is not None else (3 if args.quick else 5)
    specs = args.tree or [f"this={HERE.parent / 'src'}"]
    trees: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            parser.error(f"--tree wants NAME=PATH, got {spec!r}")
        if name in trees:
            parser.error(f"tree name {name!r} given twice")
        trees[name] = tree_src(path)
    cases = CASES
    if args.only:
        wanted = [w.strip() for w in args.only.split(",") if w.strip()]
        unknown = set(wanted) - {c.name for c in CASES}
        if unknown:
            parser.error(f"unknown case(s): {', '.join(sorted(unknown))}")
        cases = [c for c in CASES if c.name in wanted]

    report: dict[str, Any] = {
        "benchmark": "pyserval regression suite (A/B interleaved, loopback)",
        "settings": {
            "quick": args.quick,
            "reps": reps,
            "order": "for each repetition, for each case, each tree in the order given",
            "cases": [c.name for c in cases],
            "python": sys.version.split()[0],
            "cpu_count": os.cpu_count(),
            "noise": "spread_pct = (max - min) / median of a tree's values; a ratio is"
            " 'within noise' when |ratio - 1| is at most the larger spread of the two trees"
            f" (and at least {args.noise_floor}%)",
        },
        "trees": {name: describe_tree(src) for name, src in trees.items()},
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    values: dict[str, dict[str, dict[str, list[float]]]] = {}
    better: dict[str, dict[str, str]] = {}
    runs: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    started = time.monotonic()
    for rep in range(reps):
        for case in cases:
            for name, src in trees.items():
                figures, error, seconds = run_case(case, src, args.quick)
                entry = {
                    "rep": rep,
                    "case": case.name,
                    "tree": name,
                    "seconds": round(seconds, 1),
                    "loadavg_1min": round(os.getloadavg()[0], 2),
                }
                if error is not None:
                    failures.append({**entry, "error": error})
                    print(f"[{rep}] {case.name} {name}: FAILED: {error}", file=sys.stderr)
                else:
                    assert figures is not None
                    for fig, (value, way) in figures.items():
                        if value is None or value != value:  # not measured (None, NaN)
                            continue
                        per_case = values.setdefault(case.name, {}).setdefault(fig, {})
                        per_case.setdefault(name, []).append(value)
                        better.setdefault(case.name, {})[fig] = way
                    entry["figures"] = {k: v for k, (v, _w) in figures.items()}
                    print(f"[{rep}] {case.name} {name}: {seconds:.1f} s", file=sys.stderr)
                runs.append(entry)
    names = list(trees)
    report["figures"] = {
        case: {
            fig: compare(per_tree, better[case][fig], names, args.noise_floor)
            for fig, per_tree in figs.items()
        }
        for case, figs in values.items()
    }
    report["failures"] = failures
    report["runs"] = runs
    report["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    report["wall_seconds"] = round(time.monotonic() - started, 1)
    emit(report, args.out)
    print_table(report, names, sys.stderr)
    return 1 if failures else 0


def print_table(report: dict[str, Any], names: list[str], file: Any) -> None:
    """The figures as a table: per tree median and spread, and the ratio to the first."""
    head = f"{'case':<15} {'figure':<34}"
    for name in names:
        head += f" {name + ' median':>16} {'spread%':>8}"
    for name in names[1:]:
        head += f" {name + '/' + names[0]:>14}  change"
    print(head, file=file)
    for case, figs in report["figures"].items():
        for fig, c in figs.items():
            line = f"{case:<15} {fig:<34}"
            for name in names:
                s = c["trees"].get(name)
                if s is None:
                    line += f" {'-':>16} {'-':>8}"
                else:
                    spread = "-" if s["spread_pct"] is None else f"{s['spread_pct']:.1f}"
                    line += f" {s['median']:>16.6g} {spread:>8}"
            for name in names[1:]:
                ratio = c.get(f"ratio_{name}_vs_{names[0]}")
                change = c.get(f"change_{name}_vs_{names[0]}", "")
                line += f" {'-' if ratio is None else f'{ratio:.3f}':>14}  {change}"
            print(line, file=file)


if __name__ == "__main__":
    sys.exit(main())
