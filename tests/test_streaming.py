"""Streaming (--max-memory): a model pruned one layer at a time from disk must come out bitwise
equal to the in-memory run, and to the plain driver + shrink_model path it replaces; the source
folder must stay untouched; at most one decoder layer may hold real weights at any time.

Helpers here (tiny models saved to disk, a calibration file, CLI runs) are shared with
test_resume.py and test_bad_input.py.
"""

from __future__ import annotations

import hashlib
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from conftest import build_tiny
from slimgpt import streaming
from slimgpt.api import prune
from slimgpt.config import PruneConfig
from slimgpt.errors import ConfigError
from slimgpt.io import saved_tensors as weights  # other tests import it from here

# --schedule log: these tests compare streamed with in-memory runs of the layer-wise driver (the
# auto schedule's streamed pass has its own test below)
RUN = ["--nsamples", "8", "--seqlen", "32", "--batch-size", "4", "--ratio", "0.3", "--schedule", "log"]
KINDS = {
    "llama": (LlamaConfig, LlamaForCausalLM, dict(num_key_value_heads=2, tie_word_embeddings=True)),
    # untied head and biases (transformers 5 always gives a qwen2 folder its Qwen2Tokenizer, which
    # cannot read the word-level test vocabulary, so the biased case is a Llama with attention_bias)
    "llama_bias": (LlamaConfig, LlamaForCausalLM, dict(num_key_value_heads=4, tie_word_embeddings=False,
                                                       attention_bias=True)),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, dict(num_key_value_heads=2, tie_word_embeddings=False)),
}


def save_tiny(folder: Path, kind: str = "llama", tokenizer: bool = True, **overrides) -> Path:
    """A tiny model (tests/conftest.py) with its word-level tokenizer, saved as a model folder."""
    config_cls, model_cls, kw = KINDS[kind]
    model = build_tiny(config_cls, model_cls, **{**kw, **overrides})
    model.save_pretrained(folder)
    if tokenizer:
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, 128)}}
        tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                eos_token="</s>").save_pretrained(folder)
    return folder


def calib_text(path: Path, docs: int = 30, words: int = 200, seed: int = 0) -> Path:
    rnd = random.Random(seed)
    path.write_text("\n\n".join(" ".join(f"t{rnd.randrange(3, 128)}" for _ in range(words)) for _ in range(docs)))
    return path


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert wa[k].dtype == wb[k].dtype and torch.equal(wa[k], wb[k]), k


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """``slimgpt ...`` in a fresh interpreter (for kills and exit codes)."""
    import os

    return subprocess.run([sys.executable, "-m", "slimgpt.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    return save_tiny(tmp_path / "src")


@pytest.fixture
def calib(tmp_path: Path) -> Path:
    return calib_text(tmp_path / "calib.txt")


def config(model: Path, out: Path, calib: Path, **kw) -> PruneConfig:
    kw.setdefault("schedule", "log")
    return PruneConfig(model=str(model), out=str(out), calib=str(calib), nsamples=8, seqlen=32, batch_size=4,
                       ratio=0.3, **kw)


def reference_weights(model: Path, calib: Path) -> dict[str, torch.Tensor]:
    """The pruned weights by the plain path streaming must reproduce: from_pretrained, the driver
    without a layer store, shrink_model on all plans at the end (no checkpoint, no per-layer cut)."""
    from transformers import AutoTokenizer

    from slimgpt.arch import get_adapter
    from slimgpt.data.calibration import sample_calibration
    from slimgpt.driver import layer_spaces, run_layerwise
    from slimgpt.methods.slimgpt import SlimGPT
    from slimgpt.schedule import solve_widths
    from slimgpt.surgery import parameter_count, shrink_model

    m = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32, attn_implementation="sdpa").eval()
    tok = AutoTokenizer.from_pretrained(model)
    ids, _ = sample_calibration(str(calib), tok, 8, 32, 0)
    ad = get_adapter(m)
    spaces = layer_spaces(ad)
    widths = solve_widths(spaces, parameter_count(m), 0.3, "log")
    res = run_layerwise(ad, ids, SlimGPT(), widths, spaces, torch.device("cpu"), 4, progress=False)
    slim = shrink_model(m, res.plans)
    seen, out = set(), {}
    for k, t in slim.state_dict(keep_vars=True).items():  # tied tensors once, as save_pretrained writes
        if id(t) not in seen:
            seen.add(id(t))
            out[k] = t.detach()
    return out


@pytest.mark.parametrize("kind", ["llama", "llama_bias"])  # tied embeddings / untied head + biases
def test_streamed_equals_in_memory_and_reference(kind: str, tmp_path: Path, calib: Path) -> None:
    src = save_tiny(tmp_path / "src", kind)
    before = tree_digest(src)
    mem = prune(config(src, tmp_path / "mem", calib), progress=False)
    st = prune(config(src, tmp_path / "st", calib, max_memory="1KiB"), progress=False)
    assert not mem.report["streamed"] and st.report["streamed"] and st.model is None
    assert_same_weights(tmp_path / "mem", tmp_path / "st")
    ref = reference_weights(src, calib)
    got = weights(tmp_path / "st")
    assert got.keys() == ref.keys()
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    assert (tmp_path / "st" / "config.json").read_text() == (tmp_path / "mem" / "config.json").read_text()
    assert st.report["params"] == mem.report["params"] and st.report["layers"] == mem.report["layers"]
    # a standard sharded folder: transformers loads it and computes what the in-memory model computes
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "st").eval()
    ids = torch.tensor([[5, 17, 99, 3, 64, 21, 7, 110]])
    with torch.no_grad():
        assert torch.equal(again(ids).logits, mem.model(ids).logits)
    assert tree_digest(src) == before  # the source is never written to
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt", "mem", "src", "st"]  # no work folders left


