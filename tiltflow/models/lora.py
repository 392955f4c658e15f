"""Teacher, generator and fake score of a diffusers backbone (METHOD.md 4.4 and 5.5) as LoRA adapters.

Layouts:
- "shared": ONE base transformer; teacher = adapters disabled, generator = its adapter, fake = its
  adapter. A role switch activates the right adapters before each call. For FLUX.2 the generator starts
  from another model (the step-distilled one): it then gets its own transformer (`generator_base`).
- "separate": a frozen teacher plus a generator copy and a fake copy, each with one adapter ("lora") or
  fully trainable ("full", fine-tuning every weight in fp32).
Stage 2 starts the generator from the stage-1 one plus a fresh adapter: the stage-1 LoRA is merged into
the weights in the separate layout, and kept as a frozen adapter under the fresh one in the shared
layout (merging there would change the teacher, which shares the weights).

peft's adapter switching sets requires_grad on adapters; the switch restores it, since autograd skips
leaves that lost requires_grad before backward. With gradient checkpointing, the recomputation runs the
role that ran the forward (a context_fn of torch.utils.checkpoint), whatever role is active later.
Under FSDP2 a block holds other parameter objects while it is gathered (from its pre-forward or pre-backward
hook to its reshard) than the sharded ones the optimisers hold, and peft flips the ones it holds at the time;
the switch restores both (the recomputation runs on gathered ones, and FSDP2 copies the flags of the sharded
ones at the next gather).
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from tiltflow.models.roles import Roles

GENERATOR, FAKE, STAGE1 = "generator", "fake", "generator_stage1"
LAYOUTS, FINETUNES = ("shared", "separate"), ("lora", "full")


@dataclass
class LoraSettings:
    """Reference: rank 32, alpha 64 on the attention projections (METHOD.md 4.4)."""

    rank: int = 32
    alpha: float = 64.0
    dropout: float = 0.0

    def config(self, target_modules: Sequence[str]) -> Any:
        from peft import LoraConfig

        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        return LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout, init_lora_weights=True,
                          target_modules=list(target_modules))


def add_lora(transformer: nn.Module, name: str, settings: LoraSettings, targets: Sequence[str],
             state: dict[str, Tensor] | None = None, seed: int = 0) -> list[tuple[str, nn.Parameter]]:
    """Add adapter `name` (fp32 weights, B = 0 so it starts as the identity, unless `state` is given);
    returns its (name, parameter) pairs. The random A init is seeded from (seed, name)."""
    from peft.utils import set_peft_model_state_dict

    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # Several adapters on one transformer is the design (the shared layout's generator and fake score, a
        # stage-1 LoRA under a stage-2 one); peft warns about every adapter after the first.
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute", category=UserWarning)
        torch.manual_seed(seed * 1000 + sum(name.encode()))
        transformer.add_adapter(settings.config(targets), adapter_name=name)
    if state is not None:
        result = set_peft_model_state_dict(transformer, state, adapter_name=name)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise ValueError(f"LoRA state for adapter {name!r} has {len(unexpected)} unexpected keys, "
                             f"e.g. {unexpected[:3]}")
    params = [(n, p) for n, p in transformer.named_parameters() if f".{name}." in n and "lora_" in n]
    if not params:
        raise RuntimeError(f"adapter {name!r} added no parameters (targets {list(targets)[:3]}...)")
    for _, p in params:
        p.data = p.data.float()  # fp32 master weights whatever the base dtype
    return params


def keep_input_dtype(transformer: nn.Module) -> int:
    """Under autocast only: let the LoRA layers take their (bf16) input as it is. peft casts a LoRA layer's
    input to its fp32 weights' dtype, and autocast casts it back to bf16 for the matrix product: two copies of
    the activation per layer and per pass (mostly host launch time: on an H200, SD3.5-M 4-step inference was
    13% faster at batch 1 and 9% at batch 9 without them, the forward's kernel time 1.7% less,
    benchmarks/results/lora_input_cast_ab_h200_2026-12-02.json). Without the round trip the product sees
    the same bf16 values, so the result is the same. Returns the number of layers set."""
    layers = [m for m in transformer.modules() if hasattr(m, "cast_input_dtype_enabled")]
    for m in layers:
        m.cast_input_dtype_enabled = False
    return len(layers)


def lora_state(transformer: nn.Module, name: str) -> dict[str, Tensor]:
    """Adapter `name` as a peft state dict (keys without the adapter name), detached fp32 copies."""
    from peft.utils import get_peft_model_state_dict

    sd = get_peft_model_state_dict(transformer, adapter_name=name)
    # Sharded (FSDP2) adapters are gathered: every rank must call this, and every rank gets the whole adapter.
    return {k: full_value(v.detach()).float().cpu().clone() for k, v in sd.items()}


def full_value(t: Tensor) -> Tensor:
    """A sharded tensor (DTensor) gathered to its full value, a collective (models/ imports only flow/ of
    tiltflow, so this does not use tiltflow.distributed.state.full_tensor); any other tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class AdapterSwitch:
    """Which adapters of one transformer are active; () means the base model (adapters disabled).

    A switch sets only what peft's LoRA forward reads: each layer's active adapters and whether adapters
    are disabled. peft's own enable_adapters / set_adapter also reset requires_grad on every adapter weight
    (two passes over all of them per layer): about 20 ms of host time per switch on a 24-block transformer
    on a 2-core CPU, and a stage-1 cycle switches about 25 times. requires_grad stays what the roles need
    (trainable adapters trainable, the others frozen), set once here and after every rebind."""

    def __init__(self, transformer: nn.Module, trainable: Sequence[nn.Parameter]):
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.transformer = transformer
        self.layers = [m for m in transformer.modules() if isinstance(m, BaseTunerLayer)]
        ids = {id(p) for p in trainable}
        self.trainable_names = {n for n, p in transformer.named_parameters() if "lora_" in n and id(p) in ids}
        if not all(hasattr(type(layer), a) for layer in self.layers for a in ("_active_adapter", "_disable_adapters")):
            raise RuntimeError("this peft version keeps a LoRA layer's active adapters elsewhere than "
                               "_active_adapter / _disable_adapters (peft 0.17 to 0.21 do); AdapterSwitch needs "
                               "updating")
        self.rebind()
        self.current: tuple[str, ...] | None = None

    def rebind(self) -> None:
        """Set requires_grad on the transformer's current LoRA parameters (fully_shard replaces every parameter
        object by a sharded one of the same name): trainable adapters trainable, the others frozen."""
        for n, p in self.transformer.named_parameters():
            if "lora_" in n:
                p.requires_grad_(n in self.trainable_names)

    def activate(self, names: tuple[str, ...]) -> None:
        if names == self.current:
            return
        active = list(names)
        for layer in self.layers:
            layer._disable_adapters = not names
            if names:
                layer._active_adapter = active
        self.current = names

    @contextlib.contextmanager
    def using(self, names: tuple[str, ...]) -> Iterator[None]:
        before = self.current
        self.activate(names)
        try:
            yield
        finally:
            if before is not None:
                self.activate(before)

    def checkpoint_fn(self) -> Callable[..., Any]:
        """A gradient_checkpointing_func for diffusers whose recomputation uses the forward's adapters."""
        def run(module: nn.Module, *args: Any) -> Any:
            names = self.current
            assert names is not None
            if torch.compiler.is_compiling():  # a whole compiled transformer: the graph holds its adapters, and
                # dynamo's checkpoint recomputes that graph (it has no context_fn)
                return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False)

            def context() -> tuple[Any, Any]:
                return contextlib.nullcontext(), self.using(names)
            return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False,
                                                     context_fn=context)
        return run


