"""The training spine: `train(cfg)` runs any stage of any world, in the order torchtitan uses:

    world models -> activation checkpointing -> (compile) -> shard -> optimisers -> algorithm -> loop

A world (tiltflow.worlds.base.World) builds what is specific to it: its Task, its role models, its
evaluation and what it saves at the end. Everything else is here, once, for every world.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tiltflow.algorithms.ac_dmd import ACDMD
from tiltflow.algorithms.common import GradSync, TrainState, always_sync
from tiltflow.algorithms.rtdmd import RTDMD
from tiltflow.config.loader import ConfigError, to_dict
from tiltflow.config.schema import STAGE1_STAGES, ParallelConfig, RunConfig, Stage1Config, Stage2Config
from tiltflow.distributed import Comm, ReplicatedDataComm
from tiltflow.distributed.fsdp import FSDPGradSync, compile_blocks, compile_module, fsdp_shard
from tiltflow.distributed.launch import init_distributed
from tiltflow.distributed.state import is_main_process
from tiltflow.models.adapters.attention import unbind_attention_backend
from tiltflow.models.base import cfg_owner
from tiltflow.models.ema import EMA
from tiltflow.models.roles import Roles
from tiltflow.storage import UNREADABLE, load
from tiltflow.training.checkpointing import Checkpointer, FileCheckpointer
from tiltflow.training.logger import Logger
from tiltflow.training.loop import LoopHooks, NonFinite, run_loop
from tiltflow.training.sharded_checkpoint import ShardedCheckpointer
from tiltflow.worlds.base import TrainModels, prepare_run_dir
from tiltflow.worlds.registry import get_world


def train(cfg: RunConfig, *, world: Any = None, progress: bool = True) -> dict[str, Any]:
    """Run cfg.stage of cfg.world into cfg.run_dir (resuming from its checkpoint); returns the final metrics.
    `world` overrides the registry's (e.g. a gmm world holding a reference built once for a demo)."""
    world = world if world is not None else get_world(cfg.world)()
    comm = init_distributed(cfg.device)
    run_dir = prepare_run_dir(cfg)
    if cfg.stage == "teacher":
        if not hasattr(world, "train_teacher"):
            raise ConfigError("stage", f"the {cfg.world} world has no teacher stage (its teacher is pretrained)")
        return world.train_teacher(cfg, progress=progress)
    setup = world.build(cfg, progress=progress)
    grad_sync = apply_parallel_plan(setup.models, cfg.parallel, comm, device_type=torch.device(cfg.device).type,
                                    task=setup.task)
    ranks = comm  # all ranks, for checkpoints; `comm` below is what the algorithms see of the data
    if cfg.parallel.same_data_on_every_rank:
        comm = ReplicatedDataComm(comm)
    roles = setup.models.roles()
    stage1 = cfg.stage in STAGE1_STAGES
    state = build_train_state(cfg.stage1 if stage1 else cfg.stage2, roles)
    algo: Any = (ACDMD(cfg.stage1, setup.sampler, setup.task, roles, state, seed=cfg.seed, comm=comm) if stage1
                 else RTDMD(cfg.stage2, setup.sampler, setup.task, roles, state, seed=cfg.seed, comm=comm,
                            grad_sync=grad_sync))
    logger = Logger(run_dir, cfg.logging, f"{cfg.world}/{cfg.stage}", to_dict(cfg), enabled=is_main_process())

    def evaluate(step: int) -> dict[str, float]:
        assert setup.evaluate is not None
        with state.ema.applied():
            return setup.evaluate(step)

    hooks = LoopHooks(model_state=setup.models.trainable_state, load_model_state=setup.models.load_trainable_state,
                      evaluate=evaluate if setup.evaluate is not None else None,
                      describe_fault=lambda err, it: (setup.describe_fault(err, f"{algo.phase.current} at step {it}")
                                                      if setup.describe_fault is not None else None))
    num_iters = (cfg.stage1 if stage1 else cfg.stage2).num_iters
    try:
        done = run_loop(algo, hooks, run_dir=run_dir, num_iters=num_iters,
                 checkpoint_every=cfg.checkpoint_every, log_every=cfg.log_every, eval_every=setup.eval_every,
                 desc=f"{cfg.world} {cfg.stage}", progress=progress and is_main_process(), logger=logger,
                 progress_every_s=cfg.logging.progress_every_s,
                 checkpointer=make_checkpointer(run_dir, ranks, setup.models, state, cfg),
                 nonfinite=NonFinite(cfg.on_nonfinite, cfg.max_skipped_updates, cfg.nonfinite_check),
                 time_limit_s=cfg.time_limit_s)
    finally:
        logger.close()
    if done < num_iters:  # paused at time_limit_s: nothing is exported until the run has finished
        return {"paused_at": float(done), "num_iters": float(num_iters)}
    return setup.finish(state.ema)


