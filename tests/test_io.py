"""save_pruned / load_pruned: the saved folder must reload to the same numbers, with and without
slimgpt, and saving must never leave a half-written or clobbered folder behind."""

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
from transformers import AutoModelForCausalLM

from slimgpt.errors import ConfigError, ModelError
from slimgpt.io import load_pruned, save_pruned
from slimgpt.surgery import layer_shapes, shrink_model
from test_surgery import GENERATE, IDS, MASK, logits, random_plans, zero_pruned


def pruned(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    plans = random_plans(random.Random(seed), model)
    zero_pruned(model, plans)
    return shrink_model(model, plans)


def entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_qwen2"])
def test_save_and_reload_in_process(name: str, request: pytest.FixtureRequest, tiny_tokenizer, tmp_path: Path) -> None:
    slim = pruned(request.getfixturevalue(name))
    ref = logits(slim)
    out = save_pruned(slim, tiny_tokenizer, tmp_path / "out", {"method": "test", "ratio": 0.2})

    files = entries(out)
    assert {"config.json", "model.safetensors", "slimgpt.json", "configuration_slimgpt.py",
            "modeling_slimgpt.py", "tokenizer.json"} <= set(files)
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl"))]
    assert entries(tmp_path) == ["out"]
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == f"modeling_slimgpt.{type(slim).__name__}"
    assert config["layer_num_attention_heads"][0] == 0
    assert json.loads((out / "slimgpt.json").read_text())["ratio"] == 0.2

    again = AutoModelForCausalLM.from_pretrained(out)
    assert type(again) is type(slim)
    assert layer_shapes(again) == layer_shapes(slim)
    assert torch.equal(logits(again.eval()), ref)

    model, tok = load_pruned(out)
    assert torch.equal(logits(model), ref)
    assert tok("t5 t17 t99")["input_ids"] == [5, 17, 99]
    assert torch.equal(model.generate(IDS, **GENERATE), model.generate(IDS, use_cache=False, **GENERATE))


CHILD = textwrap.dedent("""
    import sys, torch
    from transformers import AutoModelForCausalLM
    folder, ids_file, out_file = sys.argv[1:]
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    ids, mask = torch.load(ids_file)
    with torch.no_grad():
        logits = model(ids).logits
    kw = dict(attention_mask=mask, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    tokens = model.generate(ids, **kw)
    assert torch.equal(tokens, model.generate(ids, use_cache=False, **kw))
    assert not any(m == "slimgpt" or m.startswith("slimgpt.") for m in sys.modules), "slimgpt was imported"
    torch.save({"logits": logits, "tokens": tokens, "cls": type(model).__module__}, out_file)
""")


def load_without_slimgpt(folder: Path, ids: torch.Tensor, mask: torch.Tensor, tmp_path: Path) -> dict:
    """Run :data:`CHILD` on ``folder`` in a fresh process that never imports slimgpt; its results."""
    torch.save((ids, mask), tmp_path / "ids.pt")
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    subprocess.run([sys.executable, "-c", CHILD, str(folder), str(tmp_path / "ids.pt"), str(tmp_path / "res.pt")],
                   check=True, env=env, cwd=tmp_path, timeout=300)
    return torch.load(tmp_path / "res.pt")


def test_reload_without_slimgpt_via_remote_code(tiny_llama_gqa, tiny_tokenizer, tmp_path: Path) -> None:
    slim = pruned(tiny_llama_gqa, seed=5)
    ref = logits(slim)
    out = save_pruned(slim, tiny_tokenizer, tmp_path / "model", {})
    res = load_without_slimgpt(out, IDS, MASK, tmp_path)
    assert "transformers_modules" in res["cls"]  # the copied modelling file, not slimgpt's
    assert torch.equal(res["logits"], ref)
    assert torch.equal(res["tokens"], slim.generate(IDS, **GENERATE))


def test_existing_folder_is_refused_then_replaced(tiny_llama, tmp_path: Path) -> None:
    slim = shrink_model(tiny_llama, {})
    out = save_pruned(slim, None, tmp_path / "out", {"run": 1})
    with pytest.raises(ConfigError, match="exists; pass --overwrite or choose another"):
        save_pruned(slim, None, out, {"run": 2})
    assert json.loads((out / "slimgpt.json").read_text())["run"] == 1
    save_pruned(slim, None, out, {"run": 2}, overwrite=True)
    assert json.loads((out / "slimgpt.json").read_text())["run"] == 2
    assert entries(tmp_path) == ["out"]


def test_failure_leaves_nothing_and_keeps_the_old_folder(tiny_llama, tiny_tokenizer, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    slim = shrink_model(tiny_llama, {})
    out = save_pruned(slim, None, tmp_path / "out", {"run": 1})

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(type(tiny_tokenizer), "save_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):
        save_pruned(slim, tiny_tokenizer, tmp_path / "new", {})
    with pytest.raises(OSError, match="disk full"):
        save_pruned(slim, tiny_tokenizer, out, {"run": 2}, overwrite=True)
    assert entries(tmp_path) == ["out"]
    assert json.loads((out / "slimgpt.json").read_text())["run"] == 1


def test_output_inside_source_folder_is_refused(tiny_llama, tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    slim = shrink_model(tiny_llama, {})
    slim.config._name_or_path = str(source)
    for target in (source, source / "pruned"):
        with pytest.raises(ConfigError, match="source model folder"):
            save_pruned(slim, None, target, {}, overwrite=True)
    with pytest.raises(ConfigError, match="source model folder"):
        save_pruned(slim, None, tmp_path, {}, overwrite=True)
    assert entries(tmp_path) == ["source"] and entries(source) == []


def test_unshrunk_models_and_bad_folders(tiny_llama, tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="shrink_model"):
        save_pruned(tiny_llama, None, tmp_path / "out", {})
    with pytest.raises(ModelError, match="not found"):
        load_pruned(tmp_path / "missing")
    with pytest.raises(ModelError, match="no config.json"):
        load_pruned(tmp_path)
    assert entries(tmp_path) == []