class RoleBackbone:
    """One role: a transformer, the adapters active for it and (FLUX.1) its guidance input."""

    def __init__(self, adapter: Any, transformer: nn.Module, switch: AdapterSwitch | None,
                 adapters: tuple[str, ...], guidance: float | None = None):
        self.adapter, self.transformer, self.switch = adapter, transformer, switch
        self.adapters, self.guidance = adapters, guidance

    def velocity(self, x: Tensor, sigma: Tensor, cond: Any) -> Tensor:
        if self.switch is not None:
            self.switch.activate(self.adapters)
        return self.adapter.forward(self.transformer, x, sigma, cond, self.guidance)


@dataclass
class RoleModels:
    """The transformers behind the three roles, the trainable parameters by name, and the Roles."""

    finetune: str
    teacher: nn.Module
    generator: nn.Module
    fake: nn.Module
    generator_adapters: tuple[str, ...]
    generator_named: list[tuple[str, nn.Parameter]]
    fake_named: list[tuple[str, nn.Parameter]]
    teacher_role: RoleBackbone
    generator_role: RoleBackbone
    fake_role: RoleBackbone
    switches: list[AdapterSwitch] = field(default_factory=list)

    def rebind(self) -> None:
        """Re-read the trainable parameters by name from the modules. fully_shard (FSDP2) replaces each
        parameter object by a sharded DTensor parameter of the same name; objects captured before it would be
        stale (an optimiser over them never sees a gradient)."""
        for attr, module in (("generator_named", self.generator), ("fake_named", self.fake)):
            live = dict(module.named_parameters())
            named = getattr(self, attr)
            if any(live.get(n) is not p for n, p in named):
                missing = [n for n, _ in named if n not in live]
                if missing:
                    raise RuntimeError(f"{attr}: the module lost {len(missing)} parameters, e.g. {missing[:2]}")
                setattr(self, attr, [(n, live[n]) for n, _ in named])
        for switch in self.switches:
            switch.rebind()

    def roles(self) -> Roles:
        self.rebind()
        return Roles(teacher=self.teacher_role, generator=self.generator_role, fake=self.fake_role,
                     generator_params=[p for _, p in self.generator_named],
                     fake_params=[p for _, p in self.fake_named])

    def trainable_state(self) -> dict[str, Tensor]:
        """Detached copies of the trainable parameters: this rank's shards when sharded (a checkpoint of a
        sharded run gathers them itself; an export gathers them, see full_value)."""
        self.rebind()
        return {f"{role}/{n}": p.detach().clone()
                for role, named in (("generator", self.generator_named), ("fake", self.fake_named)) for n, p in named}

    @torch.no_grad()
    def load_trainable_state(self, state: dict[str, Tensor], roles: Sequence[str] = ("generator", "fake")) -> None:
        self.rebind()
        for role in roles:
            named = self.generator_named if role == "generator" else self.fake_named
            missing = [n for n, _ in named if f"{role}/{n}" not in state]
            if missing:
                raise KeyError(f"state lacks {len(missing)} {role} parameters, e.g. {missing[:2]}")
            wrong = [(n, tuple(state[f"{role}/{n}"].shape), tuple(p.shape)) for n, p in named
                     if not hasattr(p, "device_mesh") and state[f"{role}/{n}"].shape != p.shape]
            if wrong:
                n, got, want = wrong[0]
                raise ValueError(f"state's {role} parameters do not fit this model ({len(wrong)} differ in shape, "
                                 f"e.g. {n}: {got} in the state, {want} here): was it saved with another lora.rank "
                                 "or lora.finetune than this run's?")
            for n, p in named:
                value = state[f"{role}/{n}"].to(p.device, p.dtype)
                if hasattr(p, "device_mesh") and not hasattr(value, "device_mesh"):  # a full tensor into shards
                    from torch.distributed.tensor import distribute_tensor

                    value = distribute_tensor(value, p.device_mesh, p.placements)
                p.copy_(value)

    def modules(self) -> dict[str, nn.Module]:
        return {"generator": self.generator, "fake": self.fake}

    def shard_units(self, include_teacher: bool) -> list[Any]:
        """FSDP2 units: each distinct trainable transformer (one in the shared layout: the base carries the
        generator's and the fake's adapters and is the teacher too), cut at its transformer blocks; a separate
        frozen teacher when asked. (The plan's type lives in tiltflow.distributed.fsdp: models/ does not
        import it, the spine does.)"""
        from types import SimpleNamespace

        roots = {id(m): m for m in (self.generator, self.fake)}
        if include_teacher and id(self.teacher) not in roots:
            roots[id(self.teacher)] = self.teacher
        return [SimpleNamespace(root=m, blocks=[b for name in ("transformer_blocks", "single_transformer_blocks")
                                                for b in getattr(m, name, [])]) for m in roots.values()]

    def offload_frozen(self) -> list[str]:
        """Group offloading (diffusers.hooks, block level) of the models no role trains: a separate teacher
        and the adapter's text encoders. Their weights go to CPU memory (pinned) and each block comes back to
        the device it was on for its forward. Returns what was offloaded."""
        from diffusers.hooks import apply_group_offloading

        adapter = self.teacher_role.adapter
        frozen = {"teacher": self.teacher} if all(self.teacher is not m for m in (self.generator, self.fake)) else {}
        frozen.update({n: m for n in ("text_encoder", "text_encoder_2", "text_encoder_3")
                       if (m := getattr(getattr(adapter, "pipe", None), n, None)) is not None})
        for module in frozen.values():
            device = next(module.parameters()).device
            apply_group_offloading(module, onload_device=device, offload_type="block_level", num_blocks_per_group=1,
                                   use_stream=device.type == "cuda")
        return list(frozen)

    def enable_activation_checkpointing(self, every: int = 1) -> None:
        """Recompute transformer blocks in the backward: every one (every = 1), or blocks 0, every, 2 every,
        ... (the others keep their activations: less memory saved, less recomputed). The recomputation runs the
        role (adapters) that ran the forward, whatever role is active later."""
        for module in {id(m): m for m in (self.generator, self.fake)}.values():
            switch = next((sw for sw in self.switches if sw.transformer is module), None)
            fn = switch.checkpoint_fn() if switch else _checkpoint
            if every > 1:
                blocks = [b for name in ("transformer_blocks", "single_transformer_blocks")
                          for b in getattr(module, name, [])]
                kept = {id(b) for i, b in enumerate(blocks) if i % every}
                fn = _unless(kept, fn)
            module.enable_gradient_checkpointing(fn)

    def generator_weights(self) -> dict[str, Tensor]:
        """What initialises a stage-2 generator: the LoRA state (lora) or the full state dict (full)."""
        if self.finetune == "full":  # gathered when sharded (every rank calls this)
            return {k: full_value(v.detach()).float().cpu().clone() for k, v in self.generator.state_dict().items()}
        return lora_state(self.generator, GENERATOR)

    def merged_generator_weights(self) -> dict[str, Tensor]:
        """The generator as one plain state dict: its base's weights with its LoRA adapters added in (what a
        LoRA stage 2 on a full-fine-tuned stage-1 generator exports). Gathered when sharded (a collective)."""
        from tiltflow.models.export import merged_state_dict

        return merged_state_dict(self.generator, self.generator_adapters, torch.float32)