def make_checkpointer(run_dir: Path, comm: Comm, models: TrainModels, state: TrainState,
                      cfg: RunConfig) -> Checkpointer:
    """One process: the loop's own state in one atomic file. Several ranks (or resuming on one process from
    a checkpoint that several wrote): a distributed checkpoint (DCP), each rank writing its own shards, that
    any rank count loads; checkpoint.pt is then its commit record."""
    path = run_dir / "checkpoint.pt"
    settings = {"keep": cfg.checkpoint_keep, "retries": cfg.checkpoint_retries,
                "retry_wait_s": cfg.checkpoint_retry_wait_s}
    if comm.world_size > 1 or (path.exists() and _written_sharded(path)):
        return ShardedCheckpointer(run_dir, comm, models.modules(), state, **settings)
    return FileCheckpointer(run_dir, **settings)


def _written_sharded(path: Path) -> bool:
    """Whether several ranks wrote this checkpoint (its commit record says so). An unreadable file is the
    sharded checkpointer's when a distributed checkpoint folder is there (it tries the step directories), else
    FileCheckpointer's, which falls back to an older kept checkpoint and says so."""
    try:
        return bool(load(path).get("sharded", False))
    except UNREADABLE:
        return ShardedCheckpointer.folder_in(path.parent)


def apply_parallel_plan(models: TrainModels, cfg: ParallelConfig, comm: Comm, device_type: str = "cpu",
                        *, compile_backend: str | None = None, task: Any = None) -> GradSync:
    """Prepare the models in torchtitan's order: activation checkpointing (and the frozen models' CPU
    offloading, parallel.offload_frozen), then torch.compile of each transformer block (parallel.compile:
    blocks; every distinct transformer, the teacher's too; or each transformer whole: model, optionally
    replayed as CUDA graphs on CUDA), then sharding (FSDP2: each block, then the root;
    parallel.data_parallel=ddp replicates instead of sharding). The teacher's CFG is set to one
    batched pass or two (parallel.batched_cfg). Returns the gradient-sync hook the algorithm calls in its
    accumulation loop: one process has nothing to synchronise; FSDP2 reduces on the last micro-batch only.
    `compile_backend` is torch.compile's backend (None: tiltflow.distributed.fsdp.COMPILE_BACKEND, inductor).
    parallel.compile_vae compiles the VAE decoder of `task` (its `vae_decoder()`), CUDA graphs as above."""
    owner = cfg_owner(models.roles().teacher)
    if hasattr(owner, "batched_cfg"):
        owner.batched_cfg = cfg.batched_cfg
    if cfg.activation_checkpointing:  # (a world's models without the `every` argument get the default)
        every = cfg.activation_checkpointing_every
        models.enable_activation_checkpointing(**({"every": every} if every != 1 else {}))
    if cfg.offload_frozen:
        if not hasattr(models, "offload_frozen"):
            raise ConfigError("parallel.offload_frozen", "got true, but this world's models have no frozen "
                                                         "models to offload")
        if comm.world_size > 1 and cfg.shard_teacher:
            raise ConfigError("parallel.offload_frozen", "got true with parallel.shard_teacher: the teacher is "
                                                         "either sharded or offloaded; set one of them to false")
        models.offload_frozen()
    if cfg.compile != "none":
        if cfg.compile == "model" and comm.world_size > 1:
            raise ConfigError("parallel.compile", "got 'model' on several ranks; FSDP2 shards per block, so "
                                                  "compile per block there: parallel.compile=blocks")
        units = models.shard_units(include_teacher=True)
        for unit in units:  # one graph per kind of block, not one per hooked block
            unbind_attention_backend(unit.root)
        if compile_blocks(units, backend=compile_backend, whole=cfg.compile == "model",
                          cuda_graphs=cfg.cuda_graphs and device_type == "cuda") == 0:
            raise ConfigError("parallel.compile", f"got '{cfg.compile}', but this world's models have no "
                                                  "transformer blocks to compile; use parallel.compile=none")
    if cfg.compile_vae:
        decoder = task.vae_decoder() if hasattr(task, "vae_decoder") else None
        if decoder is None:
            raise ConfigError("parallel.compile_vae", "got true, but this world decodes without a VAE; use "
                                                      "parallel.compile_vae=false")
        compile_module(decoder, backend=compile_backend, cuda_graphs=cfg.cuda_graphs and device_type == "cuda")
    if comm.world_size == 1:
        return always_sync
    units = models.shard_units(include_teacher=cfg.shard_teacher)
    fsdp_shard(units, device_type=device_type, bf16=cfg.mixed_precision and device_type == "cuda",
               replicate=cfg.data_parallel == "ddp")
    return FSDPGradSync([u.root for u in units])


def build_train_state(cfg: Stage1Config | Stage2Config, roles: Roles) -> TrainState:
    """AdamW for the generator and the fake score, and the generator's EMA (METHOD.md 4.4, 5.5). Built
    after sharding, so the optimisers hold the sharded parameters."""
    return TrainState(torch.optim.AdamW(roles.generator_params, lr=cfg.lr, weight_decay=cfg.weight_decay),
                      torch.optim.AdamW(roles.fake_params, lr=cfg.fake.lr, weight_decay=0.0),
                      EMA(roles.generator_params, cfg.ema_decay))
