"""Chat templates render exactly as transformers' apply_chat_template (the reference)."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from gateway.http.chat import ChatTemplate, NoChatTemplateError
from moemesh.errors import InvalidRequestError
from moemesh.model.config import load_config
from moemesh.model.tiny import TinySpec, write_tiny_model
from moemesh.text import TextCodec

MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": 'hi "there" <b> é'},
            {"role": "assistant", "content": "hello"}, {"role": "user", "content": "again"}]
# A template that uses what Hub templates use: tojson, loop controls, namespace-free logic.
FANCY = ("{% for m in messages %}{% if loop.index > 3 %}{% break %}{% endif %}"
         "{{ m['role'] | upper }}={{ m['content'] | tojson }}\n{% endfor %}"
         "{% if add_generation_prompt %}ASSISTANT={% endif %}{{ eos_token }}")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("chat") / "m", TinySpec(layers=1, experts=2, hidden=32,
                                                                           intermediate=32, heads=2, kv_heads=1))


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_the_tiny_template_renders_and_tokenizes_as_transformers(model_dir, add_generation_prompt):
    reference = AutoTokenizer.from_pretrained(str(model_dir))
    template = ChatTemplate.load(model_dir, add_bos=True)
    text = reference.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert template.render(MESSAGES, add_generation_prompt) == text
    ids = reference.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=add_generation_prompt,
                                        return_dict=True)["input_ids"]
    codec = TextCodec(model_dir, load_config(model_dir))  # what the gateway does with the prompt text
    assert codec.encode(template.prompt(MESSAGES, add_generation_prompt)) == ids


def test_a_template_from_the_config_with_filters_and_loop_controls(model_dir, tmp_path):
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer.json").write_bytes((model_dir / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": FANCY}))
    reference = AutoTokenizer.from_pretrained(str(tmp_path))
    expected = reference.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert ChatTemplate.load(tmp_path, add_bos=True).render(MESSAGES) == expected
    assert expected.count("\n") == 3  # loop.index > 3 broke out


def test_raise_exception_and_a_missing_template_are_bad_requests(model_dir, tmp_path):
    with pytest.raises(InvalidRequestError, match="roles are system, user and assistant, got tool"):
        ChatTemplate.load(model_dir, add_bos=True).render([{"role": "tool", "content": "x"}])
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(NoChatTemplateError, match="no chat template"):
        ChatTemplate.load(tmp_path, add_bos=True).render(MESSAGES)
