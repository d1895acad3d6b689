"""Who started this process (torchrun, SLURM's srun or Lightning itself), and a check, right after the Trainer is
built, that the Trainer's devices x num_nodes match the processes an external launcher started."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from resnet_lit.errors import ResNetLitError

SLURM_INTERACTIVE_JOB_NAMES = ("bash", "interactive")  # Lightning's SLURMEnvironment ignores these jobs


class ClusterConfigError(ResNetLitError, RuntimeError):
    """The Trainer's devices/num_nodes do not match the processes an external launcher started."""


@dataclass(frozen=True)
class Launch:
    """How this process was started.

    Attributes:
        launcher: ``"torchrun"``, ``"slurm"`` (one process per ``srun`` task) or ``"lightning"`` (Lightning
            starts the processes of this node itself: plain ``python``/``resnet-lit``, or a SLURM job named
            ``bash``/``interactive``).
        world_size: processes the launcher started in all; None for ``"lightning"``.
        per_node: processes the launcher started on each node, when it says.
        nodes: nodes of the job, when the launcher says.
    """

    launcher: str
    world_size: int | None = None
    per_node: int | None = None
    nodes: int | None = None

    @property
    def external(self) -> bool:
        return self.launcher != "lightning"


def _int(environ: Mapping[str, str], key: str) -> int | None:
    value = environ.get(key, "")
    try:
        return int(value)
    except ValueError:  # e.g. SLURM_NTASKS_PER_NODE="2(x3)" on heterogeneous jobs
        return None


def detect_launch(environ: Mapping[str, str] | None = None) -> Launch:
    """The launcher of this process, in Lightning's order of precedence (torchrun first, then SLURM)."""
    env = os.environ if environ is None else environ
    if "TORCHELASTIC_RUN_ID" in env:  # what torch.distributed.is_torchelastic_launched() checks
        world_size = _int(env, "WORLD_SIZE")
        per_node = _int(env, "LOCAL_WORLD_SIZE")
        nodes = world_size // per_node if world_size and per_node else None
        return Launch("torchrun", world_size, per_node, nodes)
    if "SLURM_NTASKS" in env and env.get("SLURM_JOB_NAME") not in SLURM_INTERACTIVE_JOB_NAMES:
        return Launch("slurm", _int(env, "SLURM_NTASKS"), _int(env, "SLURM_NTASKS_PER_NODE"), _int(env, "SLURM_NNODES"))
    return Launch("lightning")


SLURM_HINT = (
    "resnet-lit hint: under SLURM, srun starts one process per task and Lightning only joins them, so "
    "trainer.devices must equal --ntasks-per-node and trainer.num_nodes must equal --nodes "
    "(this job: SLURM_NTASKS={ntasks}, SLURM_NTASKS_PER_NODE={ntasks_per_node}, SLURM_NNODES={nnodes}). "
    "Either run with --trainer.devices {devices} --trainer.num_nodes {num_nodes}, "
    "or make the batch script ask for what the config says: #SBATCH --nodes=<trainer.num_nodes> "
    "--ntasks-per-node=<trainer.devices> --gpus-per-node=<trainer.devices>, and start it with "
    "`srun resnet-lit fit ...`. `devices: auto` counts the GPUs each task can see, which is 1, not the "
    "task count, when the job uses --gpus-per-task=1. To let Lightning start the processes itself "
    "inside an allocation instead, run one task with SLURM_JOB_NAME=interactive."
)
TORCHRUN_HINT = (
    "resnet-lit hint: torchrun starts the processes and Lightning only joins them, so trainer.devices "
    "must equal torchrun's --nproc_per_node and trainer.num_nodes its --nnodes "
    "(this launch: WORLD_SIZE={world_size}, LOCAL_WORLD_SIZE={local_world_size}). "
    "Run with --trainer.devices {devices} --trainer.num_nodes {num_nodes} --trainer.strategy ddp. "
    "On CPU `devices: auto` means 1 process, so set it explicitly there."
)


