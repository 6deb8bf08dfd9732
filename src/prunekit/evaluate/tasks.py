"""Zero-shot multiple-choice tasks through lm-evaluation-harness, run in process on a model object.

PIQA, ARC-Easy, ARC-Challenge and HellaSwag, the tasks the pruning literature reports, run from
local copies of their data sets with lm-eval's own prompts and metrics; any other name goes to
lm-eval's task registry, whose tasks download their data from the Hugging Face Hub.

lm-eval reads the local tasks through `dataset_path: json`. The local files are not all in a shape
that loader reads (PIQA keeps its labels in a separate file, HellaSwag is a 6-line text format), so
each run converts them into jsonl files in the Hub's schema inside a temporary folder, next to a
copy of the shipped task config that points at them. The data folder itself is never written.
"""
from __future__ import annotations

import gzip
import json
import string
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from prunekit.data.sources import DATA_DIR_ENV, resolve_data_dir
from prunekit.errors import PrunekitError

TASK_CONFIG_DIR = Path(__file__).parent / "lm_eval_tasks"

Doc = dict[str, Any]


class EvalError(PrunekitError, ValueError):
    """Bad input to an evaluation, reported before any model work starts."""


# ----------------------------------------------------------------------------- local data readers
# Each reader turns the shared data files into docs in the schema that lm-eval's task yaml expects,
# so the shipped configs can keep lm-eval's templates word for word.


def read_piqa_docs(goals_file: Path, labels_file: Path) -> Iterator[Doc]:
    """PIQA rows ({goal, sol1, sol2}) joined line by line with their labels."""
    rows = goals_file.read_text(encoding="utf-8").splitlines()
    labels = labels_file.read_text(encoding="utf-8").split()
    if len(rows) != len(labels):
        raise EvalError(
            f"{goals_file} has {len(rows)} rows but {labels_file} has {len(labels)} labels; "
            "restore both files from the same PIQA release."
        )
    for row, label in zip(rows, labels):
        doc = json.loads(row)
        yield {"goal": doc["goal"], "sol1": doc["sol1"], "sol2": doc["sol2"], "label": int(label)}


def read_arc_docs(mosaicml_file: Path) -> Iterator[Doc]:
    """mosaicml_icl ARC rows ({query: "Question: ...", choices, gold}) in the Hub's ARC schema."""
    with mosaicml_file.open(encoding="utf-8") as rows:
        for index, row in enumerate(rows):
            doc = json.loads(row)
            letters = list(string.ascii_uppercase[: len(doc["choices"])])
            yield {
                "id": str(index),
                # lm-eval's template adds the "Question: " prefix back.
                "question": doc["query"].removeprefix("Question: "),
                "choices": {"text": doc["choices"], "label": letters},
                "answerKey": letters[doc["gold"]],
            }


def read_hellaswag_docs(six_line_file: Path) -> Iterator[Doc]:
    """HellaSwag items of 6 lines ("activity_label: ctx", gold, 4 endings) as lm-eval's processed docs."""
    # lm-eval's own cleaning, which the local file had not fully received (a few "[...]" remain).
    from lm_eval.tasks.hellaswag.utils import preprocess

    with gzip.open(six_line_file, "rt", encoding="utf-8") as text:
        lines = text.read().rstrip("\n").split("\n")
    if len(lines) % 6:
        raise EvalError(
            f"{six_line_file} has {len(lines)} lines, not a multiple of 6; restore the file from "
            "the shared data release."
        )
    for start in range(0, len(lines), 6):
        query, gold, *endings = lines[start : start + 6]
        yield {"query": preprocess(query), "choices": [preprocess(e) for e in endings], "label": int(gold)}


@dataclass(frozen=True)
class LocalTask:
    """A task that lm-eval runs from local data files, converted by `read_docs`."""

    data_files: tuple[str, ...]  # relative to the data dir, in the order `read_docs` takes them
    read_docs: Callable[..., Iterator[Doc]]
    split: str
    differs_from_lm_eval: str | None = None


