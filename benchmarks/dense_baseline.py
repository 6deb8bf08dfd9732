"""The dense baseline: WikiText-2 perplexity, zero-shot accuracy and CPU speed of one model.

Perplexity (fp32): `wiki.test.raw` read as it is, tokenized once without special tokens, cut into
non-overlapping windows, remainder dropped; every window at each of --seq-lens, plus every 16th
window at 512 (ENVIRONMENT.md's reference figure: 29.45 for SmolLM2-135M). Tasks (bf16 by default):
0-shot, lm-eval's prompts, the local copies of the data; `--limit TASK=N` scores the first N items
of TASK. Speed (bf16): prefill, decode at batch 1 and 16, time to first token, peak memory.

Each stage calls the public API (`evaluate_model`, `bench_models`) once, one stage after another,
and records beside its report the CPU time that other processes took meanwhile, so that contended
timings show; with --idle it waits for an idle machine before each stage and re-runs a stage that
was contended anyway. The JSON record is rewritten after every stage; `--resume --stages A,B`
re-runs only those stages into an existing record, keeping the others. The markdown tables of
BENCHMARKS.md are printed at the end, or from a saved record with --markdown-only.

    python benchmarks/dense_baseline.py --data-dir ../shared/data --out runs/dense_baseline.json \\
        --limit hellaswag=5000 --idle
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prunekit.evaluate.run import bench_models, evaluate_model
from prunekit.evaluate.tasks import LOCAL_TASKS, local_data_files
from prunekit.export.files import atomic_write_text

# A stage's timing counts as contended when other processes took more than this share of the CPU;
# with --idle, a stage is stopped and run again when they take more than ABORT_SHARE for a minute.
CONTENDED_SHARE = 0.05
ABORT_SHARE = 0.2
TASK_NAMES = {"piqa": "PIQA", "arc_easy": "ARC-Easy", "arc_challenge": "ARC-Challenge", "hellaswag": "HellaSwag"}


def _limits(pairs: list[str]) -> dict[str, int]:
    limits = {}
    for pair in pairs:
        task, _, count = pair.partition("=")
        if task not in LOCAL_TASKS or not count.isdigit() or int(count) < 1:
            raise argparse.ArgumentTypeError(f"--limit takes TASK=N with TASK in {', '.join(LOCAL_TASKS)}, got {pair!r}")
        limits[task] = int(count)
    return limits


# ----------------------------------------------------------------------------- contention


def _busy_cpu_seconds() -> float:
    """CPU seconds that every process on this machine has spent busy since boot (/proc/stat)."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, Path("/proc/stat").read_text().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    return sum(usage.ru_utime + usage.ru_stime for usage in
               (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)))


class OtherCpu:
    """The CPU time that processes other than this one have taken since the meter was made."""

    def __init__(self) -> None:
        self.busy, self.own, self.start = _busy_cpu_seconds(), _own_cpu_seconds(), time.perf_counter()

    def seconds(self) -> float:
        return max(0.0, (_busy_cpu_seconds() - self.busy) - (_own_cpu_seconds() - self.own))

    def share(self) -> float:
        """Of all the CPU time the machine had since the meter was made."""
        return self.seconds() / ((time.perf_counter() - self.start) * os.cpu_count())


def wait_for_idle(poll_seconds: float = 30.0) -> None:
    """Return once other processes have left the CPU idle for `poll_seconds`."""
    while True:
        meter = OtherCpu()
        time.sleep(poll_seconds)
        if (share := meter.share()) <= CONTENDED_SHARE:
            return
        print(f"waiting: other processes take {share:.0%} of the CPU", file=sys.stderr)


class Contended(BaseException):
    """Raised in the main thread when another job starts to share the CPU with a stage.

    A BaseException, as KeyboardInterrupt is, so that no library's `except Exception` swallows it.
    """


