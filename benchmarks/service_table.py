"""Benchmark of the service table: load time, lookups per second, memory per rule.

    python benchmarks/service_table.py [--sizes 1000,100000,1000000] [--out FILE] [--src DIR]

Each size runs in a fresh child process (so RSS deltas are not muddied by memory freed
by the previous size) and the parent prints one JSON document with every result.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from report import emit

SRC = Path(__file__).resolve().parents[1] / "src"

DISTRIBUTION = {
    "prefix_lengths": "15% /256 exact serviceIDs; 85% uniform integer length in 16..128",
    "prefix_bits": "uniformly random leading bits; duplicate (value, length) pairs redrawn",
    "default_rule": "one /0 DROP entry on top of the N prefixes",
    "rules": (
        "one rule per prefix: 80% FORWARD to 1 target, 10% FORWARD to 2-4 targets with"
        " weights 1..10 (weighted pick at lookup), 5% DEMUX, 3% DELAY, 2% DROP"
    ),
    "targets": "drawn from a shared pool of 256 next hops (Target objects are shared)",
    "hit_ids": "a random stored prefix with its remaining bits random (may hit a nested,"
    " longer prefix)",
    "random_ids": "256 uniformly random bits (almost always fall to a short prefix or /0)",
    "lookup_id_layout": "the ID ints are allocated together, in the order the timed loop"
    " reads them, like a just-decoded ID that is still in cache; the entries they hit are"
    " spread uniformly over the whole table (no locality: the worst case for caches)",
}


def _import_table() -> Any:
    try:
        import pyserval.sal.service_table as st
    except ImportError:
        sys.path.insert(0, str(SRC))
        import pyserval.sal.service_table as st
    return st


def rss_bytes() -> int:
    """Current resident set size (Linux /proc); 0 where unavailable."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def malloc_trim() -> bool:
    """glibc's malloc_trim(0): free heap pages back to the OS; False where unavailable."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.malloc_trim(0)) or True
    except (OSError, AttributeError):
        return False


def _draw_prefixes(n: int, rng: random.Random) -> list[tuple[int, int]]:
    """``n`` distinct (value, length) pairs following DISTRIBUTION."""
    seen: set[tuple[int, int]] = set()
    out: list[tuple[int, int]] = []
    while len(out) < n:
        length = 256 if rng.random() < 0.15 else rng.randint(16, 128)
        pair = (rng.getrandbits(length) << (256 - length), length)
        if pair not in seen:
            seen.add(pair)
            out.append(pair)
    return out


def _make_inputs(
    st: Any, pairs: list[tuple[int, int]], rng: random.Random
) -> list[tuple[Any, Any]]:
    """A (prefix, rule) pair for each drawn prefix, rules following DISTRIBUTION."""
    return list(_iter_inputs(st, pairs, rng))


def _iter_inputs(
    st: Any, pairs: list[tuple[int, int]], rng: random.Random
) -> Iterator[tuple[Any, Any]]:
    """:func:`_make_inputs` one pair at a time: every prefix and rule is a new object,
    as when a controller streams its rules in, and only what the table keeps survives."""
    from pyserval.naming.service_id import ServicePrefix

    hops = [st.Target((f"10.{i // 250}.{i % 250}.1", 4000 + i)) for i in range(256)]
    weighted = [st.Target(h.address, w) for h in hops[:32] for w in range(1, 11)]
    listeners = [object() for _ in range(64)]
    for value, length in pairs:
        r = rng.random()
        if r < 0.80:
            rule = st.Rule.forward(rng.choice(hops))
        elif r < 0.90:
            rule = st.Rule.forward(*rng.sample(weighted, rng.randint(2, 4)))
        elif r < 0.95:
            rule = st.Rule.demux(rng.choice(listeners))
        elif r < 0.98:
            rule = st.Rule.delay()
        else:
            rule = st.Rule.drop()
        # A new int for the value too: the caller's prefix is its own object.
        yield ServicePrefix._of(value | 0, length), rule


def _rate(fn: Callable[[Any], Any], items: Sequence[Any], repeat: int) -> dict[str, float]:
    """Calls per second of ``fn`` over ``items`` in a plain for loop (loop cost included)."""
    rates = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for item in items:
            fn(item)
        rates.append(len(items) / (time.perf_counter() - t0))
    return {"best_per_s": round(max(rates)), "median_per_s": round(statistics.median(rates))}


def _trie_depth(table: Any, ids: Sequence[int]) -> float:
    """Average number of trie nodes a lookup visits (re-walks the structure; diagnostic)."""
    visited: int = sum(map(table._nodes_visited, ids))
    return visited / len(ids)


def _paths(table: Any, ids: Sequence[int], repeat: int) -> dict[str, Any]:
    """Where a hit lookup's time goes: its rate on the IDs of each path, and the floor.

    Paths: ``leaf`` (the slot's root is the matching entry, no draw), ``leaf_weighted``
    (the same with a weighted draw), ``deeper`` (two or more nodes: a branch node or a
    nesting entry first, no draw), ``short`` (no trie node matched: the short-prefix
    level answers). ``floor`` reads the index slot and takes a reference to the object it
    holds (the entry's first cache line), and nothing else: what any lookup that starts
    from a flat index and returns the entry pays, whatever the code after it.
    """
    groups: dict[str, list[int]] = {"leaf": [], "leaf_weighted": [], "deeper": [], "short": []}
    for v in ids:
        res = table.lookup_int(v)
        visited = table._nodes_visited(v)
        entry = res.entry
        if entry.prefix.length <= table.stride:
            group = "short"
        elif visited >= 2:
            group = "deeper"
        else:
            group = "leaf" if res is entry else "leaf_weighted"
        groups[group].append(v)
    out: dict[str, Any] = {}
    for name, members in groups.items():
        if members:
            out[name] = {
                "share": round(len(members) / len(ids), 3),
                **_rate(table.lookup_int, members, repeat),
            }
    roots, shift = table._roots, table._slot_shift
    out["floor"] = _rate(lambda v: roots[v >> shift], ids, repeat)
    return out


def run_one(
    size: int, n_lookups: int, repeat: int, seed: int, use_tracemalloc: bool
) -> dict[str, Any]:
    st = _import_table()
    from pyserval.naming.service_id import ServiceID, ServicePrefix

    rng = random.Random(seed)
    pairs = _draw_prefixes(size, rng)
    # The lookup IDs are made right after the prefixes, before the big allocations, so
    # they sit together in memory in the order the loops read them: reading one then costs
    # about what reading a just-decoded ID from a packet costs (it is in cache), and the
    # timings measure the table rather than the benchmark's own list of IDs.
    hit_ids = []
    for _ in range(n_lookups):
        value, length = pairs[rng.randrange(size)]
        hit_ids.append(value | rng.getrandbits(256 - length))
    random_ids = [rng.getrandbits(256) for _ in range(n_lookups)]
    hit_sids = [ServiceID._of(v) for v in hit_ids]
    random_sids = [ServiceID._of(v) for v in random_ids]
    gc.collect()
    rss_ids = rss_bytes()
    inputs = _make_inputs(st, pairs, rng)
    del pairs
    gc.collect()
    rss1 = rss_bytes()

    gc_time = [0.0]
    gc_start = [0.0]

    def on_gc(phase: str, _info: dict[str, int]) -> None:
        if phase == "start":
            gc_start[0] = time.perf_counter()
        else:
            gc_time[0] += time.perf_counter() - gc_start[0]

    table = st.ServiceTable(rng=random.Random(seed + 1))
    gc.callbacks.append(on_gc)
    t0 = time.perf_counter()
    table.add(ServicePrefix.default(), st.Rule.drop())
    add = table.add
    for prefix, rule in inputs:
        add(prefix, rule)
    load_s = time.perf_counter() - t0
    gc.callbacks.remove(on_gc)
    gc.collect()
    rss2 = rss_bytes()
    assert len(table) == size + 1, (len(table), size)

    # Every hit ID must resolve to an entry whose prefix contains it.
    for v in hit_ids[:1000]:
        res = table.lookup_int(v)
        assert res is not None and res.entry.prefix.contains(ServiceID._of(v))

    noop = _rate(lambda v: None, hit_ids, repeat)
    results: dict[str, Any] = {
        "size": size,
        "entries": len(table),
        "rules": table.rule_count,
        "stride_bits": table.stride,
        "load_s": round(load_s, 3),
        "load_rules_per_s": round((size + 1) / load_s),
        "load_s_in_gc": round(gc_time[0], 3),
        "lookups_per_run": n_lookups,
        "lookup_int_hit": _rate(table.lookup_int, hit_ids, repeat),
        "lookup_int_random": _rate(table.lookup_int, random_ids, repeat),
        "lookup_serviceid_hit": _rate(table.lookup, hit_sids, repeat),
        "lookup_serviceid_random": _rate(table.lookup, random_sids, repeat),
        "match_serviceid_hit": _rate(table.match, hit_sids, repeat),
        "empty_python_call_loop": noop,
        "avg_trie_nodes_visited_hit": round(_trie_depth(table, hit_ids[:20000]), 2),
        "avg_trie_nodes_visited_random": round(_trie_depth(table, random_ids[:20000]), 2),
        "lookup_int_hit_by_path": _paths(table, hit_ids[:100_000], repeat),
        "memory": {
            "method": "RSS delta from /proc/self/statm after gc.collect(), fresh process",
            "table_bytes_per_rule": round((rss2 - rss1) / (size + 1), 1),
            "table_note": "RSS growth during the add() calls: entries, trie nodes,"
            " precomputed resolutions, stride arrays (prefix and Rule objects excluded:"
            " they were built before)",
            "inputs_bytes_per_rule": round((rss1 - rss_ids) / size, 1),
            "inputs_note": "RSS growth while building the ServicePrefix and Rule objects,"
            " which the table keeps (the prefix value ints were drawn before and are not"
            " counted: about 60 bytes each)",
            "rss_note": "RSS moves in pages and pymalloc arenas: small sizes are coarse",
        },
    }
    if use_tracemalloc or size <= 100_000:
        del table
        gc.collect()
        tracemalloc.start()
        table = st.ServiceTable(rng=random.Random(seed + 1))
        table.add(ServicePrefix.default(), st.Rule.drop())
        for prefix, rule in inputs:
            table.add(prefix, rule)
        current, _peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        results["memory"]["tracemalloc_table_bytes_per_rule"] = round(current / (size + 1), 1)
        results["memory"]["tracemalloc_note"] = (
            "bytes allocated by a second, identical load traced by tracemalloc (exact"
            " Python allocations of the table, without allocator overhead)"
        )
    return results


def run_all_in(size: int, seed: int, traced: bool) -> dict[str, Any]:
    """Bytes per rule *all in*, in a fresh process: rules streamed into an empty table."""
    st = _import_table()
    from pyserval.naming.service_id import ServicePrefix

    pairs = _draw_prefixes(size, random.Random(seed))
    rng = random.Random(seed + 7)
    gc.collect()
    malloc_trim()  # the same before as after (below), so that only the load is counted
    rss0_untrimmed = rss0 = rss_bytes()
    if traced:
        tracemalloc.start()
    table = st.ServiceTable(rng=random.Random(seed + 1))
    table.add(ServicePrefix.default(), st.Rule.drop())
    t0 = time.perf_counter()
    for prefix, rule in _iter_inputs(st, pairs, rng):
        table.add(prefix, rule)
    load_s = time.perf_counter() - t0
    gc.collect()
    rss_untrimmed = rss_bytes()
    # Freed heap memory that glibc has not handed back yet (the stride lists the table
    # outgrew, the list of entries a regrow walks) is not the table's: give it back first.
    trimmed = malloc_trim()
    rss1 = rss_bytes()
    out: dict[str, Any] = {
        "size": size,
        "method": "fresh process; RSS delta (/proc/self/statm, after gc.collect) over a load"
        " whose prefixes and rules are made one at a time and dropped after add(), as from"
        " a controller: everything the table holds (entries, trie, stride arrays, its copies"
        " of the prefix values, the Rule and Target objects it keeps), nothing the caller"
        " holds; the (value, length) pairs drawn before are excluded",
        "bytes_per_rule": round((rss1 - rss0) / (size + 1), 1),
        "bytes_per_rule_before_malloc_trim": round(
            (rss_untrimmed - rss0_untrimmed) / (size + 1), 1
        ),
        "malloc_trim": trimmed,
        "load_rules_per_s": round((size + 1) / load_s),
        "distinct_rule_sets": len(getattr(table, "_states", {})) or None,
        "goal_bytes_per_rule": 300,
    }
    out["meets_goal"] = out["bytes_per_rule"] <= 300
    if traced:
        current, _peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        out["tracemalloc_bytes_per_rule"] = round(current / (size + 1), 1)
        out["tracemalloc_note"] = (
            "a traced load (RSS then includes tracemalloc's own records: use the traced figure)"
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,100000,1000000")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--lookups", type=int, default=200_000, help="IDs per timed run")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per measurement")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--tracemalloc",
        action="store_true",
        help="also trace a second load with tracemalloc for sizes over 100000 (slow)",
    )
    parser.add_argument(
        "--src", type=Path, default=None, help="import pyserval from this src/ (e.g. main's)"
    )
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--all-in", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.all_in is not None:
        print(json.dumps(run_all_in(args.all_in, args.seed, args.tracemalloc)))
        return 0

    if args.one is not None:
        result = run_one(args.one, args.lookups, args.repeat, args.seed, args.tracemalloc)
        print(json.dumps(result))
        return 0

    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    env = dict(os.environ)
    src = str(args.src) if args.src is not None else str(SRC)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    runs = []
    for size in sizes:
        cmd = [
            sys.executable,
            __file__,
            "--one",
            str(size),
            "--lookups",
            str(args.lookups),
            "--repeat",
            str(args.repeat),
            "--seed",
            str(args.seed),
        ]
        if args.tracemalloc:
            cmd.append("--tracemalloc")
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode:
            sys.stderr.write(done.stderr)
            raise SystemExit(f"benchmark for size {size} failed (exit {done.returncode})")
        result = json.loads(done.stdout)
        traced = [False, True] if args.tracemalloc or size <= 100_000 else [False]
        for trace in traced:
            cmd = [sys.executable, __file__, "--all-in", str(size), "--seed", str(args.seed)]
            if trace:
                cmd.append("--tracemalloc")
            done = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if done.returncode:
                sys.stderr.write(done.stderr)
                raise SystemExit(f"all-in memory run for {size} failed ({done.returncode})")
            key = "all_in_traced" if trace else "all_in"
            result["memory"][key] = json.loads(done.stdout)
        runs.append(result)
    report = {
        "benchmark": "pyserval service table",
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "gc": "enabled (default thresholds)",
        "timing": "time.perf_counter around a plain for loop calling the bound method; best"
        " and median of --repeat runs; the loop and call cost is included (see"
        " empty_python_call_loop for that floor)",
        "src": src,
        "loadavg_at_start": list(os.getloadavg()),
        "distribution": DISTRIBUTION,
        "results": runs,
    }
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
