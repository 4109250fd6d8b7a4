"""Guard rails for GRPO runs: stop or alert on reward collapse, silent search failure and KL explosion.

Users of the anchors report GRPO collapsing mid-training and tool-call parsers silently disabling search (REFERENCE.md,
complaints 4 and 7); neither ReSearch nor Search-R1 watch for it. Each guard is checked once per step on the step's
aggregate metrics and exported as the Prometheus gauge ``searchrl_train_guard_tripped{guard}`` (1 on a step where it
tripped, else 0), which the chart's PrometheusRule alerts on.

Guards:
    * ``reward_collapse``: the batch mean reward is more than ``drop`` below the maximum of the previous ``window``
      steps' means.
    * ``no_search``: no episode made a search for ``steps`` consecutive steps.
    * ``search_failure``: more than ``max_ratio`` of a step's searches failed or timed out (stops by default).
    * ``kl_explosion``: the mean per-token KL to the reference exceeds ``max_kl``.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from searchrl.errors import InvalidRequest, Unavailable
from searchrl.trainer.config import GuardsConfig

log = logging.getLogger(__name__)

GUARDS = ("reward_collapse", "no_search", "kl_explosion", "search_failure")


@dataclass(frozen=True)
class GuardEvent:
    """One guard tripping at one step.

    Attributes:
        guard: ``reward_collapse``, ``no_search`` or ``kl_explosion``.
        step: the training step (1-based).
        action: ``warn`` or ``stop``.
        message: what was observed, for logs and the run summary.
    """

    guard: str
    step: int
    action: str
    message: str


class Guards:
    """Stateful checks over the step metrics; its state is saved in checkpoints so a resumed run keeps its history."""

    def __init__(self, config: GuardsConfig) -> None:
        self.config = config
        self._rewards: deque[float] = deque(maxlen=config.reward_collapse.window)
        self._no_search_streak = 0
        self.tripped: dict[str, bool] = dict.fromkeys(GUARDS, False)

    def _action(self, override: str | None) -> str:
        return override or self.config.action

    def update(
        self,
        step: int,
        *,
        reward_mean: float,
        searches_per_episode: float,
        kl: float,
        searches: int = 0,
        failed_searches: int = 0,
    ) -> list[GuardEvent]:
        """Checks one finished step.

        Args:
            step: the step number.
            reward_mean: mean reward over the step's episodes.
            searches_per_episode: mean number of searches per episode.
            kl: mean per-token KL to the reference (nats).
            searches: searches made in the step (valid queries sent to a backend).
            failed_searches: how many of them failed (backend error or timeout).

        Returns:
            The guards that tripped at this step (empty when all is well); :attr:`tripped` holds the same as flags.
        """
        events: list[GuardEvent] = []
        cfg = self.config
        self.tripped = dict.fromkeys(GUARDS, False)

        rc = cfg.reward_collapse
        if rc.enabled and self._rewards:
            best = max(self._rewards)
            if best - reward_mean > rc.drop:
                events.append(
                    GuardEvent(
                        "reward_collapse",
                        step,
                        self._action(rc.action),
                        f"mean reward {reward_mean:.4f} is {best - reward_mean:.4f} below the max {best:.4f} of the last "
                        f"{len(self._rewards)} steps (threshold {rc.drop})",
                    )
                )
        self._rewards.append(reward_mean)

        ns = cfg.no_search
        self._no_search_streak = self._no_search_streak + 1 if searches_per_episode <= 0 else 0
        if ns.enabled and self._no_search_streak >= ns.steps:
            events.append(
                GuardEvent(
                    "no_search",
                    step,
                    self._action(ns.action),
                    f"no episode searched in {self._no_search_streak} consecutive steps: check the search tags / tool "
                    "parser and the search backend",
                )
            )

        ke = cfg.kl_explosion
        if ke.enabled and kl > ke.max_kl:
            events.append(
                GuardEvent(
                    "kl_explosion", step, self._action(ke.action), f"mean KL to the reference {kl:.4f} > {ke.max_kl}"
                )
            )

        sf = cfg.search_failure
        if sf.enabled and searches >= sf.min_searches and failed_searches / searches > sf.max_ratio:
            events.append(
                GuardEvent(
                    "search_failure",
                    step,
                    self._action(sf.action),
                    f"{failed_searches} of {searches} searches failed or timed out "
                    f"({failed_searches / searches:.0%} > {sf.max_ratio:.0%}): the episodes saw error messages instead "
                    "of documents; check the search services",
                )
            )

        for ev in events:
            self.tripped[ev.guard] = True
            log.warning("guard %s tripped at step %d (%s): %s", ev.guard, ev.step, ev.action, ev.message)
        return events

    def state_dict(self) -> dict[str, Any]:
        """Serialisable state (for checkpoints)."""
        return {"rewards": list(self._rewards), "no_search_streak": self._no_search_streak}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores :meth:`state_dict` output."""
        self._rewards = deque((float(x) for x in state.get("rewards", [])), maxlen=self.config.reward_collapse.window)
        self._no_search_streak = int(state.get("no_search_streak", 0))


