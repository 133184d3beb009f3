"""Corpora resolution, user-file readers and calibration sampling, on files made in the test."""

from __future__ import annotations

import json
import types

import pytest
import torch

from slimgpt.data import calibration, corpora
from slimgpt.data.calibration import get_calibration, needs_bos, sample_calibration, windows_from_documents
from slimgpt.data.corpora import c4_documents, load_documents, read_documents, wiki_documents
from slimgpt.errors import DataError


def words(start: int, n: int, vocab: int = 128) -> str:
    """``n`` words of the conftest tokenizer (``tN`` is token N), cycling over ids 3..vocab-1."""
    return " ".join(f"t{3 + (start + i) % (vocab - 3)}" for i in range(n))


def ids_of(text: str) -> list[int]:
    return [int(w[1:]) for w in text.split()]


def is_slice(window: list[int], seq: list[int]) -> bool:
    n = len(window)
    return any(seq[i : i + n] == window for i in range(len(seq) - n + 1))


@pytest.fixture
def bos_tokenizer(tiny_tokenizer):
    """The conftest tokenizer, but its default call puts <s> in front, like Gemma's."""
    from tokenizers import processors

    backend = tiny_tokenizer.backend_tokenizer
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tiny_tokenizer


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """No data folder from the environment, no exllamav3 wheel, no network."""
    monkeypatch.delenv("SLIMGPT_DATA", raising=False)
    monkeypatch.setattr(corpora, "_wheel_dir", lambda: None)
    monkeypatch.setattr(corpora, "hub_reachable", lambda timeout=3.0: False)


def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and msg
    return msg