LOCAL_TASKS: dict[str, LocalTask] = {
    "piqa": LocalTask(("piqa/valid.jsonl", "piqa/valid-labels.lst"), read_piqa_docs, "validation"),
    "arc_easy": LocalTask(
        ("arc_easy/arc_easy_test.mosaicml_icl.jsonl",), read_arc_docs, "test",
        "about 1% of questions are padded or cut to 4 options in the local copy",
    ),
    "arc_challenge": LocalTask(
        ("arc_challenge/arc_challenge_test.mosaicml_icl.jsonl",), read_arc_docs, "test",
        "about 1% of questions are padded or cut to 4 options in the local copy",
    ),
    "hellaswag": LocalTask(
        ("hellaswag/hellaswag_val_full.txt.gz",), read_hellaswag_docs, "validation",
        "context is the data set's `ctx`, not lm-eval's ctx_a + ' ' + ctx_b.capitalize()",
    ),
}


# ----------------------------------------------------------------------------- configs


def local_data_files(task: str, data_dir: str | Path | None) -> list[Path]:
    """The existing data files of a local task, or an error naming the first one missing."""
    root = resolve_data_dir(data_dir)
    if root is None:
        raise EvalError(
            f"the local tasks ({', '.join(LOCAL_TASKS)}) read the shared data sets, but no data "
            f"folder is set; pass --data-dir (data_dir=) or set {DATA_DIR_ENV}."
        )
    files = []
    for relative in LOCAL_TASKS[task].data_files:
        path = root / relative
        if not path.is_file():
            raise EvalError(
                f"task {task} needs {path}, which does not exist; point --data-dir or "
                f"{DATA_DIR_ENV} at the shared data folder, the one that holds {relative}."
            )
        files.append(path)
    return files


def write_task_config(task: str, source_files: list[Path], run_dir: Path) -> Path:
    """Convert a local task's data into `run_dir` and write its lm-eval config there; returns the config."""
    config = yaml.safe_load((TASK_CONFIG_DIR / f"{task}.yaml").read_text(encoding="utf-8"))
    dataset_kwargs = config["dataset_kwargs"]
    # The shipped config names its converted file relative to itself; the datasets loader resolves
    # relative paths against the working directory, so they become absolute here.
    dataset_kwargs["data_files"] = {
        split: str(run_dir / file_name) for split, file_name in dataset_kwargs["data_files"].items()
    }
    # Keep the datasets library's arrow cache inside the run folder too, so nothing outlives the run.
    dataset_kwargs["cache_dir"] = str(run_dir / "datasets_cache")
    (docs_file,) = dataset_kwargs["data_files"].values()
    with open(docs_file, "w", encoding="utf-8") as out:
        for doc in LOCAL_TASKS[task].read_docs(*source_files):
            out.write(json.dumps(doc, ensure_ascii=False) + "\n")
    config_file = run_dir / f"{task}.yaml"
    config_file.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return config_file


# ----------------------------------------------------------------------------- evaluation


