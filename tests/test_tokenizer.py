"""Tokenizer rebuilt from GGUF metadata: round trips, agreement with the trained original, chat template."""

from __future__ import annotations

import pytest

from ktlab.model import GGUFFile
from ktlab.model.tokenizer import CHATML_TEMPLATE, Tokenizer, byte_level_pretokenizer

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "def main():\n    return 42  # answer\n",
    "naïve café 日本語 emoji 🙂 and tabs\tand\r\nwindows newlines",
    "   leading spaces, trailing   ",
    "<|im_start|>user\nhi<|im_end|>",
    "",
]


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(test_tokenizer: Tokenizer, text: str):
    assert test_tokenizer.decode(test_tokenizer.encode(text)) == text


def test_gguf_tokenizer_equals_original(gguf_q8, test_tokenizer: Tokenizer, tokenizer_data):
    """The tokenizer read back from the GGUF splits text exactly like the one we wrote."""
    from_file = GGUFFile(gguf_q8).tokenizer()
    assert from_file.vocab_size == len(tokenizer_data.tokens)
    assert from_file.eos_id == tokenizer_data.eos_id
    for text in TEXTS:
        assert from_file.encode(text) == test_tokenizer.encode(text)


def test_special_tokens_are_single_ids(test_tokenizer: Tokenizer, tokenizer_data):
    ids = test_tokenizer.encode("<|im_start|>user\n")
    assert ids[0] == tokenizer_data.tokens.index("<|im_start|>")
    assert test_tokenizer.decode(ids, skip_special=True) == "user\n"


def test_fixed_encoding(test_tokenizer: Tokenizer):
    """Merges learnt from the fixed corpus: frequent words are single tokens."""
    ids = test_tokenizer.encode(" experts")
    assert len(ids) == 1
    assert test_tokenizer.decode(ids) == " experts"
    assert len(test_tokenizer.encode("zzqx")) > 1


def test_chat_template_output(test_tokenizer: Tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a list?"}]
    assert test_tokenizer.apply_chat_template(messages) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is a list?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert test_tokenizer.apply_chat_template(messages[1:], add_generation_prompt=False) == (
        "<|im_start|>user\nWhat is a list?<|im_end|>\n"
    )


def test_chat_template_matches_jinja_in_transformers(test_tokenizer: Tokenizer):
    """Same rendering as Hugging Face's own chat-template engine."""
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=test_tokenizer.backend)
    hf.chat_template = CHATML_TEMPLATE
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi!"}]
    expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert test_tokenizer.apply_chat_template(messages) == expected


def test_broken_template_is_a_value_error(test_tokenizer: Tokenizer):
    broken = Tokenizer(test_tokenizer.backend, test_tokenizer.eos_id, chat_template="{% for x in %}")
    with pytest.raises(ValueError, match="chat template"):
        broken.apply_chat_template([{"role": "user", "content": "x"}])


def test_stream_decoder_holds_partial_utf8(test_tokenizer: Tokenizer):
    text = "日本語 🙂 ok"
    decoder = test_tokenizer.stream_decoder()
    pieces = [decoder.push(t) for t in test_tokenizer.encode(text)]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_qwen35_keeps_combining_marks_in_words_where_qwen2_splits_them():
    """GGUF ``qwen35`` (Qwen3.5): a letter and its combining accent stay one piece; Qwen2 splits them."""
    word = "cafe\u0301 naïve"  # e + COMBINING ACUTE ACCENT
    qwen35 = [p for p, _ in byte_level_pretokenizer("qwen35").pre_tokenize_str(word)]
    qwen2 = [p for p, _ in byte_level_pretokenizer("qwen2").pre_tokenize_str(word)]
    assert len(qwen35) == 2 and len(qwen2) == 3, (qwen35, qwen2)


