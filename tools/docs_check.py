"""Check every measured figure in the docs against the JSON record it came from.

`make docs-check` runs this. A figure carries its reference in an HTML comment on the same line
(invisible when the Markdown is rendered); CONTRIBUTING.md describes the format:

    the dense model scores 29.45 <!-- fig 29.45@stages/ppl-512-every16/perplexity -->
    <!-- record: dense_baseline.json -->        (the record that later references of the section read)
    | 128 | all 2,370 | **54.61** | 7.7 min | <!-- fig 54.61@stages/ppl-128/perplexity; 7.7@{stages/ppl-128/seconds}/60 -->

Each `PRINTED@REF` pairs a number as it is printed on the line with where it comes from:
  - a JSON pointer into the current record (`runs/3/ppl/0.2`; `~1` stands for "/" in a key; a final
    `[N]` reads the N-th number inside a string value);
  - `FILE.json#POINTER` for another record under benchmarks/results/;
  - an expression over such references in braces (`{a/seconds}/60`, `100*{gap}`, `{a}/{b}`);
  - `-` for a number that is not a measurement (a setting, a goal, a constant);
  - `>=REF` / `<=REF` for a printed bound ("within 5%", "under 20 s") that the record must respect;
  - `norecord` for a measured figure that has no record; its paragraph or table must say "no record".
A whole line of settings is marked `<!-- not-measured: why -->`; a file's recurring settings
(the target ratios) are listed once in `<!-- settings: 20%, 35%, 50% -->`.

The check fails on a figure that differs from its record at the digits printed, on a figure that
looks measured (a decimal fraction, or a number with a unit: s, min, GiB, tok/s, x, % ...) and
carries no reference, on a reference to a missing record or key, and on a record older than the
script that makes it unless the figure's block says so visibly: "(old: made before COMMIT)",
COMMIT being the first change to the script after the record was made.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import operator
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = "benchmarks/results"
PROVENANCE = f"{RESULTS}/provenance.json"
DOC_GLOBS = ("README.md", "BENCHMARKS.md", "GPU_BENCHMARKS.md", "docs/*.md")
# Generated from tests/test_error_catalogue.py: it quotes program messages and holds no measurement.
NOT_CHECKED = {"docs/ERRORS.md"}

# Units that may follow a number after a space ("128 s", "15 GiB"); "x" and "%" must touch it
# ("1.26x", "35%"), so that "8 x 512" stays a shape.
SPACED_UNITS = ("tokens/s", "tok/s", "TFLOP/s", "TB/s", "GB/s", "minutes", "minute", "seconds", "hours", "hour",
                "min", "ms", "GiB", "GB", "MiB", "MB", "s")
# A number (1,234.5, 12, 0.97) that is not part of a name: not after a letter and a hyphen
# ("Llama-3-8B", "gpt-2"), not followed by letters ("135M", "fp32").
NUMBER = re.compile(
    r"(?<![\w.,/#=~^])(?<![A-Za-z]-)(?<![A-Za-z]\d-)(?P<num>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?)"
    r"(?:(?P<tight>[x%])(?![\w])|(?P<space>\s?)(?P<unit>" + "|".join(re.escape(u) for u in SPACED_UNITS) + r")(?![\w/]))?"
    r"(?![\w.]*\w)(?![.,]\d)"
)
# Spans that hold no figure: code, comments, link targets, dates, times, versions, identifiers.
MASKS = (
    re.compile(r"<!--.*?-->"),
    re.compile(r"`[^`]*`"),
    re.compile(r"\]\([^)]*\)"),
    re.compile(r"https?://\S+"),
    re.compile(r"\b\d{4}-\d{2}-\d{2}\b"),
    re.compile(r"\b(?:[AH]\d00|L40S?)\s+\d+\s?GB\b|\b\d+\s?GB\s+HBM\w*"),  # a GPU's name and its memory
    re.compile(r"\b\d{1,2}:\d{2}\b"),
    re.compile(r"\b\d+(?:\.\d+){2,}\S*"),
    re.compile(
        r"(?i)\b(?:torch|transformers|python|tokenizers|safetensors|accelerate|peft|gguf|lm-eval"
        r"|llama-cpp-python|prunekit|datasets|cuda|cu)\s*\d+(?:\.\d+)+\S*"
    ),
    re.compile(r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*\d)[0-9a-f]{7,40}\b"),
)
FIG_COMMENT = re.compile(r"<!--\s*fig\s+(.*?)\s*-->")
RECORD_COMMENT = re.compile(r"<!--\s*record:\s*(\S+)\s*-->")
NOT_MEASURED = re.compile(r"<!--\s*not-measured\b.*?-->")
SETTINGS_COMMENT = re.compile(r"<!--\s*settings:\s*(.*?)\s*-->")
OLD_MARK = re.compile(r"old: made before ([0-9a-f]{7,40}(?:, [0-9a-f]{7,40})*)")
NO_RECORD = "no record"


@dataclass
class Figure:
    text: str  # the number as printed, without its unit
    unit: str
    column: int

    @property
    def looks_measured(self) -> bool:
        return "." in self.text or bool(self.unit)

    @property
    def value(self) -> float:
        return float(self.text.replace(",", ""))

    @property
    def decimals(self) -> int:
        return len(self.text.split(".")[1]) if "." in self.text else 0


@dataclass
class Line:
    number: int
    text: str
    figures: list[Figure] = field(default_factory=list)
    refs: list[tuple[str, str]] = field(default_factory=list)  # (printed, reference)
    record: str | None = None  # the record in force on this line
    not_measured: bool = False
    block: int = 0  # index of the block (paragraph, table with its caption, list) it belongs to


@dataclass
class Report:
    checked: int = 0
    old: int = 0
    no_record: int = 0
    not_measured: int = 0
    failures: list[str] = field(default_factory=list)

    def fail(self, where: str, problem: str, fix: str) -> None:
        self.failures.append(f"{where}: {problem} ({fix})")


def old_marks(text: str) -> set[str]:
    return {commit for m in OLD_MARK.finditer(text) for commit in m.group(1).split(", ")}


def masked(text: str) -> str:
    for pattern in MASKS:
        text = pattern.sub(lambda m: " " * len(m.group(0)), text)
    return text


def find_figures(text: str) -> list[Figure]:
    """Every number of a line outside code, comments, links, dates and versions, with its unit."""
    figures = []
    for m in NUMBER.finditer(masked(text)):
        unit = m.group("tight") or m.group("unit") or ""
        figures.append(Figure(m.group("num"), unit, m.start()))
    return figures


def parse_refs(comment_body: str) -> list[tuple[str, str]]:
    refs = []
    for item in comment_body.split(";"):
        item = item.strip()
        if not item:
            continue
        printed, _, ref = item.partition("@")
        refs.append((printed.strip().strip("*"), ref.strip()))
    return refs


def parse(path: Path) -> tuple[list[Line], set[str]]:
    """The lines of a Markdown file that can hold figures, with their references and blocks."""
    lines: list[Line] = []
    settings: set[str] = set()
    in_fence = False
    record = None
    block = 0
    previous_blank = True
    previous_kind = ""
    for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        stripped = text.strip()
        if stripped.startswith("```") or stripped.startswith("~~~"):
            in_fence = not in_fence
            continue
        if in_fence:
            continue
        for m in SETTINGS_COMMENT.finditer(text):
            settings.update(s.strip() for s in m.group(1).split(",") if s.strip())
        if not stripped:
            previous_blank = True
            continue
        kind = "table" if stripped.startswith("|") else "text"
        if previous_blank:
            # A table belongs to the block of the caption paragraph just above it.
            caption = kind == "table" and previous_kind == "text" and bool(lines) and lines[-1].number == number - 2
            if not caption:
                block += 1
        previous_blank = False
        previous_kind = kind
        if stripped.startswith("#"):
            record = None
            continue
        if text.startswith("    ") and (not lines or lines[-1].number < number - 1 or lines[-1].text.startswith("    ")) \
                and not stripped.startswith(("-", "*", "|")) and re.match(r"\s+(python|prunekit|bash|accelerate|PYTHONPATH|flock)\b", text):
            continue  # an indented code block
        for m in RECORD_COMMENT.finditer(text):
            record = m.group(1)
        line = Line(number, text, find_figures(text), record=record, block=block)
        line.not_measured = bool(NOT_MEASURED.search(text))
        for m in FIG_COMMENT.finditer(text):
            line.refs.extend(parse_refs(m.group(1)))
        lines.append(line)
    return lines, settings


# ---------------------------------------------------------------- records and their code versions

class Records:
    def __init__(self, root: Path):
        self.root = root
        self._json: dict[str, object] = {}
        self._age: dict[str, tuple[str, str] | None] = {}
        provenance = root / PROVENANCE
        self.provenance = json.loads(provenance.read_text()) if provenance.exists() else {}

    def path(self, name: str) -> Path:
        under_results = self.root / RESULTS / name
        return under_results if under_results.exists() or "/" not in name else self.root / name

    def load(self, name: str):
        if name not in self._json:
            self._json[name] = json.loads(self.path(name).read_text(encoding="utf-8"))
        return self._json[name]

    def scripts(self, name: str) -> list[str] | None:
        """The files whose change makes the record old: provenance.json's entry, else the script its command names.

        An entry with "script": null says on purpose that no committed script made the record (a command
        typed by hand); None means nobody said, which the check reports.
        """
        entry = self.provenance.get(name) or self.provenance.get(Path(name).name)
        if entry is not None:
            script = entry.get("script")
            return [] if script is None else [script] if isinstance(script, str) else list(script)
        found = re.findall(r"(?:benchmarks/)?([\w-]+\.(?:py|sh))\b", json.dumps(self.load(name)))
        for script in found:
            if (self.root / "benchmarks" / script).exists():
                return [f"benchmarks/{script}"]
        return None

    def _git(self, *args: str) -> str:
        return subprocess.run(["git", *args], cwd=self.root, capture_output=True, text=True, check=True).stdout.strip()

    def made_at(self, name: str) -> str | None:
        """The commit the record was made from: provenance's "made_at", else the last commit that wrote it."""
        entry = self.provenance.get(name) or self.provenance.get(Path(name).name) or {}
        if entry.get("made_at"):
            return self._git("rev-parse", entry["made_at"])
        rel = str(self.path(name).relative_to(self.root))
        if self._git("status", "--porcelain", "--", rel):
            return None  # written and not committed yet: made from the working tree, so current
        return self._git("log", "-1", "--format=%H", "--", rel) or None

    def age(self, name: str) -> tuple[str, str] | None:
        """(script, the first commit that changed it after the record was made), or None if current.

        Raises LookupError when nothing says which script made the record.
        """
        if name not in self._age:
            scripts = self.scripts(name)
            if scripts is None:
                raise LookupError(f"nothing says which script made {name}: its command names none")
            made = self.made_at(name) if scripts else None
            self._age[name] = None
            if made:
                # Commits that provenance.json declares harmless to this record (with the reason) do not age it.
                harmless = tuple((self.provenance.get(name) or self.provenance.get(Path(name).name) or {})
                                 .get("not_affected_by", {}))
                changes = [c for c in self._git("log", "--format=%H", f"{made}..HEAD", "--", *scripts).split()
                           if not (harmless and c.startswith(harmless))]
                if changes:
                    self._age[name] = (", ".join(scripts), changes[-1])
        return self._age[name]


