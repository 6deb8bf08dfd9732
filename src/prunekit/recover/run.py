"""`recover`: load a pruned model and its teacher, check they fit together, train, save.

    recover("runs/pruned35", "runs/recovered", RecoverySettings(method="distill"), teacher="smollm2-135m")

Every check (settings, output path, vocabulary and tokenizer agreement) runs before a weight is
read. Checkpoints go to OUT.checkpoints; `resume=True` continues a killed run from its last one.
The output is the same kind of model directory that `prune` writes, LoRA merged.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from prunekit.data.sources import resolve_source
from prunekit.export.files import OutputExistsError, check_output_dir
from prunekit.export.huggingface import PROVENANCE_FILE, SavedModel, provenance_plans, save_model
from prunekit.models.loading import load, load_config, load_skeleton, load_tokenizer, resolve_model_source
from prunekit.models.memory import BYTES, PeakMemory, recovery_estimate
from prunekit.models.structure import ModelStructure, model_structure
from prunekit.pipeline import LOAD_SECONDS, rate, self_text_seconds
from prunekit.plan.plan import surviving_layers
from prunekit.preflight import Machine, Need, Preflight
from prunekit.recover.train import SHARD_NEEDS_LAUNCHER, RecoveryError, RecoverySettings, get_method, recover_loaded

CHECKPOINT_SUFFIX = ".checkpoints"
# A short text that exercises ordinary words, digits, code and whitespace: two tokenizers that
# split it alike and share a vocabulary are treated as the same tokenizer.
TOKENIZER_PROBE = "The quick brown fox, 1234 jumps! def f(x):\n    return x ** 2  # café naïve 東京"


def check_teacher_fits(student_tokenizer, teacher_tokenizer, student_config, teacher_config) -> None:
    """Distillation compares logits token by token: both models must share one vocabulary."""
    if student_config.vocab_size != teacher_config.vocab_size:
        raise RecoveryError(f"the teacher's vocabulary has {teacher_config.vocab_size:,} entries and the student's "
                            f"{student_config.vocab_size:,}; distillation needs the original model the student was "
                            "pruned from (same tokenizer and vocabulary) as the teacher")
    if student_tokenizer is None or teacher_tokenizer is None:
        return
    probe = [tokenizer(TOKENIZER_PROBE, add_special_tokens=False)["input_ids"]
             for tokenizer in (student_tokenizer, teacher_tokenizer)]
    if probe[0] != probe[1] or student_tokenizer.get_vocab() != teacher_tokenizer.get_vocab():
        raise RecoveryError("the teacher's tokenizer differs from the student's (they split the same text into "
                            "different tokens); use as teacher the original model the student was pruned from")


def teacher_layer_map(student_dir: Path, student_layers: int, teacher_layers: int) -> list[int] | None:
    """Which teacher layer each student layer came from, read from the student's provenance."""
    if student_layers == teacher_layers:
        return list(range(student_layers))
    provenance_file = student_dir / PROVENANCE_FILE
    if provenance_file.is_file():
        survivors = surviving_layers(provenance_plans(json.loads(provenance_file.read_text())), teacher_layers)
        if len(survivors) == student_layers:
            return survivors
    return None


def preflight_recover(student: ModelStructure, teacher: ModelStructure | None, settings: RecoverySettings,
                      dtype: str = "float32", *, gpu: bool, processes: int = 1) -> Preflight:
    """What a recovery will need, from the shapes of the student (the pruned model, or the shape
    its plan predicts) and the teacher: memory per process on the device it trains on (the GPU of
    its local rank when there is one), the weights and checkpoints it writes, a rough time."""
    settings.validate()
    resolve_source(settings.data.source, settings.data.data_dir)  # readable now, not after an hour of work
    shards = processes if settings.shard else 1
    # Under a launcher each process trains on the GPU of its local rank, and checks that one.
    device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if gpu else "cpu"
    needs = recovery_estimate(student, teacher, dtype, lora=get_method(settings.method).lora,
                              batch_size=settings.batch_size, seq_len=settings.data.seq_len, shards=shards,
                              activation_checkpointing=settings.activation_checkpointing, device=device)
    hints = ("train LoRA adapters (--method lora+distill), cache the teacher's top-K logits and free it "
             "(--teacher-cache 64), recompute activations (--activation-checkpointing), lower --batch-size or "
             "--seq-len, or split it over GPUs (accelerate launch --num_processes N -m prunekit recover ... --shard)")
    size = BYTES.get(dtype, 4)
    trained = 0.02 * student.total_params if get_method(settings.method).lora else student.total_params
    checkpoints = (student.total_params * size + int(trained * 4 * 2)) if settings.checkpoint_every else 0
    flops = student.flops_per_token(512)
    teacher_share = 1 / 3 if settings.needs_teacher else 0  # a teacher forward is a third of a training step
    written = settings.tokens + settings.data.held_out * settings.data.seq_len
    seconds = (LOAD_SECONDS + (1 + teacher_share) * 3 * flops * settings.tokens / rate(device, "train")
               + self_text_seconds(teacher or student, settings.data.source, written, device))
    return Preflight("recover", f"{settings.method}, {settings.tokens:,} tokens on {device.split(':')[0]}", seconds,
                     (Need(device, needs, hints=hints),), disk_bytes=student.total_params * size + checkpoints,
                     leaves=student)


