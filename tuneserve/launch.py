"""Stage 0 when the world is larger than one process: start one training process per GPU (and join the
other nodes) through torch's elastic launcher, the engine behind `torchrun`, then report the workers'
outcome as the pipeline's own exit code.

`python -m entrypoints.train` runs this when NPROC_PER_NODE resolves to more than one process or
NNODES > 1. Each worker runs the same command with torchrun's variables (RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT) set; in a worker this stage is skipped, and train.py trains data-parallel
(DDP, or FSDP with DISTRIBUTED_STRATEGY=fsdp) and exits (`end_worker`). This process, on node 0, then
merges, verifies and publishes by itself, once every worker has exited 0: the later stages start with
the GPUs' memory released and never run inside the process group.

Why the launcher's Python API rather than exec'ing `torchrun`: torchrun exits 1 whatever its workers
exited with, and the Kubernetes Job acts on our exit codes (2, 3, 4 fail at once; 75, 143 retry).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import uuid

from tuneserve.exitcodes import ExitCode
from tuneserve.settings import Settings

log = logging.getLogger(__name__)

# Seconds the launcher gives its workers between forwarding SIGTERM and SIGKILL: enough to finish a step
# and save a checkpoint. The container runtime's own grace period (Kubernetes:
# terminationGracePeriodSeconds) bounds it from outside.
SHUTDOWN_TIMEOUT = 600


# Set in the environment the workers inherit from our launcher: they train and exit; the launcher finishes.
WORKER_MARK = "TUNESERVE_LAUNCHED_WORKER"


def in_worker() -> bool:
    """True inside a process started by torchrun's launcher (ours or a user's own `torchrun`)."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def runs_final_stages(cfg: Settings) -> bool:
    """Whether this process merges, verifies and publishes: the only process; our launcher on node 0, after
    its workers exit; or rank 0 when a user's own `torchrun` started the processes (nobody waits for them)."""
    if in_worker():
        return is_main() and WORKER_MARK not in os.environ
    return cfg.node_rank == 0


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    """Global rank 0: the process that writes OUTPUT_DIR's shared files and runs the stages after training."""
    return rank() == 0


def nproc_per_node(cfg: Settings) -> int:
    if cfg.nproc_per_node != "auto":
        return int(cfg.nproc_per_node)
    if cfg.device == "cpu":
        return 1
    import torch

    return max(torch.cuda.device_count(), 1)


def planned_world(cfg: Settings) -> int:
    """The training processes of the run, all nodes together: WORLD_SIZE in a worker, else NPROC_PER_NODE x NNODES
    (every node runs as many as this one)."""
    return world_size() if in_worker() else nproc_per_node(cfg) * cfg.nnodes


def needed(cfg: Settings) -> bool:
    return not in_worker() and (cfg.nnodes > 1 or nproc_per_node(cfg) > 1)


def end_worker(code: int) -> None:
    """How a process started by a torchrun launcher ends, whatever its outcome: at once, without the
    interpreter's teardown. Torch's process groups are not safe to tear down there: left alive, gloo's
    threads can abort a finished process at exit (SIGABRT, "terminate called without an active exception":
    pytorch/pytorch#190489); destroyed with `destroy_process_group()` while the DDP model still references
    the group, the process can hang in ~ProcessGroupGloo joining its threads. Both were seen in this
    project's tests; either turns a finished run into a failed or stuck one. The pipeline has written and
    closed its files by now, and the launcher only needs the exit code."""
    logging.shutdown()  # flush the log handlers, as the interpreter's exit would
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def exit_code_of(code: int) -> int:
    """A worker's exit status as a pipeline exit code (a negative status is the signal that killed it)."""
    if code < 0:
        return 128 + (-code)
    return code if code in {c.value for c in ExitCode} else int(ExitCode.UNEXPECTED)


def launch(cfg: Settings, argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    nproc = nproc_per_node(cfg)
    if cfg.nnodes > 1:
        # Static rendezvous, as `torchrun --nnodes N --node-rank R --master-addr A --master-port P`: every node
        # knows its rank (the Indexed Job's index), so nothing but node 0's address has to be agreed on.
        rdzv = dict(
            rdzv_backend="static",
            rdzv_endpoint=f"{cfg.master_addr}:{cfg.master_port}",
            rdzv_configs={"rank": cfg.node_rank, "timeout": 900},
            run_id="tuneserve",
        )
    else:
        # One node: `torchrun --standalone` (a local store on a free port, so parallel runs never collide).
        rdzv = dict(
            rdzv_backend="c10d", rdzv_endpoint="localhost:0", rdzv_configs={"is_host": True}, run_id=str(uuid.uuid4())
        )
    config = LaunchConfig(
        min_nodes=cfg.nnodes,
        max_nodes=cfg.nnodes,
        nproc_per_node=nproc,
        max_restarts=0,
        monitor_interval=1,
        logs_specs=DefaultLogsSpecs(),
        shutdown_timeout=SHUTDOWN_TIMEOUT,
        **rdzv,
    )
    log.info(
        "starting %d training processes on this node (node %d of %d, %s, world size %d)",
        nproc,
        cfg.node_rank,
        cfg.nnodes,
        cfg.distributed_strategy,
        nproc * cfg.nnodes,
    )
    os.environ[WORKER_MARK] = "1"
    try:
        elastic_launch(config, sys.executable)("-m", "entrypoints.train", *(argv or []))
    except ChildFailedError as exc:
        first_rank, failure = exc.get_first_failure()
        code = exit_code_of(failure.exitcode)
        log.error("training process rank %d exited %d first; exiting %d", first_rank, failure.exitcode, code)
        return code
    except SignalException as exc:
        # The launcher forwarded the signal to its workers, which saved a checkpoint and exited.
        log.error(
            "stopped by %s: the training processes saved a checkpoint and exited. Rerun with the same "
            "OUTPUT_DIR to resume.",
            signal.Signals(exc.sigval).name,
        )
        return 128 + int(exc.sigval)
    finally:
        del os.environ[WORKER_MARK]
    log.info("all %d training processes on this node finished and exited", nproc)
    return int(ExitCode.OK)
