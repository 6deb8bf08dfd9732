"""Zero-shot tasks: local configs run in process, and render exactly the prompts lm-eval renders."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

from conftest import byte_tokenizer, tiny_model  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from prunekit.evaluate.tasks import (  # noqa: E402
    DATA_DIR_ENV,
    LOCAL_TASKS,
    EvalError,
    evaluate_tasks,
    local_data_files,
    write_task_config,
)

# One item per task in two shapes: as the shared data folder stores it, and as the Hub rows that
# lm-eval's own task yaml reads. Both must render to the same prompt, choices and gold.
# HellaSwag's ctx_b starts upper case so that lm-eval's ctx_b.capitalize() keeps the local `ctx`
# (the known difference is covered by the protocol note, not here); its "[step]" tag checks that
# lm-eval's cleaning is applied.
LOCAL_FILES: dict[str, dict[str, str]] = {
    "piqa": {
        "piqa/valid.jsonl": json.dumps({"goal": "How do I dry wet shoes?", "sol1": "Fill them with ice.",
                                        "sol2": "Stuff them with newspaper."}) + "\n",
        "piqa/valid-labels.lst": "1\n",
    },
    "arc_easy": {
        "arc_easy/arc_easy_test.mosaicml_icl.jsonl": json.dumps(
            {"query": "Question: Which gas do plants take in?", "choices": ["oxygen", "carbon dioxide",
             "helium", "neon"], "gold": 1}) + "\n",
    },
    "arc_challenge": {
        "arc_challenge/arc_challenge_test.mosaicml_icl.jsonl": json.dumps(
            {"query": "Question: What makes the Moon shine?", "choices": ["its own fire", "lava",
             "reflected sunlight", "stars"], "gold": 2}) + "\n",
    },
    "hellaswag": {
        "hellaswag/hellaswag_val_full.txt.gz": "\n".join([
            "Roof shingle removal: A man is sitting on a roof. Then he",
            "3",
            "is using wrap to wrap a pair of skis.",
            "is ripping level tiles off [step] slowly.",
            "is holding a rubik's cube.",
            "starts pulling up roofing on a roof.",
        ]) + "\n",
    },
}
HUB_DOCS: dict[str, dict] = {
    "piqa": {"goal": "How do I dry wet shoes?", "sol1": "Fill them with ice.",
             "sol2": "Stuff them with newspaper.", "label": 1},
    # Some Hub ARC items label their options 1-4 rather than A-D; the prompt must not depend on it.
    "arc_easy": {"id": "Mercury_1", "question": "Which gas do plants take in?",
                 "choices": {"text": ["oxygen", "carbon dioxide", "helium", "neon"], "label": ["1", "2", "3", "4"]},
                 "answerKey": "2"},
    "arc_challenge": {"id": "Mercury_2", "question": "What makes the Moon shine?",
                      "choices": {"text": ["its own fire", "lava", "reflected sunlight", "stars"],
                                  "label": ["A", "B", "C", "D"]},
                      "answerKey": "C"},
    "hellaswag": {"ind": 4, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.",
                  "ctx_b": "Then he", "ctx": "A man is sitting on a roof. Then he",
                  "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off [step] slowly.",
                              "is holding a rubik's cube.", "starts pulling up roofing on a roof."],
                  "source_id": "activitynet~v_-JhWjGDPHMY", "split": "val", "split_type": "indomain", "label": "3"},
}
EXPECTED: dict[str, tuple[str, list[str], int]] = {
    "piqa": ("Question: How do I dry wet shoes?\nAnswer:", ["Fill them with ice.", "Stuff them with newspaper."], 1),
    "arc_easy": ("Question: Which gas do plants take in?\nAnswer:", ["oxygen", "carbon dioxide", "helium", "neon"], 1),
    "arc_challenge": ("Question: What makes the Moon shine?\nAnswer:",
                      ["its own fire", "lava", "reflected sunlight", "stars"], 2),
    "hellaswag": ("Roof shingle removal: A man is sitting on a roof. Then he",
                  ["is using wrap to wrap a pair of skis.", "is ripping level tiles off slowly.",
                   "is holding a rubik's cube.", "starts pulling up roofing on a roof."], 3),
}
LM_EVAL_TASK_YAML = {
    "piqa": "piqa/piqa.yaml",
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
}


def write_local_files(task: str, data_dir: Path) -> None:
    for relative, text in LOCAL_FILES[task].items():
        path = data_dir / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".gz":
            path.write_bytes(gzip.compress(text.encode()))
        else:
            path.write_text(text)


def our_task(task: str, data_dir: Path, run_dir: Path):
    run_dir.mkdir()
    write_task_config(task, local_data_files(task, data_dir), run_dir)
    return TaskManager(include_path=run_dir, include_defaults=False).load([task])["tasks"][task]


def lm_eval_task(task: str, hub_doc: dict, work_dir: Path):
    """lm-eval's own config for `task`, reading `hub_doc` from a local file instead of the Hub."""
    import lm_eval.tasks
    from lm_eval.tasks._yaml_loader import load_yaml

    config = load_yaml(Path(lm_eval.tasks.__file__).parent / LM_EVAL_TASK_YAML[task])
    split = LOCAL_TASKS[task].split
    docs_file = work_dir / "hub_docs.jsonl"
    docs_file.write_text(json.dumps(hub_doc) + "\n")
    config.update(
        dataset_path="json", dataset_name=None,
        dataset_kwargs={"data_files": {split: str(docs_file)}, "cache_dir": str(work_dir / "cache")},
        training_split=None, validation_split=None, test_split=None,
    )
    config[f"{split}_split"] = split
    return TaskManager(include_defaults=False).load([config])["tasks"][task]