def _checkpoint(module: nn.Module, *args: Any) -> Any:
    """diffusers' default gradient_checkpointing_func: recompute the block in the backward."""
    return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False)


def _unless(kept: set[int], checkpoint: Callable[..., Any]) -> Callable[..., Any]:
    """A gradient_checkpointing_func that runs the blocks whose id is in `kept` plainly."""
    def run(module: nn.Module, *args: Any) -> Any:
        return module(*args) if id(module) in kept else checkpoint(module, *args)
    return run


def _prepare(base: nn.Module, settings: LoraSettings, targets: list[str], stage1: dict[str, Tensor] | None,
             merge: bool) -> tuple[tuple[str, ...], list[tuple[str, nn.Parameter]]]:
    """Generator adapters on `base`: optionally the stage-1 LoRA (merged, or frozen below), then a fresh one."""
    names: tuple[str, ...] = (GENERATOR,)
    if stage1 is not None:  # a scale-1 LoRA (alpha = rank), as tiltflow.models.export writes them
        rank = next(v.shape[0] for k, v in stage1.items() if k.endswith(".lora_A.weight"))
        s1 = LoraSettings(rank=rank, alpha=float(rank))
        s1_targets = sorted({k[: -len(".lora_A.weight")] for k in stage1 if k.endswith(".lora_A.weight")})
        add_lora(base, STAGE1, s1, s1_targets, stage1)
        if merge:  # folded into the transformer's own weights (then no adapter remains)
            base.fuse_lora(adapter_names=[STAGE1])
            base.unload_lora()
        else:
            names = (STAGE1, GENERATOR)
    return names, add_lora(base, GENERATOR, settings, targets)


