"""models.tokenizer against transformers' AutoTokenizer on small byte-level BPE tokenizers made here."""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import pytest

from models.hub import CheckpointError
from models.tokenizer import BUILTIN_CHAT_TEMPLATE, load_tokenizer

SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>",
            "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<s>", "</s>", "<pad>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs!",
    "def add(a, b):\n    return a + b  # tokens, spaces\tand tabs",
    "Hello world, hello tokenizer; café naïve résumé — ünïcödé 東京 🙂",
] * 20
TEXTS = [
    "Hello world",
    " leading space and  double  spaces ",
    "line one\nline two\n\n\tindented",
    "ünïcödé café 東京 🙂 never seen: ☃ ß",
    "<|im_start|>user\nhi<|im_end|>\n",
    "<s>starts with the BOS string",
    "",
]

# Meta-Llama-3-8B-Instruct's template, verbatim.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Qwen-style, exercising namespace, loop controls, raise_exception, tojson (no HTML escaping), strftime_now,
# `is defined`, a {% generation %} block and whitespace control with and without "-".
QWEN_TEMPLATE = """{%- if messages[0]['role'] != 'system' %}
{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(users=0) %}
{%- for message in messages %}
    {%- if message['role'] not in ['system', 'user', 'assistant'] %}
        {{- raise_exception('Unknown role: ' + message['role']) }}
    {%- endif %}
    {%- if message.get('skip') %}{% continue %}{% endif %}
    {%- if message['role'] == 'user' %}{% set ns.users = ns.users + 1 %}{% endif %}
    {%- if message['role'] == 'assistant' %}
<|im_start|>assistant
{% generation %}{{ message['content'] }}{% endgeneration %}<|im_end|>
    {% else %}
        {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}
    {% endif %}
    {%- if message.meta is defined %}{{ message.meta | tojson }}
{% endif %}
    {%- if message.reasoning_content is defined %}<think>{{ message.reasoning_content }}</think>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\\n' }}
{%- endif %}
{%- if strftime_now is not defined %}{{ raise_exception('no strftime_now') }}{% endif %}
{{- '[users=' ~ ns.users ~ ']' }}"""

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "  What is 2+2?  "},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And <b>3+3</b> & more?", "meta": {"html": "<b>&'\"", "n": [1, 2]}},
]
CHAT_NO_SYSTEM = [
    {"role": "user", "content": "hi", "name": None},
    {"role": "assistant", "content": "hello", "reasoning": "greet back"},
    {"role": "user", "content": "skip me", "skip": True},
]


