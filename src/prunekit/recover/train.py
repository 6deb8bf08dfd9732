"""Recovery training: LoRA, distillation from the original model, or both, in one plain loop.

| method        | trains                          | loss                                              |
|---------------|---------------------------------|---------------------------------------------------|
| lora          | LoRA adapters (merged at the end) | cross-entropy on the data                         |
| distill       | every weight                    | KL to the teacher (+ ce_weight CE, + hidden_weight) |
| lora+distill  | LoRA adapters (merged at the end) | KL to the teacher (+ ...)                         |
| full          | every weight                    | cross-entropy on the data                         |

The loop is AdamW with linear warm-up and cosine decay, gradient accumulation and clipping, bf16
autocast on GPUs that have it. The model runs to its final hidden states (the head makes the logits
of one position) and the vocabulary-wide losses take the logits of a chunk of positions at a time
(prunekit.models.loss), the teacher's too: a batch's full logits are never held, so a 262,144-token
vocabulary trains in the memory its weights and activations need. `accelerate` places it: one
process on the CPU or a GPU, or the same code under `accelerate launch` for DDP; with `shard=True` each process holds a 1/N slice
of every weight, gradient and AdamW state (FSDP2, one unit per decoder layer), for a model
whose training fits no single GPU. Checkpoints hold the model, optimizer and random states; a
run that is killed resumes from its last checkpoint to the same weights as a run that never
stopped, since the data order and the learning rate are functions of the step.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from prunekit.data.calibration import IGNORE_INDEX
from prunekit.data.sources import SELF_SOURCE
from prunekit.errors import PrunekitError
from prunekit.models.architecture import architecture_for
from prunekit.models.loss import OutputHead, chunk_positions, chunked_head_loss, head_logits, product_head, token_nll
from prunekit.models.modeling_prunekit import decoder_layers
from prunekit.recover import losses
from prunekit.recover.data import RecoveryData, recovery_rows


class RecoveryError(PrunekitError, ValueError):
    """Recovery cannot run as asked, or training diverged."""


SHARD_NEEDS_LAUNCHER = ("shard splits the model over the processes of a launcher, and this is a single process; "
                        "run it under `accelerate launch --num_processes N` or `torchrun --nproc_per_node N`, "
                        "or drop shard")


@dataclass(frozen=True)
class Method:
    lora: bool        # train LoRA adapters (merged at the end) instead of every weight
    distill: bool     # learn from the teacher's logits instead of the data's next tokens
    default_lr: float


METHODS: dict[str, Method] = {
    "lora": Method(lora=True, distill=False, default_lr=2e-4),
    "distill": Method(lora=False, distill=True, default_lr=2e-4),  # BENCHMARKS.md: 2e-4 beat 5e-5, 5e-4, 1e-3
    "lora+distill": Method(lora=True, distill=True, default_lr=2e-4),
    "full": Method(lora=False, distill=False, default_lr=5e-5),
}
PRECISIONS = ("auto", "fp32", "bf16")


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise RecoveryError(f"unknown recovery method {name!r}; choose one of {list(METHODS)}")
    return METHODS[name]


@dataclass(frozen=True)
class RecoverySettings:
    method: str = "distill"
    tokens: int = 200_000                 # training budget; rows = tokens // seq_len, rounded down to whole steps
    batch_size: int = 4                   # rows per micro-batch per process
    grad_accum: int = 1
    lr: float | None = None               # None: the method's default (METHODS)
    weight_decay: float = 0.0
    warmup: float = 0.05                  # fraction of the steps with a linear warm-up
    min_lr_ratio: float = 0.1             # the cosine ends at lr * min_lr_ratio
    clip: float = 1.0                     # gradient-norm clipping (0: off)
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ("all-linear",)
    temperature: float = 1.0
    ce_weight: float = 0.0                # with distillation: add this much cross-entropy on the data
    hidden_weight: float = 0.0            # with distillation: add this much hidden-state matching at kept layers
    teacher_cache: int = 0                # 0: teacher logits on the fly; k: cache the teacher's top-k logits first
    eval_every: int = 25                  # steps between held-out perplexity measurements (0: start and end only)
    checkpoint_every: int = 50            # steps between checkpoints (0: none)
    precision: str = "auto"               # auto: bf16 autocast on CUDA GPUs that support it, else fp32
    shard: bool = False                   # under a launcher: split weights, gradients and AdamW state over the
                                          # processes (FSDP2), for a model whose training state fits no one GPU
    activation_checkpointing: bool = False  # keep only each layer's input and recompute the rest in the
                                            # backward pass: about a third more compute, far less memory
    seed: int = 0
    data: RecoveryData = field(default_factory=RecoveryData)

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else get_method(self.method).default_lr

    def validate(self) -> None:
        """Everything that can be checked without a model; raises RecoveryError naming the fix."""
        method = get_method(self.method)
        positive = {"tokens": self.tokens, "batch_size": self.batch_size, "grad_accum": self.grad_accum,
                    "lora_rank": self.lora_rank}
        for name, value in positive.items():
            if value < 1:
                raise RecoveryError(f"{name} must be at least 1, got {value}")
        if self.learning_rate <= 0:
            raise RecoveryError(f"lr must be positive, got {self.learning_rate}")
        if not 0 <= self.warmup < 1 or not 0 <= self.min_lr_ratio <= 1:
            raise RecoveryError(f"warmup ({self.warmup}) must be in [0, 1) and min_lr_ratio ({self.min_lr_ratio}) in [0, 1]")
        if self.temperature <= 0:
            raise RecoveryError(f"temperature must be positive, got {self.temperature}")
        for name in ("ce_weight", "hidden_weight", "teacher_cache", "eval_every", "checkpoint_every", "clip", "weight_decay"):
            if getattr(self, name) < 0:
                raise RecoveryError(f"{name} must not be negative, got {getattr(self, name)}")
        if not method.distill and (self.ce_weight or self.hidden_weight or self.teacher_cache):
            raise RecoveryError(f"ce_weight, hidden_weight and teacher_cache apply to distillation; method "
                                f"{self.method!r} has no teacher loss (use distill or lora+distill)")
        if self.hidden_weight and self.teacher_cache:
            raise RecoveryError("hidden-state matching needs the teacher's hidden states on the fly; "
                                "drop teacher_cache or hidden_weight")
        if self.precision not in PRECISIONS:
            raise RecoveryError(f"unknown precision {self.precision!r}; choose one of {list(PRECISIONS)}")
        self.data.validate()
        if self.tokens < self.data.seq_len * self.batch_size * self.grad_accum:
            raise RecoveryError(
                f"a token budget of {self.tokens:,} is smaller than one optimizer step "
                f"({self.batch_size} rows x {self.grad_accum} accumulation x {self.data.seq_len} tokens = "
                f"{self.batch_size * self.grad_accum * self.data.seq_len:,}); raise tokens or lower batch_size / seq_len")

    @property
    def needs_teacher(self) -> bool:
        return get_method(self.method).distill or self.data.source == SELF_SOURCE

    def to_dict(self) -> dict:
        return asdict(self)


def learning_rate_at(step: int, total_steps: int, settings: RecoverySettings) -> float:
    """Linear warm-up to lr, then cosine decay to lr * min_lr_ratio at the last step (nanoGPT's schedule)."""
    peak, warmup = settings.learning_rate, int(settings.warmup * total_steps)
    if step < warmup:
        return peak * (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total_steps - warmup - 1)
    floor = peak * settings.min_lr_ratio
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * min(1.0, progress)))