def test_deepseek_v3_splits_digits_in_threes_and_cjk_apart():
    """GGUF ``deepseek-v3``: digits in groups of up to three, a CJK run its own piece, words with
    their leading space (its tokenizer.json's Sequence of three splits)."""
    pieces = [p for p, _ in byte_level_pretokenizer("deepseek-v3").pre_tokenize_str("x 1234567 日本語 hello")]
    assert pieces[:2] == ["x", "Ġ"] and pieces[2:5] == ["123", "456", "7"], pieces
    assert len(pieces) == 8 and pieces[5] == "Ġ" and pieces[7] == "Ġhello", pieces  # 6: the CJK run, as bytes


def test_o200k_and_kimi_k2_split_words_before_capitals_and_kimi_splits_han_off():
    """GGUF ``gpt-4o`` (gpt-oss's o200k): a word ends where an upper-case run starts, contractions stay
    with their word, digits go in threes, a slash joins the word after it. ``kimi-k2``: the same, but a
    Han run is always its own piece (its regex's class intersections, which onig runs)."""
    text = "HelloWorld's 12345 foo/bar\n\nI'M OK 日本語abc"
    o200k = [p for p, _ in byte_level_pretokenizer("gpt-4o").pre_tokenize_str(text)]
    assert o200k[:8] == ["Hello", "World's", "Ġ", "123", "45", "Ġfoo", "/bar", "ĊĊ"], o200k
    assert o200k[8:10] == ["I'M", "ĠOK"] and len(o200k) == 11, o200k  # the Han run glues to "abc"
    kimi = [p for p, _ in byte_level_pretokenizer("kimi-k2").pre_tokenize_str(text)]
    assert kimi[:10] == o200k[:10] and len(kimi) == 13 and kimi[-1] == "abc", kimi  # " ", Han run, "abc"


@pytest.mark.parametrize("pre", ["gpt2", "olmo", "qwen2", "qwen35", "deepseek-v3", "gpt-4o", "kimi-k2"])
def test_each_pretokenizer_round_trips_and_olmo_splits_as_gpt2(tokenizer_data, pre):
    """Every GGUF pre-tokenizer we accept round-trips the fixed texts; OLMoE's ("olmo") splits
    exactly as GPT-2's (llama.cpp gives them one regex) and differently from Qwen2's on digits."""
    d = tokenizer_data
    tok = Tokenizer.from_vocab(d.tokens, d.merges, d.token_types, pre, d.eos_id, d.bos_id, d.chat_template)
    gpt2 = Tokenizer.from_vocab(d.tokens, d.merges, d.token_types, "gpt2", d.eos_id, d.bos_id, d.chat_template)
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text
        if pre == "olmo":
            assert tok.encode(text) == gpt2.encode(text)
    pieces = [p for p, _ in byte_level_pretokenizer(pre).pre_tokenize_str(" 12345 abc")]
    want = {"qwen2": 7, "qwen35": 7, "deepseek-v3": 4, "gpt-4o": 4, "kimi-k2": 4}.get(pre, 2)  # Qwen: each digit
    # apart; DeepSeek, o200k and Kimi: threes
    assert len(pieces) == want, pieces


SPM_TEXTS = [t for t in TEXTS if "<|" not in t]


def test_sentencepiece_vocabulary_encodes_as_sentencepiece(spm_tokenizer):
    """A llama (SentencePiece BPE) vocabulary rebuilt from GGUF fields splits the fixed texts into the
    same ids as the sentencepiece library itself (BOS first), and decodes back to the text (a GGUF
    file's: tests/test_model_families.py)."""
    sp, data = spm_tokenizer
    tok = Tokenizer.from_spm_vocab(data.tokens, data.scores, data.token_types, data.eos_id, data.bos_id)
    for text in SPM_TEXTS:
        assert tok.encode(text) == [data.bos_id, *sp.encode(text)], text
        assert tok.decode(tok.encode(text), skip_special=True) == text
    assert tok.encode("<s>hi")[:2] == [data.bos_id, *sp.encode("hi")[:1]]  # a written BOS is not doubled
