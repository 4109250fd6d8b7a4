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
        # Frozen: in the permanent generation, which gc.get_objects() does not list. (The count is only bounded from
        # below: a service thread left by another test in this process may freeze more objects at any moment.)
        assert frozen >= len(startup) and gc.get_freeze_count() >= frozen
        startup_ids = {id(n) for n in startup}
        assert not any(id(o) in startup_ids for o in gc.get_objects())
        a, b = _Node(), _Node()  # a reference cycle created while serving
        a.other, b.other = b, a
        assert any(o is a for o in gc.get_objects())  # later objects stay in the collector's generations
        ref = weakref.ref(a)
        del a, b
        gc.collect()
        assert ref() is None  # collected: only objects alive at freeze time are exempt
        assert gc.get_freeze_count() >= frozen
    finally:
        gc.unfreeze()  # give this test process its collector back
