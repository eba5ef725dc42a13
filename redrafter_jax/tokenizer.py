"""Tokenizer: a `tokenizers.Tokenizer` plus the model's chat template and special ids."""

from __future__ import annotations

import datetime
import functools
import json
from typing import NamedTuple

import jinja2
import jinja2.ext
import jinja2.sandbox
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers

# llama.cpp's byte-level BPE pre-tokenizers: regexes that split text in turn (a regex's matches and the text
# between them are both pieces, which the next one splits further), as its unicode_regex_split applies them
_GPT2_REGEX = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"""
_LLAMA3_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+"""
                 r"""[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
_QWEN2_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"""
                r"""[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
# Seed-Coder's (Seed-OSS's): Qwen2's, but a run of punctuation stops at a line break
_SEED_CODER_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}\r\n]+"""
                     r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
# words split before capitals (as the models' own tokenizers split them: llama.cpp approximates the cases)
_CASED_WORDS = (r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+""",
                r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*""")
_CASED_REST = r""" ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
# o200k's (GPT-4o's, GPT-OSS's): contractions kept with their word, numbers in threes
_O200K_REGEX = "|".join([w + r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?" for w in _CASED_WORDS] + [r"\p{N}{1,3}", _CASED_REST])
# Tekken's (Mistral NeMo's, Ministral's, Pixtral's): no contractions, digits one by one
_TEKKEN_REGEX = "|".join([*_CASED_WORDS, r"\p{N}", _CASED_REST])
# DeepSeek LLM's and Coder's: line breaks alone, then words (a space before each), punctuation, CJK and Hangul
# runs, numbers. DeepSeek LLM's letters are the cased ones its tokenizer.json lists (written here as escapes:
# some, like U+2126 OHM SIGN, would change under Unicode normalisation)
_DEEPSEEK_LETTERS = (
    "A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af\u0370-\u0373"
    "\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5\u03f7-\u0481\u048a-"
    "\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-"
    "\u1d77\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d"
    "\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-"
    "\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-"
    "\u212d\u212f-\u2134\u2139\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-"
    "\u2cee\u2cf2\u2cf3\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-"
    "\ufb06\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3\U000104d8-"
    "\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df\U0001e900-\U0001e943")
_DEEPSEEK_CJK = "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"
_DEEPSEEK_LLM = ("[\r\n]", rf"\s?[{_DEEPSEEK_LETTERS}]+",
                 "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+", r"\s+$", _DEEPSEEK_CJK, r"\p{N}+")
_DEEPSEEK_CODER = ("[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _DEEPSEEK_CJK, r"\p{N}")


class _Pre(NamedTuple):
    splits: tuple[str, ...]
    ignore_merges: bool = False  # a piece that is a token stays one, unmerged (llama.cpp's and the model's own)
    add_bos: bool = False  # a BOS leads the text where the file does not say (tokenizer.ggml.add_bos_token)


_LLAMA3 = _Pre((_LLAMA3_REGEX,), ignore_merges=True, add_bos=True)
# by the names llama.cpp's converter writes (`tokenizer.ggml.pre`), as llama.cpp reads each
GGUF_PRE_TOKENIZERS = {
    # (what llama.cpp also does where the file names none)
    "default": _Pre((r"[\p{P}\$\+<=>\^~\|]+", _GPT2_REGEX, r"\p{N}+", "[0-9][0-9][0-9]")),
    **dict.fromkeys(("gpt-2", "phi-2", "mpt", "olmo", "jais", "trillion", "granite-docling", "exaone4", "a.x-4.0",
                     "mellum", "gigachat"), _Pre((_GPT2_REGEX,))),
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b", "mellum2"),
                    _Pre((r"\p{N}", _GPT2_REGEX))),  # digits one by one first
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2"),
                    _LLAMA3),
    **dict.fromkeys(("dbrx", "smaug-bpe", "chatglm-bpe"), _Pre(_LLAMA3.splits)),
    **dict.fromkeys(("glm4", "glm5"), _Pre(_LLAMA3.splits, ignore_merges=True)),  # (their tokenizer.json's)
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "megrez", "stablelm2", "hunyuan"), _Pre((_QWEN2_REGEX,))),
    "seed-coder": _Pre((_SEED_CODER_REGEX,)),
    **dict.fromkeys(("gpt-4o", "llama4", "minimax-m2", "kanana2", "talkie"), _Pre((_O200K_REGEX,))),
    # Tiny Aya's: numbers in threes from their last digit, then o200k's
    **dict.fromkeys(("tiny_aya", "cohere2moe"), _Pre((r"\d{1,3}(?=(?:\d{3})*\b)", _O200K_REGEX))),
    "tekken": _Pre((_TEKKEN_REGEX,), ignore_merges=True, add_bos=True),
    "deepseek-llm": _Pre(_DEEPSEEK_LLM),
    "deepseek-coder": _Pre(_DEEPSEEK_CODER),
    # Viking's: runs of anything but spaces and sentence punctuation, then digits one by one
    "viking": _Pre((" ?[^(\\s|.,!?\u2026\u3002\uff0c\u3001\u0964\u06d4\u060c)]+", r"\p{N}")),
}


def _gguf_pre(name: str) -> _Pre:
    if name not in GGUF_PRE_TOKENIZERS:
        raise ValueError(f"unsupported GGUF pre-tokenizer {name!r} (supported: {', '.join(GGUF_PRE_TOKENIZERS)})")
    return GGUF_PRE_TOKENIZERS[name]


def _gguf_pre_tokenizer(name: str) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [pre_tokenizers.Split(tokenizers.Regex(r), behavior="isolated", invert=False) for r in _gguf_pre(name).splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


_NORMAL = 1  # GGUF token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte


def _sentencepiece_bpe(vocab: dict[str, int], tokens: list[str], scores: list[float], token_types: list[int],
                       unknown_token_id: int, add_space_prefix: bool) -> tokenizers.Tokenizer:
    """SentencePiece's BPE as `tokenizers` pieces: it merges the adjacent pair whose merged piece scores
    highest, so the merges are every split of a piece into two pieces, ranked by that piece's score;
    spaces are "▁" (one prepended, as SentencePiece's dummy prefix), bytes without a piece are <0xNN>."""
    if scores is None:
        raise ValueError("GGUF SentencePiece vocabulary without tokenizer.ggml.scores")
    normal = {t for t, ty in zip(tokens, token_types) if ty == _NORMAL}
    ranked = []  # (-score, -len(left), left, right): best first; ties as transformers' converter orders them
    for piece, score in zip(tokens, scores):
        if piece in normal:
            ranked += [(-score, -k, piece[:k], piece[k:]) for k in range(1, len(piece))
                       if piece[:k] in normal and piece[k:] in normal]
    ranked.sort(key=lambda m: m[:2])
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[m[2:] for m in ranked],
                                          unk_token=tokens[unknown_token_id], fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581")] * add_space_prefix
                                          + [normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
                                    + [decoders.Strip(" ", 1, 0)] * add_space_prefix)
    return tok


def _raise_exception(message: str):
    raise jinja2.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=8)