@lru_cache(maxsize=1)
def _trained_bpe() -> str:
    """A byte-level BPE (GPT-2/Llama 3 style) trained on CORPUS, as tokenizer.json text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return tok.to_str()


def base_vocab() -> int:
    from tokenizers import Tokenizer

    return Tokenizer.from_str(_trained_bpe()).get_vocab_size()


def make_tokenizer(out: Path, config: dict | None, bos_post: str | None = None, **files) -> Path:
    """Write tokenizer.json (with a post-processor prepending `bos_post`, if given) and the config files."""
    from tokenizers import Tokenizer, processors

    tok = Tokenizer.from_str(_trained_bpe())
    if bos_post is not None:
        bos = (bos_post, tok.token_to_id(bos_post))
        tok.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{bos_post}:0 $A:0", pair=f"{bos_post}:0 $A:0 {bos_post}:1 $B:1",
                                          special_tokens=[bos]),
        ])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    if config is not None:
        (out / "tokenizer_config.json").write_text(json.dumps(config))
    for name, content in files.items():
        name = name.replace("__", ".")
        (out / name).write_text(content if isinstance(content, str) else json.dumps(content))
    return out


def hf_tokenizer(path: Path, **kwargs):
    import transformers
    from transformers import AutoTokenizer

    transformers.logging.set_verbosity_error()
    return AutoTokenizer.from_pretrained(str(path), **kwargs)


def llama3(out: Path) -> Path:
    config = {"bos_token": "<|begin_of_text|>", "eos_token": {"content": "<|eot_id|>", "__type": "AddedToken"},
              "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": LLAMA3_TEMPLATE,
              "clean_up_tokenization_spaces": True}
    gen = {"bos_token_id": 0, "eos_token_id": [1, 2]}
    return make_tokenizer(out, config, bos_post="<|begin_of_text|>", generation_config__json=gen)


def qwen(out: Path) -> Path:
    config = {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "add_bos_token": False,
              "tokenizer_class": "Qwen2Tokenizer", "chat_template": QWEN_TEMPLATE,
              "additional_special_tokens": ["<|im_start|>", "<|im_end|>"]}
    return make_tokenizer(out, config, generation_config__json={"eos_token_id": [6, 7], "pad_token_id": 7})


def _same_as_hf(tok, hf, texts=TEXTS) -> None:
    for text in texts:
        ids, expected = tok.encode(text), hf.encode(text)
        if tok.bos_id is not None and expected[:2] == [tok.bos_id] * 2:
            expected = expected[1:]  # the text starts with the BOS string: transformers doubles BOS, we never do
        assert ids == expected, text
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True), text
        assert tok.decode(ids, skip_special_tokens=False) == hf.decode(ids, skip_special_tokens=False), text
        assert tok.encode(text, add_bos=False) == hf.encode(text, add_special_tokens=False), text


# --- encode / decode against transformers ------------------------------------------------------------
def test_llama3_style_bos_from_post_processor(tmp_path):
    tok, hf = load_tokenizer(llama3(tmp_path)), hf_tokenizer(tmp_path)
    assert tok.add_bos and tok.bos_token == "<|begin_of_text|>" and tok.bos_id == hf.bos_token_id == 0
    assert tok.eos_token == "<|eot_id|>" and tok.eos_id == hf.eos_token_id == 2
    assert tok.stop_ids == {1, 2} and tok.pad_id == tok.eos_id  # no pad token: falls back to EOS
    assert tok.vocab_size == len(hf) == base_vocab()
    _same_as_hf(tok, hf)
    assert tok.encode("Hello", add_bos=True)[0] == 0 and tok.encode("Hello", add_bos=False)[0] != 0


def test_qwen_style_no_bos(tmp_path):
    tok, hf = load_tokenizer(qwen(tmp_path)), hf_tokenizer(tmp_path)
    assert not tok.add_bos and tok.bos_id is None and tok.bos_token is None
    assert (tok.eos_id, tok.pad_id) == (hf.eos_token_id, hf.pad_token_id) == (6, 7)
    assert tok.stop_ids == {6, 7}
    _same_as_hf(tok, hf)
    assert tok.encode("Hello", add_bos=True) == tok.encode("Hello")  # no BOS token to add


@pytest.mark.parametrize("add_bos_token", [True, False])
@pytest.mark.parametrize("post_bos", [True, False])
def test_add_bos_token_setting_is_followed(tmp_path, add_bos_token, post_bos):
    """add_bos_token decides, whatever tokenizer.json's post-processor does: transformers given the setting."""
    config = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "add_bos_token": add_bos_token,
              "tokenizer_class": "LlamaTokenizerFast"}
    path = make_tokenizer(tmp_path, config, bos_post="<s>" if post_bos else None)
    tok, hf = load_tokenizer(path), hf_tokenizer(path, add_bos_token=add_bos_token)
    assert tok.add_bos is add_bos_token and tok.pad_id == hf.pad_token_id == SPECIALS.index("<pad>")
    _same_as_hf(tok, hf)
    assert (tok.encode("Hello")[0] == tok.bos_id) is add_bos_token


def test_add_bos_token_is_ignored_by_transformers_default_load(tmp_path):
    """Documents the one divergence: transformers 5 alone reads only tokenizer.json's post-processor."""
    config = {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True, "tokenizer_class": "PreTrainedTokenizerFast"}
    path = make_tokenizer(tmp_path, config)
    tok, hf = load_tokenizer(path), hf_tokenizer(path)
    assert tok.encode("Hello") == [tok.bos_id] + hf.encode("Hello")


