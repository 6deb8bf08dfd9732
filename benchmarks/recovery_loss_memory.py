"""Peak memory of one recovery step with a 262,144-token vocabulary (Gemma 3's), before and after
the chunked loss: a tiny random model (2 layers, hidden 128, tied embeddings) trained one step by
`recover_loaded` (distillation from a teacher of the same shape, the default method, and plain
cross-entropy), each in a fresh process, the peak resident memory the job added to the process
(VmHWM after clear_refs, less the resident set before the models were built) set beside the
recovery estimate of the same prunekit tree.

    python benchmarks/recovery_loss_memory.py --before-commit 463de77 --json benchmarks/results/recovery_loss_memory.json

`--before-commit` names a commit whose src/ is run as "before" (git archive into a temporary
directory, put first on PYTHONPATH); "after" is this checkout. `--before-src DIR` names such a
tree already extracted (a machine without the git history, e.g. the GPU machine). With a CUDA
GPU, recovery trains there (accelerate's choice) and the peak is torch's peak allocation on the
device during the job, set beside the estimate for the device:

    python benchmarks/recovery_loss_memory.py --before-src .gpu/before_src/src --batch-size 8 --seq-len 512 --json OUT.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SHAPE = dict(vocab_size=262_144, hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=32, max_position_embeddings=1024, tie_word_embeddings=True,
             pad_token_id=0, bos_token_id=1, eos_token_id=2)

ONE_STEP = textwrap.dedent("""
    import json, sys, time
    import torch
    import accelerate, peft  # noqa: F401  (their import is not the job's memory)
    from transformers import AutoConfig, AutoModelForCausalLM
    sys.path.insert(0, sys.argv[5])
    from tests.conftest import byte_tokenizer
    import prunekit
    from prunekit.models.memory import recovery_estimate
    from prunekit.models.structure import model_structure
    from prunekit.recover import RecoveryData, RecoverySettings, recover_loaded

    method, batch, seq, text = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    shape = json.loads(sys.argv[6])
    torch.set_num_threads(2)
    status = lambda key: int(next(line for line in open("/proc/self/status")
                                  if line.startswith(key + ":")).split()[1]) * 1024
    tokenizer = byte_tokenizer()
    settings = RecoverySettings(method=method, tokens=batch * seq, batch_size=batch, eval_every=0, checkpoint_every=0,
                                data=RecoveryData(source=text, seq_len=seq, held_out=1))
    config = AutoConfig.for_model("llama", **shape)
    baseline = status("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")  # VmHWM from here: the job's own peak
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_config(config, dtype=torch.float32) if method == "distill" else None
    structure = model_structure(model)
    cuda = torch.cuda.is_available()
    sizing = dict(lora=False, batch_size=batch, seq_len=seq)
    try:
        estimate = recovery_estimate(structure, structure if teacher is not None else None, "float32", **sizing,
                                     device="cuda" if cuda else "cpu")
    except TypeError:  # a tree from before the estimate knew devices
        estimate = recovery_estimate(structure, structure if teacher is not None else None, "float32", **sizing)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        device_baseline = torch.cuda.memory_allocated()
    started = time.perf_counter()
    _, record = recover_loaded(model, tokenizer, settings, teacher=teacher, progress=False)
    measured = torch.cuda.max_memory_allocated() - device_baseline if cuda else status("VmHWM") - baseline
    print(json.dumps({"prunekit": prunekit.__file__, "estimate_bytes": estimate.total, "device": "cuda" if cuda else "cpu",
                      "estimate_parts": estimate.parts, "measured_bytes": measured,
                      "step_seconds": record["train_seconds"], "seconds": time.perf_counter() - started,
                      "loss": record["loss"][0]}))
""")


def measure(method: str, batch: int, seq: int, text: Path, src: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src)}
    done = subprocess.run([sys.executable, "-c", ONE_STEP, method, str(batch), str(seq), str(text), str(ROOT),
                           json.dumps(SHAPE)], capture_output=True, text=True, env=env, cwd=ROOT, check=False)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if not Path(result["prunekit"]).resolve().is_relative_to(src.resolve()):  # else "before" measured "after"
        raise SystemExit(f"the job imported prunekit from {result['prunekit']}, not from {src}")
    gib = lambda size: round(size / 2**30, 3)  # noqa: E731
    return {"method": method, "prunekit": result["prunekit"], "device": result.get("device", "cpu"),
            "measured_peak_over_start_gib": gib(result["measured_bytes"]),
            "estimate_gib": gib(result["estimate_bytes"]),
            "estimate_parts_gib": {k: gib(v) for k, v in result["estimate_parts"].items()},
            "estimate_over_measured": round(result["estimate_bytes"] / result["measured_bytes"], 3),
            "step_seconds": round(result["step_seconds"], 2), "first_loss": result["loss"]}


def torch_device_name() -> str | None:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before-commit", default=None, help="run this commit's src/ as 'before'")
    parser.add_argument("--before-src", default=None, help="an extracted src/ tree to run as 'before'")
    parser.add_argument("--methods", default="distill,full")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    runs = {}
    with tempfile.TemporaryDirectory() as work:
        text = Path(work) / "text.txt"
        text.write_text("The cat sat on the mat. The dog sat on the log. " * 2000)
        trees = {"after": ROOT / "src"}
        if args.before_commit:
            archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.before_commit, "src"], capture_output=True,
                                     check=True).stdout
            subprocess.run(["tar", "-x", "-C", work], input=archive, check=True)
            trees = {"before": Path(work) / "src", **trees}
        elif args.before_src:
            trees = {"before": Path(args.before_src).resolve(), **trees}
        for name, src in trees.items():
            for method in args.methods.split(","):
                runs.setdefault(name, {})[method] = measure(method, args.batch_size, args.seq_len, text, src)
                print(name, json.dumps(runs[name][method]), flush=True)
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          check=False)
    record = {
        "what": "peak resident memory one recovery step added to a fresh process (VmHWM after clear_refs, less the "
                "resident set before the models were built), beside the recovery estimate of the same tree: a "
                "random 2-layer llama with a 262,144-token vocabulary, fp32, full-weight training, one optimizer step "
                "of batch x seq tokens, plus the held-out perplexity of 1 row at start and end",
        "shape": SHAPE, "batch_size": args.batch_size, "seq_len": args.seq_len,
        "full_logits_of_one_batch_gib": round(args.batch_size * args.seq_len * SHAPE["vocab_size"] * 4 / 2**30, 3),
        "command": " ".join(["python", "benchmarks/recovery_loss_memory.py", *sys.argv[1:]]),
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch threads 2"
                   + (f", {torch_device_name()}" if torch_device_name() else ""),
        "checkout": head.stdout.strip(), "before_commit": args.before_commit, "runs": runs,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
