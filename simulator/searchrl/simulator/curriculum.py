"""The ZeroSearch noise curriculum and the seeded per-query quality draw.

ZeroSearch (arXiv 2505.04588, section 3.4) raises the share of noisy document sets during training with an exponential
schedule. At step ``i`` of ``m`` the probability that a search gets NOISY documents is::

    p_i = p_s + (b^(i/m) - 1) / (b - 1) * (p_e - p_s)

with base ``b = 4``, start ``p_s = 0`` and end ``p_e = 0.5`` by default: ``p_0 = p_s`` and ``p_m = p_e``, slow at first
and faster towards the end (for ``b > 1``).

The quality of each query is then drawn independently with that probability. The draw is a pure function of
``(seed, query index, query text)`` (a SHA-256 hash seeds a :class:`random.Random`), so replaying a training run with the
same seed gives the same qualities, whatever process or machine serves the request. Seed ``0`` means unseeded: the
draw uses the operating system's randomness.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

__all__ = [
    "Curriculum",
    "Quality",
    "curriculum_noise_probability",
    "draw_qualities",
    "draw_quality",
    "validate_noise_probability",
]

_SYSTEM_RANDOM = random.SystemRandom()


class Quality(str, Enum):
    """Quality of a simulated document set (ZeroSearch's prompt word)."""

    USEFUL = "useful"
    NOISY = "noisy"


def validate_noise_probability(p: float) -> float:
    """Checks a noise probability.

    Args:
        p: probability that a query gets NOISY documents.

    Returns:
        ``p`` as a float.

    Raises:
        ValueError: ``p`` is NaN or outside [0, 1].
    """
    value = float(p)
    if math.isnan(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"noise probability must be in [0, 1], got {p}")
    return value


def curriculum_noise_probability(
    step: int, total_steps: int, start: float = 0.0, end: float = 0.5, base: float = 4.0
) -> float:
    """Noise probability ``p_i`` of the ZeroSearch curriculum (arXiv 2505.04588, section 3.4).

    ``p_i = p_s + (b^(i/m) - 1) / (b - 1) * (p_e - p_s)``; for ``b = 1`` the limit, the linear ramp
    ``p_s + (i/m) * (p_e - p_s)``, is used.

    Args:
        step: training step ``i``, ``0 <= step <= total_steps``.
        total_steps: total number of steps ``m`` (> 0).
        start: ``p_s``, the noise probability at step 0, in [0, 1].
        end: ``p_e``, the noise probability at the last step, in [0, 1].
        base: ``b`` (> 0); larger values keep the noise low for longer.

    Returns:
        The noise probability, in [0, 1].

    Raises:
        ValueError: a step outside [0, total_steps], ``total_steps <= 0``, ``base <= 0`` or a probability outside [0, 1].
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    if not 0 <= step <= total_steps:
        raise ValueError(f"step must be in [0, total_steps={total_steps}], got {step}")
    if not base > 0 or math.isinf(base):
        raise ValueError(f"curriculum base must be a finite number > 0, got {base}")
    validate_noise_probability(start)
    validate_noise_probability(end)
    frac = step / total_steps
    ramp = frac if math.isclose(base, 1.0) else (base**frac - 1.0) / (base - 1.0)
    return min(1.0, max(0.0, start + ramp * (end - start)))


@dataclass(frozen=True)
class Curriculum:
    """The schedule's parameters; see :func:`curriculum_noise_probability`.

    Attributes:
        start: ``p_s`` (ZeroSearch default 0).
        end: ``p_e`` (ZeroSearch default 0.5).
        base: ``b`` (ZeroSearch default 4).
    """

    start: float = 0.0
    end: float = 0.5
    base: float = 4.0

    def __post_init__(self) -> None:
        curriculum_noise_probability(0, 1, self.start, self.end, self.base)  # validates the parameters

    def noise_probability(self, step: int, total_steps: int) -> float:
        """``p_i`` at ``step`` of ``total_steps``.

        Raises:
            ValueError: see :func:`curriculum_noise_probability`.
        """
        return curriculum_noise_probability(step, total_steps, self.start, self.end, self.base)


def _uniform(seed: int, index: int, query: str) -> float:
    """A uniform number in [0, 1) that depends only on ``(seed, index, query)``; OS randomness when ``seed == 0``."""
    if seed == 0:
        return _SYSTEM_RANDOM.random()
    digest = hashlib.sha256(f"{seed}\x1f{index}\x1f{query}".encode()).digest()
    return random.Random(int.from_bytes(digest[:16], "big")).random()


def draw_quality(noise_probability: float, seed: int, query: str, index: int = 0) -> Quality:
    """Draws the quality of one query's document set.

    Args:
        noise_probability: probability of NOISY, in [0, 1].
        seed: replay seed (an unsigned 64-bit integer); 0 draws from the operating system's randomness.
        query: the query text (part of the hash).
        index: the query's position in its request (part of the hash, so repeated queries draw independently).

    Returns:
        ``Quality.NOISY`` with probability ``noise_probability``, else ``Quality.USEFUL``.

    Raises:
        ValueError: ``noise_probability`` outside [0, 1] or a negative seed.
    """
    p = validate_noise_probability(noise_probability)
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    return Quality.NOISY if _uniform(seed, index, query) < p else Quality.USEFUL


def draw_qualities(queries: Sequence[str], noise_probability: float, seed: int) -> list[Quality]:
    """Draws one quality per query (index ``i`` of ``queries`` is part of the hash of query ``i``).

    Args:
        queries: the request's queries, in order.
        noise_probability: probability of NOISY per query, in [0, 1].
        seed: replay seed; 0 means unseeded.

    Returns:
        One :class:`Quality` per query, in order.

    Raises:
        ValueError: see :func:`draw_quality`.
    """
    return [draw_quality(noise_probability, seed, q, i) for i, q in enumerate(queries)]
