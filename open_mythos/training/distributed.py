"""Process groups and model wrapping for data-parallel training with PyTorch's own stack.

Launch with ``torchrun --nproc_per_node N -m open_mythos train ... --parallel ddp|fsdp``.
The backend is NCCL on CUDA and Gloo on CPU. Without ``torchrun``, ``ddp``/``fsdp`` start a
one-process group, so the same code paths run (and are testable) on one process.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .. import devices
from ..layers.recurrence import agreed_any
from .config import ConfigError, Parallel, Precision, as_member, error_line


@dataclass(frozen=True)
class DistContext:
    """Where this process sits.

    Attributes:
        parallel: the data-parallel mode.
        rank, world_size, local_rank: from ``torchrun`` (0, 1, 0 without it).
        device: this process's device.
        owns_group: whether :func:`setup` created the process group (and must destroy it).
    """

    parallel: Parallel
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether collectives run (any parallel mode, even on one process)."""
        return self.parallel is not Parallel.NONE


def resolve_device(spec: str, local_rank: int = 0) -> torch.device:
    """:func:`open_mythos.devices.resolve_device` for ``run.device`` (errors as
    :class:`ConfigError`)."""
    try:
        return devices.resolve_device(spec, local_rank)
    except ValueError as err:
        raise ConfigError(f"run.device: {err}") from None


def setup(parallel: Parallel, device_spec: str, timeout_s: float = 0.0) -> DistContext:
    """Join (or create) the process group that ``parallel`` needs and pick the device.

    ``timeout_s``: how long its collectives wait for the other ranks (0: torch's default).

    Raises:
        ConfigError: ``torchrun`` started several processes but ``parallel`` is ``none``.
    """
    parallel = as_member(Parallel, parallel, "parallel")
    world = _env_int("WORLD_SIZE", 1, low=1)
    local_rank = _env_int("LOCAL_RANK", 0, low=0)
    if parallel is Parallel.NONE:
        if world > 1:
            raise ConfigError(
                f"torchrun started {world} processes but run.parallel is 'none'; "
                "pass --parallel ddp or --parallel fsdp")
        return DistContext(parallel, 0, 1, 0, resolve_device(device_spec), False)

    device = resolve_device(device_spec, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = {"timeout": datetime.timedelta(seconds=timeout_s)} if timeout_s > 0 else {}
    if dist.is_initialized():  # a caller (e.g. a test harness) already made the group
        return DistContext(parallel, dist.get_rank(), dist.get_world_size(), local_rank, device, False)
    if "RANK" in os.environ:
        # torchrun sets all of these; another launcher may not, and init_process_group's
        # own error is a traceback deep inside torch.
        missing = [k for k in ("WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise ConfigError(f"RANK is set but {', '.join(missing)} not: launch with torchrun, "
                              "or set RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT")
        rank = _env_int("RANK", 0, low=0)
        if rank >= world:  # it would wait for a rank 0 that never comes
            raise ConfigError(f"RANK={rank} is not below WORLD_SIZE={world}: launch with "
                              "torchrun, or give each process a rank in [0, WORLD_SIZE)")
        try:
            dist.init_process_group(backend, device_id=device if device.type == "cuda" else None,
                                    **timeout)
        except dist.DistNetworkError as err:  # the rendezvous store was not reached
            raise ConfigError(
                f"rank {rank} could not reach the rendezvous at {os.environ['MASTER_ADDR']}:"
                f"{os.environ['MASTER_PORT']} ({error_line(err)}): is rank 0 running, "
                "and are MASTER_ADDR and MASTER_PORT its?") from err
    else:
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}",
                                rank=0, world_size=1, **timeout)
    return DistContext(parallel, dist.get_rank(), dist.get_world_size(), local_rank, device, True)


def _env_int(name: str, default: int, low: int) -> int:
    """The launcher's integer ``name`` from the environment, at least ``low``."""
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        value = low - 1
    if value < low:
        raise ConfigError(f"{name}={text!r} in the environment is not an integer >= {low}: "
                          "launch with torchrun, or set it to one")
    return value


def teardown(ctx: DistContext, clean: bool = True) -> None:
    """Destroy the process group if :func:`setup` created it.

    ``clean``: every rank got here the normal way, so a barrier first lets each rank's
    pending collectives finish before any rank tears its group down (without it a gloo rank
    could exit while another still joins its communication threads, and hang there).
    """
    if ctx.owns_group and dist.is_initialized():
        if clean and ctx.world_size > 1:
            dist.barrier()
        dist.destroy_process_group()


def group_alive(ctx: DistContext) -> bool:
    """Whether collectives can still run in ``ctx``: False once :func:`teardown` destroyed
    the process group that :func:`setup` created."""
    return not ctx.owns_group or dist.is_initialized()


#: What the collective errors of a rank whose peer went away say (gloo: a closed or reset
#: connection, a timed-out wait; NCCL: the watchdog's timeout, a remote process's exit).
#: Anything else (this rank's own out-of-memory or a misuse, even inside a collective)
#: keeps its traceback.
_LOST_PEER_MARKS = ("Connection closed by peer", "Connection reset by peer",
                    "Timed out waiting", "Watchdog caught collective operation timeout",
                    "remote process exited", "Socket Timeout")


