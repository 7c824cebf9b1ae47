"""An engine folder's tokenizer, read with `tokenizers` and `jinja2` alone (no transformers, no torch).

The export writes `tokenizer/` with transformers' `save_pretrained`: `tokenizer.json` (the whole
`tokenizers` pipeline as transformers ran it: normalizer, pre-tokenizer, model, post-processor,
decoder, added tokens and which of them are special), `tokenizer_config.json` (the named special
tokens) and `chat_template.jinja` (or a `chat_template` entry in the config). This class does
what the runtime needs of it the way transformers' `TokenizersBackend` does it: `encode`,
`decode`, `apply_chat_template` (the same sandboxed Jinja environment and template variables),
`eos_token_id`, `get_vocab`. tests/test_packaging.py checks it against `AutoTokenizer` on an engine.
`TokenTable` gives each token id its own bytes and display string (what logprobs responses show).
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from mtad_trt.errors import EngineFolderError

# transformers' SPECIAL_TOKENS_ATTRIBUTES: what a chat template sees as variables (bos_token, ...).
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# Names a message's reasoning goes by; templates read the first (transformers aliases the others).
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _token_text(value) -> str | None:
    """A special token as the config stores it: a string, or an AddedToken dict with `content`."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise EngineFolderError(f"cannot read {path}: {e}") from None


class Tokenizer:
    """The subset of a Hugging Face fast tokenizer that the runtime uses, with the same results."""

    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer as Backend

        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise EngineFolderError(f"engine folder has no tokenizer at {path}: re-export the engine")
        self.path = path
        try:
            self.backend = Backend.from_file(str(path / "tokenizer.json"))
        except Exception as e:  # tokenizers raises plain Exceptions for unreadable files
            raise EngineFolderError(f"cannot load the tokenizer at {path}: {e}") from None
        # transformers encodes without truncation or padding unless asked, and keeps special tokens whole
        self.backend.no_truncation()
        self.backend.no_padding()
        self.backend.encode_special_tokens = False
        config = _read_json(path / "tokenizer_config.json")
        legacy = _read_json(path / "special_tokens_map.json")
        self.special_tokens = {}
        for name in SPECIAL_TOKENS:
            text = _token_text(config.get(name, legacy.get(name)))
            if text is not None:
                self.special_tokens[name] = text
        self.clean_up_tokenization_spaces = bool(config.get("clean_up_tokenization_spaces", False)) and (
            type(self.backend.model).__name__ != "BPE"
            or bool(config.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output"))
        )
        self.chat_template = self._chat_template(path, config)

    @staticmethod
    def _chat_template(path: Path, config: dict) -> str | None:
        """The default template: `chat_template.jinja`, else the config's (a string, or a named list)."""
        file = path / "chat_template.jinja"
        if file.is_file():
            return file.read_text(encoding="utf-8")
        template = config.get("chat_template")
        if isinstance(template, list):
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        return template if isinstance(template, str) and template else None

    # -- ids -----------------------------------------------------------------------------------
    def _id(self, name: str) -> int | None:
        text = self.special_tokens.get(name)
        return None if text is None else self.backend.token_to_id(text)

    @property
    def eos_token_id(self) -> int | None:
        return self._id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._id("pad_token")

    @property
    def bos_token_id(self) -> int | None:
        return self._id("bos_token")

    def get_vocab(self) -> dict[str, int]:
        return self.backend.get_vocab(with_added_tokens=True)

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    # -- text ----------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.backend.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        text = self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        return clean_up_tokenization(text) if self.clean_up_tokenization_spaces else text

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False,
                            tokenize: bool = True) -> str | list[int]:
        """Render `messages` with the chat template; tokenized without added special tokens (the
        template writes them), as transformers does."""
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template")
        chat = [{k: v for k, v in m.items() if v is not None} for m in messages]
        chat = [_alias_reasoning(m) for m in chat]
        text = _compile(self.chat_template).render(messages=chat, tools=None, documents=None,
                                                   add_generation_prompt=add_generation_prompt,
                                                   **self.special_tokens)
        return self.encode(text, add_special_tokens=False) if tokenize else text


