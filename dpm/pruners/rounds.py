"""Selection rounds: where a round-based base pruner (DepGraph) meets the DPM decay controller.

A training-loop hook (see `dpm.train.StepHook`). Round r starts at fine-tune iteration
r * interval: the base pruner selects channels on the current weights up to the round's share of
the speed-up (never decaying, pruned or cooling-down released ones), the selection enters the
decay controller (step 1 at once), the decay runs for N steps while training continues, and once
every admitted channel is zero they are removed physically with the optimizer state sliced, not
reset. N = 1 removes at the start of the round: Torch-Pruning's one-shot recipe when R = 1.
"""

from __future__ import annotations

import logging
from typing import Hashable

import torch

from dpm import distributed
from dpm.core import DecayController, RectifyConfig, Target
from dpm.faults import fault_point
from dpm.pruners.protocol import RoundPruner

log = logging.getLogger(__name__)


class PruningRounds:
    """Drives R selection rounds of `pruner` with a DecayController over one training phase.

    Args:
        model: the live model (pruned in place).
        pruner: the selection-and-removal algorithm (:class:`~dpm.pruners.protocol.RoundPruner`:
            DepGraphPruner).
        speedup: the MACs speed-up target in the pruner's native units, relative to the model the
            pruner was built on.
        rounds: R; round r (1-based) selects up to speedup ** (r / R).
        interval: optimizer iterations between round starts.
        N, decay_interval, schedule, include_consumers: the decay (docs/method.md section 3).
        rectify: Self-Rectifying settings, or None (+SP / base).
        release_cooldown: rounds a released channel stays out of selection (None: the rest of the
            round it was released in).
        max_extra_rounds: with SR, rounds added after R while the target is not met.
        total_steps: the phase's iterations. With SR, a round's releases can leave the target unmet
            (budget=base has no substitute): after R rounds a make-up round starts as soon as no
            decay is in flight, and when no decay of N steps fits any more (or the extra rounds
            are used up) the channels still missing are removed at once, as the base method would,
            so the final MACs meet the target, SR on or off (docs/method.md invariant 6).
        track: targets whose norm trajectory the controller logs (None: all).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        pruner: RoundPruner,
        *,
        speedup: float,
        rounds: int,
        interval: int,
        N: int,
        decay_interval: int = 1,
        schedule: str = "linear",
        include_consumers: bool = False,
        rectify: RectifyConfig | None = None,
        max_extra_rounds: int = 10,
        total_steps: int | None = None,
        track: int | None = 8,
    ):
        self.model, self.pruner = model, pruner
        self.speedup, self.rounds, self.interval = speedup, rounds, interval
        self.include_consumers = include_consumers
        self.max_extra_rounds, self.total_steps = max_extra_rounds, total_steps
        self.decay_steps = N * decay_interval
        self.controller = DecayController(
            model,
            N,
            interval=decay_interval,
            schedule=schedule,
            rectify=rectify,
            include_consumers=include_consumers,
            replacement=self.replacement,
            track=track,
        )
        self.iteration = 0  # optimizer iterations seen in this phase
        self.rounds_done = 0
        self.next_round_at = 0
        self.admitted = 0
        self.removed = 0
        self.removals: list[dict] = []
        self.closed = False  # the one-step removal after the make-up rounds has run

    # ------------------------------------------------------------------ hook
    def step_start(self, optimizer: torch.optim.Optimizer) -> None:
        # A round waits for the previous one's decay to end: selection sees no decaying channel.
        if self.controller.decaying:
            return
        if self.rounds_done < self.rounds:
            if self.iteration >= self.next_round_at:
                self._start_round(optimizer)
            return
        if self.closed or not self._short_of_target():
            return
        # Past R, only SR's releases leave the target unmet: make up for them at once.
        late = self.total_steps is not None and self.iteration + self.decay_steps > self.total_steps
        if self.rounds_done < self.rounds + self.max_extra_rounds and not late:
            self._start_round(optimizer)
        else:
            self._remove_now(optimizer)

    def before_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.controller.before_step(optimizer)

    def after_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.controller.after_step(optimizer)
        self.iteration += 1
        self._remove_if_done(optimizer)

    # ------------------------------------------------------------------ rounds
    def current_speedup(self) -> float:
        return self.pruner.base_native[0] / self.pruner.native_macs_params()[0]

    def _short_of_target(self) -> bool:
        return self.controller.rectify is not None and self.current_speedup() < self.speedup * (1 - 1e-9)

    def _start_round(self, optimizer: torch.optim.Optimizer) -> None:
        self.controller.start_round()
        self.rounds_done += 1
        share = min(self.rounds_done, self.rounds) / self.rounds
        target = self.speedup**share
        # Register every channel (the C_len families), then admit the selection.
        candidates = self.candidates()
        self.controller.register(
            t for k, t in candidates.items() if self.controller.status(k) not in ("decaying", "pruned")
        )
        keys = self.pruner.select(target, excluded=self.controller.candidates_excluded())
        # DDP: the weights are equal on every rank, so is the selection; rank 0's is used regardless.
        keys = distributed.broadcast_object(keys)
        log.info(
            "round %d: %d channels selected for %.3fx (now %.3fx)",
            self.rounds_done,
            len(keys),
            target,
            self.current_speedup(),
        )
        self.controller.admit([candidates[k] for k in keys])
        self.admitted += len(keys)
        self.next_round_at = self.iteration + self.interval
        self._remove_if_done(optimizer)

    def _remove_now(self, optimizer: torch.optim.Optimizer) -> None:
        """The base method's one-step removal of the channels still missing from the target, once:
        cooling-down released channels are spared unless the target cannot be met without them."""
        self.closed = True
        spare_released = self.controller.candidates_excluded()
        for excluded in (spare_released, frozenset(self.controller.decaying | self.controller.pruned)):
            if not self._short_of_target():
                break
            keys = distributed.broadcast_object(self.pruner.select(self.speedup, excluded=excluded))
            if keys:
                self.admitted += len(keys)
                self._remove(keys, optimizer, immediate=True)

    def _remove_if_done(self, optimizer: torch.optim.Optimizer) -> None:
        """Remove the round's channels physically once none is decaying any more."""
        pruned = self.controller.pruned
        if not pruned or self.controller.decaying:
            return
        fault_point("rounds:before_removal")  # tests: a kill between the decay's end and the removal
        # DDP: every rank must remove the same channels at the same step (the DDP wrapper is rebuilt
        # on the next forward); a divergence is an error, not a silently different model per rank.
        distributed.agree(sorted(map(str, pruned)), f"the channels removed at iteration {self.iteration}")
        self._remove(pruned, optimizer, immediate=False)

    def _remove(self, keys, optimizer: torch.optim.Optimizer, immediate: bool) -> None:
        """Physical removal of `keys` (their optimizer state sliced too), recorded in `removals`;
        `immediate`: the base method's one-step removal, without a decay."""
        self.pruner.remove(keys, optimizer)
        self.controller.forget(keys)
        self.controller.bind(self.model)
        self.removed += len(keys)
        record = {
            "iteration": self.iteration,
            "round": self.rounds_done,
            "removed": len(keys),
            "speedup": self.current_speedup(),
        }
        if immediate:
            record["immediate"] = True
            log.info(
                "after round %d: %d channels removed at once at iteration %d (no decay fits any more), speed-up %.3fx",
                self.rounds_done,
                len(keys),
                self.iteration,
                record["speedup"],
            )
        else:
            log.info(
                "round %d: removed %d channels at iteration %d, speed-up %.3fx",
                self.rounds_done,
                len(keys),
                self.iteration,
                record["speedup"],
            )
        self.removals.append(record)

    def candidates(self) -> dict[Hashable, Target]:
        """Every channel (group) of the live model, with its consumer slices under include_consumers."""
        return self.pruner.targets(self.include_consumers)

    def replacement(self, released: list[Target], excluded: frozenset) -> list[Target]:
        """budget=strict: for each released channel, the next-least-important candidate."""
        candidates = self.candidates()
        free = [k for k in candidates if k not in excluded and k not in {t.key for t in released}]
        scores = self.pruner.importance(free)
        chosen = sorted(free, key=scores.__getitem__)[: len(released)]
        self.admitted += len(chosen)
        return [candidates[k] for k in chosen]

    # ------------------------------------------------------------------ summary and checkpoints
    def summary(self) -> dict:
        counts = self.controller.counts()
        return {
            "rounds_done": self.rounds_done,
            "admitted": self.admitted,
            "released": counts["releases_total"],
            "readmitted": counts["readmissions"],
            "pruned": self.removed,
            "native_speedup": self.current_speedup(),
            "removals": self.removals,
        }

    def state_dict(self) -> dict:
        return {
            "pruner": self.pruner.state_dict(),
            "controller": self.controller.state_dict(),
            "iteration": self.iteration,
            "rounds_done": self.rounds_done,
            "next_round_at": self.next_round_at,
            "admitted": self.admitted,
            "removed": self.removed,
            "removals": self.removals,
            "closed": self.closed,
        }

    def load_state_dict(self, state: dict) -> None:
        self.pruner.load_state_dict(state["pruner"])  # replays removals: the model has its pruned shape
        self.controller.bind(self.model)
        self.controller.load_state_dict(state["controller"])
        for key in ("iteration", "rounds_done", "next_round_at", "admitted", "removed", "removals"):
            setattr(self, key, state[key])
        self.closed = state.get("closed", False)
