"""Tokenizer, chat templates and incremental detokenization, against transformers where it applies."""

import random

import gguf
import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from shared.engine.detokenizer import IncrementalDetokenizer
from shared.engine.errors import InvalidRequestError
from shared.tokenizer import Tokenizer
from tests.engine.conftest import CHATML

TEXTS = [
    "Hello world",
    "  leading spaces\n\n\ttabs and trailing  ",
    "numbers 1234567 3.14159 -42 1e10 2024-05-01",
    "def f(x):\n    return x**2  # comment\n\nclass A:\n\tpass\n",
    "émoji 😀🎉👍🏽 中文字符 日本語 한국어 العربية",
    "<|im_start|>user\nhi<|im_end|>",
    "'s 't 're don't I'LL",
    "   ",
    "",
    "a" * 300,
    "x = [1,2,3]; y = {'a': 1}",
    "\u00a0nbsp\u2009thin\u200bzero",
    "Ｆｕｌｌｗｉｄｔｈ ﬁ ligature é vs e\u0301",
    "\r\n\r\n windows\r\nlines",
    "<think>not special</think> <|unknown|>",
    "URL https://example.com/a?b=c&d=e#f",
]
CONVERSATIONS = [
    [{"role": "user", "content": "hi"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "and 3+3? 😀"},
    ],
    [{"role": "user", "content": "Write code:\n```py\nprint(1)\n```"}, {"role": "assistant", "content": "Done."}],
    [{"role": "system", "content": ""}, {"role": "user", "content": "  spaces  ", "name": None}],
]
CORPUS = [
    "Hello world! Bonjour le monde. Ça va? 你好，世界。日本語のテキスト。😀🎉👍🏽 emoji",
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog 1234567890",
    "Ünïcödé tëxt wïth äccents — and “quotes”",
    "한국어 텍스트 العربية עברית",
] * 3


# ---- small tokenizers for unit tests --------------------------------------------------------------
@pytest.fixture(scope="module")
def byte_level() -> Tokenizer:
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        CORPUS,
        trainers.BpeTrainer(
            vocab_size=400,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
            special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        ),
    )
    return Tokenizer(tok, eos_token="<|im_end|>", chat_template=CHATML)


@pytest.fixture(scope="module")
def spm_gguf(tmp_path_factory):
    """A GGUF with a SentencePiece-style vocab (like Llama 2's): scores, no merges, <0xXX> byte tokens."""
    bpe = HFTokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Metaspace()
    bpe.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, show_progress=False))
    vocab = bpe.get_vocab()
    pieces = sorted(vocab, key=vocab.get)
    path = tmp_path_factory.mktemp("spm") / "spm.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *pieces])
    w.add_token_scores([0.0] * 259 + [-float(i) for i in range(len(pieces))])
    w.add_token_types([2, 3, 3] + [6] * 256 + [1] * len(pieces))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# ---- against transformers -------------------------------------------------------------------------
@pytest.mark.integration
def test_smollm2_ids_and_text_equal_transformers(smollm2_tokenizer, hf_smollm2_tokenizer):
    tok, ref = smollm2_tokenizer, hf_smollm2_tokenizer
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == ref.encode(text), repr(text)
        assert tok.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False)
        for skip in (True, False):
            assert tok.decode(ids, skip) == ref.decode(ids, skip_special_tokens=skip), repr(text)
    assert tok.vocab_size == len(ref) == 49152
    assert tok.eos_token_ids == [2, 0] and tok.bos_token_id == 1  # <|im_end|>, <|endoftext|>; <|im_start|>
    assert tok.is_special(2) and not tok.is_special(tok.encode("hi")[0])