def lost_peer(err: BaseException) -> bool:
    """Whether ``err`` is a collective that failed because another rank went away (died,
    hung past the timeout, or was stopped). Only under ``torchrun`` with several
    processes."""
    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return False
    if isinstance(err, tuple(getattr(dist, name) for name in ("DistNetworkError",
                                                              "DistStoreError")
                             if hasattr(dist, name))):
        return True
    return any(mark in str(err) for mark in _LOST_PEER_MARKS)


def report_lost_peer(err: BaseException, newest_checkpoint: object | None) -> None:
    """One line on stderr from a rank whose collective ``err`` failed because a peer went
    away (:func:`lost_peer`): which rank, the error's first line, and where to resume."""
    saved = (f"the newest checkpoint is {newest_checkpoint}; continue from it with --resume"
             if newest_checkpoint else "nothing was saved")
    detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    with contextlib.suppress(OSError):  # stderr gone
        print(f"openmythos train: error: rank {os.environ.get('RANK', '0')} lost its peers "
              f"in a collective ({detail}): another process died, hung or was stopped; "
              f"{saved}", file=sys.stderr, flush=True)


def free_port() -> int:
    """A TCP port that is free on localhost right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The units FSDP2 shards separately: each Prelude and Coda block, and the whole
    recurrent block (its parameters are gathered once and reused by every loop)."""
    middle = [model.recurrent] if hasattr(model, "recurrent") else list(model.core)
    return [*model.prelude, *middle, *model.coda]


def wrap_model(model: nn.Module, ctx: DistContext, precision: Precision) -> nn.Module:
    """Apply the data-parallel wrapper of ``ctx.parallel`` to a model already on
    ``ctx.device`` (identical on every rank).

    - ``none``: the model itself.
    - otherwise the early-exit test is first made collective (:func:`agree_across_ranks`);
    - ``ddp``: ``DistributedDataParallel``. Buffers are not re-broadcast at every forward:
      the only persistent one, the MoE router bias, is updated from all-reduced loads and so
      stays identical on every rank by construction.
    - ``fsdp``: ``fully_shard`` on every block of :func:`transformer_blocks`, then on the root
      (embedding, final norm and the tied head share the root's parameter group). With bf16,
      a ``MixedPrecisionPolicy`` gathers parameters in bf16 and reduces gradients in fp32.
    """
    precision = as_member(Precision, precision, "precision")
    if ctx.parallel is Parallel.NONE:
        return model
    agree_across_ranks(model)
    if ctx.parallel is Parallel.DDP:
        import inspect

        from torch.nn.parallel import DistributedDataParallel

        # Newer PyTorch renames broadcast_buffers (and warns on the old name).
        sync = ("forward_sync_buffers"
                if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                else "broadcast_buffers")
        return DistributedDataParallel(
            model,
            device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
            # The halting head receives no gradient when ACT is off.
            find_unused_parameters=not model.cfg.use_act,
            **{sync: False},
        )
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
          if precision is Precision.BF16 else MixedPrecisionPolicy())
    for block in transformer_blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


#: Whether any sequence on any rank is still running (``alive``: this rank's (B,) bool
#: tensor): the early-exit test of a data-parallel run, one all-reduce per loop, so every
#: rank runs the same number of loops and the collectives inside them stay matched.
agree_on_exit = agreed_any


def agree_across_ranks(model: nn.Module) -> nn.Module:
    """Make the rank-dependent decisions of ``model`` collective: its recurrent block's
    early-exit test becomes :func:`agree_on_exit`. A dense baseline has none. Returns
    ``model``."""
    recurrent = getattr(model, "recurrent", None)
    if recurrent is not None:
        recurrent.any_alive = agree_on_exit
    return model


def reduced_expert_loads(model: nn.Module, ctx: DistContext) -> list[torch.Tensor]:
    """The expert load each MoE layer of ``model`` accumulated since its last router-bias
    update, summed over ranks with one all-reduce for all layers (what
    ``MoEFFN.update_router_bias(load=...)`` needs to keep the bias identical everywhere)."""
    layers = model.moe_layers()
    if not layers:
        return []
    loads = torch.stack([moe.load_since_update for moe in layers])
    return list(all_reduce(loads.clone(), ctx).unbind(0))


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (FSDP2 shards in place, so it is the model itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


@contextlib.contextmanager
def gradient_sync(model: nn.Module, ctx: DistContext, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on accumulation micro-steps (``enabled=False``)."""
    if enabled or ctx.parallel is Parallel.NONE:
        yield
    elif ctx.parallel is Parallel.DDP:
        with model.no_sync():
            yield
    else:
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)


def all_reduce(tensor: torch.Tensor, ctx: DistContext, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (``"sum"`` or ``"max"``) across ranks; identity on one process."""
    if ctx.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return tensor


def gather_objects(obj: object, ctx: DistContext) -> list[object] | None:
    """Every rank's ``obj`` on rank 0 (None elsewhere); ``[obj]`` on one process."""
    if not ctx.distributed:
        return [obj]
    out: list[object] | None = [None] * ctx.world_size if ctx.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_object(obj: object, ctx: DistContext) -> object:
    """Rank 0's ``obj`` on every rank."""
    if not ctx.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()
