"""The GPU check's goal lines (docs/gpu-check.md): each of issue 15's figures is checked out loud, as
a `GOAL PASS`, `GOAL FAIL`, `GOAL WARN` or `GOAL SKIP` line with the figure and its limit, and the
run ends with all of them together. A FAIL is also a failure of the run; a WARN (a figure that
could not be read) and a SKIP (a check this machine cannot do, with the reason) are not."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

GiB = 1024**3

# issue 15's goals
FIRST_LAUNCH_ERROR = 0.25  # a model never launched before: estimate within 25% of NVML
PROFILED_ERROR = 0.10  # launched before: placed on its stored profile, within 10%
WAKE_LLM_SECONDS = 1.0  # a parked ~0.75 B LLM answers again within 1 s
WAKE_EMBEDDING_SECONDS = 0.3
PARKED_SLACK = 1.05  # a parked runner holds its CUDA context and (about) nothing more


def error(estimate: int, used: int) -> float | None:
    """(estimate - used) / used, or None when nothing was measured."""
    return (estimate - used) / used if used else None


def pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 100:+.1f}%"


@dataclass
class Goals:
    failures: list[str]
    real_gpu: bool  # False on fake GPUs (GPU_CHECK_DRY=1): NVML figures are absent there
    lines: list[str] = field(default_factory=list)

    def _say(self, verdict: str, name: str, detail: str) -> None:
        line = f"GOAL {verdict} {name}: {detail}"
        self.lines.append(line)
        print(f"[gpu-check {time.strftime('%H:%M:%S')}] {line}", flush=True)
        if verdict == "FAIL":
            self.failures.append(f"{name}: {detail}")

    def skip(self, name: str, reason: str) -> None:
        self._say("SKIP", name, f"skipped: {reason}")

    def warn(self, name: str, detail: str) -> None:
        self._say("WARN", name, detail)

    def check(self, name: str, ok: bool, detail: str) -> None:
        self._say("PASS" if ok else "FAIL", name, detail)

    def estimate(self, name: str, estimate: int, used: int, first: bool, source: str) -> None:
        """An estimate against NVML's per-pid use: within 25% for a first launch, 10% once profiled."""
        limit = FIRST_LAUNCH_ERROR if first else PROFILED_ERROR
        what = f"{'first launch' if first else 'launched before'} ({source})"
        name = f"{name} estimate {'first' if first else 'again'}"
        if not self.real_gpu:
            self.skip(name, f"fake GPU, no NVML ({what}, {estimate / GiB:.2f} GiB)")
            return
        err = error(estimate, used)
        detail = (
            f"{what} estimate {estimate / GiB:.2f} GiB vs NVML {used / GiB:.2f} GiB, error {pct(err)} "
            f"(goal within {limit * 100:.0f}%)"
        )
        if err is None:
            self.warn(name, detail + "; NVML reported nothing for its pid")
        else:
            self.check(name, abs(err) <= limit, detail)

    def wake(self, name: str, seconds: float | None, embedding: bool) -> None:
        limit = WAKE_EMBEDDING_SECONDS if embedding else WAKE_LLM_SECONDS
        if seconds is None:
            self.check(f"{name} wake", False, "no wake time recorded")
            return
        where = "" if self.real_gpu else " (fake GPU: the control path only, no weights copied)"
        self.check(f"{name} wake", seconds < limit, f"{seconds:.3f} s (goal under {limit} s){where}")

    def parked(self, name: str, used: int, context: int) -> None:
        if not self.real_gpu:
            self.skip(f"{name} parked use", "fake GPU, no NVML")
            return
        self.check(
            f"{name} parked use",
            used <= context * PARKED_SLACK,
            f"NVML {used / GiB:.2f} GiB while parked "
            f"(goal: at most its CUDA context, {context / GiB:.2f} GiB)",
        )

    def summary(self) -> str:
        return "\n".join(["", "goals:", *(f"  {line}" for line in self.lines)])