def launch_hint(launch: Launch, environ: Mapping[str, str] | None = None) -> str:
    """What to change when the Trainer and an external launcher disagree on the process layout."""
    env = os.environ if environ is None else environ
    if launch.launcher == "slurm":
        return SLURM_HINT.format(
            ntasks=env.get("SLURM_NTASKS"),
            ntasks_per_node=env.get("SLURM_NTASKS_PER_NODE", "unset"),
            nnodes=env.get("SLURM_NNODES", "unset"),
            devices=_or_placeholder(launch.per_node, "<tasks per node>"),
            num_nodes=_or_placeholder(launch.nodes, "<nodes>"),
        )
    if launch.launcher == "torchrun":
        return TORCHRUN_HINT.format(
            world_size=env.get("WORLD_SIZE"),
            local_world_size=env.get("LOCAL_WORLD_SIZE"),
            devices=_or_placeholder(launch.per_node, "<nproc_per_node>"),
            num_nodes=_or_placeholder(launch.nodes, "<nnodes>"),
        )
    return ""


def _or_placeholder(value: int | None, placeholder: str) -> int | str:
    return placeholder if value is None else value


def describe_launch(launch: Launch, trainer: L.Trainer, environ: Mapping[str, str] | None = None) -> str:
    """One line for the log: the launcher and the process layout the Trainer will use."""
    env = os.environ if environ is None else environ
    layout = f"trainer.devices={trainer.num_devices} x trainer.num_nodes={trainer.num_nodes}"
    if launch.launcher == "torchrun":
        return f"resnet-lit: launched by torchrun: {launch.world_size} processes ({layout})"
    if launch.launcher == "slurm":
        job = env.get("SLURM_JOB_ID", "?")
        return f"resnet-lit: launched by SLURM srun, job {job}: {launch.world_size} tasks ({layout})"
    environment = getattr(trainer.strategy, "cluster_environment", None)
    if environment is not None and environment.creates_processes_externally:  # e.g. LSF, MPI
        return f"resnet-lit: processes started outside Lightning ({type(environment).__name__}, {layout})"
    return f"resnet-lit: Lightning starts {trainer.num_devices} processes per node ({layout})"


def check_launch(trainer: L.Trainer, environ: Mapping[str, str] | None = None) -> Launch:
    """Fail fast, with a hint, when an external launcher started a different number of processes than
    ``trainer.devices x trainer.num_nodes``; log the launch on rank 0 when there is more than one process.

    External launchers (``torchrun``, ``srun``) start every process themselves and Lightning only joins them.
    Runs Lightning's own check of the launcher's variables (otherwise only done when the run starts), then the
    total, which Lightning does not check for a single-device Trainer: under ``srun -n 2`` such a Trainer would
    train two independent copies into the same folder. The error says which YAML keys and launcher options
    to change.
    """
    env = os.environ if environ is None else environ
    launch = detect_launch(env)
    expected = trainer.num_devices * trainer.num_nodes
    if launch.external:
        cluster_environment = getattr(trainer.strategy, "cluster_environment", None)
        if cluster_environment is not None:
            with explain_launch_errors(env):
                cluster_environment.validate_settings(num_devices=trainer.num_devices, num_nodes=trainer.num_nodes)
        if launch.world_size is not None and launch.world_size != expected:
            launcher = "SLURM srun" if launch.launcher == "slurm" else launch.launcher
            raise ClusterConfigError(
                f"{launcher} started {launch.world_size} processes, but the Trainer expects "
                f"trainer.devices x trainer.num_nodes = {trainer.num_devices} x {trainer.num_nodes} = {expected} "
                f"(strategy {type(trainer.strategy).__name__}).\n{launch_hint(launch, env)}"
            )
    if launch.external or expected > 1:
        rank_zero_info(describe_launch(launch, trainer, env))
    return launch


@contextmanager
def explain_launch_errors(environ: Mapping[str, str] | None = None) -> Iterator[None]:
    """Re-raise Lightning's errors about SLURM/torchrun settings as :class:`ClusterConfigError` plus our hint."""
    env = os.environ if environ is None else environ
    try:
        yield
    except (ValueError, RuntimeError) as err:
        if isinstance(err, ClusterConfigError):
            raise
        launch = detect_launch(env)
        message = str(err)
        slurm_error = launch.launcher == "slurm" and "SLURM" in message
        torchrun_error = launch.launcher == "torchrun" and "world size" in message
        if not (slurm_error or torchrun_error):
            raise
        raise ClusterConfigError(f"{message}\n{launch_hint(launch, env)}") from err