# ----------------------------------------------------------------------------- pieces of the loop


def _with_lora(model: nn.Module, settings: RecoverySettings) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    targets = list(settings.lora_targets)
    if targets == ["all-linear"]:
        # Named here rather than through PEFT's "all-linear", whose set of names comes in another
        # order in every process and so draws the adapters' random initial values in another order.
        head = model.get_output_embeddings()
        targets = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                          if isinstance(module, nn.Linear) and module is not head})
    config = LoraConfig(r=settings.lora_rank, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
                        target_modules=targets, bias="none", task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, config)
    except ValueError as error:  # PEFT names the targets it could not find
        raise RecoveryError(f"LoRA targets {list(targets)} do not fit this model ({error}); "
                            "pass module names such as q_proj,v_proj or all-linear") from None


def _set_activation_checkpointing(model: nn.Module, enable: bool) -> None:
    # transformers 5.2x renamed gradient_checkpointing_* to activation_checkpointing_*; older 5.x has only the first.
    prefix = "activation" if hasattr(model, "activation_checkpointing_enable") else "gradient"
    if enable:
        getattr(model, f"{prefix}_checkpointing_enable")({"use_reentrant": False})
    else:
        getattr(model, f"{prefix}_checkpointing_disable")()


def next_tokens(labels: torch.Tensor) -> torch.Tensor:
    """The label each position predicts: labels shifted left, the last position ignored. Shifting
    the labels rather than slicing the logits spares a copy of the [batch, seq, vocab] logits and
    of their gradient at every step."""
    return torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def _rows_of_step(order: torch.Tensor, step: int, micro: int, settings: RecoverySettings, world: int,
                  rank: int) -> torch.Tensor:
    """Training rows of one micro-batch of this process: a fixed function of (step, micro, rank)."""
    start = ((step * settings.grad_accum + micro) * world + rank) * settings.batch_size
    return order[start:start + settings.batch_size]


