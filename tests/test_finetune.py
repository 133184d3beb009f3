"""LoRA recovery: adapters only where weights exist, the loss goes down, prompts are masked, and a
merged model reloads without peft and computes what the adapted model computed."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from slimgpt.cli import main
from slimgpt.finetune import (
    IGNORE,
    FinetuneConfig,
    add_lora,
    build_examples,
    collate,
    evaluate_loss,
    finetune,
    load_adapter,
    lora_targets,
    merge_lora,
    save_finetuned,
    summed_nll,
    train_lora,
)
from slimgpt.io import load_pruned, save_pruned
from slimgpt.recovery.lora import quiet_peft
from slimgpt.surgery import shrink_model
from test_surgery import IDS, random_plans, zero_pruned

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def pruned(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Layer 0: no attention; layer 3: no MLP (see test_surgery.random_plans)."""
    plans = random_plans(random.Random(seed), model)
    zero_pruned(model, plans)
    return shrink_model(model, plans)


@pytest.fixture
def pruned_dir(tiny_llama_gqa, tiny_tokenizer, tmp_path: Path) -> Path:
    """Like a folder pruned from a zoo model: its config still names the GGUF the weights were
    dequantised from, so transformers attaches a GGUF quantizer on load (which blocks saving)."""
    slim = pruned(tiny_llama_gqa)
    slim.config.quantization_config = {"quant_method": "gguf", "gguf_file": "model.gguf", "dequantize": False}
    return save_pruned(slim, tiny_tokenizer, tmp_path / "pruned", {"config": {"model": "dense"}})


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    """A short token pattern repeated: easy to learn, so a few steps must lower the loss."""
    words = " ".join(f"t{3 + (i * 7) % 40}" for i in range(40))
    path = tmp_path / "train.txt"
    path.write_text("\n\n".join([words] * 12))
    return path


def quick(**kw) -> FinetuneConfig:
    base = dict(model="unused", data="unused", batch_size=2, grad_accum=1, seqlen=16, lr=1e-2, max_steps=12,
                val_size=0, device="cpu")
    return FinetuneConfig(**{**base, **kw})


def test_targets_skip_zero_sized_linears(tiny_qwen2) -> None:
    slim = pruned(tiny_qwen2)
    targets = lora_targets(slim)
    # independent count: every projection of every layer whose weight has elements
    expected = [f"model.layers.{i}.{'self_attn' if p in PROJ[:4] else 'mlp'}.{p}"
                for i, layer in enumerate(slim.model.layers) for p in PROJ
                if getattr(layer.self_attn if p in PROJ[:4] else layer.mlp, p).weight.numel()]
    assert sorted(targets) == sorted(expected)
    assert not any(t.startswith("model.layers.0.self_attn") for t in targets)  # layer 0: 0 heads
    assert not any(t.startswith("model.layers.3.mlp") for t in targets)  # layer 3: 0 channels
    assert len(targets) == 7 * 4 - 4 - 3

    model = add_lora(slim, quick(rank=4))
    wrapped = [n.removeprefix("base_model.model.") for n, m in model.named_modules() if hasattr(m, "lora_A")]
    assert sorted(wrapped) == sorted(targets)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert sum(model.get_parameter(n).numel() for n in trainable) == sum(
        4 * (slim.get_submodule(t).in_features + slim.get_submodule(t).out_features) for t in targets)
    # a model whose 0-head / 0-channel layers carry no adapter still runs forward and backward
    out = model(IDS[:, :6], labels=IDS[:, :6])
    out.loss.backward()


def test_summed_nll_matches_transformers_loss(tiny_llama, tiny_tokenizer) -> None:
    """The token-weighted loss equals transformers' own mean loss times the token count."""
    examples, _ = build_examples_from_text(tiny_tokenizer, "t5 t6 t7 t8 t9 t10 t11 t12 t13 t14 t15", seqlen=6)
    batch = collate(examples, pad_id=0)
    batch["labels"][0, :3] = IGNORE
    ref = tiny_llama(input_ids=batch["input_ids"], labels=batch["labels"]).loss
    n = int((batch["labels"][:, 1:] != IGNORE).sum())
    assert torch.allclose(summed_nll(tiny_llama, batch, torch.device("cpu")) / n, ref, atol=1e-5)


