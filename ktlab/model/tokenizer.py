"""Byte-level BPE tokenizer and chat template, rebuilt from GGUF metadata.

The GGUF stores the vocabulary (``tokenizer.ggml.tokens``), the merges, the token types and
the name of the pre-tokenizer (``tokenizer.ggml.pre``). We rebuild an equivalent
``tokenizers.Tokenizer`` from them and render ``tokenizer.chat_template`` with jinja2.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import jinja2
import jinja2.sandbox
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

# Pre-tokenizer split patterns, keyed by the GGUF ``tokenizer.ggml.pre`` name (a tuple: splits applied
# one after the other, as a tokenizer.json Sequence of Splits).
PRETOKENIZER_PATTERNS: dict[str, str | tuple[str, ...]] = {
    "qwen2": (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
        r"|\s*[\r\n]+|\s+(?!\S)|\s+"
    ),
    "gpt2": r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+",
}
PRETOKENIZER_PATTERNS["olmo"] = PRETOKENIZER_PATTERNS["gpt2"]  # OLMoE's files: GPT-2's split (as llama.cpp)
# Qwen3.5's: Qwen2's with combining marks (\p{M}) kept in words (its tokenizer.json, as llama.cpp).
PRETOKENIZER_PATTERNS["qwen35"] = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# DeepSeek-V3 / R1's: digits in threes, CJK runs, then words and punctuation (its tokenizer.json, as llama.cpp).
PRETOKENIZER_PATTERNS["deepseek-v3"] = (
    r"\p{N}{1,3}",
    "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
    r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+",
)

# gpt-oss's o200k (GGUF "gpt-4o", as llama.cpp and tiktoken's o200k_base): words split before an
# upper-case run ("HelloWorld" -> "Hello", "World") with their contractions, digits in threes,
# punctuation runs with their trailing newlines or slashes.
_O200K_WORD = r"[^\r\n\p{L}\p{N}]?"
PRETOKENIZER_PATTERNS["gpt-4o"] = (
    _O200K_WORD + r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|" + _O200K_WORD + r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Kimi-K2's (GGUF "kimi-k2", its tokenization_kimi.py; llama.cpp runs it as a custom splitter): o200k's
# with Han runs split off first and kept out of the word classes.
_NOT_HAN_UPPER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]"
_NOT_HAN_LOWER = r"[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]"
_CONTRACTION = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
PRETOKENIZER_PATTERNS["kimi-k2"] = (
    r"[\p{Han}]+"
    r"|" + _O200K_WORD + _NOT_HAN_UPPER + "*" + _NOT_HAN_LOWER + "+" + _CONTRACTION
    + r"|" + _O200K_WORD + _NOT_HAN_UPPER + "+" + _NOT_HAN_LOWER + "*" + _CONTRACTION
    + r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# GGUF token types (llama.cpp's llama_token_type).
TOKEN_TYPE_NORMAL = 1
TOKEN_TYPE_UNKNOWN = 2
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4
SPM_SPACE = "\u2581"  # SentencePiece's visible space

# The chat template of the bundled model: Qwen's ChatML format without tool calls.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def byte_level_pretokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    """The pre-tokenizer for a GGUF ``tokenizer.ggml.pre`` name (regex split, then bytes)."""
    if pre not in PRETOKENIZER_PATTERNS:
        known = ", ".join(sorted(PRETOKENIZER_PATTERNS))
        raise ValueError(f"unsupported tokenizer.ggml.pre {pre!r} (supported: {known})")
    patterns = PRETOKENIZER_PATTERNS[pre]
    splits = [pre_tokenizers.Split(Regex(p), behavior="isolated", invert=False)
              for p in ((patterns,) if isinstance(patterns, str) else patterns)]
    return pre_tokenizers.Sequence([*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


@dataclass
class Tokenizer:
    """Text <-> token ids, plus the chat template; the one tokenizer type of ktlab."""

    backend: HFTokenizer
    eos_id: int
    bos_id: int | None = None
    chat_template: str | None = None
    special_ids: frozenset[int] = field(default_factory=frozenset)
    #: Start every encoded text with ``bos_id`` (SentencePiece vocabularies such as Mixtral's),
    #: unless the text already starts with it (a chat template that writes it).
    add_bos: bool = False

    @classmethod
    def from_vocab(
        cls,
        tokens: Sequence[str],
        merges: Sequence[str],
        token_types: Sequence[int] | None,
        pre: str,
        eos_id: int,
        bos_id: int | None = None,
        chat_template: str | None = None,
    ) -> Tokenizer:
        """Rebuild from GGUF-style vocabulary lists (merges as ``"left right"`` strings)."""
        if not 0 <= eos_id < len(tokens):
            raise ValueError(f"eos token id {eos_id} is outside the vocabulary of {len(tokens)} tokens")
        vocab = {tok: i for i, tok in enumerate(tokens)}
        pairs = [tuple(m.split(" ", 1)) for m in merges]
        backend = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
        backend.pre_tokenizer = byte_level_pretokenizer(pre)
        backend.decoder = decoders.ByteLevel()
        special = _add_special_tokens(backend, tokens, _types_or_normal(tokens, token_types))
        return cls(backend, eos_id, bos_id, chat_template, special)

    @classmethod
    def from_spm_vocab(
        cls,
        tokens: Sequence[str],
        scores: Sequence[float],
        token_types: Sequence[int] | None,
        eos_id: int,
        bos_id: int | None = None,
        chat_template: str | None = None,
        add_bos: bool = True,
    ) -> Tokenizer:
        """Rebuild a SentencePiece BPE vocabulary (GGUF ``tokenizer.ggml.model = "llama"``: pieces with
        ``▁`` for spaces, ``<0xNN>`` byte tokens, a score per piece). The merges are the pairs of
        pieces that form another piece, best-scored first, as Hugging Face's converter derives them;
        unknown characters fall back to their UTF-8 byte tokens."""
        if not 0 <= eos_id < len(tokens) or len(scores) != len(tokens):
            raise ValueError(f"eos token id {eos_id} or {len(scores)} scores do not fit {len(tokens)} tokens")
        types = _types_or_normal(tokens, token_types)
        vocab = {tok: i for i, tok in enumerate(tokens)}
        backend = HFTokenizer(models.BPE(vocab=vocab, merges=spm_merges(tokens, scores, types), fuse_unk=True,
                                         byte_fallback=True, unk_token=_unk_token(tokens, types)))
        backend.normalizer = normalizers.Sequence([normalizers.Prepend(SPM_SPACE),
                                                   normalizers.Replace(" ", SPM_SPACE)])
        backend.decoder = decoders.Sequence([decoders.Replace(SPM_SPACE, " "), decoders.ByteFallback(),
                                             decoders.Fuse(), decoders.Strip(" ", 1, 0)])
        special = _add_special_tokens(backend, tokens, types)
        return cls(backend, eos_id, bos_id, chat_template, special, add_bos=add_bos and bos_id is not None)

    @property
    def vocab_size(self) -> int:
        """Number of tokens, special tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (special tokens written in the text are recognised), after the
        BOS token where the vocabulary wants one (``add_bos``)."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if self.add_bos and (not ids or ids[0] != self.bos_id):
            ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Text of ``ids``; invalid UTF-8 byte runs become U+FFFD."""
        return self.backend.decode(list(ids), skip_special_tokens=skip_special)

    def token_to_id(self, token: str) -> int | None:
        """Id of a token string, or None."""
        return self.backend.token_to_id(token)

    def apply_chat_template(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Render ``messages`` ([{role, content}, ...]) with the model's chat template."""
        template = self.chat_template or CHATML_TEMPLATE
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        try:
            return env.from_string(template).render(
                messages=list(messages), add_generation_prompt=add_generation_prompt,
                bos_token=self._token_text(self.bos_id), eos_token=self._token_text(self.eos_id),
            )
        except jinja2.TemplateError as exc:
            raise ValueError(f"chat template failed to render: {exc}") from exc

    def _token_text(self, token_id: int | None) -> str:
        return "" if token_id is None else (self.backend.id_to_token(token_id) or "")

    def stream_decoder(self) -> StreamDecoder:
        """An incremental decoder that yields text only once its UTF-8 bytes are complete."""
        return StreamDecoder(self)


