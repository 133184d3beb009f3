"""Issue 21, "a user's first hour": every bad input is one line and exit 2 *before* any long work
(no model loaded, no evaluation run), the command line answers ``--help`` and a typo without
importing torch, a local ``.gguf`` file is a model, and ``export --to gguf`` writes f16 and q8_0.

"Before any work" is checked by making model loading and evaluation fail the test
(:func:`no_work`): the refusal must come first.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from conftest import build_tiny
from slimgpt import preflight
from slimgpt.cli import main
from slimgpt.errors import ConfigError
from slimgpt.export import export
from slimgpt.io import save_pruned
from slimgpt.preflight import Geometry, calibration_need, check_calibration_memory, check_positions
from slimgpt.surgery import shrink_model
from test_export import VOCAB, bpe_tokenizer, gguf_plans, slim_model  # noqa: F401
from test_streaming import RUN, calib_text, save_tiny


@pytest.fixture
def no_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading any model or running any evaluation fails the test."""
    def boom(*_a, **_k):
        pytest.fail("a model was loaded or an evaluation ran before the refusal")

    import importlib

    import slimgpt.evaluation.results
    import slimgpt.zoo

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", boom)
    monkeypatch.setattr(slimgpt.zoo, "load_model", boom)
    monkeypatch.setattr(slimgpt.evaluation.results, "evaluate_model", boom)
    # the module, not the function of the same name that slimgpt.evaluation exports
    monkeypatch.setattr(importlib.import_module("slimgpt.evaluation.perplexity"), "perplexity", boom)


def refused(capsys: pytest.CaptureFixture, args: list[str], *expect: str) -> str:
    """``slimgpt ARGS`` exits 2 with one line on stderr holding every ``expect``."""
    capsys.readouterr()
    rc = main(args)
    lines = [ln for ln in capsys.readouterr().err.strip().splitlines() if ln.strip()]
    assert rc == 2, lines
    assert len(lines) == 1 and lines[0].startswith("slimgpt") and "error" in lines[0], lines
    for e in expect:
        assert e in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def src(tmp_path: Path) -> Path:
    return save_tiny(tmp_path / "src")  # max_position_embeddings 256


@pytest.fixture
def calib(tmp_path: Path) -> Path:
    return calib_text(tmp_path / "calib.txt")


# ---- the command line answers at once ----------------------------------------------------------------