@pytest.mark.integration
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_smollm2_chat_equals_transformers(smollm2_tokenizer, hf_smollm2_tokenizer, add_generation_prompt):
    for conv in CONVERSATIONS:
        text = smollm2_tokenizer.apply_chat_template(conv, add_generation_prompt)
        ref = hf_smollm2_tokenizer.apply_chat_template(
            conv, add_generation_prompt=add_generation_prompt, tokenize=False
        )
        assert text == ref
        ids = hf_smollm2_tokenizer.apply_chat_template(conv, add_generation_prompt=add_generation_prompt)
        ids = ids["input_ids"] if not isinstance(ids, list) else ids
        assert smollm2_tokenizer.encode_chat(conv, add_generation_prompt) == ids
    text = smollm2_tokenizer.apply_chat_template(CONVERSATIONS[0])  # the template adds a system turn
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_folder_tokenizer_equals_transformers(tiny_model_dir, kind):
    from transformers import AutoTokenizer

    path = tiny_model_dir(kind)
    tok, ref = Tokenizer.from_pretrained_dir(path), AutoTokenizer.from_pretrained(path)
    for text in TEXTS:
        assert tok.encode(text) == ref.encode(text), repr(text)
    extra = {"enable_thinking": False} if kind == "qwen3" else {}
    for conv in CONVERSATIONS:
        ids = ref.apply_chat_template(conv, add_generation_prompt=True, **extra)
        ids = ids["input_ids"] if not isinstance(ids, list) else ids
        assert tok.encode_chat(conv, **extra) == ids
    ids = tok.encode_chat(CONVERSATIONS[0], **extra)
    if kind == "llama":  # BOS from the template once, not again from the post-processor
        assert tok.encode("hi")[0] == 0 and ids[0] == 0 and ids.count(0) == 1
    else:
        assert "<think>\n\n</think>" in tok.decode(ids)


@pytest.mark.integration
def test_sentencepiece_gguf_equals_transformers(spm_gguf):
    from transformers import AutoTokenizer

    tok = Tokenizer.from_gguf(spm_gguf)
    ref = AutoTokenizer.from_pretrained(spm_gguf.parent, gguf_file=spm_gguf.name)
    texts = [*TEXTS, "Ω unseen ∑ characters 🦜", " leading space", "Hello</s>world<s>"]
    for text in texts:
        ids = tok.encode(text)
        assert ids == ref.encode(text), repr(text)
        assert ids[0] == 1  # SentencePiece GGUFs add BOS by default, as llama.cpp does
        for skip in (True, False):
            assert tok.decode(ids, skip) == ref.decode(ids, skip_special_tokens=skip), repr(text)


# ---- chat templates -------------------------------------------------------------------------------
def test_no_chat_template_is_a_clear_error(byte_level):
    plain = Tokenizer(byte_level.tokenizer, eos_token="<|im_end|>")
    with pytest.raises(InvalidRequestError, match="no chat template"):
        plain.encode_chat([{"role": "user", "content": "hi"}])
    assert issubclass(InvalidRequestError, ValueError)


def test_template_features_as_transformers_provides_them(byte_level):
    template = (
        "{% for m in messages %}"
        "{% if m.role == 'tool' %}{{ raise_exception('no tools here') }}{% endif %}"
        "{% generation %}[{{ m.role }}|{{ m.content | tojson }}|{{ m.name is defined }}]"
        "{% endgeneration %}{% endfor %}\n  {% if add_generation_prompt %}{{ eos_token }}{% endif %}"
        "{{ strftime_now('%Y') | length }}"
    )
    tok = Tokenizer(byte_level.tokenizer, eos_token="<|im_end|>", chat_template=template)
    text = tok.apply_chat_template([{"role": "user", "content": "<b>&", "name": None}])
    assert text == '[user|"<b>&"|False]<|im_end|>4'  # no HTML escaping; None keys dropped; lstrip_blocks
    with pytest.raises(InvalidRequestError, match="no tools here"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])
    with pytest.raises(InvalidRequestError):  # the sandbox refuses attribute access to internals
        evil = Tokenizer(byte_level.tokenizer, chat_template="{{ messages.__class__.__mro__ }}")
        evil.apply_chat_template([])


# ---- incremental detokenizer ----------------------------------------------------------------------
def stream(tok: Tokenizer, prompt: list[int], ids: list[int], skip: bool = True, seed: int = 0) -> list[str]:
    """Feed ids in random chunks of 1..3; returns the deltas (the last one from flush)."""
    rng, detok, deltas, i = random.Random(seed), IncrementalDetokenizer(tok, prompt, skip), [], 0
    while i < len(ids):
        n = rng.randint(1, 3)
        deltas.append(detok.step(ids[i : i + n]))
        i += n
    deltas.append(detok.flush())
    assert detok.text == "".join(deltas)
    return deltas