def recover(student: str | Path, out: str | Path, settings: RecoverySettings, *, teacher: str | Path | None = None,
            force: bool = False, resume: bool = False, keep_checkpoints: bool = False, dtype: str = "float32",
            progress: bool = True) -> SavedModel | None:
    """Recover the pruned model at `student` and save it to `out` (see the module docstring).

    Under `accelerate launch` the main process saves and returns the SavedModel; the others
    return None once it is written."""
    settings.validate()
    processes = int(os.environ.get("WORLD_SIZE", "1"))  # set by accelerate launch and torchrun
    if settings.shard and processes < 2:
        raise RecoveryError(SHARD_NEEDS_LAUNCHER)
    out = Path(out)
    student_source = resolve_model_source(student)
    teacher_source = resolve_model_source(teacher) if teacher is not None else None
    if settings.needs_teacher and teacher_source is None:
        raise RecoveryError(f"method {settings.method!r} with data {settings.data.source!r} needs the original model "
                            "as teacher; pass --teacher ORIGINAL")
    protected = student_source.local_paths + (teacher_source.local_paths if teacher_source else ())
    check_output_dir(out, force=force, protected=protected)
    checkpoints = out.parent / (out.name + CHECKPOINT_SUFFIX)
    if checkpoints.exists() and not resume:
        if not force:
            raise OutputExistsError(f"checkpoints of an earlier run are in {checkpoints}; pass --resume to continue "
                                    "that run, or --force to start over")
        shutil.rmtree(checkpoints)

    student_config = load_config(student_source)
    student_tokenizer = load_tokenizer(student_source)
    if student_tokenizer is None:
        raise RecoveryError(f"{student} has no tokenizer, so the training text cannot be tokenized; save one with it")
    layer_map = None
    if teacher_source is not None:
        teacher_config = load_config(teacher_source)
        check_teacher_fits(student_tokenizer, load_tokenizer(teacher_source), student_config, teacher_config)
        if settings.hidden_weight:
            layer_map = teacher_layer_map(Path(student_source.location), student_config.num_hidden_layers,
                                          teacher_config.num_hidden_layers)
            if layer_map is None:
                raise RecoveryError("hidden-state matching needs to know which teacher layer each student layer came "
                                    f"from, and {student} records no plan that says so; drop hidden_weight")

    student_structure = model_structure(load_skeleton(student_source))
    teacher_structure = model_structure(load_skeleton(teacher_source)) if teacher_source is not None else None
    machine = Machine.here(out)
    preflight = preflight_recover(student_structure, teacher_structure, settings, dtype, gpu=machine.has_gpu,
                                  processes=processes)
    preflight.check(machine, str(student))
    with PeakMemory(preflight.device) as peak:
        model, tokenizer = load(student, dtype=dtype)
        teacher_model = load(teacher, dtype=dtype, with_tokenizer=False)[0] if teacher_source is not None else None
        trained, record = recover_loaded(model, tokenizer, settings, teacher=teacher_model, layer_map=layer_map,
                                         checkpoint_dir=checkpoints, resume=resume, progress=progress)
    record["memory"] = peak.to_dict(next((n.estimate.total for n in preflight.needs if n.device == preflight.device),
                                         None))
    del teacher_model
    from accelerate import PartialState

    state = PartialState()  # under `accelerate launch` every process trained; one of them writes
    if not state.is_main_process:
        state.wait_for_everyone()
        return None
    provenance = {}
    if student_source.kind == "directory" and (Path(student_source.location) / PROVENANCE_FILE).is_file():
        provenance = json.loads((Path(student_source.location) / PROVENANCE_FILE).read_text())
    saved = save_model(
        trained, tokenizer, out, source=provenance.get("source_model") or str(student), protected=protected,
        force=force,
        extra_provenance={"plan": provenance.get("plan"), "pruning": provenance.get("pruning"),
                          "recovered_from": str(student),
                          "recovery": {"settings": settings.to_dict(), "teacher": str(teacher) if teacher else None,
                                       **record}},
    )
    if not keep_checkpoints:
        shutil.rmtree(checkpoints, ignore_errors=True)
    state.wait_for_everyone()
    return saved
