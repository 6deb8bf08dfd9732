"""Recipes: the whole job as one YAML file, validated completely before anything heavy runs.

    model: smollm2-135m
    stages: [prune, recover, evaluate, bench, report]
    prune: {target: 0.3, criterion: taylor, calibration: {source: auto, n_samples: 64, seq_len: 256}}
    recover: {method: distill, tokens: 20000, data: {source: auto, seq_len: 256}}
    evaluate: {ppl: [wikitext2], window_every: 16}

Each stage's section is the typed settings of the function that runs it (PruneSettings,
RecoverySettings, ...): an unknown key or a value of the wrong type is an error that names the
key, its type and the valid keys. `key=value` overrides address any key by its dotted path
(`prune.target=0.4`). A data source `auto` means c4 where a local data directory has it, else
`self` (text the model writes), so a recipe runs with no data set at all.
"""
from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from prunekit.data.sources import SELF_SOURCE
from prunekit.errors import PrunekitError
from prunekit.pipeline import CalibrationSettings, PruneSettings
from prunekit.recover.data import RecoveryData
from prunekit.recover.train import RecoverySettings

AUTO_SOURCE = "auto"
SHIPPED_RECIPES = Path(__file__).resolve().parents[1] / "recipes"  # installed with the package
STAGE_ORDER = ("analyze", "plan", "prune", "recover", "evaluate", "bench", "export", "report")


class RecipeError(PrunekitError, ValueError):
    """The recipe cannot run as written; the message names the key and the fix."""


@dataclass(frozen=True)
class AnalyzeSettings:
    criterion: str = "sensitivity"
    criterion_options: dict = field(default_factory=dict)
    calibration: CalibrationSettings = field(default_factory=CalibrationSettings)
    batch_size: int = 8
    device: str | None = None                 # as PruneSettings: where scoring runs; None: cpu
    layer_by_layer: bool = False


@dataclass(frozen=True)
class EvaluateSettings:
    ppl: tuple[str, ...] = ("wikitext2",)     # text sources; evaluated on the final model and the original
    seq_len: int = 512
    window_every: int = 16
    tasks: tuple[str, ...] = ()
    limit: int | None = None
    dtype: str = "float32"
    dense: bool = True                        # evaluate the original model too (the report marks it)
    device: str = "cpu"                       # cpu or cuda


@dataclass(frozen=True)
class BenchSettings:
    baseline: bool = True                     # time the original model side by side
    device: str = "cpu"
    dtype: str = "bfloat16"
    prefill_batch: int = 4
    prefill_len: int = 256
    decode_batches: tuple[int, ...] = (1, 8)
    decode_tokens: int = 32
    repeats: int = 3
    decode: str | None = None                 # graph or eager, as `prunekit bench --decode`; None: graph on cuda, eager on cpu


@dataclass(frozen=True)
class ExportSettings:
    name: str = "export"                      # what the final model is written as, under the run directory
    format: str = "huggingface"               # huggingface: NAME/ as hard links to the final model; gguf: NAME.gguf
    quant: str = "f16"                        # gguf: f16, q8_0 or q4_k_m


@dataclass(frozen=True)
class HardwareSettings:
    """The machine a recipe is written for. `prunekit run` checks the machine it runs on; the
    tests preflight every shipped recipe against this one, so a recipe that names a GPU must fit it."""
    cpu_memory_gib: float = 24.0
    gpus: int = 0
    gpu_memory_gib: float = 0.0               # free memory of each GPU


@dataclass(frozen=True)
class ReportSettings:
    pass


@dataclass(frozen=True)
class ScheduleSettings:
    """Prune and recover in rounds (Adapt-Pruner): round k prunes the model round k-1 recovered to
    its cumulative target, counted against the ORIGINAL model, then recovers it on its share of
    recover.tokens (the budget of all the rounds together, so that a schedule and a one-shot
    recipe with the same recover section train on as many tokens). The runner expands prune and
    recover into prune@1, recover@1, ... (`runner.schedule`)."""
    rounds: int = 2
    targets: tuple[float, ...] = ()           # cumulative targets, one per round, the last prune.target; default even steps

    def cumulative_targets(self, target: float) -> tuple[float, ...]:
        return self.targets or tuple(target * k / self.rounds for k in range(1, self.rounds + 1))

    def round_tokens(self, tokens: int) -> int:
        return tokens // self.rounds

    def validate(self, target: float) -> None:
        if self.rounds < 1:
            raise RecipeError(f"schedule.rounds must be at least 1, got {self.rounds}")
        if not self.targets:
            return
        targets = list(self.targets)
        if len(targets) != self.rounds:
            raise RecipeError(f"schedule.targets names {len(targets)} cumulative targets for {self.rounds} rounds; give "
                              "one per round, or drop it for even steps")
        if any(not 0 < t < 1 for t in targets) or any(b <= a for a, b in zip(targets, targets[1:])):
            raise RecipeError(f"schedule.targets {targets} must rise from round to round, each a fraction in (0, 1)")
        if abs(targets[-1] - target) > 1e-9:
            raise RecipeError(f"schedule.targets end at {targets[-1]}, but prune.target is {target}; end them at "
                              "prune.target")