def clean_up_tokenization(text: str) -> str:
    """transformers' `clean_up_tokenization` (spaces before punctuation and in contractions)."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
                 (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


def _alias_reasoning(message: dict) -> dict:
    reasoning = next((message[k] for k in REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


@lru_cache(maxsize=8)
def _compile(template: str):
    """The template in the environment transformers renders chat templates in: sandboxed and
    immutable, trim_blocks + lstrip_blocks, loop controls, `{% generation %}` blocks, and the globals
    and filters Hub templates use (raise_exception, strftime_now, tojson without HTML escaping)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` marks assistant text; rendering keeps it as is."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    class Namespace(jinja2.utils.Namespace):
        """jinja's namespace() without underscore attributes (no way to CPython internals)."""

        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates cannot set {name!r} on a namespace")

    class TemplateDict:
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = Namespace
    return env.from_string(template)


# -- token strings -----------------------------------------------------------------------------------
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the character a byte-level BPE vocabulary writes for
    each byte -> that byte (printable bytes stand for themselves, the rest are shifted past 255)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = list(bs)
    shifted = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + shifted)
            shifted += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class TokenTable:
    """Each token id's bytes and display string, as logprobs responses show tokens.

    The bytes are the token's own: for a byte-level BPE vocabulary (GPT-2, Qwen, Llama 3) its
    vocabulary entry mapped back through the byte alphabet, so a token holding part of a UTF-8
    character has exactly those bytes; a SentencePiece `<0xNN>` byte token is that byte; other
    entries are their text with `▁` as a space; added tokens (`<|im_end|>`) are their content. The
    display string is the bytes as UTF-8, or OpenAI's `bytes:\\xNN...` where they are not valid
    UTF-8 on their own. Distinct tokens have distinct strings, so `top_logprobs` dicts lose none.
    """

    def __init__(self, tokenizer) -> None:
        backend = getattr(tokenizer, "backend", None) or getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise TypeError(f"cannot read token strings from a {type(tokenizer).__name__}")
        self.backend = backend
        self.added = {int(i): t.content for i, t in backend.get_added_tokens_decoder().items()}
        self.special = {int(i) for i, t in backend.get_added_tokens_decoder().items() if t.special}
        self.byte_level = _has_byte_level(json.loads(backend.to_str()).get("decoder"))
        self._bytes: dict[int, bytes] = {}
        self._text: dict[int, str] = {}
        self._decoder = _byte_decoder()

    def bytes(self, tid: int) -> bytes:
        b = self._bytes.get(tid)
        if b is None:
            b = self._bytes[tid] = self._token_bytes(tid)
        return b

    def _token_bytes(self, tid: int) -> bytes:
        if tid in self.added:
            return self.added[tid].encode("utf-8")
        tok = self.backend.id_to_token(tid)
        if tok is None:
            return b""
        if self.byte_level:
            d = self._decoder
            return b"".join(bytes([d[ch]]) if ch in d else ch.encode("utf-8") for ch in tok)
        m = _BYTE_FALLBACK.fullmatch(tok)
        if m:
            return bytes([int(m.group(1), 16)])
        return tok.replace("\u2581", " ").encode("utf-8")

    def text(self, tid: int) -> str:
        s = self._text.get(tid)
        if s is None:
            b = self.bytes(tid)
            try:
                s = b.decode("utf-8")
            except UnicodeDecodeError:
                s = "bytes:" + "".join(f"\\x{x:02x}" for x in b)
            self._text[tid] = s
        return s

    def width(self, tid: int, skip_special: bool) -> int:
        """How many characters the token starts in decoded text (a UTF-8 continuation byte starts
        none; a special token skipped in the text has none)."""
        if skip_special and tid in self.special:
            return 0
        return sum(1 for x in self.bytes(tid) if x & 0xC0 != 0x80)


def _has_byte_level(node: Any) -> bool:
    if isinstance(node, dict):
        return node.get("type") == "ByteLevel" or any(_has_byte_level(v) for v in node.values())
    if isinstance(node, list):
        return any(_has_byte_level(v) for v in node)
    return False