def chunkable_head(model: nn.Module) -> OutputHead | None:
    """The output head, when the loss can make its logits a chunk at a time from the final hidden
    states: a plain linear head. A head that LoRA adapts is not (its logits need the adapter's
    forward), and gets the full logits. Read it after the model's forward: a sharded (FSDP2)
    model's head weight is whole only from its forward until its backward."""
    head = model.get_output_embeddings()
    return OutputHead.of(model) if type(head) is nn.Linear else None


def final_hidden_states(model: nn.Module, ids: torch.Tensor, chunked: object):
    """The model's output on `ids` with every layer's hidden states; the last is the final norm's
    output, what the head turns into logits. When the loss is `chunked` the model makes the logits
    of the last position only (transformers' logits_to_keep), through its own forward, so that
    DDP's and FSDP's hooks run as for the full logits."""
    return model(input_ids=ids, use_cache=False, output_hidden_states=True, logits_to_keep=1 if chunked else 0)


@torch.no_grad()
def teacher_output(teacher: nn.Module, ids: torch.Tensor, *, full_logits: bool, hidden_states: bool):
    """The teacher's output on `ids`: its full logits when the student's loss takes them, else only
    its final hidden states (the backbone alone: the teacher is never wrapped for DDP or FSDP, and
    without gradients the other layers' states need not be kept, unless `hidden_states` asks)."""
    if full_logits:
        return teacher(input_ids=ids, use_cache=False, output_hidden_states=hidden_states)
    return teacher.base_model(input_ids=ids, use_cache=False, output_hidden_states=hidden_states)


@torch.no_grad()
def _teacher_top_k(teacher: nn.Module, ids: torch.Tensor, rows: list[int], k: int, batch_size: int,
                   device: torch.device, progress: bool) -> tuple[torch.Tensor, torch.Tensor]:
    values = torch.zeros(len(ids), ids.shape[1], k, dtype=torch.bfloat16)
    indices = torch.zeros(len(ids), ids.shape[1], k, dtype=torch.int32)
    head = product_head(OutputHead.of(teacher))
    positions = chunk_positions(head.vocab_size, device)
    for start in tqdm(range(0, len(rows), batch_size), desc=f"teacher top-{k} logits", unit="batch", disable=not progress):
        chunk = torch.tensor(rows[start:start + batch_size])
        hidden = teacher_output(teacher, ids[chunk].to(device), full_logits=False, hidden_states=False)
        flat = hidden.last_hidden_state.flatten(0, 1)
        top = [losses.top_k_logits(head_logits(head, flat[first:first + positions]), k)
               for first in range(0, len(flat), positions)]
        shape = (len(chunk), ids.shape[1], k)
        values[chunk] = torch.cat([v for v, _ in top]).view(shape).to(torch.bfloat16).cpu()
        indices[chunk] = torch.cat([i for _, i in top]).view(shape).cpu()
    return values, indices