def _full_copy(module: nn.Module, state: dict[str, Tensor] | None = None) -> tuple[nn.Module, list]:
    out = copy.deepcopy(module).float().train()
    if state is not None:
        out.load_state_dict(state)
    out.requires_grad_(True)
    return out, list(out.named_parameters())


def build_roles(adapter: Any, *, layout: str = "shared", finetune: str = "lora",
                lora: LoraSettings | None = None, generator_base: nn.Module | None = None,
                stage1_generator: dict[str, Tensor] | None = None, student_guidance: float | None = None,
                fake_base: nn.Module | None = None) -> RoleModels:
    """Roles over `adapter.transformer` (the teacher, never modified). `generator_base` (FLUX.2: the
    distilled model; or a full-fine-tuned stage-1 generator) initialises the generator instead of the
    teacher; `stage1_generator` starts a stage-2 generator: a scale-1 LoRA state (alpha = rank, as export
    writes it), or the full weights when finetune='full'. `fake_base` (LoRA, layout 'separate': a full-fine-
    tuned stage-1 fake score) carries the fake score's LoRA instead of a copy of the teacher."""
    if layout not in LAYOUTS or finetune not in FINETUNES:
        raise ValueError(f"layout must be one of {LAYOUTS} and finetune one of {FINETUNES}, "
                         f"got layout={layout!r}, finetune={finetune!r}")
    if layout == "shared" and finetune == "full":
        raise ValueError("full fine-tuning needs layout='separate' (the shared layout holds LoRA adapters)")
    settings = lora or LoraSettings()
    base = adapter.transformer
    targets = adapter.lora_target_modules(base)
    teacher_guidance = getattr(adapter, "guidance", None)
    student_guidance = teacher_guidance if student_guidance is None else student_guidance
    gen_src = base if generator_base is None else generator_base
    switches: dict[int, AdapterSwitch] = {}
    if finetune == "full":
        gen, gen_named = _full_copy(gen_src, stage1_generator)
        fake, fake_named = _full_copy(base)
        gen_names: tuple[str, ...] = ()
        fake_adapters: tuple[str, ...] = ()
    else:
        shared_gen = layout == "shared" and generator_base is None
        own = layout == "shared" or generator_base is not None  # a dedicated generator_base needs no copy
        gen = gen_src if own else copy.deepcopy(gen_src)
        if fake_base is not None and layout == "shared":
            raise ValueError("a fake_base needs layout='separate' (in the shared layout the fake score's LoRA sits "
                             "on the teacher)")
        fake = fake_base if fake_base is not None else base if layout == "shared" else copy.deepcopy(base)
        gen_names, gen_named = _prepare(gen, settings, targets, stage1_generator, merge=not shared_gen)
        fake_named = add_lora(fake, FAKE, settings, targets)
        fake_adapters = (FAKE,)
        trainable = [p for _, p in gen_named + fake_named]
        precision = getattr(adapter, "precision", None)
        for module in {id(m): m for m in (gen, fake)}.values():  # each distinct LoRA-carrying transformer
            switches[id(module)] = AdapterSwitch(module, trainable)
            if precision is not None and precision.autocast:
                keep_input_dtype(module)
    return RoleModels(
        finetune, base, gen, fake, gen_names, gen_named, fake_named,
        teacher_role=RoleBackbone(adapter, base, switches.get(id(base)), (), teacher_guidance),
        generator_role=RoleBackbone(adapter, gen, switches.get(id(gen)), gen_names, student_guidance),
        fake_role=RoleBackbone(adapter, fake, switches.get(id(fake)), fake_adapters, student_guidance),
        switches=list(switches.values()))
