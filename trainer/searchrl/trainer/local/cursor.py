"""Which training questions come next: :class:`DataCursor`, a seeded permutation per epoch, checkpointed."""

from __future__ import annotations

import numpy as np

from searchrl.errors import InvalidRequest


class DataCursor:
    """Which questions come next: a seeded permutation per epoch, read ``batch_size`` at a time.

    A batch that crosses an epoch boundary takes the rest of the epoch and the start of the next one, so every
    question is seen once per epoch. The state is ``(epoch, position)``; the permutation of epoch ``e`` depends only
    on ``(seed, e)``.

    Raises:
        InvalidRequest: ``n_rows < 1``.
    """

    def __init__(self, n_rows: int, batch_size: int, seed: int, shuffle: bool = True) -> None:
        if n_rows < 1:
            raise InvalidRequest("no training questions")
        self.n_rows, self.batch_size, self.seed, self.shuffle = n_rows, batch_size, seed, shuffle
        self.epoch = 0
        self.position = 0

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n_rows)
        return np.random.default_rng([self.seed, epoch]).permutation(self.n_rows)

    def next_batch(self) -> list[int]:
        """Indices of the next ``batch_size`` questions."""
        out: list[int] = []
        while len(out) < self.batch_size:
            order = self._order(self.epoch)
            take = min(self.batch_size - len(out), self.n_rows - self.position)
            out += [int(i) for i in order[self.position : self.position + take]]
            self.position += take
            if self.position >= self.n_rows:
                self.epoch += 1
                self.position = 0
        return out

    def state_dict(self) -> dict[str, int]:
        """``{"epoch", "position"}``."""
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restores :meth:`state_dict` output."""
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        if self.position >= self.n_rows:  # the data shrank since the checkpoint: start the next epoch
            self.epoch, self.position = self.epoch + 1, 0