def _check_arguments(tasks: list[str], limit: int | None, batch_size: int, num_fewshot: int) -> None:
    if isinstance(tasks, str) or not tasks or not all(isinstance(t, str) and t for t in tasks):
        raise EvalError(f"tasks must be a non-empty list of task names, got {tasks!r}; e.g. ['piqa', 'arc_easy'].")
    repeated = sorted({t for t in tasks if tasks.count(t) > 1})
    if repeated:
        raise EvalError(f"task {repeated[0]} is listed more than once; list each task once.")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise EvalError(f"limit must be a positive number of examples or None for all, got {limit!r}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise EvalError(f"batch_size must be a positive integer, got {batch_size!r}.")
    if isinstance(num_fewshot, bool) or not isinstance(num_fewshot, int) or num_fewshot < 0:
        raise EvalError(f"num_fewshot must be 0 or more, got {num_fewshot!r}.")


def _import_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError as error:
        raise EvalError(
            "zero-shot tasks need lm-evaluation-harness, which is not installed; "
            "run `pip install 'prunekit[eval]'`."
        ) from error


def _task_metrics(task: str, output: dict[str, Any]) -> dict[str, float | None]:
    """lm-eval's "acc,none"-style keys as plain metric names; "N/A" stderrs (one example) as None."""
    metrics: dict[str, float | None] = {}
    for key, value in output["results"][task].items():
        # Metric keys are "metric,filter"; the rest ("alias", "sample_len", ...) is bookkeeping.
        metric, is_metric, _filter = key.partition(",")
        if is_metric:
            metrics[metric] = float(value) if isinstance(value, (int, float)) else None
    return metrics


def _protocol(task: str, data_files: list[Path] | None, output: dict[str, Any], limit: int | None,
              num_fewshot: int) -> dict[str, Any]:
    import lm_eval

    local = LOCAL_TASKS.get(task)
    protocol: dict[str, Any] = {
        "harness": f"lm-eval {lm_eval.__version__}",
        "task_version": output["versions"].get(task),
        "num_fewshot": num_fewshot,
        "limit": limit,
        "data": [str(path) for path in data_files] if data_files else "Hugging Face Hub (lm-eval registry)",
    }
    if local is not None:
        protocol["split"] = local.split
        protocol["prompt"] = f"lm-eval's {task} yaml, unchanged templates"
        if local.differs_from_lm_eval:
            protocol["differs_from_lm_eval"] = local.differs_from_lm_eval
        if num_fewshot:
            # The local copies hold one split, so lm-eval samples examples from it, leaving out the
            # doc being scored.
            protocol["fewshot_from"] = local.split
    return protocol


def evaluate_tasks(
    model: Any,
    tokenizer: Any,
    tasks: list[str],
    *,
    data_dir: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    num_fewshot: int = 0,
) -> dict[str, dict[str, Any]]:
    """Score `model` on lm-eval tasks, in process, and return per task its metrics and protocol.

    `tasks` are names from LOCAL_TASKS (read from `data_dir` or $PRUNEKIT_DATA_DIR) or from lm-eval's
    registry (which needs the Hub). `limit` scores the first `limit` examples of each task.

    Returns {task: {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr" (whatever metrics the task
    reports), "n": examples scored, "seconds": wall time, "protocol": {...}}}.
    """
    _check_arguments(tasks, limit, batch_size, num_fewshot)
    _import_lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    data_files = {task: local_data_files(task, data_dir) for task in tasks if task in LOCAL_TASKS}
    registry_tasks = [task for task in tasks if task not in LOCAL_TASKS]

    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="prunekit-tasks-") as run_dir:
        for task, files in data_files.items():
            write_task_config(task, files, Path(run_dir))
        # Indexing lm-eval's ~15k built-in configs takes seconds, so only when a task needs them;
        # configs in include_path take precedence over built-ins of the same name.
        task_manager = TaskManager(include_path=run_dir, include_defaults=bool(registry_tasks))
        unknown = [task for task in registry_tasks if task not in task_manager.all_tasks]
        if unknown:
            raise EvalError(
                f"unknown task {unknown[0]!r}; local tasks are {', '.join(LOCAL_TASKS)}, and other "
                "names must be lm-eval tasks (`lm-eval ls tasks`), which download data from the Hub."
            )

        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        for task in tasks:
            start = time.perf_counter()
            output = simple_evaluate(
                model=lm, tasks=[task], num_fewshot=num_fewshot, limit=limit,
                task_manager=task_manager, log_samples=False,
            )
            seconds = time.perf_counter() - start
            results[task] = {
                **_task_metrics(task, output),
                # A group (e.g. mmlu) reports the examples of all its subtasks.
                "n": sum(count["effective"] for count in output["n-samples"].values()),
                "seconds": round(seconds, 2),
                "protocol": _protocol(task, data_files.get(task), output, limit, num_fewshot),
            }
    return results