class AbortOnContention:
    """Raise Contended in the main thread once other processes take more than `share` of the CPU
    over `seconds`, so a stage stops early rather than finishing with an unfair time.

    The watcher thread signals the process with SIGUSR1, whose handler (which Python runs in the
    main thread) raises; SIGINT would not do, as shells start background jobs with it ignored.
    """

    def __init__(self, share: float, seconds: float = 60.0) -> None:
        self.share, self.seconds = share, seconds
        self._done = threading.Event()
        self._lock = threading.Lock()  # no signal once __exit__ has begun to restore the handler

    def _watch(self) -> None:
        while True:
            meter = OtherCpu()
            if self._done.wait(self.seconds):
                return
            if meter.share() > self.share:
                with self._lock:
                    if not self._done.is_set():
                        os.kill(os.getpid(), signal.SIGUSR1)
                return

    @staticmethod
    def _raise(signum: int, frame: object) -> None:
        raise Contended

    def __enter__(self) -> AbortOnContention:
        self._previous = signal.signal(signal.SIGUSR1, self._raise)
        threading.Thread(target=self._watch, daemon=True).start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        with self._lock:
            self._done.set()
        signal.signal(signal.SIGUSR1, self._previous)


def measured(stage: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run a stage; record beside its report how much CPU other processes took meanwhile."""
    meter = OtherCpu()
    report = stage()
    return {
        "report": report,
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "contention": {"wall_seconds": round(time.perf_counter() - meter.start, 1),
                       "other_processes_cpu_seconds": round(meter.seconds(), 1),
                       "other_processes_cpu_share": round(meter.share(), 3)},
    }


# ----------------------------------------------------------------------------- stages


def stages(args: argparse.Namespace) -> dict[str, Callable[[], dict[str, Any]]]:
    """Every stage by name, in the order they run; each calls the public API once."""
    def ppl(seq_len: int, every: int) -> Callable[[], dict[str, Any]]:
        return lambda: evaluate_model(args.model, ppl=["wikitext2"], seq_len=seq_len, window_every=every,
                                      dtype=args.ppl_dtype, data_dir=args.data_dir)

    def task(name: str) -> Callable[[], dict[str, Any]]:
        return lambda: evaluate_model(args.model, ppl=[], tasks=[name], limit=args.limit.get(name),
                                      dtype=args.task_dtype, data_dir=args.data_dir)

    named = {"ppl-512-every16": ppl(512, 16)}
    named.update({f"ppl-{seq_len}": ppl(seq_len, 1) for seq_len in args.seq_lens})
    named.update({f"task-{name}": task(name) for name in args.tasks})
    named["speed"] = lambda: bench_models(args.model, baseline=args.baseline, dtype=args.speed_dtype,
                                          repeats=args.repeats)
    return named


# ----------------------------------------------------------------------------- markdown


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def _time(seconds: float, contention: dict[str, Any]) -> str:
    text = f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"
    return text + ("*" if contention["other_processes_cpu_share"] > CONTENDED_SHARE else "")


def markdown(record: dict[str, Any]) -> str:
    """The tables of BENCHMARKS.md: perplexity, zero-shot accuracy, speed, then machine and commands."""
    done = record["stages"]
    if not done:
        return "(no stage has run yet)"
    ppl = [stage for name, stage in done.items() if name.startswith("ppl-")]
    tasks = [stage for name, stage in done.items() if name.startswith("task-")]
    lines: list[str] = []

    if ppl:
        first = next(iter(ppl[0]["report"]["perplexity"].values()))["protocol"]
        lines += [f"**WikiText-2 test perplexity** ({first['dtype']}; `wiki.test.raw` read as it is, "
                  f"{first['stream_tokens']:,} tokens, tokenized once without special tokens; non-overlapping "
                  "windows, remainder dropped):", ""]
        rows = []
        for stage in ppl:
            entry = stage["report"]["perplexity"]["wikitext2"]
            protocol = entry["protocol"]
            every = protocol["window_every"]
            windows = f"all {entry['n_windows']:,}" if every == 1 else f"every {every}th ({entry['n_windows']:,})"
            rows.append([f"{protocol['seq_len']:,}", windows, f"{entry['n_tokens']:,}",
                         f"**{entry['perplexity']:.2f}**", _time(entry["seconds"], stage["contention"])])
        lines += _md_table(["window (tokens)", "windows", "tokens scored", "perplexity", "time"], rows)

    if tasks:
        dtype = tasks[0]["report"]["model"]["dtype"]
        lines += ["", f"**Zero-shot accuracy** ({dtype}; 0-shot, lm-eval's prompts and metrics, local copies of "
                      "the data; ± is the standard error):", ""]
        rows, notes = [], {}
        for stage in tasks:
            (task, entry), = stage["report"]["tasks"].items()
            protocol = entry["protocol"]
            limit = protocol["limit"]
            items = f"{entry['n']:,}" + (f" (the first {limit:,})" if limit else " (all)")
            rows.append([TASK_NAMES.get(task, task), protocol["split"], items,
                         f"{entry['acc']:.3f} ± {entry['acc_stderr']:.3f}",
                         f"{entry['acc_norm']:.3f} ± {entry['acc_norm_stderr']:.3f}",
                         _time(entry["seconds"], stage["contention"])])
            if protocol.get("differs_from_lm_eval"):
                notes.setdefault(protocol["differs_from_lm_eval"], []).append(TASK_NAMES.get(task, task))
        lines += _md_table(["task", "split", "items", "acc", "acc_norm", "time"], rows)
        if notes:
            lines += ["", "Local copies differ from lm-eval's Hub data: "
                      + "; ".join(f"{', '.join(tasks)}: {note}" for note, tasks in notes.items()) + "."]

    if "speed" in done:
        speed = done["speed"]["report"]["speed"]
        settings, timings = speed["settings"], speed["model"]["timings"]

        baseline = speed.get("baseline")

        def spread(t: dict, digits: int, suffix: str = "") -> str:
            return f"{t['median']:,.{digits}f}{suffix} ({t['low']:,.{digits}f}-{t['high']:,.{digits}f})"

        def cells(metric: str, digits: int = 0) -> list[str]:
            row = [spread(timings[metric], digits)]
            if baseline:
                row += [spread(baseline["timings"][metric], digits), spread(speed["speedup"][metric], 2, "x"),
                        f"{speed['ideal_speedup']:.2f}x"]
            return row

        contended = "*" if done["speed"]["contention"]["other_processes_cpu_share"] > CONTENDED_SHARE else ""
        lines += ["", f"**CPU speed**{contended} ({settings['dtype']}, eager, {settings['repeats']} repeats after "
                      f"{settings['warmup']} warm-up; median (min-max); random token ids"
                      + ("; the baseline timed in the same process, interleaved" if baseline else "") + "):", ""]
        rows = [[f"prefill tokens/s, batch {settings['prefill_batch']} x {settings['prefill_len']}",
                 *cells("prefill_tokens_per_s")]]
        for batch in settings["decode_batches"]:
            rows.append([f"decode tokens/s, batch {batch} ({settings['decode_tokens']} greedy tokens after a "
                         f"{settings['decode_context']}-token prompt)", *cells(f"decode_tokens_per_s_batch{batch}", 1)])
            rows.append([f"time to first token, batch {batch}, ms", *cells(f"time_to_first_token_ms_batch{batch}")])
        memory = [f"{speed['model']['peak_memory_mib']:,.0f}"]
        if baseline:
            memory += [f"{baseline['peak_memory_mib']:,.0f}", "", ""]
        rows.append(["peak memory, MiB (weights + peak RSS above the start of a call)", *memory])
        header = ["metric", "value"] + (["baseline", "measured speedup", "ideal (FLOPs)"] if baseline else [])
        lines += _md_table(header, rows)

    environments = [stage["report"]["environment"] for stage in done.values()]
    machine, versions = environments[0]["machine"], environments[0]["versions"]
    dates = sorted({env["date"][:10] for env in environments})
    shares = {name: stage["contention"]["other_processes_cpu_share"] for name, stage in done.items()}
    contended = {name: share for name, share in shares.items() if share > CONTENDED_SHARE}
    lines += [
        "",
        f"Measured on {machine['cpu']}, {machine['cpu_cores']} cores ({machine['torch_threads']} torch threads), "
        f"{' to '.join(dates)}; " + ", ".join(f"{name} {version}" for name, version in versions.items()) + ". "
        "Times are wall-clock, model load excluded. Other processes took at most "
        f"{max(shares.values()):.0%} of the CPU during any stage"
        + (f" (* marks stages above {CONTENDED_SHARE:.0%}: "
           + ", ".join(f"{name} {share:.0%}" for name, share in contended.items()) + ")" if contended else "")
        + ".",
        "",
        "Commands:",
        "",
        *(f"    {command}" for command in dict.fromkeys(stage["command"] for stage in done.values())),
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data-dir", default=None, help="shared data folder (default $PRUNEKIT_DATA_DIR)")
    parser.add_argument("--out", type=Path, default=Path("runs/dense_baseline.json"))
    parser.add_argument("--seq-lens", type=lambda text: [int(n) for n in text.split(",")], default=[128, 512, 2048],
                        help="window lengths scored on every window (default 128,512,2048)")
    parser.add_argument("--tasks", type=lambda text: text.split(","), default=list(LOCAL_TASKS),
                        help=f"default {','.join(LOCAL_TASKS)}")
    parser.add_argument("--limit", nargs="*", default=[], metavar="TASK=N",
                        help="score only the first N items of TASK (default: every item of every task)")
    parser.add_argument("--baseline", default=None,
                        help="time this model too, interleaved in the speed stage (e.g. the dense model beside a "
                             "pruned one): measured speedups next to the ideal ones")
    parser.add_argument("--ppl-dtype", default="float32")
    parser.add_argument("--task-dtype", default="bfloat16")
    parser.add_argument("--speed-dtype", default="bfloat16")
    parser.add_argument("--repeats", type=int, default=5, help="speed repeats (default 5)")
    parser.add_argument("--idle", action="store_true",
                        help="before each stage wait until other processes leave the CPU idle; stop a stage they "
                             "start to contend and run it again (up to --retries times; the last try runs through)")
    parser.add_argument("--retries", type=int, default=6, help="with --idle: re-runs of a contended stage (default 6)")
    parser.add_argument("--stages", type=lambda text: text.split(","), help="run only these stages (default all)")
    parser.add_argument("--resume", action="store_true", help="keep the other stages of the record at --out")
    parser.add_argument("--markdown-only", action="store_true", help="print the tables of the record at --out")
    args = parser.parse_args()
    try:
        args.limit = _limits(args.limit)
    except argparse.ArgumentTypeError as error:
        parser.error(str(error))
    if args.markdown_only:
        print(markdown(json.loads(args.out.read_text(encoding="utf-8"))))
        return 0

    # Tasks run after most of an hour of perplexity: check their names and data first.
    unknown = sorted(set(args.tasks) - set(LOCAL_TASKS))
    if unknown:
        parser.error(f"unknown task {unknown[0]!r}; choose from {', '.join(LOCAL_TASKS)}")
    for task in args.tasks:
        local_data_files(task, args.data_dir)
    available = stages(args)
    selected = args.stages or list(available)
    if set(selected) - set(available):
        parser.error(f"unknown stage {sorted(set(selected) - set(available))[0]!r}; choose from {', '.join(available)}")
    if args.resume and not args.out.is_file():
        parser.error(f"--resume needs an existing record at {args.out}; drop --resume to start one")
    if args.resume and json.loads(args.out.read_text(encoding="utf-8"))["model"] != args.model:
        parser.error(f"the record at {args.out} is of another model; pass its --model or another --out")

    record = (json.loads(args.out.read_text(encoding="utf-8")) if args.resume
              else {"format": "prunekit.dense_baseline/1", "model": args.model, "stages": {}})
    for name, stage in available.items():
        if name not in selected:
            continue
        for attempt in range(1, args.retries + 2 if args.idle else 2):
            last = attempt == args.retries + 1 or not args.idle
            if args.idle:
                wait_for_idle()
            print(f"stage {name}, attempt {attempt}", file=sys.stderr)
            if last:
                result = measured(stage)
                break
            try:
                with AbortOnContention(ABORT_SHARE):
                    result = measured(stage)
            except Contended:
                print(f"stage {name}: stopped, another job took over {ABORT_SHARE:.0%} of the CPU", file=sys.stderr)
                continue
            if result["contention"]["other_processes_cpu_share"] <= CONTENDED_SHARE:
                break
        record["stages"][name] = {**result, "attempts": attempt}
        # Keep the stages in the order they are defined, whichever ran last.
        order = [*available, *record["stages"]]
        record["stages"] = {key: record["stages"][key] for key in dict.fromkeys(order) if key in record["stages"]}
        atomic_write_text(args.out, json.dumps(record, indent=1, ensure_ascii=False) + "\n")
    print(markdown(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