def build_examples_from_text(tok, text: str, seqlen: int, tmp: Path | None = None):
    import tempfile

    folder = Path(tmp or tempfile.mkdtemp())
    path = folder / "x.txt"
    path.write_text(text)
    return build_examples(str(path), tok, seqlen)


def test_text_chunks_and_alpaca_prompt_mask(tiny_tokenizer, tmp_path: Path) -> None:
    examples, info = build_examples_from_text(tiny_tokenizer, "t5 t6 t7\n\nt8 t9 t10 t11", seqlen=3, tmp=tmp_path)
    # documents joined with EOS (id 2): 5 6 7 2 8 9 10 11 -> two chunks of 3, rest dropped
    assert [e.input_ids for e in examples] == [[5, 6, 7], [2, 8, 9]]
    assert all(e.labels == e.input_ids for e in examples) and info["format"] == "text"

    records = [{"instruction": "t5 t6", "input": "", "output": "t7 t8"},
               {"instruction": "t9", "input": "t10 t11", "output": "t12"}]
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(records))
    examples, info = build_examples(str(path), tiny_tokenizer, seqlen=256)
    assert info["format"] == "alpaca" and len(examples) == 2
    from slimgpt.data.corpora import format_alpaca

    for rec, ex in zip(records, examples):
        prompt, response = format_alpaca(rec)
        n_prompt = len(prompt.split())  # the word-level tokenizer: one token per word
        assert ex.input_ids[-1] == 2  # EOS appended
        assert ex.labels[:n_prompt] == [IGNORE] * n_prompt
        assert ex.labels[n_prompt:] == ex.input_ids[n_prompt:]
        assert ex.input_ids[n_prompt:-1] == [int(w[1:]) for w in response.split()]
    # truncation that cuts off every response token drops the example
    with pytest.raises(Exception, match="no training examples"):
        build_examples(str(path), tiny_tokenizer, seqlen=5)


def test_loss_decreases_on_repeated_text(pruned_dir: Path, text_file: Path, tiny_tokenizer) -> None:
    model, tok = load_pruned(pruned_dir)
    cfg = quick(data=str(text_file))
    examples, _ = build_examples(str(text_file), tok, cfg.seqlen)
    before = evaluate_loss(model, examples, 0, torch.device("cpu"))
    peft_model = add_lora(model, cfg)
    history = train_lora(peft_model, examples, examples[:4], cfg, 0, torch.device("cpu"), progress=False)
    after = evaluate_loss(peft_model, examples, 0, torch.device("cpu"))
    losses = [h["loss"] for h in history if "loss" in h]
    assert len(losses) == 12 and history[0]["step"] == 0 and "eval_loss" in history[-1]
    assert after < 0.7 * before, (before, after)
    assert sum(losses[-3:]) < 0.8 * sum(losses[:3])
    assert history[-1]["eval_loss"] < history[0]["eval_loss"]
    # cosine schedule from lr down to 0 at the last step
    assert history[1]["lr"] < cfg.lr and history[-1]["lr"] == pytest.approx(0.0, abs=1e-12)


CHILD = textwrap.dedent("""
    import sys, torch
    sys.modules["peft"] = None  # any import of peft now fails
    from transformers import AutoModelForCausalLM
    folder, out_file = sys.argv[1:]
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    ids = torch.tensor([[5, 17, 99, 3, 64, 21, 7, 110, 42, 8], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        logits = model(ids).logits
    assert not any(m == "slimgpt" or m.startswith(("slimgpt.", "peft")) for m in sys.modules if sys.modules[m])
    torch.save(logits, out_file)
""")