def test_one_layer_in_memory_at_a_time(model_dir: Path, calib: Path, tmp_path: Path, monkeypatch) -> None:
    seen: list[int] = []
    acquire = streaming.StreamingStore.acquire

    def watched(self, index: int) -> None:
        real = [i for i, lay in enumerate(self.adapter.layers) if any(p.device.type != "meta" for p in lay.parameters())]
        assert real == [], f"layers {real} still hold weights when layer {index} is loaded"
        assert self.adapter.decoder.embed_tokens.weight.device.type == "meta"
        acquire(self, index)
        seen.append(index)

    monkeypatch.setattr(streaming.StreamingStore, "acquire", watched)
    res = prune(config(model_dir, tmp_path / "st", calib, max_memory="1KiB"), progress=False)
    assert seen == [0, 1, 2, 3] and res.report["streamed"]


def test_skeleton_holds_no_weights(model_dir: Path) -> None:
    model, tok, source = streaming.load_skeleton(str(model_dir), torch.float32)
    assert all(p.device.type == "meta" for p in model.parameters())
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as from_pretrained ties
    assert tok("t5 t6")["input_ids"] == [5, 6]
    assert source.shapes["model.layers.0.mlp.down_proj.weight"] == (64, 96)


def test_offloaded_activations_give_the_same_weights(model_dir: Path, calib: Path, tmp_path: Path) -> None:
    prune(config(model_dir, tmp_path / "a", calib, max_memory="1KiB"), progress=False)
    off = tmp_path / "acts"
    prune(config(model_dir, tmp_path / "b", calib, max_memory="1KiB", offload_activations=str(off)), progress=False)
    prune(config(model_dir, tmp_path / "c", calib, offload_activations=str(off)), progress=False)
    assert_same_weights(tmp_path / "a", tmp_path / "b")
    assert_same_weights(tmp_path / "a", tmp_path / "c")
    assert not off.exists()  # created for the run, removed after it


