"""The `prunekit eval` and `prunekit bench` commands: argument parsing over `prunekit.evaluate.run`.

Each is a (help, add_arguments, run) tuple, the shape of the entries of `prunekit.cli.COMMANDS`.
Every option is checked by the API function, before the model is loaded.
"""
from __future__ import annotations

import argparse

from prunekit.data import DATA_DIR_ENV
from prunekit.evaluate.run import (
    DEFAULT_PPL,
    DTYPE_CHOICES,
    bench_models,
    evaluate_model,
    format_bench_table,
    format_eval_table,
)
from prunekit.evaluate.speed import DECODE_MODES, DEVICES
from prunekit.evaluate.tasks import LOCAL_TASKS

MODEL_HELP = "directory, .gguf file, hub id or smollm2-135m"


def _names(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"{text!r} has an empty name; separate names with single commas")
    return names


def _batch_sizes(text: str) -> list[int]:
    try:
        return [int(size) for size in _names(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers, e.g. 1,16") from None


# ----------------------------------------------------------------------------- eval


def _add_eval(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help=MODEL_HELP)
    parser.add_argument(
        "--ppl", type=_names, metavar="TEXTS",
        help="perplexity on these comma-separated texts: wikitext2, c4, ptb, FILE.txt or FILE.jsonl[:FIELD] "
             f"(default {DEFAULT_PPL}, unless --tasks is given)",
    )
    parser.add_argument("--seq-len", type=int, default=512, help="window length in tokens (default 512)")
    parser.add_argument("--stride", type=int, help="slide the windows by this many tokens, below --seq-len "
                                                   "(default: non-overlapping windows, remainder dropped)")
    parser.add_argument("--window-every", type=int, default=1, metavar="K",
                        help="score only every K-th non-overlapping window, for a quick estimate (default 1)")
    parser.add_argument("--tasks", type=_names, default=[], metavar="TASKS",
                        help=f"zero-shot tasks, comma-separated: {', '.join(LOCAL_TASKS)} (local data) "
                             "or any lm-eval task (data from the Hub)")
    parser.add_argument("--limit", type=int, metavar="N", help="score the first N examples of each task (default all)")
    parser.add_argument("--batch-size", type=int, default=8, help="windows or task requests per forward (default 8)")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="float32", help="dtype to load the model in "
                                                                                  "(default float32)")
    parser.add_argument("--device", choices=DEVICES, default="cpu", help="where the model runs (default cpu)")
    parser.add_argument("--data-dir", help=f"the shared data folder (default ${DATA_DIR_ENV})")
    parser.add_argument("--json", metavar="FILE", help="also write every figure and its protocol to FILE")


def _run_eval(args: argparse.Namespace) -> int:
    ppl = args.ppl if args.ppl is not None else ([] if args.tasks else [DEFAULT_PPL])
    report = evaluate_model(
        args.model, ppl=ppl, seq_len=args.seq_len, stride=args.stride, window_every=args.window_every,
        tasks=args.tasks, limit=args.limit, dtype=args.dtype, batch_size=args.batch_size, data_dir=args.data_dir,
        json_out=args.json, device=args.device,
    )
    print(format_eval_table(report))
    if args.json:
        print(f"wrote {args.json}")
    return 0


# ----------------------------------------------------------------------------- bench


def _add_bench(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help=MODEL_HELP)
    parser.add_argument("--baseline", metavar="OTHER", help=f"a second model ({MODEL_HELP}) measured in the same "
                                                            "run, interleaved; speedups are model over baseline")
    parser.add_argument("--device", choices=DEVICES, default="cpu", help="default cpu")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="bfloat16", help="default bfloat16")
    parser.add_argument("--prefill-batch", type=int, default=8, help="prefill batch size (default 8)")
    parser.add_argument("--prefill-len", type=int, default=512, help="prefill length in tokens (default 512)")
    parser.add_argument("--decode-batches", type=_batch_sizes, default=[1, 16], metavar="SIZES",
                        help="decode batch sizes, comma-separated (default 1,16)")
    parser.add_argument("--decode-context", type=int, default=128, help="prompt length before decoding (default 128)")
    parser.add_argument("--decode-tokens", type=int, default=64, help="tokens decoded per repeat (default 64)")
    parser.add_argument("--warmup", type=int, help="untimed calls first (default 1; 2 with --compile)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats; tables show median and range (default 5)")
    parser.add_argument("--compile", action="store_true", help="prefill through torch.compile; on CUDA with "
                                                               "--decode eager, decode with a compiled static KV cache")
    parser.add_argument("--decode", choices=list(DECODE_MODES), default=None,
                        help="how decode is timed: graph (a static KV cache, each step replayed from a CUDA graph; "
                             "the default on cuda) or eager (transformers' generate; the default and only way on cpu)")
    parser.add_argument("--json", metavar="FILE", help="also write every figure and its settings to FILE")


def _run_bench(args: argparse.Namespace) -> int:
    report = bench_models(
        args.model, baseline=args.baseline, device=args.device, dtype=args.dtype, prefill_batch=args.prefill_batch,
        prefill_len=args.prefill_len, decode_batches=args.decode_batches, decode_context=args.decode_context,
        decode_tokens=args.decode_tokens, warmup=args.warmup, repeats=args.repeats, use_compile=args.compile,
        json_out=args.json, decode=args.decode,
    )
    print(format_bench_table(report))
    if args.json:
        print(f"wrote {args.json}")
    return 0


EVAL_COMMAND = ("perplexity and zero-shot accuracy of a model", _add_eval, _run_eval)
BENCH_COMMAND = ("inference speed of a model, side by side with a baseline", _add_bench, _run_bench)