def rendered(task_object) -> tuple[str, list[str], int]:
    doc = task_object.eval_docs[0]
    return task_object.doc_to_text(doc), task_object.doc_to_choice(doc), task_object.doc_to_target(doc)


@pytest.mark.parametrize("task", sorted(LOCAL_TASKS))
def test_local_prompt_choices_and_gold_match_lm_eval(task: str, tmp_path: Path) -> None:
    write_local_files(task, tmp_path / "data")
    ours = rendered(our_task(task, tmp_path / "data", tmp_path / "run"))
    theirs = rendered(lm_eval_task(task, HUB_DOCS[task], tmp_path))
    assert ours == theirs == EXPECTED[task]


@pytest.mark.parametrize("task", sorted(LOCAL_TASKS))
def test_local_task_runs_on_a_tiny_model(task: str, shared_data_dir: Path | None) -> None:
    if shared_data_dir is None:
        pytest.skip("the shared data sets are not here; set PRUNEKIT_DATA_DIR to run this test")
    # The byte tokenizer spends a token per character: long PIQA solutions need room.
    model = tiny_model("llama", max_position_embeddings=1024)
    result = evaluate_tasks(model, byte_tokenizer(), [task], data_dir=shared_data_dir, limit=4, batch_size=4)

    scores = result[task]
    for metric in ("acc", "acc_norm", "acc_stderr", "acc_norm_stderr"):
        assert 0.0 <= scores[metric] <= 1.0, metric
    assert scores["n"] == 4
    assert scores["seconds"] > 0
    assert scores["protocol"]["num_fewshot"] == 0
    assert scores["protocol"]["split"] == LOCAL_TASKS[task].split
    assert scores["protocol"]["data"][0].startswith(str(shared_data_dir))


def test_unknown_task_lists_local_tasks_and_names_the_hub(tmp_path: Path) -> None:
    # No model: the name is checked before any model work.
    with pytest.raises(EvalError, match="unknown task 'no_such_task'") as error:
        evaluate_tasks(None, None, ["no_such_task"], data_dir=tmp_path)
    assert all(task in str(error.value) for task in LOCAL_TASKS)
    assert "Hub" in str(error.value)


def test_missing_data_file_names_path_and_option(tmp_path: Path) -> None:
    with pytest.raises(EvalError) as error:
        evaluate_tasks(None, None, ["piqa"], data_dir=tmp_path)
    message = str(error.value)
    assert str(tmp_path / "piqa" / "valid.jsonl") in message
    assert "--data-dir" in message and DATA_DIR_ENV in message


def test_no_data_dir_says_how_to_set_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    with pytest.raises(EvalError, match=DATA_DIR_ENV):
        evaluate_tasks(None, None, ["hellaswag"])


def test_mismatched_piqa_labels_are_reported(tmp_path: Path) -> None:
    write_local_files("piqa", tmp_path / "data")
    (tmp_path / "data" / "piqa" / "valid-labels.lst").write_text("1\n0\n")
    with pytest.raises(EvalError, match="1 rows but .* 2 labels"):
        our_task("piqa", tmp_path / "data", tmp_path / "run")


@pytest.mark.parametrize("arguments, problem", [
    (dict(tasks="piqa"), "list of task names"),
    (dict(tasks=[]), "list of task names"),
    (dict(tasks=["piqa", "piqa"]), "more than once"),
    (dict(limit=0), "limit"),
    (dict(batch_size=0), "batch_size"),
    (dict(num_fewshot=-1), "num_fewshot"),
])
def test_bad_arguments_are_rejected(arguments: dict, problem: str, tmp_path: Path) -> None:
    with pytest.raises(EvalError, match=problem):
        evaluate_tasks(None, None, **({"tasks": ["piqa"], "data_dir": tmp_path} | arguments))