def _fresh(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_parsing_and_a_typo_import_neither_torch_nor_transformers(tmp_path: Path) -> None:
    """``slimgpt --help`` took 11-13 s (imports); parsing and the cheap checks must import nothing
    heavy, so a typo is answered in about a second (measured: 0.1 s)."""
    r = _fresh("import sys\nfrom slimgpt.cli import build_parser, main\nbuild_parser()\n"
               f"rc = main(['prune', '--ratio', '2', '--out', {str(tmp_path / 'x')!r}])\n"
               "print(rc, sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    assert r.stdout.split("\n")[0] == "2 []", r.stdout + r.stderr
    assert r.stderr.strip().splitlines() == ["slimgpt: error: --ratio must be a number in (0, 1), the share of all "
                                             "parameters removed; got 2.0"]


def test_import_slimgpt_still_registers_the_slim_classes(tmp_path: Path) -> None:
    """The registration waits for transformers to be imported, in either order."""
    check = "from transformers.models.auto.configuration_auto import CONFIG_MAPPING as M; print('slimgpt_llama' in M)"
    assert _fresh(f"import slimgpt, transformers; {check}").stdout.strip() == "True"
    assert _fresh(f"import transformers, slimgpt; {check}").stdout.strip() == "True"
    r = _fresh("import slimgpt, sys; print('torch' in sys.modules)")
    assert r.stdout.strip() == "False", r.stderr


# ---- the output --------------------------------------------------------------------------------------


def test_unwritable_out_is_refused_before_loading(src: Path, calib: Path, tmp_path: Path, capsys, no_work) -> None:
    (tmp_path / "afile").write_text("x")
    for out in ("/proc/slimgpt-x", str(tmp_path / "afile" / "out")):
        refused(capsys, ["prune", str(src), "--out", out, "--calib", str(calib), *RUN], "cannot write", out)
    refused(capsys, ["export", str(src), "--to", "gguf", "--out", "/proc/slimgpt-x.gguf"], "cannot write")
    (tmp_path / "m.gguf").write_text("old")
    refused(capsys, ["export", str(src), "--to", "gguf", "--out", str(tmp_path / "m.gguf")], "exists")


# ---- the windows -------------------------------------------------------------------------------------


def test_window_longer_than_the_model_reads_is_refused(src: Path, calib: Path, tmp_path: Path, capsys,
                                                        no_work) -> None:
    out = str(tmp_path / "out")
    refused(capsys, ["prune", str(src), "--out", out, "--calib", str(calib), "--nsamples", "4", "--seqlen", "100000"],
            "--seqlen 100000", "max_position_embeddings 256", "--seqlen 256 or less")
    refused(capsys, ["eval", str(src), "--ppl", str(calib), "--seqlen", "128,300"], "--seqlen 300",
            "max_position_embeddings 256")
    assert not (tmp_path / "out").exists()


def test_calibration_that_cannot_fit_names_the_largest_that_would(src: Path, calib: Path, tmp_path: Path, capsys,
                                                                   monkeypatch, no_work) -> None:
    free = 6 * 2**20
    monkeypatch.setattr(preflight, "available_memory", lambda: free)
    err = refused(capsys, ["prune", str(src), "--out", str(tmp_path / "out"), "--calib", str(calib),
                           "--nsamples", "64", "--seqlen", "256"],
                  "calibration on 64 windows × 256 tokens needs about", "available", "the largest that fit")
    geo = Geometry.of(json.loads((src / "config.json").read_text()))
    assert geo is not None

    def host(n: int, s: int) -> int:
        return calibration_need(geo, n, s, 8, 4).host(gpu=False)

    n = int(err.split("--nsamples ")[1].split()[0])
    s = int(err.split("--seqlen ")[2].split()[0])
    assert host(n, 256) <= free < host(n + 1, 256)
    assert host(64, s) <= free < host(64, s + 1)


def test_the_documented_defaults_are_not_refused() -> None:
    """SmolLM2-135M at the CPU default 64 × 512 fits in 1 GiB; Llama-2-7B at the paper's 256 × 2048
    in fp16 fits a 24 GiB GPU and 64 GiB of host memory; the issue's 16 × 100,000 window is refused
    by the position limit first."""
    smol = Geometry(576, 1536, 9, 3, 64, 30, 49152, True, 8192, 1)
    assert calibration_need(smol, 64, 512, 8, 4).host(gpu=False) < 2**30
    check_calibration_memory("smollm2-135m", smol, 64, 512, 8, 4, "cpu", host_free=2**30)
    with pytest.raises(ConfigError, match="max_position_embeddings 8192"):
        check_positions("smollm2-135m", smol, 100000)
    llama7b = Geometry(4096, 11008, 32, 32, 128, 32, 32000, False, 4096, 1)
    need = calibration_need(llama7b, 256, 2048, 8, 2)
    assert need.host(gpu=True) < 64 * 2**30 and need.device() < 24 * 2**30
    check_calibration_memory("llama-7b", llama7b, 256, 2048, 8, 2, "cuda", host_free=64 * 2**30,
                             device_free=24 * 2**30)
    with pytest.raises(ConfigError, match=r"on cuda, 6\.0 GiB free .* --seqlen \d+ at --nsamples 256"):
        check_calibration_memory("llama-7b", llama7b, 256, 2048, 8, 2, "cuda", host_free=64 * 2**30,
                                 device_free=6 * 2**30)
    with pytest.raises(ConfigError, match="--seqlen 2048 at --nsamples 16|the largest"):
        check_calibration_memory("smollm2-135m", smol, 16, 8192, 8, 4, "cpu", host_free=2**30)


def test_evaluation_that_cannot_fit_names_a_batch_and_a_length_that_would() -> None:
    from slimgpt.preflight import check_eval_memory, eval_need

    smol = Geometry(576, 1536, 9, 3, 64, 30, 49152, True, 8192, 1)
    free = 4 * 2**30
    check_eval_memory("smollm2-135m", smol, 128, 8, 4, "cpu", free=free)  # the default window: about 1.1 GiB
    with pytest.raises(ConfigError, match=r"windows of 2048 tokens .* use --batch-size (\d+) or --seqlen (\d+) or less") as e:
        check_eval_memory("smollm2-135m", smol, 2048, 8, 4, "cpu", free=free)
    batch, seqlen = (int(x) for x in e.value.args[0].split("--batch-size ")[1].split(" or --seqlen ")[0:1]
                     + [e.value.args[0].split("--seqlen ")[1].split()[0]])
    assert eval_need(smol, 2048, batch, 4) <= free < eval_need(smol, 2048, batch + 1, 4)
    assert eval_need(smol, seqlen, 8, 4) <= free < eval_need(smol, seqlen + 1, 8, 4)


# ---- the models named --------------------------------------------------------------------------------


@pytest.fixture
def pruned(src: Path, tmp_path: Path) -> Path:
    """A pruned folder whose slimgpt.json names ``src`` as its source (so eval scores both)."""
    model = AutoModelForCausalLM.from_pretrained(src)
    tok = AutoTokenizer.from_pretrained(src)
    return save_pruned(shrink_model(model, {}), tok, tmp_path / "pruned", {"config": {"model": str(src)}})


def test_eval_of_truncated_weights_fails_before_the_baseline_is_scored(pruned: Path, calib: Path, capsys,
                                                                       no_work) -> None:
    weights = pruned / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    refused(capsys, ["eval", str(pruned), "--ppl", str(calib)], "could not read the weights", "truncated",
            "save_pretrained")
    refused(capsys, ["bench", str(pruned.parent / "src"), str(pruned)], "truncated")


def test_eval_labels_an_explicit_baseline_as_such(pruned: Path, src: Path, calib: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval.json"
    assert main(["eval", str(pruned), "--baseline", str(pruned), "--ppl", str(calib), "--max-windows", "2",
                 "--seqlen", "32", "--json", str(out)]) == 0
    assert [m["label"] for m in json.loads(out.read_text())["models"]] == ["baseline", "pruned"]
    assert main(["eval", str(pruned), "--ppl", str(calib), "--max-windows", "2", "--seqlen", "32",
                 "--json", str(out)]) == 0
    assert [m["label"] for m in json.loads(out.read_text())["models"]] == ["dense", "pruned"]


# ---- a local GGUF file is a model ----------------------------------------------------------------------


def write_llama_gguf(model: LlamaForCausalLM, tokenizer, path: Path) -> Path:
    """The tiny model as a stock llama.cpp ``llama`` GGUF (f32), the kind transformers reads."""
    import gguf

    from slimgpt.export.gguf import add_tokenizer, permute_rope

    c = model.config
    d = c.head_dim
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(d)
    w.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(float(c.rms_norm_eps))
    w.add_vocab_size(c.vocab_size)
    add_tokenizer(w, tokenizer, c.vocab_size, "gpt-2")

    def put(name: str, t: torch.Tensor) -> None:
        w.add_tensor(name, t.detach().float().numpy().copy())

    put("token_embd.weight", model.model.embed_tokens.weight)
    put("output_norm.weight", model.model.norm.weight)
    if not c.tie_word_embeddings:
        put("output.weight", model.lm_head.weight)
    for i, layer in enumerate(model.model.layers):
        a, m = layer.self_attn, layer.mlp
        put(f"blk.{i}.attn_norm.weight", layer.input_layernorm.weight)
        put(f"blk.{i}.attn_q.weight", permute_rope(a.q_proj.weight, d))
        put(f"blk.{i}.attn_k.weight", permute_rope(a.k_proj.weight, d))
        put(f"blk.{i}.attn_v.weight", a.v_proj.weight)
        put(f"blk.{i}.attn_output.weight", a.o_proj.weight)
        put(f"blk.{i}.ffn_norm.weight", layer.post_attention_layernorm.weight)
        put(f"blk.{i}.ffn_gate.weight", m.gate_proj.weight)
        put(f"blk.{i}.ffn_up.weight", m.up_proj.weight)
        put(f"blk.{i}.ffn_down.weight", m.down_proj.weight)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_local_gguf_is_converted_once_into_the_cache(bpe_tokenizer, tmp_path: Path, monkeypatch, capsys) -> None:  # noqa: F811
    from slimgpt import zoo

    monkeypatch.setenv("SLIMGPT_CACHE", str(tmp_path / "cache"))
    model = build_tiny(LlamaConfig, LlamaForCausalLM, vocab_size=VOCAB, num_key_value_heads=2,
                       tie_word_embeddings=False)
    path = write_llama_gguf(model, bpe_tokenizer, tmp_path / "tiny.gguf")

    loaded, tok = zoo.load_model(str(path))
    folder = Path(zoo.resolve_model(str(path)))
    assert folder.parent == tmp_path / "cache" / "models" and folder.name.startswith("gguf-tiny-")
    assert json.loads((folder / "slimgpt_source.json").read_text())["gguf_file"] == str(path.resolve())
    ids = torch.tensor([[1, 40, 7, 250, 33, 5]])
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-5)
    assert tok("the quick brown fox")["input_ids"] == bpe_tokenizer("the quick brown fox")["input_ids"]

    monkeypatch.setattr(zoo, "_convert_into", lambda *a, **k: pytest.fail("converted twice"))
    assert zoo.resolve_model(str(path)) == str(folder)  # the cache is reused
    # the CLI takes it as a model (the conversion is done, nothing is converted again)
    out = tmp_path / "padded"
    assert main(["export", str(path), "--to", "padded", "--out", str(out)]) == 0 and (out / "config.json").is_file()

    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all" * 4)
    refused(capsys, ["eval", str(tmp_path / "junk.gguf")], "could not read", "as a GGUF file")


def test_our_own_deci_export_is_refused_as_a_model(bpe_tokenizer, tmp_path: Path, monkeypatch, capsys) -> None:  # noqa: F811
    monkeypatch.setenv("SLIMGPT_CACHE", str(tmp_path / "cache"))
    slim = slim_model("llama", vocab_size=VOCAB)
    path = export(slim, bpe_tokenizer, "gguf", tmp_path / "pruned.gguf", tokenizer_pre="gpt-2")
    refused(capsys, ["eval", str(path)], "'deci' GGUF", "slimgpt folder it was exported from")


# ---- export types --------------------------------------------------------------------------------------


def _read(path: Path) -> dict[str, tuple[np.ndarray, str, int]]:
    """name → (dequantised values in the model's (out, in) layout, type name, bytes in the file)."""
    import gguf

    out = {}
    for t in gguf.GGUFReader(path).tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type).reshape([int(x) for x in reversed(t.shape)])
        out[t.name] = (values.astype(np.float32), t.tensor_type.name, int(t.n_bytes))
    return out


def test_gguf_types_dequantise_to_the_weights_and_shrink(bpe_tokenizer, tmp_path: Path) -> None:  # noqa: F811
    model = build_tiny(LlamaConfig, LlamaForCausalLM, vocab_size=VOCAB, num_key_value_heads=4,
                       tie_word_embeddings=True)
    slim = slim_model("llama", plans=gguf_plans(model), vocab_size=VOCAB).requires_grad_(False)
    files = {t: export(slim, bpe_tokenizer, "gguf", tmp_path / f"{t}.gguf", dtype=t, tokenizer_pre="gpt-2")
             for t in ("f32", "f16", "q8_0")}
    read = {t: _read(p) for t, p in files.items()}
    layer = slim.model.layers[0].mlp
    up = layer.up_proj.weight.numpy()  # (48, 64): rows of 64 split into 32-wide blocks
    down = layer.down_proj.weight.numpy()  # (64, 48): rows of 48 do not

    assert np.array_equal(read["f32"]["blk.0.ffn_up.weight"][0], up)
    f16, kind, _ = read["f16"]["blk.0.ffn_up.weight"]
    assert kind == "F16" and np.allclose(f16, up, rtol=2**-10, atol=1e-7)
    q8, kind, _ = read["q8_0"]["blk.0.ffn_up.weight"]
    # one f16 scale d = max|w| / 127 per 32 values: error ≤ d/2, plus the scale's f16 rounding (127 d 2⁻¹¹)
    scale = np.abs(up).reshape(up.shape[0], -1, 32).max(-1, keepdims=True) / 127
    assert kind == "Q8_0" and np.all(np.abs(q8 - up).reshape(scale.shape[:2] + (32,)) <= 0.57 * scale)
    q8_down, kind, _ = read["q8_0"]["blk.0.ffn_down.weight"]
    assert kind == "F16" and np.allclose(q8_down, down, rtol=2**-10, atol=1e-7)  # the f16 fallback
    assert read["q8_0"]["blk.0.attn_norm.weight"][1] == "F32"  # norms stay f32

    data = {t: sum(n for *_, n in r.values()) for t, r in read.items()}
    assert data["f16"] < 0.55 * data["f32"] and data["q8_0"] < 0.35 * data["f32"], data
    assert files["q8_0"].stat().st_size < files["f16"].stat().st_size < files["f32"].stat().st_size


def test_export_cli_default_is_f16(tiny_tokenizer, tmp_path: Path) -> None:
    folder = save_pruned(slim_model("llama"), tiny_tokenizer, tmp_path / "pruned", {})
    from slimgpt.cli import build_parser

    args = build_parser().parse_args(["export", str(folder), "--to", "gguf", "--out", "x.gguf"])
    assert args.gguf_type == "f16"
    assert "q8_0" in build_parser()._subparsers._group_actions[0].choices["export"].format_help()
