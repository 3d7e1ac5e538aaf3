"""Chat messages -> prompt text with the checkpoint's chat template, rendered as transformers does.

The template is tokenizer_config.json's `chat_template` (a string, or a list of named templates:
the one named "default"), or a `chat_template.jinja` file beside it (where newer transformers
saves it). It is rendered like transformers' `apply_chat_template(tokenize=False)`: jinja2's
ImmutableSandboxedEnvironment with trim_blocks and lstrip_blocks, the loopcontrols extension, the
`tojson` filter that does not escape HTML, `raise_exception` (a template's way to refuse a
conversation: InvalidRequestError, 400), `strftime_now`; the variables are `messages`,
`add_generation_prompt` and the tokenizer's special tokens (`bos_token`, `eos_token`, ...).

The gateway's tokenizer puts BOS in front of every prompt text itself (moemesh.text.TextCodec),
where transformers tokenizes a rendered chat without adding special tokens; a rendered text that
begins with the BOS token's text has it removed here (`ChatTemplate.prompt`), so the ids are the
ones transformers would give.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from moemesh.errors import CheckpointError, InvalidRequestError
from moemesh.model.tokenizer import TOKENIZER_CONFIG_FILE

TEMPLATE_FILE = "chat_template.jinja"
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


class NoChatTemplateError(InvalidRequestError):
    """The model has no chat template, so /v1/chat/completions cannot serve it (400)."""


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _template_source(model_dir: Path, config: dict[str, Any]) -> str | None:
    source = config.get("chat_template")
    if isinstance(source, list):  # [{"name": ..., "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        source = named.get("default")
    if source is None and (model_dir / TEMPLATE_FILE).is_file():
        source = (model_dir / TEMPLATE_FILE).read_text()
    return source if isinstance(source, str) else None


class ChatTemplate:
    """The checkpoint's chat template (or none) and the special tokens it may refer to."""

    def __init__(self, source: str | None, special_tokens: dict[str, str], add_bos: bool):
        self.source = source
        self.special_tokens = special_tokens
        self.add_bos = add_bos  # the gateway's tokenizer adds BOS to every prompt text
        try:
            self._template = _environment().from_string(source) if source is not None else None
        except jinja2.exceptions.TemplateError as exc:
            raise CheckpointError(f"the chat template does not compile: {exc}") from exc

    @classmethod
    def load(cls, model_dir: Path, add_bos: bool) -> ChatTemplate:
        """From `model_dir`'s tokenizer_config.json (and chat_template.jinja); a model without one
        loads too (chat then answers NoChatTemplateError)."""
        path = Path(model_dir) / TOKENIZER_CONFIG_FILE
        try:
            config = json.loads(path.read_text()) if path.is_file() else {}
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"cannot read {path}: {exc}") from exc
        tokens = {name: text for name in SPECIAL_TOKENS if (text := _token_text(config.get(name))) is not None}
        return cls(_template_source(Path(model_dir), config), tokens, add_bos)

    def render(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """The conversation as the template writes it; InvalidRequestError when the template refuses it."""
        if self._template is None:
            raise NoChatTemplateError("this model has no chat template (no chat_template in its "
                                      "tokenizer_config.json): use /v1/completions with a prompt")
        try:
            return self._template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                         tools=None, documents=None, **self.special_tokens)
        except (jinja2.exceptions.TemplateError, TypeError) as exc:  # raise_exception, or a template error
            raise InvalidRequestError(f"the chat template refused the messages: {exc}") from None

    def prompt(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """The prompt text to tokenize: `render`, less a leading BOS text the tokenizer adds anyway."""
        text = self.render(messages, add_generation_prompt)
        bos = self.special_tokens.get("bos_token")
        if self.add_bos and bos and text.startswith(bos):
            return text[len(bos):]
        return text
