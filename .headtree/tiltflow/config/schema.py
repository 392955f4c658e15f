"""The run config's shared part: what every world's run has (stage, seed, run directory, sampler, the two
stages' hyperparameters, logging, parallelism). Each world's config subclasses RunConfig and adds its own
fields (tiltflow/config/gmm.py, tiltflow/config/diffusers.py).

A `stage` selects the trainer and a preset of settings (STAGE_PRESETS); the file and dotted overrides
are applied on top of the preset, and the resolved config is saved with every run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from tiltflow.config.loader import ConfigError


def require(cond: bool, path: str, msg: str) -> None:
    if not cond:
        raise ConfigError(path, msg)


def join_path(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def require_min(obj: object, path: str, low: int, *names: str) -> None:
    """Each field `names` of `obj` is at least `low`."""
    for name in names:
        value = getattr(obj, name)
        require(value >= low, join_path(path, name), f"got {value}, expected >= {low}")


def require_lr(lr: float, path: str) -> None:
    require(math.isfinite(lr) and lr > 0, path, f"got {lr}, expected a finite value > 0")


def require_ema_decay(decay: float, path: str) -> None:
    require(0 <= decay < 1, path, f"got {decay}, expected a value in [0, 1)")


@dataclass
class SamplerConfig:
    num_steps: int = 4
    shift: float = 1.0
    eta: float = 0.9

    def validate(self, path: str) -> None:
        require(self.num_steps >= 2, join_path(path, "num_steps"), f"got {self.num_steps}, expected >= 2")
        require(self.shift > 0, join_path(path, "shift"), f"got {self.shift}, expected > 0")
        require(0 <= self.eta <= 1, join_path(path, "eta"), f"got {self.eta}, expected a value in [0, 1]")


@dataclass
class FakeConfig:
    """Fake-score objective (METHOD.md 4.2-4.3)."""

    lr: float = 1e-3
    weighting: Literal["none", "clamped"] = "none"
    consistency_gamma: float = 0.01
    consistency_delta_max: float = 0.2
    consistency_two_sample: bool = True
    # Which denoiser outputs of the consistency term carry gradient (docs/method.md 4.3): "anchor" (h0 only, as
    # METHOD 4.3 marks it; h(x'_i) are stop-gradient targets and their pass runs without a graph) or "both" (h0
    # and h(x'_i): the gradient of the whole estimate; tiltflow's default before 2026-12-03).
    consistency_grad: Literal["anchor", "both"] = "anchor"

    def validate(self, path: str) -> None:
        require_lr(self.lr, join_path(path, "lr"))


@dataclass
class Stage1Config:
    """AC-DMD (METHOD.md 4); DMD2-style is eta = 1, subinterval = false, consistency_gamma = 0."""

    num_iters: int = 1500
    batch_size: int = 1024
    lr: float = 3e-4
    weight_decay: float = 0.0  # METHOD.md 4.4: AdamW without weight decay
    n_fake: int = 5  # fake-score updates per generator update (METHOD.md 4.4, reference 10)
    ema_decay: float = 0.99
    grad_clip: float = 1.0
    subinterval: bool = True
    delta: float = 0.01
    tau_min: float = 0.02
    tau_max: float = 0.98
    fake: FakeConfig = field(default_factory=FakeConfig)

    def validate(self, path: str) -> None:
        require_min(self, path, 0, "num_iters")
        require_min(self, path, 1, "n_fake")
        require_lr(self.lr, join_path(path, "lr"))
        require_ema_decay(self.ema_decay, join_path(path, "ema_decay"))
        require(0 < self.tau_min < self.tau_max <= 1, path, f"need 0 < tau_min < tau_max <= 1, got "
               f"{self.tau_min}, {self.tau_max}")


@dataclass
class Stage2Config:
    """Joint DM + reward (METHOD.md 5). w_pg / w_bp = null mean beta (the exact tilt weighting)."""

    mode: Literal["reference", "exact"] = "reference"
    beta: float = 1.0
    num_iters: int = 600
    num_prompts: int = 32
    group_size: int = 16
    accumulation: int = 1
    num_trained_steps: int = 2  # SubGRPO: stochastic steps with a policy-gradient term; 0 = all of them
    w_dm: float = 0.001
    w_pg: float | None = 1.0
    w_bp: float | None = 1e-4
    advantage: Literal["normalized", "raw"] = "normalized"
    adv_clip: float = 5.0
    ppo_clip: float | None = 1e-5
    logprob_reduction: Literal["sum", "mean"] = "mean"
    bp_loss: Literal["hinge", "linear"] = "hinge"
    bp_margin: float = 3.0
    # Samples decoded (and scored) at a time for the reward back-propagation term; 0 = the whole rollout batch.
    # The VAE decoder's activations with gradient are about 3 GiB per 512-px image (SD3.5-M, FLUX.2), so a group
    # of 24 holds some 75 GiB at once; with bp_chunk = c the term's gradient is taken to the generator's output
    # chunk by chunk and reaches the generator through that output alone: the same loss and gradient.
    bp_chunk: int = 0
    dm_depth: int = 1  # steps the DM gradient flows back through: 1 = last step (reference), 0 = whole chain
    dm_scaling: Literal["normalized", "kl", "fisher"] = "normalized"
    # How the DM surrogate reduces over dimensions: "mean" over every element (reference) or "sum" over
    # dimensions, mean over the batch (the KL and the log-probs are sums over dimensions, so the exact mode's
    # terms keep their relative size at any dimension). The "kl" scaling is always summed.
    dm_reduction: Literal["mean", "sum"] = "mean"
    dm_tau_min: float = 0.02
    dm_tau_max: float = 0.98
    # What DM matches: the teacher (reference) or the diffused tilted target p_tilde_tau (METHOD.md 5.6):
    # the teacher's denoiser replaced by D~ = E_p_tilde[x0 | x_tau]. The reward then enters only through
    # D~, so w_pg and w_bp must be 0 (else the tilt is counted twice). Estimators of D~: linear_shift (a
    # single linear reward; exact, one teacher call), split_snis (any reward), shifted_proposal
    # (differentiable rewards); auto picks the first that fits the rewards (resolve_tilt_estimator).
    dm_target: Literal["teacher", "tilted"] = "teacher"
    tilt_estimator: Literal["auto", "linear_shift", "split_snis", "shifted_proposal"] = "auto"
    tilt_num_pairs: int = 4  # M: split-SNIS uses 2M posterior draws per DM sample
    tilt_posterior_steps: int = 32  # k: steps of the teacher's reverse sampler from tau to 0 (no exact posterior)
    # Fake-score updates per generator update (one optimiser step, after `accumulation` rollout batches),
    # on the rollouts' final samples (METHOD.md 5.5, reference 1). They are spread over the rollout batches:
    # batch m of A gets n_fake // A updates, plus one if m < n_fake % A.
    n_fake: int = 1
    lr: float = 3e-6
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    ema_decay: float = 0.9
    ema_every: int = 8
    # Diagnostic: back-propagate each weighted term alone and log its generator-gradient norm (grad_norm_pg,
    # grad_norm_bp, grad_norm_dm, before clipping), to see which term drives the update. Costs one backward
    # per term; the update is the same up to the order of summation. One process only.
    grad_norms_by_term: bool = False
    fake: FakeConfig = field(default_factory=FakeConfig)

    def validate(self, path: str) -> None:
        require(self.beta > 0, join_path(path, "beta"), f"got {self.beta}, expected > 0")
        require(self.group_size >= 2, join_path(path, "group_size"),
               f"got {self.group_size}, expected >= 2 (group-relative advantages need a group; with std "
               "normalisation a group of 1 has no spread)")
        require_min(self, path, 1, "num_prompts", "accumulation", "ema_every")
        require_min(self, path, 0, "n_fake", "bp_chunk")
        require_lr(self.lr, join_path(path, "lr"))
        require_ema_decay(self.ema_decay, join_path(path, "ema_decay"))
        require(self.dm_depth >= 0, join_path(path, "dm_depth"),
                f"got {self.dm_depth}, expected >= 0 (0 = whole chain)")
        require(self.num_trained_steps >= 0, join_path(path, "num_trained_steps"),
               f"got {self.num_trained_steps}, expected >= 0 (0 = every stochastic step)")
        require(0 < self.dm_tau_min < self.dm_tau_max <= 1, path,
               f"need 0 < dm_tau_min < dm_tau_max <= 1, got {self.dm_tau_min}, {self.dm_tau_max}")
        for name in ("w_dm", "w_pg", "w_bp"):
            w = getattr(self, name)
            require(w is None or w >= 0, join_path(path, name), f"got {w}, expected >= 0 or null (= beta)")
        if self.dm_target == "tilted":
            for name, w in zip(("w_pg", "w_bp"), self.weights()[1:]):
                require(w == 0, join_path(path, name), f"got {getattr(self, name)} (= {w}) with "
                        f"{join_path(path, 'dm_target')} = 'tilted': the tilted target already carries the "
                        "reward, so it would be counted twice; set it to 0 (the rtdmd_exact stage does; DM toward the "
                        "teacher plus the reward terms is the rtdmd_fullchain stage)")
            require(self.dm_scaling != "fisher", join_path(path, "dm_scaling"),
                    f"'fisher' differentiates the teacher's denoiser; {join_path(path, 'dm_target')} = "
                    "'tilted' (the rtdmd_exact stage) supports 'normalized' and 'kl'; the Fisher route is "
                    "stage=rtdmd_fullchain stage2.dm_scaling=fisher")
            require_min(self, path, 1, "tilt_num_pairs", "tilt_posterior_steps")

    def weights(self) -> tuple[float, float, float]:
        """(w_dm, w_pg, w_bp) with null resolved to beta."""
        return (self.w_dm, self.beta if self.w_pg is None else self.w_pg, self.beta if self.w_bp is None else self.w_bp)


def resolve_tilt_estimator(name: str, *, linear: bool, differentiable: bool, path: str = "stage2.tilt_estimator",
                           rewards: str = "the rewards") -> str:
    """stage2.tilt_estimator checked against the rewards (linear: a single linear reward r = a.x;
    differentiable: every reward is), with 'auto' resolved to linear_shift, else shifted_proposal, else
    split_snis. A mismatch is a ConfigError naming both settings."""
    if name == "auto":
        return "linear_shift" if linear else "shifted_proposal" if differentiable else "split_snis"
    require(name != "linear_shift" or linear, path, f"'linear_shift' needs a single linear reward r = a.x, but "
            f"{rewards} are not; use split_snis or shifted_proposal (or auto)")
    require(name != "shifted_proposal" or differentiable, path, f"'shifted_proposal' needs differentiable "
            f"rewards, but {rewards} are not all differentiable; use split_snis (or auto)")
    return name




@dataclass
class LoggingConfig:
    """metrics.jsonl is always written; TensorBoard and Weights & Biases are optional extras."""

    tensorboard: bool = False  # needs `pip install tensorboard`; events go to <run_dir>/tensorboard
    wandb: bool = False  # needs `pip install wandb`; set WANDB_MODE=offline to log without a server
    wandb_project: str = "tiltflow"
    progress_every_s: float = 30.0  # off a terminal (no progress bar): one progress line this often

    def validate(self, path: str) -> None:
        require(self.progress_every_s > 0, join_path(path, "progress_every_s"),
                f"got {self.progress_every_s}, expected > 0")


@dataclass
class ParallelConfig:
    """How the spine prepares the models before the optimisers are built (tiltflow.training.spine)."""

    activation_checkpointing: bool = False  # recompute each transformer block in the backward
    # With activation_checkpointing: recompute blocks 0, k, 2k, ... only (k = 2: about half the activation memory
    # saved for half the recomputation); 1: every block.
    activation_checkpointing_every: int = 1
    # Several ranks (torchrun): FSDP2 shards the generator and the fake score per block, then the root.
    # "ddp": replicate them instead (FSDP2 over a (ranks x 1) mesh, i.e. HSDP with shards of one rank: whole
    # parameters on every rank, gradients all-reduced in one step, as DistributedDataParallel does), for
    # models that fit one GPU, where the per-block all-gathers cost more than the memory they save.
    data_parallel: Literal["fsdp", "ddp"] = "fsdp"
    shard_teacher: bool = False  # a separate frozen teacher: shard it too (saves memory) or replicate it
    mixed_precision: bool = True  # under FSDP2 on CUDA: bf16 gathers and compute, fp32 master weights and reductions
    # Debugging the sharding: every rank trains on rank 0's data, so N ranks must reproduce one process.
    same_data_on_every_rank: bool = False
    # The teacher's classifier-free guidance as one transformer pass at batch 2B (cond and uncond concatenated
    # along the batch, then split) where the conditioning concatenates; false: two passes at batch B. Worlds
    # whose backbones do not offer it (gmm) and FLUX.1-dev (guidance is an input: one pass) are unaffected.
    batched_cfg: bool = True
    # torch.compile each transformer block (after activation checkpointing, before fully_shard), each distinct
    # transformer whole (one graph per pass: fewer guard checks and launches; one process only), or none.
    # The first iterations compile (minutes for a full-size model); inductor needs a C compiler on the CPU.
    compile: Literal["none", "blocks", "model"] = "none"
    # With compile: model on CUDA, replay each compiled pass as a CUDA graph (torch.compile's "reduce-overhead"
    # mode): one launch per pass instead of thousands, for host-bound passes; memory for the recorded graphs.
    cuda_graphs: bool = False
    # torch.compile the VAE's decoder too (worlds with a VAE; with cuda_graphs, replayed as a CUDA graph like the
    # transformer): its many small kernels (30 group norms at 512 px) fused, and launched once. It decodes every
    # sample image (evaluation, inference) and, in stage 2, the reward path with gradient.
    compile_vae: bool = False
    # Keep the frozen models (a separate teacher; the text encoders) in CPU memory and bring each of their
    # blocks to the GPU for its forward (diffusers' group offloading; the copies on a side stream on CUDA):
    # their GPU memory is saved, at the cost of a host-to-device copy of their weights on every pass.
    offload_frozen: bool = False

    def validate(self, path: str) -> None:
        require(not (self.offload_frozen and self.compile != "none"), join_path(path, "offload_frozen"),
                f"got true with compile '{self.compile}'; offloaded models move their weights in forward hooks, "
                "which compiled graphs cannot hold: use compile: none, or offload_frozen: false")
        require(not self.cuda_graphs or self.compile == "model", join_path(path, "cuda_graphs"),
                f"got true with compile '{self.compile}'; CUDA graphs replay a whole compiled pass, so they need "
                "compile: model")
        require(self.activation_checkpointing_every >= 1, join_path(path, "activation_checkpointing_every"),
                f"got {self.activation_checkpointing_every}, expected an integer >= 1 (1: every block)")


STAGE1_STAGES = ("ac_dmd", "dmd2")
STAGE2_STAGES = ("rtdmd", "rtdmd_exact", "rtdmd_fullchain", "grpo_only", "bp_only", "dm_bp")
# Stage names that were renamed: a config that still names one gets a config error naming its successor.
RENAMED_STAGES = {"rtdmd_tilted": "'rtdmd_tilted' is now called 'rtdmd_exact' (DM toward the diffused tilted "
                                  "target, METHOD.md 5.6); use stage=rtdmd_exact"}
# "teacher" trains a world's own teacher (worlds whose teacher is not a pretrained model).
STAGES = ("teacher", *STAGE1_STAGES, *STAGE2_STAGES)
# "rtdmd_tilted" is accepted by the type only so that validate can say what it became (RENAMED_STAGES).
Stage = Literal["teacher", "ac_dmd", "dmd2", "rtdmd", "rtdmd_exact", "rtdmd_fullchain", "grpo_only", "bp_only",
                "dm_bp", "rtdmd_tilted"]


@dataclass
class RunConfig:
    """Fields every world's run config has. A world subclasses this and adds its own fields."""

    stage: Stage = "ac_dmd"
    world: str = "gmm"
    seed: int = 0
    run_dir: str = "runs/default"
    init_from: str | None = None  # stage 2: the stage-1 run directory whose final weights start this stage
    device: str = "cpu"
    checkpoint_every: int = 200
    # Checkpoints kept: checkpoint.pt plus checkpoint-step<N>.pt for the newest N-1 before it (one process), or
    # the newest N step directories of checkpoint-dcp/ (several ranks)
    checkpoint_keep: int = 1
    checkpoint_retries: int = 0  # a failed checkpoint write (disk full, no permission): retries, then the run stops
    checkpoint_retry_wait_s: float = 10.0
    on_nonfinite: Literal["stop", "skip"] = "stop"  # a NaN/inf loss, gradient or reward: stop, or skip that update
    max_skipped_updates: int = 10  # with on_nonfinite: skip, the run stops once more updates than this are skipped
    # When the NaN/inf check reads its values: after every update (the host waits for the GPU once per update, 11
    # times a stage-1 cycle), or once at the end of each step (no wait between updates; a non-finite update is
    # then found at the step's end, the updates after it have run, and the run stops before anything of that
    # step is logged or saved: the last checkpoint is intact). "step" needs on_nonfinite: stop.
    nonfinite_check: Literal["update", "step"] = "update"
    log_every: int = 25
    # > 0: past this many seconds of one `tiltflow train` call the run checkpoints and stops (exit code 3);
    # the same command resumes it (for time-limited jobs). 0: no limit.
    time_limit_s: float = 0.0
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    stage1: Stage1Config = field(default_factory=Stage1Config)
    stage2: Stage2Config = field(default_factory=Stage2Config)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def validate(self, path: str) -> None:
        require(self.stage not in RENAMED_STAGES, "stage", RENAMED_STAGES.get(self.stage, ""))
        if self.stage == "rtdmd_exact":
            # rtdmd_exact used to be DM toward the teacher through the whole chain plus beta times the reward
            # gradient (stage2.mode 'exact'); a config written for that meaning must not silently run the new one.
            require(self.stage2.mode != "exact" and self.stage2.dm_target == "tilted", "stage2.mode" if
                    self.stage2.mode == "exact" else "stage2.dm_target",
                    "stage=rtdmd_exact is now DM toward the diffused tilted target (dm_target 'tilted', no reward "
                    "terms); the former rtdmd_exact (full-chain DM + beta times the reward gradient, stage2.mode "
                    "'exact') is stage=rtdmd_fullchain")
        require_min(self, "", 1, "checkpoint_every", "log_every", "checkpoint_keep")
        require(0 <= self.seed < 2**63, "seed", f"got {self.seed}, expected an integer in [0, 2**63)")
        require_min(self, "", 0, "checkpoint_retries", "max_skipped_updates")
        require(self.nonfinite_check == "update" or self.on_nonfinite == "stop", "nonfinite_check",
                f"got 'step' with on_nonfinite '{self.on_nonfinite}'; a check at the end of the step comes after the "
                "updates ran, so it cannot skip one: use on_nonfinite: stop, or nonfinite_check: update")
        require(math.isfinite(self.time_limit_s) and self.time_limit_s >= 0, "time_limit_s",
                f"got {self.time_limit_s}, expected seconds >= 0 (0: no limit)")
        require(math.isfinite(self.checkpoint_retry_wait_s) and self.checkpoint_retry_wait_s >= 0,
                "checkpoint_retry_wait_s", f"got {self.checkpoint_retry_wait_s}, expected a finite value >= 0")
        if self.stage in STAGE2_STAGES:
            k, s2 = self.sampler.num_steps, self.stage2
            require(s2.num_trained_steps <= k - 1, "stage2.num_trained_steps",
                   f"got {s2.num_trained_steps}, expected <= sampler.num_steps - 1 = {k - 1} (the stochastic steps)")
            require(s2.dm_depth <= k, "stage2.dm_depth", f"got {s2.dm_depth}, expected <= sampler.num_steps = {k}")
        if self.stage2.mode == "exact" and self.stage in ("rtdmd", "rtdmd_fullchain"):
            require(self.stage2.advantage == "raw", "stage2.advantage", "exact mode needs 'raw' advantages")
            require(self.stage2.ppo_clip is None, "stage2.ppo_clip", "exact mode uses no clipping (null)")

    def check_reward_bp(self, differentiable: bool, rewards_path: str) -> None:
        """A stage-2 run with w_bp > 0 needs a differentiable reward (the pathwise term has nothing to
        back-propagate otherwise): an error at config load, naming both settings."""
        if self.stage in STAGE2_STAGES and self.stage2.weights()[2] > 0 and not differentiable:
            w_bp = self.stage2.w_bp if self.stage2.w_bp is not None else f"null (= beta = {self.stage2.beta})"
            raise ConfigError("stage2.w_bp", f"got {w_bp} > 0, but no reward in '{rewards_path}' is "
                              "differentiable; set stage2.w_bp=0 or add a differentiable reward")