@torch.no_grad()
def held_out_perplexity(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor, batch_size: int,
                        device: torch.device) -> float:
    """exp of the mean next-token loss over the counted tokens of the held-out rows."""
    was_training = model.training
    model.eval()
    chunked = chunkable_head(_unwrapped(model)) is not None
    total, count = 0.0, 0
    for start in range(0, len(ids), batch_size):
        batch, target = ids[start:start + batch_size].to(device), next_tokens(labels[start:start + batch_size]).to(device)
        mask = target != IGNORE_INDEX
        output = final_hidden_states(model, batch, chunked)
        head = chunkable_head(_unwrapped(model)) if chunked else None  # after the forward (see chunkable_head)
        if head is None:
            total += float(losses.cross_entropy(output.logits, target, mask)) * int(mask.sum())
        else:
            total += float(token_nll(head, output.hidden_states[-1][mask], target[mask]).sum(dtype=torch.float64))
        count += int(mask.sum())
        del output
    model.train(was_training)
    return math.exp(total / max(count, 1))


def _save_checkpoint(accelerator, directory: Path, state: dict, sharded: tuple | None = None) -> None:
    """The training state plus our own (step, history, settings) under directory/last, replaced in
    one rename. `sharded` = (model, optimizer) of a sharded run: every process writes its slices
    (torch.distributed.checkpoint) and its random state; else accelerate saves its prepared objects."""
    tmp, last, old = directory / "last.tmp", directory / "last", directory / "last.old"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    if sharded is None:
        accelerator.save_state(str(tmp), safe_serialization=False)
    else:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optimizer_state = get_state_dict(*sharded)
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(tmp))
        torch.save(_random_state(), tmp / f"random_state_{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "trainer_state.json").write_text(json.dumps(state) + "\n")
        if last.exists():
            os.replace(last, old)
        os.replace(tmp, last)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _load_sharded_checkpoint(found: Path, model: nn.Module, optimizer, process_index: int) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=str(found))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    random_state = torch.load(found / f"random_state_{process_index}.pt", weights_only=False)
    torch.set_rng_state(random_state["cpu"])
    if random_state["cuda"] is not None:
        torch.cuda.set_rng_state(random_state["cuda"])


def _random_state() -> dict:
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def latest_checkpoint(directory: Path) -> Path | None:
    """The last complete checkpoint: `last`, or `last.old` when a kill fell between the two renames."""
    for name in ("last", "last.old"):
        if (directory / name / "trainer_state.json").is_file():
            return directory / name
    return None


def _comparable(settings: dict) -> dict:
    """The settings a resumed run must share with the run it continues (evaluation cadence may change)."""
    return {k: v for k, v in settings.items() if k not in ("eval_every", "checkpoint_every")}


# ----------------------------------------------------------------------------- sharded training (FSDP2)


