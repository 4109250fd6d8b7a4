"""CPU fake of SGLang 0.5.23 for searchrl's tests (see ``tests/services/fake_sglang/README.md``)."""

from sglang.srt.entrypoints.engine import Engine

__version__ = "0.5.23+fake"
__all__ = ["Engine"]