# Stage presets: applied before the file and the overrides (which win). Baselines of METHOD.md 6.
# DM toward the teacher through the whole chain plus beta times the unbiased reward gradient (what
# rtdmd_exact meant before 2026-12-02): NOT exact, its fixed point over-tilts by the factor F of METHOD.md 5.6.
_FULLCHAIN = {"mode": "exact", "w_dm": 1.0, "w_pg": None, "w_bp": None, "advantage": "raw", "ppo_clip": None,
          "logprob_reduction": "sum", "bp_loss": "linear", "dm_depth": 0, "dm_scaling": "normalized",
          "dm_reduction": "sum", "num_trained_steps": 0}
# The exact mode: DM toward the diffused tilted target (METHOD.md 5.6): no reward terms, DM through the whole
# chain; p_tilde is its fixed point.
_EXACT = {"w_dm": 1.0, "w_pg": 0.0, "w_bp": 0.0, "dm_depth": 0, "dm_scaling": "normalized",
           "dm_reduction": "sum", "dm_target": "tilted", "tilt_estimator": "auto", "dm_tau_max": 0.85}
STAGE_PRESETS: dict[str, dict] = {
    "dmd2": {"sampler": {"eta": 1.0}, "stage1": {"subinterval": False, "fake": {"consistency_gamma": 0.0}}},
    "rtdmd_exact": {"stage2": dict(_EXACT)},
    "rtdmd_fullchain": {"stage2": dict(_FULLCHAIN)},
    "grpo_only": {"stage2": {"w_dm": 0.0, "w_bp": 0.0}},
    "bp_only": {"stage2": {"w_dm": 0.0, "w_pg": 0.0}},
    "dm_bp": {"stage2": {"w_pg": 0.0}},
}