@dataclass(frozen=True)
class Recipe:
    model: str
    stages: tuple[str, ...]
    data_dir: str | None = None
    dtype: str = "float32"
    analyze: AnalyzeSettings = field(default_factory=AnalyzeSettings)
    prune: PruneSettings = field(default_factory=PruneSettings)
    recover: RecoverySettings = field(default_factory=RecoverySettings)
    teacher: str | None = None                # default: the recipe's model
    schedule: ScheduleSettings | None = None  # prune and recover in rounds instead of once each
    evaluate: EvaluateSettings = field(default_factory=EvaluateSettings)
    bench: BenchSettings = field(default_factory=BenchSettings)
    export: ExportSettings = field(default_factory=ExportSettings)
    report: ReportSettings = field(default_factory=ReportSettings)
    hardware: HardwareSettings = field(default_factory=HardwareSettings)

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))


def _plain(value: Any) -> Any:
    """Tuples as lists, recursively: the form YAML and JSON give back."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# ----------------------------------------------------------------------------- typed parsing


def _type_name(kind: Any) -> str:
    return getattr(kind, "__name__", None) or str(kind).replace("typing.", "")


def _coerce(value: Any, kind: Any, where: str) -> Any:
    """`value` as `kind` (a field's annotation), or RecipeError naming `where`."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            return _coerce(value, option, where)
    if dataclasses.is_dataclass(kind):
        if not isinstance(value, dict):
            raise RecipeError(f"{where} must be a mapping of {kind.__name__} settings, got {value!r}")
        return from_dict(kind, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"{where} must be a list, got {value!r}")
        return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict or kind is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{where} must be a mapping, got {value!r}")
        if args:
            return {str(k): _coerce(v, args[1], f"{where}.{k}") for k, v in value.items()}
        return dict(value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind in (int, float, str, bool) and not (isinstance(value, kind) and not (kind is int and isinstance(value, bool))):
        raise RecipeError(f"{where} must be {_type_name(kind)}, got {value!r} ({type(value).__name__})")
    return value


def from_dict(cls: type, data: dict, where: str = "recipe") -> Any:
    """An instance of dataclass `cls` from `data`; unknown keys and wrong types are errors."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise RecipeError(f"unknown key{'s' * (len(unknown) > 1)} {', '.join(f'{where}.{k}' for k in unknown)}; "
                          f"valid keys of {where}: {', '.join(names)}")
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in data
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise RecipeError(f"{where} needs {', '.join(missing)}")
    return cls(**{k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()})


# ----------------------------------------------------------------------------- loading


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """`a.b=value` sets data["a"]["b"]; the value is read as YAML (0.4, true, [a, b], null)."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise RecipeError(f"override {item!r} must read KEY=VALUE, e.g. prune.target=0.4")
        node = data
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise RecipeError(f"override {item!r}: {part} is not a section")
        node[last] = yaml.safe_load(text)
    return data


def parse_recipe(data: dict) -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError("a recipe is a YAML mapping with at least `model` and `stages`")
    recipe = from_dict(Recipe, data)
    unknown = [s for s in recipe.stages if s not in STAGE_ORDER]
    if unknown:
        raise RecipeError(f"unknown stage {unknown[0]!r}; stages are, in the order they run: {', '.join(STAGE_ORDER)}")
    if not recipe.stages:
        raise RecipeError(f"the recipe names no stages; choose from {', '.join(STAGE_ORDER)}")
    if len(set(recipe.stages)) != len(recipe.stages):
        raise RecipeError(f"a stage is named twice in {list(recipe.stages)}")
    order = [STAGE_ORDER.index(s) for s in recipe.stages]
    if order != sorted(order):
        raise RecipeError(f"stages run in the order {', '.join(STAGE_ORDER)}; list them so, got {list(recipe.stages)}")
    if "recover" in recipe.stages and "prune" not in recipe.stages:
        raise RecipeError("the recover stage trains the pruned model: add the prune stage before it")
    if recipe.schedule is not None:
        check_schedule(recipe)
    check_bench_decode(recipe.bench)
    return recipe


def check_bench_decode(bench: BenchSettings) -> None:
    """bench.decode names a decode timing the bench device can run (speed.DECODE_MODES)."""
    from prunekit.evaluate.speed import DECODE_MODES

    if bench.decode is not None and bench.decode not in DECODE_MODES:
        raise RecipeError(f"bench.decode {bench.decode!r} is not a decode timing; choose one of "
                          f"{', '.join(DECODE_MODES)}, or drop the key for graph on cuda and eager on cpu")
    if bench.decode == "graph" and bench.device != "cuda":
        raise RecipeError("bench.decode graph replays CUDA graphs, which need bench.device=cuda; set bench.decode=eager "
                          "to time decode on the CPU")


def check_schedule(recipe: Recipe) -> None:
    """A schedule's settings, and the stages and keys it cannot go with."""
    if not {"prune", "recover"} <= set(recipe.stages):
        raise RecipeError("a schedule interleaves the prune and recover stages; list both in stages, or drop schedule")
    if "plan" in recipe.stages:
        raise RecipeError("the plan stage plans the original model once, but a schedule prunes a new model every round; "
                          "drop the plan stage or the schedule")
    if recipe.prune.scores is not None:
        raise RecipeError("prune.scores hold the original model's scores, but a schedule's later rounds prune recovered "
                          "models; drop prune.scores or the schedule")
    recipe.schedule.validate(recipe.prune.target)


def shipped_recipes() -> list[str]:
    return sorted(path.stem for path in SHIPPED_RECIPES.glob("*.yaml"))


def load_recipe(recipe: str | Path | dict, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """A Recipe from a YAML path or a mapping, with `key=value` overrides applied."""
    if isinstance(recipe, dict):
        data = copy.deepcopy(recipe)  # overrides must not reach into the caller's mapping
    else:
        path = Path(recipe)
        if not path.is_file() and (SHIPPED_RECIPES / f"{recipe}.yaml").is_file():
            path = SHIPPED_RECIPES / f"{recipe}.yaml"  # a shipped recipe by name: `prunekit run demo`
        if not path.is_file():
            raise RecipeError(f"recipe {path} does not exist; pass a YAML file or the name of a shipped recipe "
                              f"({', '.join(shipped_recipes())})")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as error:
            raise RecipeError(f"{path} is not valid YAML: {error}") from None
    return parse_recipe(apply_overrides(data or {}, list(overrides)))


def has_local_data(data_dir: str | None) -> bool:
    """Whether the data directory (given, or $PRUNEKIT_DATA_DIR) holds C4 and WikiText-2, which
    sources `auto` then mean; without them, `auto` means text the model writes itself."""
    from prunekit.data import resolve_data_dir

    try:
        root = resolve_data_dir(data_dir)
    except PrunekitError:  # an unusable data directory means: run on self text
        return False
    return root is not None and (root / "c4").is_dir() and (root / "wikitext-2-raw").is_dir()


def auto_source(source: str, local: bool, *, evaluation: bool = False) -> str:
    """`auto` as c4 (calibration and training) or wikitext2 (evaluation) with local data, else self."""
    if source != AUTO_SOURCE:
        return source
    return ("wikitext2" if evaluation else "c4") if local else SELF_SOURCE


def resolve_auto(recipe: Recipe, has_local_data: bool) -> Recipe:
    """Replace data sources `auto` with c4 (local data present) or self (none)."""
    def fix(settings):
        return dataclasses.replace(settings, source=auto_source(settings.source, has_local_data))

    prune = dataclasses.replace(recipe.prune, calibration=fix(recipe.prune.calibration))
    analyze = dataclasses.replace(recipe.analyze, calibration=fix(recipe.analyze.calibration))
    data: RecoveryData = recipe.recover.data
    recover = dataclasses.replace(recipe.recover, data=fix(data))
    evaluate = dataclasses.replace(recipe.evaluate, ppl=tuple(auto_source(p, has_local_data, evaluation=True)
                                                              for p in recipe.evaluate.ppl))
    return dataclasses.replace(recipe, prune=prune, analyze=analyze, recover=recover, evaluate=evaluate)