def random_ids(tok: Tokenizer, rng: random.Random, n: int, avoid: range = range(0)) -> list[int]:
    """Random tokens, with whole multi-byte characters mixed in so partial characters occur often."""
    ids: list[int] = []
    while len(ids) < n:
        if rng.random() < 0.3:
            text = rng.choice(["😀", "👍🏽", "中文", "日本語", "é", "한", "🦜"])
            ids += tok.encode(text, add_special_tokens=False)
        elif (i := rng.randrange(tok.vocab_size)) not in avoid:
            ids.append(i)
    return ids


def check_detokenizer_property(tok: Tokenizer, trials: int = 200, avoid: range = range(0)) -> None:
    rng = random.Random(0)
    for trial in range(trials):
        prompt = tok.encode(rng.choice(["", "Hello", "你好 😀", "x" * 20]), add_special_tokens=False)
        ids = random_ids(tok, rng, rng.randint(1, 40), avoid)
        skip = trial % 2 == 0
        deltas = stream(tok, prompt, ids, skip, seed=trial)
        expected = tok.decode(prompt + ids, skip)[len(tok.decode(prompt, skip)) :]
        assert "".join(deltas) == expected, (prompt, ids)


def test_detokenizer_concatenation_equals_decode(byte_level):
    check_detokenizer_property(byte_level)
    rng = random.Random(1)
    for _ in range(50):  # byte-level: with a complete prompt, simply the decode of the generated ids
        ids = random_ids(byte_level, rng, 30)
        assert "".join(stream(byte_level, byte_level.encode("Hi"), ids)) == byte_level.decode(ids)


def test_detokenizer_on_sentencepiece_with_byte_fallback(spm_gguf):
    tok = Tokenizer.from_gguf(spm_gguf)
    # Byte tokens only as whole characters: the ByteFallback decoder turns every byte of an invalid run
    # into U+FFFD, so a lone "<0x7C>" reads "|" alone but "�" next to a stray "<0xE4>" - no streaming
    # decoder can match that. SentencePiece emits byte tokens only for characters missing from the vocab.
    check_detokenizer_property(tok, avoid=range(3, 259))
    ids = tok.encode(" Ω mid-word", add_special_tokens=False)  # Ω is not in the vocab: two byte tokens
    assert "".join(stream(tok, tok.encode("Say"), ids)) == " Ω mid-word"  # the space after the prompt stays


def test_detokenizer_never_emits_a_broken_character(byte_level):
    text = "a😀b 中文 👍🏽!"
    ids = byte_level.encode(text)
    assert len(ids) > len(text)  # characters really are split across tokens
    detok = IncrementalDetokenizer(byte_level, [])
    deltas = [detok.step([i]) for i in ids]
    assert "".join(deltas) == text and detok.text == text
    assert not any("\ufffd" in d for d in deltas)
    assert "" in deltas  # some tokens were held back until their character was complete


def test_detokenizer_flush_releases_an_unfinished_character(byte_level):
    ids = byte_level.encode("ok😀")[:-1]
    detok = IncrementalDetokenizer(byte_level, byte_level.encode("x"))
    assert "".join(detok.step([i]) for i in ids) == "ok"
    assert detok.flush() == byte_level.decode(ids)[2:] and detok.text == byte_level.decode(ids)


@pytest.mark.integration
def test_detokenizer_on_smollm2(smollm2_tokenizer):
    check_detokenizer_property(smollm2_tokenizer, trials=100)
    rng = random.Random(2)
    prompt = smollm2_tokenizer.encode_chat([{"role": "user", "content": "hi"}])
    for _ in range(50):
        ids = random_ids(smollm2_tokenizer, rng, 30)
        assert "".join(stream(smollm2_tokenizer, prompt, ids)) == smollm2_tokenizer.decode(ids)