def test_bos_never_doubled(tmp_path):
    tok, hf = load_tokenizer(llama3(tmp_path)), hf_tokenizer(tmp_path)
    text = tok.render_chat(CHAT[:2], add_generation_prompt=True)
    assert text.startswith("<|begin_of_text|>")
    ids = tok.encode(text)
    assert ids[:2] == [tok.bos_id, tok.encode("<|start_header_id|>", add_bos=False)[0]]
    assert ids == tok.encode(text, add_bos=False) == hf.apply_chat_template(CHAT[:2], add_generation_prompt=True,
                                                                           tokenize=True, return_dict=False)


def test_special_tokens_map_overrides_legacy_config(tmp_path):
    config = {"bos_token": "<s>", "eos_token": "</s>", "tokenizer_class": "PreTrainedTokenizerFast"}
    special_map = {"bos_token": {"content": "<|begin_of_text|>", "lstrip": False}, "eos_token": "<|end_of_text|>",
                   "pad_token": "<pad>"}
    path = make_tokenizer(tmp_path, config, bos_post="<|begin_of_text|>", special_tokens_map__json=special_map)
    tok, hf = load_tokenizer(path), hf_tokenizer(path)
    assert (tok.bos_token, tok.eos_token) == (hf.bos_token, hf.eos_token) == ("<|begin_of_text|>", "<|end_of_text|>")
    assert tok.pad_id == hf.pad_token_id
    _same_as_hf(tok, hf)


def test_token_missing_from_vocab_is_appended_like_transformers(tmp_path):
    config = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<|brand_new_pad|>",
              "tokenizer_class": "PreTrainedTokenizerFast"}
    path = make_tokenizer(tmp_path, config)
    tok, hf = load_tokenizer(path), hf_tokenizer(path)
    assert tok.pad_id == hf.pad_token_id == base_vocab() and tok.vocab_size == len(hf) == base_vocab() + 1
    _same_as_hf(tok, hf, TEXTS + ["a <|brand_new_pad|> b"])


def test_eos_from_generation_config_when_tokenizer_names_none(tmp_path):
    path = make_tokenizer(tmp_path, None, generation_config__json={"eos_token_id": 9, "bos_token_id": 8})
    tok = load_tokenizer(path)
    assert (tok.eos_token, tok.eos_id, tok.pad_id, tok.stop_ids) == ("</s>", 9, 9, {9})
    assert (tok.bos_token, tok.bos_id, tok.add_bos) == ("<s>", 8, False)  # no post-processor BOS, no setting


# --- chat templates ----------------------------------------------------------------------------------
@pytest.mark.parametrize("maker", [llama3, qwen])
@pytest.mark.parametrize("chat", [CHAT, CHAT_NO_SYSTEM, CHAT[:1]])
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_render_chat_matches_transformers(tmp_path, maker, chat, add_generation_prompt):
    tok, hf = load_tokenizer(maker(tmp_path)), hf_tokenizer(tmp_path)
    expected = hf.apply_chat_template(chat, add_generation_prompt=add_generation_prompt, tokenize=False)
    assert tok.render_chat(chat, add_generation_prompt=add_generation_prompt) == expected


def test_render_chat_qwen_details(tmp_path):
    tok = load_tokenizer(qwen(tmp_path))
    text = tok.render_chat(CHAT)
    assert '{"html": "<b>&\'\\"", "n": [1, 2]}' in text  # tojson does not HTML-escape
    assert text.endswith("[users=2]")
    assert "<think>greet back</think>" in tok.render_chat(CHAT_NO_SYSTEM)  # reasoning aliased
    from jinja2.exceptions import TemplateError

    with pytest.raises(TemplateError, match="Unknown role: robot"):
        tok.render_chat([{"role": "robot", "content": "beep"}])


