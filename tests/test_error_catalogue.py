"""The bad-input catalogue: every case runs the real command and must end with exit code 2 and one
clear sentence (never a traceback). docs/ERRORS.md is generated from this table, so it stays true:

    python tests/test_error_catalogue.py > docs/ERRORS.md
"""
from __future__ import annotations

import contextlib
import io
import itertools
import json
import os
import re
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from conftest import byte_tokenizer, tiny_model  # noqa: E402

import prunekit  # noqa: E402
from prunekit.cli import main as cli_main  # noqa: E402

TEXT = "The cat sat on the mat. The dog sat on the log. " * 40


def build_world(root: Path) -> dict[str, str]:
    """Models, plans, data files and recipes, good and bad, that the cases point at."""
    root.mkdir(parents=True, exist_ok=True)
    model = root / "model"
    if not model.exists():
        prunekit.save_model(tiny_model("llama", intermediate_size=128, max_position_embeddings=128), byte_tokenizer(), model)
        other = root / "other"
        prunekit.save_model(tiny_model("llama", intermediate_size=32, vocab_size=320), byte_tokenizer(), other)
        (root / "text.txt").write_text(TEXT)
        (root / "empty.txt").write_text("")
        (root / "latin1.txt").write_bytes("caf\xe9 na\xefve ".encode("latin-1") * 50)
        (root / "short.txt").write_text("too short")
        (root / "not_a_model").mkdir()
        bad_json = root / "bad_config"
        bad_json.mkdir()
        (bad_json / "config.json").write_text("{not json")
        gpt2 = root / "gpt2"
        gpt2.mkdir()
        (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
        (root / "broken.gguf").write_bytes(b"GGUF" + b"\x00" * 64)
        prunekit.save_model(tiny_model("gemma2"), byte_tokenizer(), root / "gemma2")  # no GGUF writer for it
        (root / "exists.gguf").write_bytes(b"GGUF")
        other_plan = prunekit.Plan(layers={0: prunekit.LayerPlan(keep_channels=tuple(range(16)))})
        skeleton = prunekit.model_structure(tiny_model("llama", intermediate_size=32, vocab_size=320))
        from prunekit.plan.plan import structure_signature

        data = other_plan.to_dict()
        data["model"] = structure_signature(skeleton)
        (root / "other_plan.json").write_text(json.dumps(data))
        (root / "bad_plan.json").write_text("[1, 2")
        (root / "recipe_key.yaml").write_text(f"model: {model}\nstages: [prune]\nprune: {{taget: 0.3}}\n")
        (root / "recipe_type.yaml").write_text(f"model: {model}\nstages: [prune]\nprune: {{target: lots}}\n")
        (root / "recipe_stage.yaml").write_text(f"model: {model}\nstages: [prune, distil]\n")
        (root / "exists").mkdir()
        calibration = f"calibration: {{source: {root / 'text.txt'}, n_samples: 4, seq_len: 32}}"
        # the last stage is the wrong one: refused before the first stage loads a weight
        (root / "recipe_last.yaml").write_text(f"model: {model}\nstages: [prune, evaluate, bench]\nprune: {{target: 0.2, "
                                               f"{calibration}}}\nevaluate: {{ppl: [{root / 'text.txt'}], seq_len: 32}}\n"
                                               "bench: {repeats: 0}\n")
        (root / "recipe_eval_text.yaml").write_text(f"model: {model}\nstages: [prune, evaluate]\nprune: {{target: 0.2, "
                                                    f"{calibration}}}\nevaluate: {{ppl: [{root / 'short.txt'}], "
                                                    "seq_len: 64}\n")
        (root / "recipe_memory.yaml").write_text(f"model: {model}\nstages: [prune, recover]\nprune: {{target: 0.2, "
                                                 f"{calibration}}}\nrecover: {{method: distill, tokens: 10000000000000, "
                                                 f"batch_size: 100000000, data: {{source: {root / 'text.txt'}, "
                                                 "seq_len: 32}}\n")
        (root / "recipe_export.yaml").write_text(f"model: {model}\nstages: [prune, export]\nprune: {{target: 0.2, "
                                                 f"{calibration}}}\nexport: {{format: onnx}}\n")
        from prunekit.score import score_model

        score_model(tiny_model("llama", intermediate_size=32, vocab_size=320), "magnitude").save(root / "other_scores.json")
        prunekit.save_model(tiny_model("llama"), byte_tokenizer(), root / "corrupt")
        (root / "corrupt" / "model.safetensors").write_bytes(b"not safetensors" * 10)
        pruned = root / "pruned"
        prunekit.save_model(tiny_model("llama", intermediate_size=64, max_position_embeddings=128), byte_tokenizer(),
                            pruned)
        nan_model = tiny_model("llama", intermediate_size=128)
        with torch.no_grad():
            nan_model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
        prunekit.save_model(nan_model, byte_tokenizer(), root / "nan_weights")
        # finite in float16, but the activations they make are not
        overflow = tiny_model("llama", intermediate_size=64)
        with torch.no_grad():
            for layer in overflow.model.layers:
                layer.mlp.down_proj.weight.fill_(30000.0)
        prunekit.save_model(overflow, byte_tokenizer(), root / "overflow")
    return {name: str(root / name) for name in (
        "model", "other", "text.txt", "empty.txt", "latin1.txt", "short.txt", "not_a_model", "bad_config", "gpt2",
        "broken.gguf", "other_plan.json", "bad_plan.json", "recipe_key.yaml", "recipe_type.yaml", "recipe_stage.yaml",
        "exists", "pruned", "corrupt", "nan_weights", "overflow", "recipe_last.yaml", "recipe_eval_text.yaml",
        "recipe_memory.yaml", "recipe_export.yaml", "other_scores.json")} | {"root": str(root)}


# (case, command line with {names} from build_world, a fragment the message must contain)
CASES: list[tuple[str, str, str]] = [
    ("model path that does not exist", "inspect {root}/nowhere", "no model at"),
    ("directory that is not a model", "inspect {not_a_model}", "config.json"),
    ("config.json that is not JSON", "inspect {bad_config}", "not valid JSON"),
    ("unsupported architecture", "inspect {gpt2}", "gpt2"),
    ("corrupt GGUF file", "inspect {broken.gguf}", "broken.gguf"),
    ("GGUF export of a family the GGUF writer lacks", "export {root}/gemma2 --format gguf --out {root}/g1.gguf",
     "the GGUF writer does not support model type 'gemma2'; it supports llama"),
    ("unknown GGUF quantization type", "export {model} --out {root}/g2.gguf --quant q3_k", "supports f16, q8_0, q4_k_m"),
    ("unknown export format", "export {model} --format onnx --out {root}/g3.onnx", "unknown export format 'onnx'"),
    ("GGUF output that is not a .gguf file", "export {model} --out {root}/g4.bin", "ending in .gguf"),
    ("GGUF output that exists", "export {model} --out {root}/exists.gguf", "already exists"),
    ("GGUF export of a tokenizer llama.cpp cannot read", "export {model} --out {root}/g5.gguf", "no BPE merges"),
    ("corrupt safetensors weights", "eval {corrupt} --ppl {text.txt} --seq-len 16", "cannot load the weights"),
    ("target outside (0, 1)", "prune {model} --target 1.5 --out {root}/o1 --calib {text.txt}", "must be a fraction"),
    ("target unreachable under the limits",
     "prune {model} --target 0.6 --prune-structures channel --limit channel=0.1 --out {root}/o2 --calib {text.txt}",
     "at most"),
    ("replacing dropped layers of a family with a norm after its MLP",
     "prune {root}/gemma2 --target 0.2 --prune-structures layer --replace-dropped-layers --out {root}/or1 --calib {text.txt}",
     "post_feedforward_layernorm before the residual add"),
    ("allocation search layer by layer",
     "prune {model} --target 0.2 --allocation search --layer-by-layer --out {root}/os1 --calib {text.txt}",
     "cannot run layer by layer yet"),
    ("allocation search of whole layers",
     "prune {model} --target 0.2 --allocation search --prune-structures channel,layer --out {root}/os3 --calib {text.txt}",
     "cannot remove ['layer'] yet"),
    ("allocation search with no generations",
     "prune {model} --target 0.2 --allocation search --search-generations 0 --out {root}/os4 --calib {text.txt}",
     "generations must be at least 1"),
    ("plan made for another model", "prune {model} --plan {other_plan.json} --out {root}/o3", "made for"),
    ("plan file that is not JSON", "prune {model} --plan {bad_plan.json} --out {root}/o4", "JSON"),
    ("empty calibration file", "prune {model} --target 0.2 --out {root}/o5 --calib {empty.txt} --calib-seq-len 16",
     "empty"),
    ("calibration file that is not UTF-8",
     "prune {model} --target 0.2 --out {root}/o6 --calib {latin1.txt} --calib-seq-len 16", "UTF-8"),
    ("too few calibration tokens for the samples",
     "prune {model} --target 0.2 --out {root}/o7 --calib {short.txt} --calib-seq-len 64", "fewer than one window"),
    ("unknown calibration source", "prune {model} --target 0.2 --out {root}/o8 --calib wikitext3",
     "unknown calibration source 'wikitext3'"),
    ("unknown criterion option",
     "prune {model} --target 0.2 --out {root}/o9 --calib {text.txt} --criterion-option depth=3", "has no options"),
    ("limit on an unknown structure",
     "prune {model} --target 0.2 --out {root}/o10 --calib {text.txt} --limit neuron=0.3", "unknown structures"),
    ("output directory that exists", "prune {model} --target 0.2 --out {exists} --calib {text.txt}", "exists"),
    ("output inside the input model", "prune {model} --target 0.2 --out {model}/sub --calib {text.txt} --force",
     "overlaps the input model"),
    ("unknown evaluation task", "eval {model} --tasks piqa2", "unknown task 'piqa2'"),
    ("evaluation window longer than the model's positions", "eval {model} --ppl {text.txt} --seq-len 4096",
     "lower it"),
    ("evaluation text shorter than one window", "eval {model} --ppl {short.txt} --seq-len 64", "window"),
    ("CUDA asked for on a machine without a GPU", "bench {model} --device cuda", "no CUDA GPU"),
    ("CUDA-graph decode asked for on the CPU", "bench {model} --decode graph", "--decode eager"),
    ("evaluation on a GPU this machine lacks", "eval {model} --ppl {text.txt} --seq-len 16 --device cuda",
     "no CUDA GPU"),
    ("teacher with another vocabulary",
     "recover {pruned} --teacher {other} --out {root}/r1 --data {text.txt} --seq-len 16 --tokens 4096",
     "vocabulary"),
    ("distillation without a teacher", "recover {pruned} --out {root}/r2 --data {text.txt} --seq-len 16",
     "needs the original model as teacher"),
    ("token budget smaller than one step",
     "recover {pruned} --teacher {model} --out {root}/r3 --data {text.txt} --seq-len 64 --tokens 10",
     "smaller than one optimizer step"),
    ("recovery data shorter than one row",
     "recover {pruned} --method lora --out {root}/r4 --data {short.txt} --seq-len 64 --tokens 512 --held-out 0",
     "fewer than one window"),
    ("recovery options that need distillation",
     "recover {pruned} --method lora --out {root}/r5 --data {text.txt} --ce-weight 0.5", "apply to distillation"),
    ("sharded recovery without a launcher",
     "recover {pruned} --method lora --out {root}/r6 --data {text.txt} --shard", "run it under `accelerate launch"),
    ("recipe file that does not exist", "run {root}/nothing.yaml --out {root}/run1", "does not exist"),
    ("unknown recipe key", "run {recipe_key.yaml} --out {root}/run2", "unknown key recipe.prune.taget"),
    ("recipe value of the wrong type", "run {recipe_type.yaml} --out {root}/run3", "must be float"),
    ("unknown recipe stage", "run {recipe_stage.yaml} --out {root}/run4", "unknown stage 'distil'"),
    ("malformed recipe override", "run {recipe_key.yaml} prune.target --out {root}/run5", "KEY=VALUE"),
    ("recipe whose last stage cannot run", "run {recipe_last.yaml} --out {root}/run6",
     "repeats must be an integer >= 1"),
    ("recipe evaluation text shorter than one window", "run {recipe_eval_text.yaml} --out {root}/run7",
     "shorter than one window"),
    ("recipe whose recovery cannot fit in memory", "run {recipe_memory.yaml} --out {root}/run8",
     "recover of"),
    ("unknown export format in a recipe", "run {recipe_export.yaml} --out {root}/run9",
     "export.format must be huggingface"),
    ("unknown decode timing in a recipe", "run {recipe_export.yaml} --out {root}/run10 bench.decode=fast",
     "choose one of graph, eager"),
    ("scores computed for another model",
     "prune {model} --target 0.2 --scores {other_scores.json} --out {root}/o16 --calib {text.txt}",
     "computed for another model"),
    ("scores file that does not exist",
     "prune {model} --target 0.2 --scores {root}/no_scores.json --out {root}/o17 --calib {text.txt}",
     "scores file"),
    ("sweep target outside (0, 1)", "sweep {model} --targets 0.2,1.5 --out {root}/s1 --calib {text.txt}",
     "fractions in (0, 1)"),
    ("unknown sweep evaluation source", "sweep {model} --eval wikitext3 --out {root}/s2 --calib {text.txt}",
     "unknown evaluation source 'wikitext3'"),
    ("report on a folder that does not exist", "report {root}/no_run", "does not exist"),
    ("NaN or inf in the weights",
     "prune {nan_weights} --target 0.2 --criterion activation --out {root}/o11 --calib {text.txt} --calib-seq-len 16",
     "weight model.layers.1.mlp.up_proj.weight"),
    ("scores that come out NaN or inf",
     "prune {overflow} --dtype float16 --target 0.2 --criterion activation --prune-structures channel,head,kv_group "
     "--compensation none --out {root}/o12 "
     "--calib {text.txt} --calib-seq-len 16 --calib-samples 4", "NaN or inf scores"),
    ("unknown device", "prune {model} --target 0.2 --criterion activation --device gpu --out {root}/o13 --calib {text.txt}",
     "unknown device 'gpu'"),
    ("GPU asked for that this machine does not have",
     "analyze {model} --criterion activation --device cuda:7 --out {root}/a1 --calib {text.txt}", "was asked for"),
    ("criterion that cannot run layer by layer",
     "prune {model} --target 0.2 --criterion taylor --layer-by-layer --out {root}/o14 --calib {text.txt}",
     "cannot run layer by layer"),
    ("memory estimate beyond the device, layer by layer",
     "prune {model} --target 0.2 --criterion activation --layer-by-layer --out {root}/o15 --calib {text.txt} "
     "--calib-samples 100000000 --calib-seq-len 64", "lower --calib-samples"),
    ("calibration set with the Hub offline and no data directory",
     "HF_HUB_OFFLINE=1 PRUNEKIT_DATA_DIR= HF_HOME={root}/hf_home prune {model} --target 0.2 --out {root}/o16 --calib c4",
     "HF_HUB_OFFLINE=1 keeps the Hugging Face Hub offline; set PRUNEKIT_DATA_DIR"),
    ("evaluation set with the Hub offline and no data directory",
     "HF_HUB_OFFLINE=1 PRUNEKIT_DATA_DIR= HF_HOME={root}/hf_home eval {model} --ppl wikitext2 --seq-len 16",
     "wikitext2 (test) cannot be read: no data directory is set"),
    ("unknown save dtype", "prune {model} --target 0.2 --out {root}/o17 --calib {text.txt} --save-dtype int8",
     "unknown save dtype 'int8'; choose one of source, float32, fp32, bfloat16, bf16, float16, fp16"),
]


@contextlib.contextmanager
def environment(assignments: list[str]):
    """The environment with `NAME=VALUE` assignments made (an empty VALUE unsets NAME), restored after."""
    saved = {}
    for assignment in assignments:
        name, _, value = assignment.partition("=")
        saved[name] = os.environ.pop(name, None)
        if value:
            os.environ[name] = value
    try:
        yield
    finally:
        for name, value in saved.items():
            os.environ.pop(name, None)
            if value is not None:
                os.environ[name] = value


def run_case(command: str, world: dict[str, str]) -> tuple[int, str]:
    """Exit code and stderr of `prunekit COMMAND`, with {name} replaced by the world's paths; leading
    NAME=VALUE words set the environment for the command, as a shell would."""
    for name, path in world.items():
        command = command.replace("{" + name + "}", path)
    words = command.split()
    assignments = list(itertools.takewhile(lambda word: re.fullmatch(r"[A-Z_]+=\S*", word), words))
    args = words[len(assignments):]
    err = io.StringIO()
    with environment(assignments), contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = cli_main(args)
        except SystemExit as exit_:  # argparse
            code = exit_.code
    return code, err.getvalue().strip()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("catalogue"))


