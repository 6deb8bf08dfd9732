"""Prune, then quantize: what each step buys in llama.cpp on a 2-core laptop-class CPU.

For the dense SmolLM2-135M (`smollm2-135m`) and a pruned one (`--pruned DIR`), each exported by
`prunekit.write_gguf` at f16, q8_0 and q4_k_m, in one run:

- file size;
- WikiText-2 test perplexity computed by llama.cpp (llama-cpp-python, every position's logits):
  `wiki.test.raw` read as it is, tokenized once by the model's Hugging Face tokenizer without
  special tokens, non-overlapping 512-token windows, every `--window-every`-th window (16: 37
  windows, ENVIRONMENT.md's reference protocol), the first token of each window context only.
  llama.cpp and transformers read the same token ids;
- against transformers (fp32, the same windows): perplexity ratio and top-1 next-token agreement;
- whether llama.cpp's own tokenizer gives the Hugging Face tokenizer's ids on the whole text;
- llama.cpp speed with 2 threads, as llama-bench names it: prompt processing of 512 tokens (pp512,
  one batch, fresh cache) and generation of 128 tokens one at a time from an empty cache (tg128,
  greedy). All six files stay loaded and are timed in `--rounds` interleaved rounds (order rotated
  each round), so that a slow moment of the machine hits every file alike; medians are reported,
  with the CPU share other processes took meanwhile;
- a control for the speed figures: the dense model written as `deci` (the architecture the
  pruned model needs) and timed in the same rounds, so that the pruned model's speedup is not
  mistaken for a difference between llama.cpp's `llama` and `deci` graphs (speed only).

    flock /tmp/prunekit-cpu.lock python benchmarks/gguf_quant.py --pruned runs/pruned35 \\
        --data-dir ../shared/data --out benchmarks/results/gguf_quant.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dense_baseline import OtherCpu  # noqa: E402  (the same contention meter as the other benchmarks)

import prunekit  # noqa: E402
import prunekit.export.gguf as gguf_export  # noqa: E402
from prunekit.data import encode_text, join_documents, load_texts  # noqa: E402
from prunekit.evaluate.perplexity import plan_windows  # noqa: E402
from prunekit.export.files import atomic_write_text  # noqa: E402
from prunekit.export.gguf import QUANT_TYPES, write_gguf  # noqa: E402

THREADS = 2
SEQ_LEN = 512
PROMPT_TOKENS = 512
GEN_TOKENS = 128


def _cpu_model() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for package in ("prunekit", "llama_cpp_python", "gguf", "torch", "transformers"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = "not installed"
    return out


def _windows(tokenizer, data_dir: str | None, every: int) -> tuple[list[int], list[list[int]], str]:
    text = join_documents(load_texts("wikitext2", split="test", data_dir=data_dir, text_protocol="raw"))
    stream = encode_text(tokenizer, text)
    windows = plan_windows(len(stream), seq_len=SEQ_LEN, bos=False, window_every=every)
    return stream, [stream[w.start:w.start + SEQ_LEN] for w in windows], text


def _nll_and_top1(logits: np.ndarray, window: list[int]) -> tuple[float, np.ndarray]:
    """Summed NLL of tokens 1.. given their prefixes, and the argmax at each scored position."""
    logits = logits[:-1].astype(np.float64)
    targets = np.asarray(window[1:])
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    return float(-log_probs[np.arange(len(targets)), targets].sum()), logits.argmax(-1)


@torch.no_grad()
def transformers_reference(model, windows: list[list[int]]) -> dict:
    nll, top1 = 0.0, []
    for start in range(0, len(windows), 8):
        batch = torch.tensor(windows[start:start + 8])
        logits = model(batch).logits.float().numpy()
        for row, window in zip(logits, windows[start:start + 8]):
            window_nll, argmax = _nll_and_top1(row, window)
            nll += window_nll
            top1.append(argmax)
    scored = len(windows) * (SEQ_LEN - 1)
    return {"ppl": math.exp(nll / scored), "scored_tokens": scored, "top1": top1}


def _llama_cpp_has_amx() -> bool:
    import llama_cpp

    return b"AMX_INT8 = 1" in llama_cpp.llama_print_system_info()


def _llama(path: Path, **kwargs):
    """llama-cpp-python's `Llama`, with llama.cpp's extra weight buffers off on a CPU with AMX only
    (where its AMX kernels crash: `load_in_llama_cpp`); they also hold the repacked kernels, so they
    stay on elsewhere (the recorded AMD EPYC runs had them on); the record says which
    (machine.llama_cpp_extra_buffers)."""
    from prunekit.export.gguf import load_in_llama_cpp

    return load_in_llama_cpp(path, extra_buffers=not _llama_cpp_has_amx(), **kwargs)


def llama_cpp_quality(path: Path, windows: list[list[int]], reference: dict, text: str, stream: list[int]) -> dict:
    llm = _llama(path, n_ctx=SEQ_LEN, n_batch=SEQ_LEN, n_ubatch=SEQ_LEN, n_threads=THREADS,
                 n_threads_batch=THREADS, logits_all=True)
    try:
        nll, agree = 0.0, 0
        for window, hf_top1 in zip(windows, reference["top1"]):
            llm.reset()
            llm.eval(window)
            window_nll, top1 = _nll_and_top1(np.array(llm.scores[:SEQ_LEN], dtype=np.float32), window)
            nll += window_nll
            agree += int((top1 == hf_top1).sum())
        ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
    finally:
        llm.close()
    scored = len(windows) * (SEQ_LEN - 1)
    first_difference = next((i for i, (a, b) in enumerate(zip(ids, stream)) if a != b),
                            None if len(ids) == len(stream) else min(len(ids), len(stream)))
    return {
        "ppl": math.exp(nll / scored),
        "ppl_vs_transformers": math.exp(nll / scored) / reference["ppl"],
        "top1_agreement": agree / scored,
        "tokenizer_identical": first_difference is None,
        "tokenizer_first_difference": first_difference,
        "llama_cpp_text_tokens": len(ids),
    }


def _speed_instance(path: Path):
    return _llama(path, n_ctx=PROMPT_TOKENS + GEN_TOKENS, n_batch=PROMPT_TOKENS, n_ubatch=PROMPT_TOKENS,
                  n_threads=THREADS, n_threads_batch=THREADS, logits_all=False)


def _time_prompt(llm, prompt: list[int]) -> float:
    llm.reset()
    start = time.perf_counter()
    llm.eval(prompt)
    return len(prompt) / (time.perf_counter() - start)


def _time_generation(llm, first: int) -> float:
    llm.reset()
    llm.eval([first])
    start = time.perf_counter()
    for _ in range(GEN_TOKENS):
        llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
    return GEN_TOKENS / (time.perf_counter() - start)


def measure_speed(files: dict[tuple[str, str], Path], prompt: list[int], rounds: int) -> tuple[dict, float]:
    keys = list(files)
    instances = {key: _speed_instance(path) for key, path in files.items()}
    samples = {key: {"prompt": [], "generation": []} for key in keys}
    try:
        for key in keys:  # warm-up: page in the weights, size the buffers
            _time_prompt(instances[key], prompt[:64])
        meter = OtherCpu()
        for r in range(rounds):
            for key in keys[r % len(keys):] + keys[:r % len(keys)]:
                samples[key]["prompt"].append(_time_prompt(instances[key], prompt))
                samples[key]["generation"].append(_time_generation(instances[key], prompt[0]))
        other = meter.share()
    finally:
        for llm in instances.values():
            llm.close()
    return samples, other


def _export_as_deci(model, tokenizer, path: Path):
    """The dense model in the per-layer architecture: the writer picks `llama` for uniform models,
    so its uniformity test is overridden for this one export (the control, not a user path)."""
    uniform = gguf_export._is_uniform
    gguf_export._is_uniform = lambda blocks: False
    try:
        return write_gguf(model, tokenizer, path, force=True)
    finally:
        gguf_export._is_uniform = uniform


def _markdown(record: dict) -> str:
    lines = [
        "| model | quant | GGUF arch | file MiB | WikiText-2 ppl (llama.cpp) | vs transformers | top-1 agree | "
        "prompt tok/s (pp512) | generation tok/s (tg128) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    dense_f16 = record["models"]["dense"]["files"]["f16"]

    def speed(row: dict, metric: str) -> str:
        if f"{metric}_tok_s" not in row:
            return "not measured"
        value = row[f"{metric}_tok_s"]["median"]
        return f"{value:,.0f} ({value / dense_f16[f'{metric}_tok_s']['median']:.2f}x)"

    for name, model in record["models"].items():
        for quant, row in model["files"].items():
            lines.append(
                f"| {name} ({model['params_total'] / 1e6:.1f}M) | {quant} | {row['arch']} | "
                f"{row['bytes'] / 2**20:.1f} | {row['ppl']:.2f} | {row['ppl_vs_transformers']:.4f} | "
                f"{row['top1_agreement']:.2%} | {speed(row, 'prompt')} | {speed(row, 'generation')} |"
            )
    control = record.get("control_dense_as_deci")
    if control and "prompt_tok_s" in control:
        pp, tg = control["prompt_tok_s"]["median"], control["generation_tok_s"]["median"]
        lines.append(f"| dense, written as deci (speed control) | f16 | deci | {control['bytes'] / 2**20:.1f} | | | | "
                     f"{pp:,.0f} ({pp / dense_f16['prompt_tok_s']['median']:.2f}x) | "
                     f"{tg:,.0f} ({tg / dense_f16['generation_tok_s']['median']:.2f}x) |")
    refs = ", ".join(f"{name} {m['transformers_ppl']:.2f}" for name, m in record["models"].items())
    lines.append(f"\ntransformers fp32 perplexity on the same windows: {refs}. Speed ratios are against dense f16.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dense", default="smollm2-135m")
    parser.add_argument("--pruned", required=True, help="a pruned model directory, e.g. runs/pruned35")
    parser.add_argument("--data-dir", default=None, help="shared data (default $PRUNEKIT_DATA_DIR)")
    parser.add_argument("--work", default="runs/gguf_quant", help="where the .gguf files are written")
    parser.add_argument("--window-every", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results/gguf_quant.json")
    parser.add_argument("--no-speed", action="store_true",
                        help="sizes and quality only (no timing): for a machine that is not free for timing")
    args = parser.parse_args(argv)
    import llama_cpp  # noqa: F401  (fail now, not after the exports)

    torch.set_num_threads(THREADS)
    work = Path(args.work)
    record = {
        "command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": _cpu_model(), "threads": THREADS, "os_cpus": os.cpu_count(),
                    "llama_cpp_extra_buffers": not _llama_cpp_has_amx()},
        "versions": _versions(),
        "protocol": {"data": "wikitext-2-raw wiki.test.raw as it is, tokenized once without special tokens",
                     "seq_len": SEQ_LEN, "window_every": args.window_every,
                     "scored": "tokens 2..512 of each window", "reference": "transformers fp32, same token ids",
                     "speed": f"llama-cpp-python Llama.eval, {THREADS} threads, pp{PROMPT_TOKENS} fresh cache, "
                              f"tg{GEN_TOKENS} greedy from an empty cache, median of {args.rounds} interleaved rounds"},
        "models": {},
    }
    files: dict[tuple[str, str], Path] = {}
    texts: dict[str, tuple] = {}
    for name, spec in (("dense", args.dense), ("pruned", args.pruned)):
        started = time.perf_counter()
        model, tokenizer = prunekit.load(spec, dtype="float32")
        stream, windows, text = _windows(tokenizer, args.data_dir, args.window_every)
        reference = transformers_reference(model, windows)
        print(f"{name}: transformers ppl {reference['ppl']:.3f} on {len(windows)} windows "
              f"({time.perf_counter() - started:.0f} s)", flush=True)
        entry = {"source": spec, "params_total": prunekit.model_structure(model).total_params,
                 "params_non_embedding": prunekit.model_structure(model).non_embedding_params,
                 "transformers_ppl": reference["ppl"], "windows": len(windows), "files": {}}
        for quant in QUANT_TYPES:
            exported = write_gguf(model, tokenizer, work / f"{name}.{quant}.gguf", quant=quant, force=True)
            files[(name, quant)] = exported.path
            entry["files"][quant] = {"path": str(exported.path), "bytes": exported.bytes, "arch": exported.arch,
                                     "blocks": exported.layers, "padded": list(exported.padded),
                                     "tensor_types": exported.tensor_types}
            print(exported.summary(), flush=True)
        if name == "dense" and not args.no_speed:
            control = _export_as_deci(model, tokenizer, work / "dense.deci-control.f16.gguf")
            files[("control", "f16")] = control.path
            record["control_dense_as_deci"] = {"path": str(control.path), "bytes": control.bytes, "arch": control.arch}
        del model
        for quant in QUANT_TYPES:
            started = time.perf_counter()
            quality = llama_cpp_quality(files[(name, quant)], windows, reference, text, stream)
            entry["files"][quant].update(quality)
            print(f"{name} {quant}: llama.cpp ppl {quality['ppl']:.3f} ({quality['ppl_vs_transformers']:.4f}x), "
                  f"top-1 {quality['top1_agreement']:.4f}, tokenizer identical {quality['tokenizer_identical']} "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)
        record["models"][name] = entry
        texts[name] = (stream, windows)
    prompt = texts["dense"][1][0][:PROMPT_TOKENS]
    samples, other = ({}, None) if args.no_speed else measure_speed(files, prompt, args.rounds)
    record["speed_other_cpu_share"] = other
    for (name, quant), measured in samples.items():
        row = record["control_dense_as_deci"] if name == "control" else record["models"][name]["files"][quant]
        for metric, values in measured.items():
            row[f"{metric}_tok_s"] = {"median": statistics.median(values), "all": values}
    atomic_write_text(Path(args.out), json.dumps(record, indent=1) + "\n")
    print(_markdown(record))
    speed = "no speed measured" if other is None else f"other processes took {other:.1%} of the CPU during the speed rounds"
    print(f"\nCPU: {record['machine']['cpu']}, {THREADS} threads; {speed}; {record['date']}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
