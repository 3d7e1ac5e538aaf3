"""A byte-level tokenizer for tiny test checkpoints, built offline with `tokenizers`.

Ids 0, 1, 2 are the specials "<s>" (bos), "</s>" (eos) and "<pad>"; ids 3..258 are the 256
bytes. The model is a BPE with an empty merge list, so every UTF-8 byte is exactly one token
and any text round-trips through encode/decode. The ByteLevel pre-tokenizer maps each byte to
a printable character (GPT-2's byte-to-unicode table) and the ByteLevel decoder maps it back.

Encoding adds no special tokens: a caller that wants a leading "<s>" prepends BOS_ID itself.
As in Hugging Face tokenizers, the literal strings "<s>", "</s>", "<pad>" in text encode to their
special ids; decode with skip_special_tokens=False to get such text back verbatim.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from moemesh.errors import CheckpointError

BOS_TOKEN, EOS_TOKEN, PAD_TOKEN = "<s>", "</s>", "<pad>"
BOS_ID, EOS_ID, PAD_ID = 0, 1, 2
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)
NUM_BYTE_TOKENS = 256
TOKENIZER_VOCAB_SIZE = len(SPECIAL_TOKENS) + NUM_BYTE_TOKENS  # 259: a model's vocab must be >= this
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
# A small chat template in the Hugging Face form (jinja2, rendered by apply_chat_template), so the
# gateway's chat API can be tested on tiny checkpoints: BOS, one "<|role|>\ncontent\n" block per
# message, "<|assistant|>\n" to prompt a reply; an unknown role is refused with raise_exception.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('roles are system, user and assistant, got ' + message['role']) }}{% endif %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def build_byte_tokenizer() -> Tokenizer:
    """Return the byte-level tokenizer: specials at ids 0..2, byte b at id 3 + b."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    byte_chars = _byte_to_char()
    assert set(byte_chars.values()) == set(pre_tokenizers.ByteLevel.alphabet())
    for byte in range(NUM_BYTE_TOKENS):
        vocab[byte_chars[byte]] = len(SPECIAL_TOKENS) + byte
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    # use_regex=False: no word splitting is needed when every byte is its own token.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return tokenizer


def save_tokenizer(out_dir: str | Path) -> Path:
    """Write tokenizer.json and a minimal tokenizer_config.json (with CHAT_TEMPLATE) into `out_dir`;
    return tokenizer.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / TOKENIZER_FILE
    build_byte_tokenizer().save(str(path))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / TOKENIZER_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return path


def load_tokenizer(model_dir: str | Path) -> Tokenizer:
    """Load `model_dir/tokenizer.json`; raises CheckpointError if it is missing or unreadable."""
    path = Path(model_dir) / TOKENIZER_FILE
    if not path.is_file():
        raise CheckpointError(
            f"no {TOKENIZER_FILE} in {model_dir}: moemesh needs a fast (tokenizers-library) tokenizer"
        )
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception on malformed files
        raise CheckpointError(f"{path} is not a valid tokenizers file: {exc}") from exc


def _byte_to_char() -> dict[int, str]:
    """GPT-2's byte -> printable-character table, the one the ByteLevel pre-tokenizer uses."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for byte in range(NUM_BYTE_TOKENS):
        if byte not in table:
            table[byte] = chr(NUM_BYTE_TOKENS + extra)
            extra += 1
    return table