def test_merged_model_reloads_without_peft(pruned_dir: Path, text_file: Path, tmp_path: Path) -> None:
    model, tok = load_pruned(pruned_dir)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = quick(data=str(text_file), max_steps=3, rank=4, alpha=8.0)
    examples, _ = build_examples(str(text_file), tok, cfg.seqlen)
    peft_model = add_lora(model, cfg)
    train_lora(peft_model, examples, [], cfg, 0, torch.device("cpu"), progress=False)
    peft_model.eval()
    with torch.no_grad():
        adapted = peft_model(IDS).logits
    # independent merge: W + (alpha / r) * B @ A for every adapted linear
    deltas = {}
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_A"):
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            deltas[name.removeprefix("base_model.model.") + ".weight"] = (cfg.alpha / cfg.rank) * b @ a
    assert deltas and any(d.abs().max() > 1e-4 for d in deltas.values())  # training moved B off zero

    merged = merge_lora(peft_model)
    for name, p in merged.named_parameters():
        expected = base[name] + deltas[name] if name in deltas else base[name]
        assert torch.allclose(p, expected, atol=1e-6), name
    out = save_finetuned(merged, tok, tmp_path / "merged", {"config": {"model": "dense"}, "finetune": {"x": 1}})

    files = sorted(p.name for p in out.iterdir())
    assert "adapter_config.json" not in files and "model.safetensors" in files
    assert "peft" not in (out / "config.json").read_text().lower()
    assert json.loads((out / "slimgpt.json").read_text())["finetune"] == {"x": 1}
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    subprocess.run([sys.executable, "-c", CHILD, str(out), str(tmp_path / "logits.pt")],
                   check=True, env=env, cwd=tmp_path, timeout=300)
    assert torch.allclose(torch.load(tmp_path / "logits.pt"), adapted, atol=1e-5)
    again, _ = load_pruned(out)
    assert torch.allclose(again(IDS).logits, adapted, atol=1e-5)


def test_finetune_api_saves_adapter_that_reloads(pruned_dir: Path, text_file: Path, tmp_path: Path) -> None:
    cfg = quick(model=str(pruned_dir), data=str(text_file), max_steps=2, out=str(tmp_path / "adapter"), val_size=2)
    res = finetune(cfg, progress=False)
    assert res.out == (tmp_path / "adapter").resolve()
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "slimgpt_finetune.json"} <= {
        p.name for p in res.out.iterdir()}
    assert [h["step"] for h in res.history if "eval_loss" in h] == [0, 2]
    res.model.eval()
    with torch.no_grad():
        ref = res.model(IDS).logits
    base, _ = load_pruned(pruned_dir)
    with quiet_peft():  # peft itself reads a property transformers 5 deprecated
        reloaded = PeftModel.from_pretrained(base, res.out).eval()
    again, tok = load_adapter(res.out)  # the base folder comes from adapter_config.json
    with torch.no_grad():
        assert torch.allclose(reloaded(IDS).logits, ref, atol=1e-6)
        assert torch.allclose(again(IDS).logits, ref, atol=1e-6) and tok is not None
    with pytest.raises(Exception, match="exists; pass --overwrite"):
        finetune(cfg, progress=False)


def test_cli_merge_and_errors(pruned_dir: Path, text_file: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "merged"
    args = ["finetune", str(pruned_dir), "--data", str(text_file), "--out", str(out), "--merge",
            "--max-steps", "2", "--batch-size", "2", "--grad-accum", "2", "--seqlen", "16", "--val-size", "2",
            "--device", "cpu", "--json", str(tmp_path / "run.json")]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "saved merged model" in printed and "held-out loss" in printed
    meta = json.loads((out / "slimgpt.json").read_text())
    assert meta["config"]["model"] == "dense"  # the pruned folder's metadata is kept
    assert meta["finetune"]["config"]["effective_batch"] == 4
    model, _ = load_pruned(out)
    assert type(model).__name__ == "SlimLlamaForCausalLM"
    assert model.config.layer_num_attention_heads[0] == 0 and model.config.layer_intermediate_size[3] == 0
    report = json.loads((tmp_path / "run.json").read_text())
    assert [h["step"] for h in report["history"]] == [0, 1, 2]

    capsys.readouterr()
    assert main(["finetune", str(pruned_dir), "--data", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "x"),
                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("slimgpt: error:") and "\n" not in err
    assert main(["finetune", str(pruned_dir), "--data", str(text_file), "--out", str(tmp_path / "x"),
                 "--rank", "0"]) == 2
    assert "--rank must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