def test_template_sandbox_blocks_private_attributes(tmp_path):
    from jinja2.exceptions import SecurityError

    evil = "{{ messages.__class__.__mro__ }}{% set ns = namespace() %}"
    path = make_tokenizer(tmp_path, {"eos_token": "</s>", "chat_template": evil})
    with pytest.raises(SecurityError):
        load_tokenizer(path).render_chat(CHAT)
    path = make_tokenizer(tmp_path, {"eos_token": "</s>", "chat_template": "{% set ns = namespace(_x=1) %}"})
    with pytest.raises(SecurityError):
        load_tokenizer(path).render_chat(CHAT)


def test_chat_template_file_precedence(tmp_path):
    config = {"eos_token": "</s>", "chat_template": "from config", "tokenizer_class": "PreTrainedTokenizerFast"}
    a = make_tokenizer(tmp_path / "a", config, chat_template__jinja="from jinja {{ messages | length }}")
    assert load_tokenizer(a).render_chat(CHAT) == hf_tokenizer(a).apply_chat_template(CHAT, tokenize=False) == \
        "from jinja 4"
    b = make_tokenizer(tmp_path / "b", {"eos_token": "</s>"}, chat_template__json={"chat_template": "from json"})
    assert load_tokenizer(b).render_chat(CHAT) == "from json"
    c = make_tokenizer(tmp_path / "c", {"eos_token": "</s>", "chat_template": [
        {"name": "tool_use", "template": "tools"}, {"name": "default", "template": "default one"}]})
    assert load_tokenizer(c).render_chat(CHAT) == "default one"


def test_builtin_template_when_checkpoint_has_none(tmp_path):
    tok = load_tokenizer(make_tokenizer(tmp_path, {"eos_token": "</s>"}))
    assert tok.chat_template is None
    assert tok.render_chat(CHAT[1:3], add_generation_prompt=True) == (
        "<|im_start|>user\n  What is 2+2?  <|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n<|im_start|>assistant\n")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>",
                                                                "chat_template": BUILTIN_CHAT_TEMPLATE}))
    assert hf_tokenizer(tmp_path).apply_chat_template(CHAT[1:3], add_generation_prompt=True, tokenize=False) == \
        tok.render_chat(CHAT[1:3], add_generation_prompt=True)


# --- save --------------------------------------------------------------------------------------------
def test_save_round_trips(tmp_path):
    src = llama3(tmp_path / "src")
    (src / "chat_template.jinja").write_text(LLAMA3_TEMPLATE)
    tok = load_tokenizer(src)
    tok.save(tmp_path / "out")
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["chat_template.jinja", "tokenizer.json", "tokenizer_config.json"]
    again = load_tokenizer(tmp_path / "out")
    hf = hf_tokenizer(tmp_path / "out")
    assert again.render_chat(CHAT) == tok.render_chat(CHAT) == hf.apply_chat_template(CHAT, tokenize=False)
    assert [again.encode(t) for t in TEXTS] == [tok.encode(t) for t in TEXTS] == [hf.encode(t) for t in TEXTS]
    tok.save(src)  # saving onto itself is a no-op, not a truncation
    assert load_tokenizer(src).encode("Hello") == tok.encode("Hello")


# --- bad input ---------------------------------------------------------------------------------------
def test_missing_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                                  "generation_config.json", "chat_template.json"])
def test_corrupt_json_names_the_file(tmp_path, name):
    make_tokenizer(tmp_path, {"eos_token": "</s>"})
    (tmp_path / name).write_text('{"truncated": ')
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        load_tokenizer(tmp_path)


def test_unloadable_tokenizer_json(tmp_path):
    make_tokenizer(tmp_path, {"eos_token": "</s>"})
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "NoSuchModel"}}))
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        load_tokenizer(tmp_path)


def test_no_eos_anywhere(tmp_path):
    make_tokenizer(tmp_path, {"bos_token": "<s>"})
    with pytest.raises(CheckpointError, match="eos"):
        load_tokenizer(tmp_path)


def test_not_a_directory(tmp_path):
    with pytest.raises(CheckpointError):
        load_tokenizer(tmp_path / "nope")