def spm_merges(tokens: Sequence[str], scores: Sequence[float], types: Sequence[int]) -> list[tuple[str, str]]:
    """BPE merges of a SentencePiece vocabulary: every split of a normal piece into two pieces of
    the vocabulary, ordered by the piece's score (best first), ties by the halves' ids."""
    vocab = {tok: i for i, tok in enumerate(tokens) if types[i] == TOKEN_TYPE_NORMAL}
    merges = []
    for piece, i in vocab.items():
        splits = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
        splits.sort(key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
        merges += [(-float(scores[i]), left, right) for left, right in splits]
    merges.sort(key=lambda m: m[0])  # stable: within one score, the order above
    return [(left, right) for _, left, right in merges]


def _unk_token(tokens: Sequence[str], types: Sequence[int]) -> str | None:
    return next((tokens[i] for i, t in enumerate(types) if t == TOKEN_TYPE_UNKNOWN), None)


def _types_or_normal(tokens: Sequence[str], token_types: Sequence[int] | None) -> list[int]:
    return list(token_types) if token_types is not None else [TOKEN_TYPE_NORMAL] * len(tokens)


def _add_special_tokens(backend: HFTokenizer, tokens: Sequence[str], types: Sequence[int]) -> frozenset[int]:
    """Register the control and user-defined tokens as unsplittable specials; their ids."""
    special = [i for i, t in enumerate(types) if t in (TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED)]
    backend.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in special])
    return frozenset(special)


class StreamDecoder:
    """Turns a growing list of token ids into text pieces, safe for multi-byte characters."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tok = tokenizer
        self._ids: list[int] = []
        self._emitted = 0

    def push(self, token_id: int) -> str:
        """Add one token; return the newly completed text (possibly empty)."""
        self._ids.append(token_id)
        text = self._tok.decode(self._ids)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for more bytes
            return ""
        piece = text[self._emitted:]
        self._emitted = len(text)
        return piece