def _chat_template(source: str) -> jinja2.Template:
    """The template compiled in the environment Hugging Face's `apply_chat_template` gives templates, so
    that a prompt renders as transformers renders it: loop controls ({% break %}), JSON without HTML
    escaping, `strftime_now` (Llama 3's templates date their system header with it), `raise_exception`."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception,
                       strftime_now=lambda fmt: datetime.datetime.now().strftime(fmt))
    return env.from_string(source)


# What apply_chat_template itself gives the template: not for callers to set.
_TEMPLATE_OWN = ("messages", "add_generation_prompt", "bos_token", "eos_token")


class Tokenizer:
    """`template_vars`: more variables for the chat template, as transformers' `apply_chat_template(...,
    **kwargs)` passes them (Qwen3's `enable_thinking`, Llama 3's `date_string`, ...)."""

    def __init__(self, tok: tokenizers.Tokenizer, chat_template: str | None,
                 bos_token_id: int | None, eos_token_ids: tuple[int, ...], add_bos: bool = False,
                 template_vars: dict | None = None):
        self.tok = tok
        self.chat_template = chat_template
        self.bos_token_id = bos_token_id
        self.eos_token_ids = eos_token_ids
        self.add_bos = add_bos
        self.template_vars = self._checked_vars(template_vars or {})

    @staticmethod
    def _checked_vars(template_vars: dict) -> dict:
        if own := sorted(set(template_vars) & set(_TEMPLATE_OWN)):
            raise ValueError(f"chat template variables {own} are set by apply_chat_template itself")
        return dict(template_vars)

    def with_template_vars(self, **template_vars) -> "Tokenizer":
        """This tokenizer with more chat template variables (e.g. enable_thinking=False), for every chat it
        renders: prompts, and training's loss masks."""
        return Tokenizer(self.tok, self.chat_template, self.bos_token_id, self.eos_token_ids, self.add_bos,
                         {**self.template_vars, **template_vars})

    @classmethod
    def from_gguf_vocab(cls, model: str, pre: str, tokens: list[str], token_types: list[int],
                        merges: list[str] | None, chat_template: str | None, bos_token_id: int | None,
                        eos_token_ids: tuple[int, ...], add_bos: bool | None, scores: list[float] | None = None,
                        unknown_token_id: int = 0, add_space_prefix: bool = True) -> "Tokenizer":
        """A tokenizer from GGUF `tokenizer.ggml.*` metadata: byte-level BPE ("gpt2": its merges and
        pre-tokenizer) or SentencePiece BPE ("llama": Llama 1/2's, Mistral 7B's, TinyLlama's; its pieces'
        scores, as transformers converts a SentencePiece model). add_bos None: llama.cpp's default for the
        vocabulary (SentencePiece's and some pre-tokenizers' a BOS)."""
        vocab = {t: i for i, t in enumerate(tokens)}
        if model == "gpt2":
            pairs, spec = [tuple(m.split(" ", 1)) for m in merges], _gguf_pre(pre)
            tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False,
                                                  ignore_merges=spec.ignore_merges))
            tok.pre_tokenizer = _gguf_pre_tokenizer(pre)
            tok.decoder = decoders.ByteLevel()
            default_bos = spec.add_bos
        elif model == "llama":
            tok = _sentencepiece_bpe(vocab, tokens, scores, token_types, unknown_token_id, add_space_prefix)
            default_bos = True
        else:
            raise ValueError(f"unsupported GGUF tokenizer model {model!r} (supported: gpt2 byte-level BPE, llama "
                             f"SentencePiece BPE)")
        # token type 3 = control, 4 = user-defined: matched whole in text, never split by BPE.
        special = [tokenizers.AddedToken(t, special=True, normalized=False)
                   for t, ty in zip(tokens, token_types) if ty in (3, 4)]
        tok.add_special_tokens(special)
        return cls(tok, chat_template, bos_token_id, eos_token_ids, default_bos if add_bos is None else add_bos)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    @staticmethod
    def check_text(text, what: str = "text") -> str:
        """Raises a clear error for anything but valid Unicode text (e.g. undecodable bytes on a command line)."""
        if not isinstance(text, str):
            raise TypeError(f"{what} must be a str, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"{what} is not valid UTF-8 text") from None
        return text

    def encode(self, text: str) -> list[int]:
        ids = self.tok.encode(self.check_text(text), add_special_tokens=False).ids
        if self.add_bos and self.bos_token_id is not None:
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            **template_vars) -> str:
        """The chat as the template renders it, with the tokenizer's `template_vars` and these."""
        if not self.chat_template:
            raise ValueError("this model has no chat template; pass a plain prompt instead")
        for i, m in enumerate(messages):
            self.check_text(m.get("content"), f"message {i}'s content")
        bos = self.tok.id_to_token(self.bos_token_id) if self.bos_token_id is not None else ""
        eos = self.tok.id_to_token(self.eos_token_ids[0]) if self.eos_token_ids else ""
        return _chat_template(self.chat_template).render(
            **self._checked_vars({**self.template_vars, **template_vars}), messages=messages,
            add_generation_prompt=add_generation_prompt, bos_token=bos, eos_token=eos)

    def encode_chat(self, messages: list[dict], **template_vars) -> list[int]:
        """Token ids of a chat rendered with the template, ready for the assistant's reply.

        Templates write any BOS themselves, so none is added here.
        """
        return self.tok.encode(self.apply_chat_template(messages, **template_vars), add_special_tokens=False).ids