# ---- file readers ---------------------------------------------------------------------------
def test_txt_paragraphs_and_whole_file(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("first para\nstill first\n\n  \nsecond para\r\n\r\nthird\n")
    assert read_documents(p) == ["first para\nstill first", "second para", "third"]
    q = tmp_path / "b.txt"
    q.write_text("one line\nanother line\n")
    assert read_documents(q) == ["one line\nanother line\n"]


def test_jsonl_text_and_alpaca(tmp_path):
    p = tmp_path / "d.jsonl"
    rows = [{"text": "plain text"}, {"instruction": "Add", "input": "2 and 3", "output": "5"}, {}]
    p.write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n\n")
    docs = read_documents(p)
    assert docs[0] == "plain text"
    assert "### Instruction:\nAdd" in docs[1] and "### Input:\n2 and 3" in docs[1] and docs[1].endswith("5")
    p.write_text(json.dumps(rows[2]) + "\n")
    with pytest.raises(DataError) as e:
        read_documents(p)
    assert "text" in one_line(e)
    p.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(DataError) as e:
        read_documents(p)
    assert "d.jsonl:2" in one_line(e)


def test_alpaca_json(tmp_path):
    p = tmp_path / "alpaca.json"
    p.write_text(json.dumps([{"instruction": "Say hi", "input": "", "output": "Hi!"},
                             {"instruction": "Sum", "input": "1 1", "output": "2"}]))
    docs = read_documents(p)
    assert len(docs) == 2
    assert "### Input" not in docs[0] and docs[0].endswith("### Response:\nHi!")
    assert "### Input:\n1 1" in docs[1]


@pytest.mark.parametrize(
    "content, needle",
    [(b"[]", "no text records"), (b"{}", "JSON list"), (b"", "empty"), (b"  \n", "empty"),
     (b"[{\"text\": \"\"}]", "no text records"), (b"[1, 2", "not valid JSON")],
)
def test_bad_json_files(tmp_path, content, needle):
    p = tmp_path / "x.json"
    p.write_bytes(content)
    with pytest.raises(DataError) as e:
        read_documents(p)
    assert needle in one_line(e)


def test_missing_and_non_utf8(tmp_path):
    with pytest.raises(DataError) as e:
        read_documents(tmp_path / "nope.txt")
    assert "does not exist" in one_line(e)
    p = tmp_path / "latin1.txt"
    p.write_bytes("café au lait".encode("latin-1"))
    with pytest.raises(DataError) as e:
        read_documents(p)
    assert "UTF-8" in one_line(e) and "0xe9" in str(e.value)


# ---- named corpora ----------------------------------------------------------------------------
def make_folder(root, tag: str, wheel: bool = False):
    if wheel:
        root.mkdir(parents=True)
        (root / "c4.utf8").write_text(f"{tag} doc one\n{tag} doc two\n")
        (root / "wiki.utf8").write_text(f'<doc id="1" title="A">\nA\n\n{tag} body\n</doc>\n')
        return root
    (root / "calibration").mkdir(parents=True)
    (root / "calibration" / "c4.utf8").write_text(f"{tag} doc one\n\n{tag} doc two\n")
    (root / "calibration" / "wiki.utf8").write_text(
        f'<doc id="1" url="u" title="A">\nA\n\n{tag} body a\n</doc>\n<doc id="2" title="B">\nB {tag}\n</doc>\n'
    )
    return root


def test_resolution_order(tmp_path, monkeypatch):
    arg = make_folder(tmp_path / "arg", "arg")
    env = make_folder(tmp_path / "env", "env")
    wheel = make_folder(tmp_path / "wheel", "wheel", wheel=True)
    monkeypatch.setattr(corpora, "_wheel_dir", lambda: wheel)
    monkeypatch.setenv("SLIMGPT_DATA", str(env))

    docs, info = c4_documents(arg)
    assert docs == ["arg doc one", "arg doc two"] and info["source"].startswith(str(arg))
    assert len(info["sha256"]) == 64
    assert c4_documents()[0][0] == "env doc one"
    assert c4_documents(tmp_path / "empty-folder")[0][0] == "env doc one"  # folder without the file
    monkeypatch.delenv("SLIMGPT_DATA")
    docs, info = c4_documents()
    assert docs[0] == "wheel doc one" and info["source"] == str(wheel / "c4.utf8")

    monkeypatch.setattr(corpora, "_wheel_dir", lambda: None)
    with pytest.raises(DataError) as e:
        c4_documents()
    assert "unreachable" in one_line(e) and "exllamav3" in str(e.value)


def test_wiki_documents_strip_tags(tmp_path):
    folder = make_folder(tmp_path / "d", "x")
    docs, info = wiki_documents(folder)
    assert docs == ["A\n\nx body a", "B x"]
    assert all("<doc" not in d and "</doc>" not in d for d in docs)


def test_wikitext2_protocol(tmp_path):
    (tmp_path / "wikitext-2-raw").mkdir()
    raw = tmp_path / "wikitext-2-raw" / "wiki.test.raw"
    raw.write_bytes(b" = Title = \r\n Para one . \r\n Para two . \r\n")
    text, info = corpora.wikitext2_test_text(tmp_path)
    assert text == " = Title = \n\n Para one . \n\n Para two . "
    assert info["source"] == str(raw) and info["sha256"] == corpora.sha256_file(raw)
    assert "\\n\\n" in info["protocol"]


def test_hub_dataset_names(monkeypatch):
    calls = []

    def fake_load(name, config, split, **kw):
        calls.append((name, config, split))
        return [{"text": "hello"}, {"instruction": "i", "output": "o"}, {"text": ""}]

    monkeypatch.setattr(corpora, "hub_reachable", lambda timeout=3.0: True)
    monkeypatch.setitem(__import__("sys").modules, "datasets", types.SimpleNamespace(load_dataset=fake_load))
    docs, info = load_documents("org/name:cfg:validation")
    assert calls == [("org/name", "cfg", "validation")] and len(docs) == 2 and info["source"] == "hub:org/name:cfg:validation"
    load_documents("org/name")
    assert calls[-1] == ("org/name", None, "train")

    def failing(*a, **k):
        raise ConnectionError("no route\nsecond line")

    monkeypatch.setitem(__import__("sys").modules, "datasets", types.SimpleNamespace(load_dataset=failing))
    with pytest.raises(DataError) as e:
        load_documents("org/name")
    assert "ConnectionError: no route" in one_line(e)


def test_unknown_source():
    with pytest.raises(DataError) as e:
        load_documents("not a source")
    assert "c4" in one_line(e)


# ---- calibration sampling ---------------------------------------------------------------------
def test_windows_are_slices_deterministic_and_seeded(tiny_tokenizer):
    doc = words(0, 600)
    stream = ids_of(doc)
    a = get_calibration_from([doc], tiny_tokenizer, seed=0)
    assert a.shape == (6, 32) and a.dtype == torch.long
    assert all(is_slice(row.tolist(), stream) for row in a)
    assert torch.equal(a, get_calibration_from([doc], tiny_tokenizer, seed=0))
    assert not torch.equal(a, get_calibration_from([doc], tiny_tokenizer, seed=1))


def get_calibration_from(docs, tok, seed, nsamples=6, seqlen=32):
    return windows_from_documents(docs, tok, nsamples, seqlen, seed)[0]


def test_document_mode_uses_long_documents_only(tiny_tokenizer):
    docs = [words(0, 40), words(200, 5), words(400, 50), words(600, 3)]
    out, info = windows_from_documents(docs, tiny_tokenizer, nsamples=3, seqlen=30, seed=3)
    assert info["mode"] == "documents"
    long_ids = [ids_of(docs[0]), ids_of(docs[2])]
    assert all(any(is_slice(r.tolist(), s) for s in long_ids) for r in out)


def test_stream_mode_joins_short_documents_with_eos(tiny_tokenizer):
    docs = [words(10 * i, 7) for i in range(20)]  # every document shorter than a window
    out, info = windows_from_documents(docs, tiny_tokenizer, nsamples=4, seqlen=16, seed=0)
    assert info["mode"] == "stream" and out.shape == (4, 16)
    eos = tiny_tokenizer.eos_token_id
    assert any(eos in r.tolist() for r in out)
    doc_ids = [ids_of(d) for d in docs]
    for row in out.tolist():  # pieces between EOS are contiguous slices of one document
        piece: list[int] = []
        for t in [*row, eos]:
            if t == eos:
                assert not piece or any(is_slice(piece, d) for d in doc_ids)
                piece = []
            else:
                piece.append(t)
    starts = {tuple(r) for r in out.tolist()}
    assert len(starts) == 4  # distinct slots when the stream holds enough of them


def test_short_text_raises(tiny_tokenizer):
    with pytest.raises(DataError) as e:
        windows_from_documents(["t3 t4 t5", "t6"], tiny_tokenizer, nsamples=2, seqlen=64)
    msg = one_line(e)
    assert "has 5 tokens" in msg and "seqlen=64" in msg  # 4 words + 1 EOS separator


def test_bos_windows(bos_tokenizer):
    assert needs_bos(bos_tokenizer)
    doc = words(0, 300)
    out = get_calibration_from([doc], bos_tokenizer, seed=0, nsamples=3, seqlen=20)
    assert out.shape == (3, 20) and (out[:, 0] == 1).all()
    assert all(is_slice(r[1:].tolist(), ids_of(doc)) for r in out)


def test_no_bos_for_plain_tokenizer(tiny_tokenizer):
    assert not needs_bos(tiny_tokenizer)


def test_wikitext2_calibration_uses_train_split(tmp_path, tiny_tokenizer):
    folder = tmp_path / "wikitext-2-raw"
    folder.mkdir()
    (folder / "wiki.test.raw").write_text(" ".join(["t5"] * 400) + "\r\n")
    with pytest.raises(DataError) as e:  # no train file and no hub: never falls back to test
        get_calibration("wikitext2", tiny_tokenizer, 2, 16, data_dir=tmp_path)
    assert "wiki.train.raw" in one_line(e)
    (folder / "wiki.train.raw").write_text(" ".join(["t7"] * 400) + "\r\n")
    out = get_calibration("wikitext2", tiny_tokenizer, 2, 16, data_dir=tmp_path)
    assert (out == 7).all()


def test_file_source_and_provenance(tmp_path, tiny_tokenizer):
    p = tmp_path / "cal.txt"
    p.write_text(words(0, 200))
    out, info = sample_calibration(str(p), tiny_tokenizer, 2, 16, seed=5)
    assert out.shape == (2, 16)
    assert info["source"]["sha256"] == corpora.sha256_file(p) and info["seed"] == 5


def test_bad_sizes(tiny_tokenizer):
    from slimgpt.errors import ConfigError

    with pytest.raises(ConfigError):
        windows_from_documents(["t3 t4"], tiny_tokenizer, 0, 16)
    with pytest.raises(ConfigError):
        windows_from_documents(["t3 t4"], tiny_tokenizer, 1, 1)
    assert calibration.encode(tiny_tokenizer, "t3 t9") == [3, 9]
