"""Per-job schedulers: built from the loaded model's own scheduler config, never by reloading it.

A :class:`SchedulerSwitch` belongs to one resident model. It remembers the
scheduler the model was loaded with (the registry's default) and builds each
named scheduler once, as diffusers users do:
``Scheduler.from_config(pipe.scheduler.config, **overrides)``. Every job sets
the pipeline's scheduler, to its own or back to the default, so one job's
choice never leaks into the next.
"""

from __future__ import annotations

import inspect
from typing import Any

from darkroom.common.errors import ErrorCode, JobError
from darkroom.common.schedulers import SCHEDULER_CLASSES, SchedulerName

__all__ = ["SchedulerSwitch", "build_scheduler", "accepts_eta", "accepts_sigmas", "accepts_timesteps"]

_SIGMA_SCHEDULES = ("use_karras_sigmas", "use_lu_lambdas", "use_exponential_sigmas", "use_beta_sigmas")


def build_scheduler(name: SchedulerName, config: Any) -> Any:
    """A new ``name`` scheduler from a model's scheduler ``config`` plus the name's overrides."""
    import diffusers

    class_name, overrides = SCHEDULER_CLASSES[name]
    return getattr(diffusers, class_name).from_config(config, **overrides)


def accepts_eta(scheduler: Any) -> bool:
    """Whether ``scheduler.step`` takes ``eta`` (diffusers' ``prepare_extra_step_kwargs`` asks the same)."""
    return "eta" in inspect.signature(scheduler.step).parameters


def accepts_timesteps(scheduler: Any) -> bool:
    """Whether ``scheduler.set_timesteps`` takes explicit ``timesteps`` with this scheduler's config."""
    if "timesteps" not in inspect.signature(scheduler.set_timesteps).parameters:
        return False
    config = getattr(scheduler, "config", {})
    return not any(bool(config.get(flag, False)) for flag in _SIGMA_SCHEDULES)


def accepts_sigmas(scheduler: Any) -> bool:
    """Whether ``scheduler.set_timesteps`` takes explicit ``sigmas`` with this scheduler's config."""
    if "sigmas" not in inspect.signature(scheduler.set_timesteps).parameters:
        return False
    config = getattr(scheduler, "config", {})
    return type(scheduler).__name__ != "UniPCMultistepScheduler" or bool(config.get("use_flow_sigmas", False))


class SchedulerSwitch:
    """One model's default scheduler and the named ones built from its config (one instance per name)."""

    def __init__(self, default: Any) -> None:
        self.default = default
        self._built: dict[SchedulerName, Any] = {}

    def use(self, pipeline: Any, name: SchedulerName | None) -> Any:
        """Give ``pipeline`` the scheduler ``name`` (None: the model's default); return it."""
        scheduler = self.default if name is None else self._get(name)
        pipeline.scheduler = scheduler
        return scheduler

    def _get(self, name: SchedulerName) -> Any:
        if name not in self._built:
            try:
                self._built[name] = build_scheduler(name, self.default.config)
            except (ImportError, ValueError) as exc:  # e.g. lms without scipy, or a config it cannot take
                raise JobError(ErrorCode.INVALID_JOB, f"scheduler={name.value!r} cannot be used with this "
                                                      f"model on this worker: {exc}") from exc
        return self._built[name]

    @staticmethod
    def overrides(name: SchedulerName | None) -> dict[str, object]:
        """The config overrides ``name`` applies on top of the model's scheduler config."""
        return {} if name is None else dict(SCHEDULER_CLASSES[name][1])