class SearchFailuresExceeded(Unavailable):
    """Too many searches failed: training on these rollouts would teach the policy from error messages."""


class SearchFailureWindow:
    """The share of failed searches over the last ``window`` searches, for trainers that see episodes one by one.

    verl's agent-loop workers run episodes independently, so the per-step :class:`Guards` check of the local trainer
    has no step to look at there. This window is fed after every episode and raises once the share of failed
    searches (service errors and timeouts, :attr:`SearchRecord.failed`) among the last ``window`` searches
    exceeds ``max_ratio``; the exception fails the rollout, which fails the verl step and the RayJob, with a message
    that says why, instead of letting GRPO train on error observations.

    Args:
        max_ratio: share of failed searches tolerated, in [0, 1] (``SEARCHRL_MAX_SEARCH_FAILURE_RATIO``, 0.2).
        window: how many of the most recent searches are judged (``SEARCHRL_SEARCH_FAILURE_WINDOW``, 200).
        min_searches: no verdict before this many searches were seen (20).

    Raises:
        InvalidRequest: (constructor) a ratio outside [0, 1] or a window smaller than ``min_searches``.
    """

    def __init__(self, max_ratio: float = 0.2, window: int = 200, min_searches: int = 20) -> None:
        if not 0 <= max_ratio <= 1:
            raise InvalidRequest(f"max search failure ratio must be in [0, 1], got {max_ratio}")
        if min_searches < 1 or window < min_searches:
            raise InvalidRequest(f"need 1 <= min_searches <= window, got {min_searches} and {window}")
        self.max_ratio = max_ratio
        self.min_searches = min_searches
        self._recent: deque[bool] = deque(maxlen=window)
        self.searches = 0
        self.failures = 0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> SearchFailureWindow:
        """Settings from ``SEARCHRL_MAX_SEARCH_FAILURE_RATIO`` and ``SEARCHRL_SEARCH_FAILURE_WINDOW``.

        Raises:
            InvalidRequest: a value that is not a number or out of range.
        """
        env = os.environ if environ is None else environ
        try:
            ratio = float(env.get("SEARCHRL_MAX_SEARCH_FAILURE_RATIO", "0.2"))
            window = int(env.get("SEARCHRL_SEARCH_FAILURE_WINDOW", "200"))
        except ValueError as exc:
            raise InvalidRequest(f"bad search failure setting: {exc}") from None
        return cls(max_ratio=ratio, window=window, min_searches=min(20, window))

    @property
    def ratio(self) -> float:
        """Share of failed searches in the window (0.0 when empty)."""
        return sum(self._recent) / len(self._recent) if self._recent else 0.0

    def record(self, failed: Iterable[bool]) -> None:
        """Adds one episode's searches (``True`` for each failed one).

        Raises:
            SearchFailuresExceeded: the window holds at least ``min_searches`` searches and more than ``max_ratio``
                of them failed.
        """
        for f in failed:
            self._recent.append(bool(f))
            self.searches += 1
            self.failures += int(bool(f))
        if len(self._recent) >= self.min_searches and self.ratio > self.max_ratio:
            raise SearchFailuresExceeded(
                f"{sum(self._recent)} of the last {len(self._recent)} searches failed or timed out "
                f"({self.ratio:.0%} > SEARCHRL_MAX_SEARCH_FAILURE_RATIO={self.max_ratio:g}): the search services are "
                "down, unreachable (TLS/auth settings?) or too slow; stopping rather than training on error messages"
            )