def lookup(document, pointer: str):
    node = document
    for part in pointer.strip("/").split("/"):
        key = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, list):
            node = node[int(key)]
        else:
            node = node[key]
    return node


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.USub: operator.neg, ast.Pow: operator.pow}
_FUNCS = {"min": min, "max": max, "abs": abs, "sum": lambda *a: sum(a), "mean": lambda *a: sum(a) / len(a)}


def _evaluate(node, names: dict[str, float]) -> float:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body, names)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
        return node.value
    if isinstance(node, ast.Name) and node.id in names:
        return names[node.id]
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_evaluate(node.left, names), _evaluate(node.right, names))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_evaluate(node.operand, names))
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCS:
        return _FUNCS[node.func.id](*(_evaluate(a, names) for a in node.args))
    raise ValueError(f"unsupported expression part {ast.dump(node)[:40]}")


def resolve(ref: str, default_record: str | None, records: Records) -> tuple[float, list[str]]:
    """The value a reference names, and the records it reads."""
    def one(pointer: str) -> tuple[float, str]:
        name, hash_, key = pointer.partition("#")
        if not hash_:
            name, key = default_record, pointer
        if not name:
            raise LookupError("no record: name one with <!-- record: FILE.json --> above, or write FILE.json#KEY")
        if not records.path(name).exists():
            raise LookupError(f"record {name} does not exist under {RESULTS}/")
        nth = re.search(r"\[(\d+)\]$", key)  # the n-th number inside a string value: "needs 165.5 GiB (...)"
        try:
            value = lookup(records.load(name), key[:nth.start()] if nth else key)
            if nth and isinstance(value, str):
                value = float(re.findall(r"\d+(?:\.\d+)?", value)[int(nth.group(1))])
        except (KeyError, IndexError, ValueError, TypeError):
            raise LookupError(f"record {name} has no key {key}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise LookupError(f"{name}#{key} is not a number ({str(value)[:40]})")
        return float(value), name

    if "{" not in ref:
        value, name = one(ref)
        return value, [name]
    names, used = {}, []
    def substitute(m):
        value, name = one(m.group(1))
        used.append(name)
        names[f"v{len(names)}"] = value
        return f"v{len(names) - 1}"
    expression = re.sub(r"\{([^}]*)\}", substitute, ref)
    return _evaluate(ast.parse(expression, mode="eval"), names), used


def matches(printed: Figure, value: float) -> bool:
    half_step = 0.5 * 10 ** -printed.decimals
    return math.isfinite(value) and abs(value - printed.value) <= half_step * (1 + 1e-9) + 1e-12


# ---------------------------------------------------------------- the check

def doc_files(root: Path) -> list[Path]:
    files = []
    for pattern in DOC_GLOBS:
        files.extend(sorted(root.glob(pattern)))
    return [f for f in files if str(f.relative_to(root)) not in NOT_CHECKED]


def check_file(path: Path, root: Path, records: Records, report: Report) -> None:
    rel = path.relative_to(root)
    lines, settings = parse(path)
    block_text: dict[int, str] = {}
    for line in lines:
        block_text[line.block] = block_text.get(line.block, "") + "\n" + line.text
    old_marks_used: dict[int, set[str]] = {}
    for line in lines:
        where = f"{rel}:{line.number}"
        pending = list(line.figures)
        for printed, ref in line.refs:
            same = [f for f in pending if f.text == printed]
            figure = next((f for f in same if f.looks_measured), same[0] if same else None)
            if figure is None:
                report.fail(where, f"the reference names {printed!r}, which is not printed on this line",
                            "write the number as printed, or move the reference to its line")
                continue
            pending.remove(figure)
            if ref == "-":
                report.not_measured += 1
                continue
            if ref == "norecord":
                if NO_RECORD not in block_text[line.block].lower():
                    report.fail(where, f"{printed} is marked norecord but the text does not say so",
                                "write 'no record' beside it (in its paragraph or table) so readers see it")
                report.no_record += 1
                continue
            bound = ref[:2] if ref[:2] in ("<=", ">=") else ""
            ref = ref[len(bound):].strip()
            try:
                value, used = resolve(ref, line.record, records)
            except (LookupError, ValueError, SyntaxError, ZeroDivisionError) as error:
                report.fail(where, f"{printed}: {error}", "fix the reference")
                continue
            report.checked += 1
            if bound == ">=" and not figure.value >= value:
                report.fail(where, f"{printed} is given as a bound but the record's value is larger ({value:.6g})",
                            "print a bound that holds")
            elif bound == "<=" and not figure.value <= value:
                report.fail(where, f"{printed} is given as a lower bound but the record's value is smaller ({value:.6g})",
                            "print a bound that holds")
            elif not bound and not matches(figure, value):
                report.fail(where, f"{printed} differs from its record ({ref if len(ref) < 90 else ref[:80] + '...'} = {value:.6g})",
                            "print the record's value, or fix the reference")
            for name in used:
                try:
                    age = records.age(name)
                except LookupError as error:
                    report.fail(where, str(error), f"add it to {PROVENANCE}")
                    continue
                except subprocess.CalledProcessError as error:
                    report.fail(where, f"git could not date {name}: {error.stderr.strip()[:80]}",
                                "run the check in a git checkout with its history")
                    continue
                if age is None:
                    continue
                script, commit = age
                marks = old_marks(block_text[line.block])
                accepted = {m for m in marks if commit.startswith(m)}
                if accepted:
                    old_marks_used.setdefault(line.block, set()).update(accepted)
                    report.old += 1
                else:
                    report.fail(where, f"{printed} comes from {name}, made before {script} changed in {commit[:9]}",
                                f"re-run the script and update the figure, or mark it '(old: made before {commit[:9]})'")
                break
        for figure in pending:
            if line.not_measured or (figure.text + figure.unit) in settings:
                report.not_measured += 1
            elif figure.looks_measured:
                report.fail(where, f"{figure.text}{figure.unit} looks measured and has no reference",
                            "add <!-- fig PRINTED@KEY --> naming its record, or '-' if it is not a measurement")
    for block, text in block_text.items():
        for mark in old_marks(text) - old_marks_used.get(block, set()):
            first = next(l.number for l in lines if l.block == block and mark in l.text) if any(
                l.block == block and mark in l.text for l in lines) else next(l.number for l in lines if l.block == block)
            report.fail(f"{rel}:{first}", f"'old: made before {mark}' names no figure of this block whose record predates {mark}",
                        "remove the mark, or correct its commit")


def check(root: Path = ROOT, files: list[Path] | None = None) -> Report:
    report = Report()
    records = Records(root)
    for path in files if files is not None else doc_files(root):
        check_file(path, root, records, report)
    return report


# ---------------------------------------------------------------- suggesting references

# How a unit may have been printed from a record's value: (form, divisor).
TRANSFORMS = {
    "%": (("{}", 1.0), ("100*{}", 0.01)),
    "min": (("{}/60", 60.0), ("{}", 1.0)), "minutes": (("{}/60", 60.0), ("{}", 1.0)),
    "minute": (("{}/60", 60.0), ("{}", 1.0)),
    "hours": (("{}/3600", 3600.0), ("{}", 1.0)), "hour": (("{}/3600", 3600.0), ("{}", 1.0)),
    "GiB": (("{}", 1.0), ("{}/1024", 1024.0), ("{}/1024**3", 1024.0 ** 3)),
    "MiB": (("{}", 1.0), ("{}/1024**2", 1024.0 ** 2)),
    "GB": (("{}", 1.0), ("{}/1e9", 1e9), ("{}/1e3", 1e3)),
    "MB": (("{}", 1.0), ("{}/1e6", 1e6)),
    "ms": (("{}", 1.0), ("{}*1000", 1e-3)),
}


def leaves(node, prefix=""):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from leaves(value, f"{prefix}/{str(key).replace('~', '~0').replace('/', '~1')}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from leaves(value, f"{prefix}/{i}")
    elif isinstance(node, (int, float)) and not isinstance(node, bool):
        yield prefix.lstrip("/"), float(node)


# Record keys that hold settings, not measurements: a figure that matches one is a coincidence.
SETTING_KEYS = {"target", "seed", "windows", "layers", "lr", "damping", "steps", "rows", "batch_size"}


def _common(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a.split("/"), b.split("/")):
        if x != y:
            break
        n += 1
    return n


def suggest(line: Line, record_names: list[str], records: Records, anchor: str = "") -> list[tuple[str, str]]:
    """For each unreferenced figure of a line, the record key (and unit transform) that prints as it does.

    Figures with one candidate are placed first; the others take the candidate that shares the
    longest path with those (so that a table row reads one record entry), not yet used, untransformed.
    """
    taken = [p for p, _ in line.refs]
    figures = []
    for f in line.figures:
        if f.text in taken:
            taken.remove(f.text)
        else:
            figures.append(f)
    candidates = []
    for figure in figures:
        found = []
        for name in record_names:
            for key, value in records_leaves(records, name):
                leaf = key.rsplit("/", 1)[-1]
                if leaf in SETTING_KEYS or (figure.decimals == 0 and (leaf.isdigit() or figure.value < 10)):
                    continue  # a whole number matches list entries and settings by coincidence
                for form, scale in TRANSFORMS.get(figure.unit, (("{}", 1.0),)):
                    if matches(figure, value / scale):
                        found.append((name, key, form))
        candidates.append(found)
    chosen: dict[int, tuple[str, str, str]] = {}
    for i, found in enumerate(candidates):
        if len(found) == 1:
            chosen[i] = found[0]
    for i, found in enumerate(candidates):
        if i in chosen or not found:
            continue
        used = {(c[0], c[1]) for c in chosen.values()}
        def score(c):
            name, key, form = c
            leaf = key.rsplit("/", 1)[-1]
            coherence = max((_common(key, o[1]) for o in chosen.values() if o[0] == name and o[1] != key), default=0)
            return (key.startswith(anchor) if anchor else 0, leaf not in SETTING_KEYS, coherence, (name, key) not in used,
                    leaf in {o[1].rsplit("/", 1)[-1] for o in chosen.values()},
                    form == "{}", -record_names.index(name), -key.count("/"))
        chosen[i] = max(found, key=score)
    picks = []
    for i, figure in enumerate(figures):
        if i not in chosen:
            picks.append((figure.text, "?"))
            continue
        name, key, form = chosen[i]
        pointer = key if name == line.record else f"{name}#{key}"
        picks.append((figure.text, pointer if form == "{}" else form.format("{" + pointer + "}")))
    return picks


_LEAVES: dict[str, list] = {}


def records_leaves(records: Records, name: str):
    if name not in _LEAVES:
        _LEAVES[name] = list(leaves(records.load(name)))
    return _LEAVES[name]


def annotate(path: Path, first: int, last: int, record_names: list[str], write: bool, anchor: str = "",
             measured_only: bool = True) -> None:
    records = Records(ROOT)
    lines, settings = parse(path)
    text = path.read_text(encoding="utf-8").splitlines()
    for line in lines:
        if not first <= line.number <= last or line.not_measured:
            continue
        figures = [f for f in line.figures if (f.looks_measured or not measured_only) and f.text + f.unit not in settings]
        if not figures:
            continue
        probe = Line(line.number, line.text, figures, list(line.refs), record=line.record)
        picks = suggest(probe, record_names, records, anchor)
        if not picks:
            continue
        comment = "<!-- fig " + "; ".join(f"{p}@{r}" for p, r in picks) + " -->"
        print(f"{path.name}:{line.number}: {comment}")
        if write:
            text[line.number - 1] = text[line.number - 1].rstrip() + " " + comment
    if write:
        path.write_text("\n".join(text) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", help="Markdown files to check (default: the project's docs)")
    parser.add_argument("--suggest", metavar="FILE:FIRST-LAST",
                        help="print references for the unreferenced figures of these lines instead of checking")
    parser.add_argument("--record", action="append", default=[], help="records to search, with --suggest")
    parser.add_argument("--anchor", default="", help="with --suggest: prefer keys under this pointer")
    parser.add_argument("--write", action="store_true", help="with --suggest: append the references to the lines")
    args = parser.parse_args(argv)
    if args.suggest:
        spec, _, span = args.suggest.rpartition(":")
        first, _, last = span.partition("-")
        annotate(ROOT / spec, int(first), int(last or first), args.record, args.write, args.anchor)
        return 0
    files = [Path(f).resolve() for f in args.files] or None
    report = check(ROOT, files)
    for failure in report.failures:
        print(failure)
    print(f"docs-check: {report.checked} figures checked against their records, {report.old} of them old "
          f"(marked), {report.no_record} without a record (marked), {report.not_measured} numbers marked "
          f"as not measured; {len(report.failures)} problems")
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
