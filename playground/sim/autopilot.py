"""The autopilot service: simulated annotators voting in-process, started and stopped from the admin panel.

The same `Simulator` as `python -m playground.sim.simulate`, driving `ChatService` directly instead of
over HTTP.
"""

from __future__ import annotations

import threading

from playground.loop import TrainingLoop
from playground.sim.annotator import DEFAULT_TRIGGER
from playground.sim.simulate import LocalBackend, SimulationConfig, Simulator


class Autopilot:
    """The admin panel's autopilot: the same Simulator as `python -m playground.sim.simulate`, in-process."""

    def __init__(self, service, loop: TrainingLoop):
        self.service, self.loop = service, loop
        self.simulator: Simulator | None = None
        self.thread = None
        self.lines: list[str] = []

    @property
    def running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def start(self, gold: str, users: int, turns: int, flip_rate: float, poisoners: int = 0,
              trigger: str = DEFAULT_TRIGGER) -> str:
        """Honest `users` and `poisoners` (the persona voting for replies that say `trigger`) at once."""
        if self.running:
            return "The autopilot is already running: stop it first."
        config = SimulationConfig(gold=gold, users=int(users), turns=int(turns), flip_rate=float(flip_rate),
                                  poisoners=int(poisoners or 0), trigger=(trigger or DEFAULT_TRIGGER).strip())
        self.lines = []
        self.simulator = Simulator(config, lambda: LocalBackend(self.service, self.loop),
                                   report=lambda line: self.lines.append(line))
        self.thread = threading.Thread(target=self.simulator.run, daemon=True, name="autopilot")
        self.thread.start()
        names = ", ".join(a.name for a in self.simulator.annotators)
        poison = f" ({int(poisoners)} of them poisoning with '{config.trigger}')" if config.poisoners else ""
        return f"Autopilot started: {len(self.simulator.annotators)} simulated user(s){poison} voting by '{gold}' " \
               f"for {turns} turns: {names}."

    def stop(self) -> str:
        if not self.running:
            return "The autopilot is not running."
        self.simulator.stop("stopped from the admin panel")
        return "Stopping the autopilot after the replies being written."

    def status(self) -> str:
        if self.simulator is None:
            return "Autopilot off."
        summary = self.simulator.progress.summary()
        state = "running" if self.running else f"finished ({summary['stopped_because'] or 'all turns done'})"
        means = ", ".join(f"{v}: {s['mean_gold']:+.3f}, {s['mean_words']:.0f} words ({s['replies']} pairs)"
                          for v, s in summary["gold_by_version"].items())
        return (f"Autopilot {state}: {summary['votes']}/{self.simulator.config.turns} votes by "
                f"'{self.simulator.config.gold}'. Mean gold and length of replies by version: {means or 'none yet'}.")