def test_the_catalogue_has_at_least_thirty_distinct_cases():
    assert len({case for case, *_ in CASES}) == len(CASES) >= 30


@pytest.mark.parametrize("case, command, fragment", CASES, ids=[c for c, *_ in CASES])
def test_bad_input_gets_one_clear_sentence(world, case, command, fragment, one_thread):
    code, message = run_case(command, world)
    assert code == 2, message
    assert "Traceback" not in message
    assert fragment in message, message


def test_the_docs_list_every_case():
    docs = (ROOT / "docs" / "ERRORS.md").read_text()
    missing = [case for case, *_ in CASES if f"| {case} |" not in docs]
    assert not missing, f"regenerate docs/ERRORS.md (python tests/test_error_catalogue.py > docs/ERRORS.md): {missing}"


if __name__ == "__main__":
    import tempfile

    world = build_world(Path(tempfile.mkdtemp()))
    print("# Bad input: what each case says\n")
    print("Generated by `python tests/test_error_catalogue.py > docs/ERRORS.md` from the cases that "
          "`tests/test_error_catalogue.py` checks (exit code 2, one sentence, no traceback). Paths are "
          "shortened to their last part.\n")
    print("| case | command | message |\n|---|---|---|")
    for case, command, _ in CASES:
        _, message = run_case(command, world)
        words = command.split()
        assignments = list(itertools.takewhile(lambda word: re.fullmatch(r"[A-Z_]+=\S*", word), words))
        subcommand = words[len(assignments)]
        # the error itself, without the progress bars of the loading that came before it
        message = message[message.rfind(f"prunekit {subcommand}: error:"):] if "error:" in message else message
        shown = message.replace(world["root"] + "/", "").replace("|", "\\|").replace("\n", " ")
        line = " ".join(assignments + ["prunekit"] + words[len(assignments):])
        print(f"| {case} | `{line.replace('{root}/', '').replace('{', '').replace('}', '')}` | {shown} |")