def test_streams_automatically_when_memory_is_short(model_dir: Path, calib: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(streaming, "available_memory", lambda: 1000)
    res = prune(config(model_dir, tmp_path / "auto", calib), progress=False)
    assert res.report["streamed"]
    monkeypatch.setattr(streaming, "available_memory", lambda: 2**40)
    assert not prune(config(model_dir, tmp_path / "mem", calib), progress=False).report["streamed"]


@pytest.mark.parametrize(("text", "size"), [("4GiB", 4 * 2**30), ("512MiB", 512 * 2**20), ("8GB", 8 * 10**9),
                                            ("1.5g", int(1.5 * 2**30)), ("8e9", 8 * 10**9), ("1024", 1024)])
def test_parse_size(text: str, size: int) -> None:
    assert streaming.parse_size(text) == size


@pytest.mark.parametrize("text", ["", "lots", "-1G", "4 parsecs", "0", "GiB"])
def test_parse_size_refuses(text: str) -> None:
    with pytest.raises(ConfigError, match="--max-memory"):
        streaming.parse_size(text)


def test_streamed_equals_in_memory_in_bfloat16(model_dir: Path, calib: Path, tmp_path: Path) -> None:
    """The source is fp32; both paths cast to bf16 the same way, and checkpointed activations keep
    their bf16 bit patterns."""
    prune(config(model_dir, tmp_path / "mem", calib, dtype="bfloat16"), progress=False)
    prune(config(model_dir, tmp_path / "st", calib, dtype="bfloat16", max_memory="1KiB"), progress=False)
    assert_same_weights(tmp_path / "mem", tmp_path / "st")
    assert weights(tmp_path / "st")["model.layers.0.mlp.down_proj.weight"].dtype == torch.bfloat16


@pytest.mark.parametrize("kind", ["llama", "llama_bias"])  # head tied to the embedding (read under its name) / untied
def test_streamed_auto_schedule_equals_in_memory(kind: str, tmp_path: Path, calib: Path, monkeypatch) -> None:
    """``--schedule auto`` streams its scoring pass too: the same KL of every candidate, the same
    choice and weights as in memory, with no other layer's weights in memory while one is scored."""
    src = save_tiny(tmp_path / "src", kind)
    mem = prune(config(src, tmp_path / "mem", calib, schedule="auto"), progress=False)
    held: list[tuple[int, list[int]]] = []
    layer = streaming.StreamedWeights.layer

    def watched(self, index: int):  # noqa: ANN202
        real = [i for i, lay in enumerate(self.store.adapter.layers) if any(p.device.type != "meta" for p in lay.parameters())]
        held.append((index, real))
        return layer(self, index)

    monkeypatch.setattr(streaming.StreamedWeights, "layer", watched)
    st = prune(config(src, tmp_path / "st", calib, schedule="auto", max_memory="1KiB"), progress=False)
    assert st.report["streamed"] and not mem.report["streamed"]
    assert held == [(i, []) for i in range(4)]
    a, b = mem.report["method"]["auto"], st.report["method"]["auto"]
    assert len(a["kl"]) > 1 and a["kl"] == b["kl"] and a["chosen"] == b["chosen"]
    assert_same_weights(tmp_path / "mem", tmp_path / "st")


def test_a_bf16_source_pruned_in_fp32_is_saved_in_bf16(tmp_path: Path, calib: Path) -> None:
    """``--save-dtype auto``: the run computes in fp32 (CPU) and writes the source's bf16, in memory
    and streamed alike (the streamed run's layer checkpoints are replaced, not written through);
    the saved tensors are the fp32 result rounded to bf16, and transformers reads them as bf16."""
    src = save_tiny(tmp_path / "src")
    AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).save_pretrained(src)
    before = tree_digest(src)
    mem = prune(config(src, tmp_path / "mem", calib), progress=False)
    st = prune(config(src, tmp_path / "st", calib, max_memory="1KiB"), progress=False)
    keep = prune(config(src, tmp_path / "f32", calib, save_dtype="float32"), progress=False)
    assert mem.report["dtype"] == "float32" and mem.report["saved_dtype"] == st.report["saved_dtype"] == "bfloat16"
    assert keep.report["saved_dtype"] == "float32"
    assert_same_weights(tmp_path / "mem", tmp_path / "st")
    got, full = weights(tmp_path / "mem"), weights(tmp_path / "f32")
    assert got.keys() == full.keys()
    for k in full:
        assert full[k].dtype == torch.float32 and torch.equal(got[k], full[k].to(torch.bfloat16)), k
    assert mem.model is not None and next(mem.model.parameters()).dtype == torch.float32  # the result itself is untouched
    import json

    assert json.loads((tmp_path / "st" / "config.json").read_text())["dtype"] == "bfloat16"
    index = json.loads((tmp_path / "st" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in weights(tmp_path / "st").values())
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "st")
    assert next(again.parameters()).dtype == torch.bfloat16
    assert tree_digest(src) == before
    with pytest.raises(ConfigError, match="--save-dtype"):
        config(src, tmp_path / "bad", calib, save_dtype="int8").validate()
