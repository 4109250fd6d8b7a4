"""freeze_startup_objects: start-up objects leave the collector's reach, later garbage is still collected."""

from __future__ import annotations

import gc
import weakref

from searchrl.serving.runtime import freeze_startup_objects


class _Node:
    def __init__(self) -> None:
        self.other: _Node | None = None


def test_startup_objects_are_frozen_and_later_cycles_still_collected() -> None:
    startup = [_Node() for _ in range(1000)]
    try:
        frozen = freeze_startup_objects()
        assert frozen == gc.get_freeze_count() and frozen >= len(startup)
        a, b = _Node(), _Node()  # a reference cycle created while serving
        a.other, b.other = b, a
        ref = weakref.ref(a)
        del a, b
        gc.collect()
        assert ref() is None  # collected: only objects alive at freeze time are exempt
        assert gc.get_freeze_count() == frozen
    finally:
        gc.unfreeze()  # give this test process its collector back
