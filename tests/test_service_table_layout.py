"""The service table's memory layout: what its comments promise about block sizes.

A lookup in a big table pays mostly for memory latency, so an entry's key is made to take a
pymalloc block of the entry's own size class (then it is carved from the same pool, right
after the entry). The expectation is CPython's allocator rule: requests are rounded up to a
multiple of 16 bytes, and a GC-tracked object carries a 16-byte header that
``sys.getsizeof`` already counts.
"""

from __future__ import annotations

import sys

from pyserval.sal import Rule, ServiceTable


def _block(size: int) -> int:
    return -(-size // 16) * 16


def test_an_entry_and_its_key_take_blocks_of_one_size_class() -> None:
    table = ServiceTable()
    for prefix in ("ab" * 32, "cd" * 8 + "/64", "ef/8"):
        entry = table.add(prefix, Rule.drop())
        key = entry._key  # the private copy the lookup compares with
        assert key is not None
        assert _block(sys.getsizeof(key)) == _block(sys.getsizeof(entry)) == 80
        # ...and the key still names the prefix.
        assert entry.prefix.value == key & ((1 << 256) - 1)