def _unwrapped(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (accelerate's prepare under a launcher)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _base_model(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model  # through a PEFT wrapper


def shard_model(model: nn.Module, device: torch.device, precision: str) -> nn.Module:
    """Split `model` over the processes: one FSDP2 unit per decoder layer, and the root unit for
    the rest (embeddings, final norm, output head), which keeps tied input and output embeddings
    in one unit. A layer's full weights exist only while it runs; with bf16 they are gathered in
    bf16 and gradients are reduced in fp32."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if precision == "bf16" \
        else MixedPrecisionPolicy()
    base = _base_model(model)
    for layer in decoder_layers(base, architecture_for(base.config.model_type).to_dict()):
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def unsharded_copy(model: nn.Module, model_class: type, settings: RecoverySettings) -> nn.Module | None:
    """The weights of a sharded `model` gathered into an ordinary `model_class` (its class before
    sharding) in CPU memory on the first process; None on the others. Every process must call it
    (the gathering is collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if torch.distributed.get_rank() != 0:
        return None
    with torch.device("meta"):
        copy = model_class(_base_model(model).config)
        if get_method(settings.method).lora:
            copy = _with_lora(copy, settings)
    copy.load_state_dict(state, assign=True)
    # Buffers are not sharded, and computed ones (rotary frequencies) are not in the state dict.
    for name, buffer in model.named_buffers():
        owner, _, attribute = name.rpartition(".")
        setattr(copy.get_submodule(owner), attribute, buffer.detach().cpu())
    _base_model(copy).tie_weights()
    return copy


# ----------------------------------------------------------------------------- the loop


def recover_loaded(student: nn.Module, tokenizer, settings: RecoverySettings, *, teacher: nn.Module | None = None,
                   layer_map: list[int] | None = None, checkpoint_dir: str | Path | None = None,
                   resume: bool = False, progress: bool = True) -> tuple[nn.Module | None, dict]:
    """Train `student` as `settings` say and return (the trained model, LoRA merged; a record).
    With `settings.shard` only the first process gets the model back (the others get None).

    `teacher` is the original model (distillation, and `self` data). `layer_map[i]` is the teacher
    layer that student layer i came from (hidden-state matching; identity when the depths agree).
    With `checkpoint_dir`, a checkpoint is written every `checkpoint_every` steps; `resume`
    continues from the last one. A NaN or infinite loss stops training with RecoveryError; the
    last checkpoint is the last good state.
    """
    from accelerate import Accelerator

    settings.validate()
    method = get_method(settings.method)
    if settings.needs_teacher and teacher is None:
        raise RecoveryError(f"method {settings.method!r} with data {settings.data.source!r} needs the teacher "
                            "(the original model); pass teacher=")
    precision = settings.precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    accelerator = Accelerator(mixed_precision="bf16" if precision == "bf16" else "no", cpu=not torch.cuda.is_available())
    device, world, rank = accelerator.device, accelerator.num_processes, accelerator.process_index
    if settings.shard and not torch.distributed.is_initialized():
        raise RecoveryError(SHARD_NEEDS_LAUNCHER)
    progress = progress and accelerator.is_local_main_process

    rows_per_step = settings.batch_size * settings.grad_accum * world
    total_steps = settings.tokens // settings.data.seq_len // rows_per_step
    if total_steps < 1:
        raise RecoveryError(f"a token budget of {settings.tokens:,} is smaller than one optimizer step over {world} "
                            f"processes ({rows_per_step} rows of {settings.data.seq_len} tokens); raise tokens")
    student_layers = student.config.num_hidden_layers
    if settings.hidden_weight:
        layer_map = layer_map or list(range(student_layers))
        if len(layer_map) != student_layers or max(layer_map) >= teacher.config.num_hidden_layers:
            raise RecoveryError(f"layer_map {layer_map} does not map the student's {student_layers} layers onto the "
                                f"teacher's {teacher.config.num_hidden_layers}")

    # Data: a fixed order of training rows; the held-out rows are never trained on.
    if teacher is not None:
        teacher.to(device).eval()
    ids, labels = recovery_rows(settings.data, tokenizer, total_steps * rows_per_step, teacher=teacher)
    held = settings.data.held_out
    train_ids, train_labels = ids[:len(ids) - held], labels[:len(ids) - held]
    eval_ids, eval_labels = ids[len(ids) - held:], labels[len(ids) - held:]
    order = torch.randperm(len(train_ids), generator=torch.Generator().manual_seed(settings.seed))

    cache = None
    if method.distill and settings.teacher_cache:
        mine = sorted({int(r) for s in range(total_steps) for m in range(settings.grad_accum)
                       for r in _rows_of_step(order, s, m, settings, world, rank)})
        cache = _teacher_top_k(teacher, train_ids, mine, settings.teacher_cache, settings.batch_size, device, progress)
        if not settings.hidden_weight:
            teacher = None  # the cache replaces it: its memory is free for training
    # the teacher's head in the dtype of its chunked product: a float32 copy on a CPU for other dtypes;
    # on a GPU the autocast dtype of training, as the student's head product takes it (tensor cores)
    teacher_head = (product_head(OutputHead.of(teacher), torch.bfloat16 if precision == "bf16" else None)
                    if teacher is not None else None)

    torch.manual_seed(settings.seed)
    if settings.activation_checkpointing:
        _set_activation_checkpointing(student, True)
    if method.lora:
        student = _with_lora(student, settings)
    else:
        student.requires_grad_(True)
    student.train()
    model_class = type(_base_model(student))  # sharding swaps in a subclass
    if settings.shard:
        student = shard_model(student, device, precision)
    trainable = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    if not settings.shard:
        student, optimizer = accelerator.prepare(student, optimizer)
    sharded = (student, optimizer) if settings.shard else None
    chunked = chunkable_head(_unwrapped(student)) is not None

    record = {"steps": [], "loss": [], "lr": [], "eval": [], "total_steps": total_steps,
              "tokens_per_step": rows_per_step * settings.data.seq_len, "world_size": world, "precision": precision,
              "trainable_params": sum(p.numel() for p in trainable),  # a sharded one counts whole
              "sharded": settings.shard, "train_seconds": 0.0}
    start_step = 0
    directory = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if resume and directory is not None and (found := latest_checkpoint(directory)) is not None:
        state = json.loads((found / "trainer_state.json").read_text())
        saved, current = _comparable(state["settings"]), _comparable(json.loads(json.dumps(settings.to_dict())))
        if saved != current:
            differ = sorted(k for k in saved if saved[k] != current.get(k))
            raise RecoveryError(f"the checkpoint at {found} was made with other settings ({', '.join(differ)}); "
                                "resume with the same settings, or start over without resume")
        if sharded is not None:
            _load_sharded_checkpoint(found, student, optimizer, rank)
        else:
            accelerator.load_state(str(found))
        start_step, record = state["step"], state["record"]

    def evaluate(step: int) -> None:
        if held:
            record["eval"].append([step, round(held_out_perplexity(student, eval_ids, eval_labels, settings.batch_size,
                                                                   device), 4)])

    if start_step == 0:
        evaluate(0)
    bar = tqdm(total=total_steps, initial=start_step, desc=f"recovery ({settings.method})", unit="step",
               disable=not progress)
    for step in range(start_step, total_steps):
        started = time.perf_counter()
        lr = learning_rate_at(step, total_steps, settings)
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_loss = torch.zeros((), device=device)
        for micro in range(settings.grad_accum):
            rows = _rows_of_step(order, step, micro, settings, world, rank)
            batch, target = train_ids[rows].to(device), next_tokens(train_labels[rows]).to(device)
            mask = target != IGNORE_INDEX
            sync = micro == settings.grad_accum - 1
            if sharded is not None:
                student.set_requires_gradient_sync(sync)
            with accelerator.no_sync(student) if not sync and sharded is None else contextlib.nullcontext():
                with accelerator.autocast():
                    output = final_hidden_states(student, batch, chunked)
                    head = chunkable_head(_unwrapped(student)) if chunked else None
                    loss = _training_loss(output, head, target, mask, batch, rows, teacher, teacher_head, cache,
                                          layer_map, settings)
                accelerator.backward(loss / settings.grad_accum)
            step_loss += loss.detach() / settings.grad_accum
            # Free the step's tensors now, not when the next forward rebinds these names: held over
            # that forward, they add to every step's peak memory.
            del output, loss
        # Every process stops on a bad loss anywhere, before the weights take the step.
        worst = accelerator.gather(step_loss.reshape(1))
        if not torch.isfinite(worst).all():
            bar.close()
            saved = latest_checkpoint(directory) if directory is not None else None
            raise RecoveryError(
                f"the training loss became {float(worst[~torch.isfinite(worst)][0])} at step {step + 1}; "
                + (f"the last good state is the checkpoint at {saved} (step "
                   f"{json.loads((saved / 'trainer_state.json').read_text())['step']})" if saved else
                   "no checkpoint was written before it")
                + f"; lower the learning rate (it was {settings.learning_rate:g}) or check the data")
        if settings.clip:
            accelerator.clip_grad_norm_(trainable, settings.clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - started
        record["train_seconds"] += seconds
        record["steps"].append(step + 1)
        record["loss"].append(round(float(worst.mean()), 5))
        record["lr"].append(lr)
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss'][-1]:.3f}", tok_s=f"{record['tokens_per_step'] / seconds:,.0f}")
        done = step + 1
        if done == total_steps or (settings.eval_every and done % settings.eval_every == 0):
            evaluate(done)
        if directory is not None and settings.checkpoint_every and done % settings.checkpoint_every == 0 \
                and done < total_steps:
            _save_checkpoint(accelerator, directory, {"step": done, "record": record, "settings": settings.to_dict()},
                             sharded)
    bar.close()

    record["tokens"] = total_steps * record["tokens_per_step"]
    record["tokens_per_second"] = round(record["tokens"] / record["train_seconds"], 1) if record["train_seconds"] else None
    if device.type == "cuda":  # this process's; under a launcher every process holds about as much
        record["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    model = unsharded_copy(student, model_class, settings) if sharded is not None else accelerator.unwrap_model(student)
    if model is None:
        return None, record
    if method.lora:
        model = model.merge_and_unload()
    if settings.activation_checkpointing:
        _set_activation_checkpointing(model, False)
    model.requires_grad_(False)
    model.eval()
    return model, record


def _training_loss(output, head: OutputHead | None, target, mask, batch, rows, teacher, teacher_head, cache, layer_map,
                   settings) -> torch.Tensor:
    """The loss of one micro-batch: cross-entropy on the data, or distillation (KL to the teacher's
    logits, on the fly or from the top-k cache, plus ce_weight cross-entropy and hidden_weight
    hidden-state matching). With a chunkable `head`, every vocabulary-wide term is taken a chunk of
    positions at a time, the teacher's logits made from its final hidden states in the same chunk."""
    distill = get_method(settings.method).distill
    device = batch.device
    taught = None
    if distill and cache is None:
        taught = teacher_output(teacher, batch, full_logits=head is None, hidden_states=bool(settings.hidden_weight))
    if head is None:  # full logits
        logits = output.logits
        if not distill:
            return losses.cross_entropy(logits, target, mask)
        if cache is not None:
            loss = losses.kl_divergence_top_k(logits, cache[0][rows].to(device), cache[1][rows].to(device), mask,
                                              settings.temperature)
        else:
            loss = losses.kl_divergence(logits, taught.logits, mask, settings.temperature)
        if settings.ce_weight:
            loss = loss + settings.ce_weight * losses.cross_entropy(logits, target, mask)
    else:
        hidden = output.hidden_states[-1].flatten(0, 1)
        weights = losses.per_position_weights(mask).flatten()
        if not distill:
            return chunked_head_loss(head, hidden, losses.weighted_cross_entropy, target.flatten(), weights)
        if cache is not None:
            teacher_part = (cache[0][rows].to(device).flatten(0, 1), cache[1][rows].to(device).flatten(0, 1))
        else:
            teacher_part = (taught.last_hidden_state.flatten(0, 1),)
        loss = chunked_head_loss(head, hidden, _chunk_distillation(teacher_head, settings, cached=cache is not None),
                                 target.flatten(), weights, *teacher_part)
    if settings.hidden_weight:
        # hidden_states[0] is the embedding output, [i + 1] the output of layer i, except that the
        # last entry is the final norm's output: a pair is compared only when both sides are, or
        # neither is, a last layer.
        full_mask = torch.ones(batch.shape, dtype=torch.bool, device=batch.device)
        student_last, teacher_last = len(output.hidden_states) - 2, len(taught.hidden_states) - 2
        matched = [losses.hidden_state_distance(output.hidden_states[i + 1], taught.hidden_states[source + 1],
                                                full_mask)
                   for i, source in enumerate(layer_map) if (i == student_last) == (source == teacher_last)]
        if matched:
            loss = loss + settings.hidden_weight * torch.stack(matched).mean()
    return loss


def _chunk_distillation(teacher_head: OutputHead | None, settings: RecoverySettings, *, cached: bool):
    """The distillation loss of a chunk of positions, as a weighted sum (recover/losses.py): the
    teacher's logits come from its cached top-k, or from its final hidden states through its head."""
    def loss_of_logits(logits, targets, weights, *teacher_part):
        if cached:
            loss = losses.weighted_kl_divergence_top_k(logits, *teacher_part, weights, settings.temperature)
        else:
            with torch.no_grad():
                teacher_logits = head_logits(teacher_head, teacher_part[0])
            loss = losses.weighted_kl_divergence(logits, teacher_logits, weights, settings.temperature)
        if settings.ce_weight:
            loss = loss + settings.ce_weight * losses.weighted_cross_entropy(logits, targets, weights)
        return loss
    return loss_of_logits
