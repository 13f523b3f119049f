"""The engine's steps, as vLLM reports them to its stat loggers: the liveness signal of the serving gate.

vLLM's engine attaches its scheduler stats to the outputs of every step it takes, with or without request
outputs in that step (`Scheduler.update_from_output`: "we must return the stats even if there are no request
outputs this step"), and the API process hands them to each stat logger from its output handler. So a call of
`record` means the engine took a step: a prefill chunk or a decode through any backlog, whichever requests they
served. A frozen engine takes none. Loaded by vLLM as a plugin (entry point group `vllm.stat_logger_plugins`, in
pyproject.toml), the interface vLLM documents for custom stat loggers; it only notes the time.
"""

from __future__ import annotations

from vllm.v1.metrics.loggers import StatLoggerBase

from tuneserve.gate import ENGINE_STEPS


class EngineSteps(StatLoggerBase):
    def __init__(self, vllm_config, engine_index: int = 0):
        self.engine_index = engine_index

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
        if scheduler_stats is not None or iteration_stats is not None:
            ENGINE_STEPS.stepped()

    def log_engine_initialized(self):
        pass
