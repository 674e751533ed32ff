"""Tokenizer: a Hugging Face `tokenizers` pipeline built from `tokenizer.json` or from GGUF metadata,
and chat templates rendered in a jinja2 sandbox the way transformers renders them.

Token ids must equal what transformers gives for the same checkpoint: the model was trained on them.
"""

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import ClassVar

import jinja2
from gguf import GGUFReader
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from shared.engine.errors import InvalidRequestError

# Tokens that end an assistant turn in the chat formats we serve: generation stops on those the vocab
# has as special tokens, whatever the checkpoint names as its single EOS.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<|end_of_text|>", "<|eom_id|>", "<end_of_turn>")

# llama.cpp's GGUF token types (tokenizer.ggml.token_type)
_CONTROL, _USER_DEFINED = 3, 4

# Pre-tokenizer split regexes by `tokenizer.ggml.pre`, as the models' own tokenizer.json files have them.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLITS = {
    "llama-bpe": _LLAMA3_SPLIT,
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "falcon3": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
}
# These split digits one by one, then use the GPT-2 regex.
_DIGIT_SPLIT = {"smollm", "starcoder", "refact", "codeshell", "exaone", "minerva"}


class Tokenizer:
    def __init__(
        self,
        tokenizer: HFTokenizer,
        bos_token: str | None = None,
        eos_token: str | None = None,
        chat_template: str | None = None,
        extra_eos_ids: tuple[int, ...] = (),
        special_tokens: dict[str, str] | None = None,
    ):
        self.tokenizer = tokenizer
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)
        self.chat_template = chat_template
        self.special_ids = {i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
        self.bos_token_id: int | None = tokenizer.token_to_id(bos_token) if bos_token else None
        eos_id = tokenizer.token_to_id(eos_token) if eos_token else None
        turn_ends = [tokenizer.token_to_id(t) for t in END_OF_TURN_TOKENS]
        turn_ends = [i for i in turn_ends if i is not None and i in self.special_ids]
        ids = (eos_id, *extra_eos_ids, *turn_ends)
        self.eos_token_ids: list[int] = list(dict.fromkeys(i for i in ids if i is not None))
        # Variables a chat template sees, like transformers' special_tokens_map.
        self.special_tokens = {
            k: v
            for k, v in {"bos_token": bos_token, "eos_token": eos_token, **(special_tokens or {})}.items()
            if v is not None
        }

    # ---- loading ------------------------------------------------------------------------------
    @classmethod
    def from_pretrained_dir(cls, path: str | Path) -> "Tokenizer":
        """tokenizer.json (its post-processor decides BOS, as in transformers 5) + tokenizer_config.json."""
        path = Path(path)
        if not (path / "tokenizer.json").exists():
            raise FileNotFoundError(
                f"{path} has no tokenizer.json (sentencepiece-only tokenizer.model "
                "folders are not supported; convert with transformers first)"
            )
        tok = HFTokenizer.from_file(str(path / "tokenizer.json"))
        cfg = read_json(path / "tokenizer_config.json")
        template = cfg.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
            template = {t["name"]: t["template"] for t in template}.get("default")
        if (path / "chat_template.jinja").exists():  # transformers 5 saves it as its own file
            template = (path / "chat_template.jinja").read_text()
        elif (path / "chat_template.json").exists():
            template = read_json(path / "chat_template.json").get("chat_template", template)
        names = {k: _token_text(cfg.get(k)) for k in ("unk_token", "pad_token")}
        return cls(
            tok,
            _token_text(cfg.get("bos_token")),
            _token_text(cfg.get("eos_token")),
            template,
            special_tokens={k: v for k, v in names.items() if v},
        )

    @classmethod
    def from_gguf(cls, reader_or_path: GGUFReader | str | Path) -> "Tokenizer":
        """Rebuild the tokenizer a GGUF describes: vocab + merges, special tokens by token type,
        the pre-tokenizer its `tokenizer.ggml.pre` names, BOS as `tokenizer.ggml.add_bos_token` says."""
        reader = reader_or_path if isinstance(reader_or_path, GGUFReader) else GGUFReader(reader_or_path)

        def meta(key: str, default=None):
            field = reader.fields.get(f"tokenizer.{key}")
            return field.contents() if field is not None else default

        kind, tokens = meta("ggml.model"), meta("ggml.tokens")
        types = meta("ggml.token_type") or [1] * len(tokens)
        if kind == "gpt2":
            tok = _byte_level_bpe(tokens, meta("ggml.merges", []), meta("ggml.pre", "default"))
        elif kind == "llama":
            tok = _sentencepiece_bpe(
                tokens, meta("ggml.scores"), meta("ggml.merges"), meta("ggml.add_space_prefix", True)
            )
        else:
            raise ValueError(f"GGUF tokenizer model {kind!r} is not supported (supported: gpt2, llama)")
        # Control tokens (<|im_end|>) are special; user-defined ones (<think>) are matched whole but kept
        # in decoded text. Both must be added, or text containing them gets cut into pieces.
        tok.add_special_tokens(
            [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == _CONTROL]
        )
        tok.add_tokens(
            [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == _USER_DEFINED]
        )
        bos_id, eos_id = meta("ggml.bos_token_id"), meta("ggml.eos_token_id")
        bos = tokens[bos_id] if bos_id is not None else None
        eos = tokens[eos_id] if eos_id is not None else None
        add_bos = bos is not None and meta("ggml.add_bos_token", kind == "llama")
        add_eos = eos is not None and meta("ggml.add_eos_token", False)
        single = [bos] * add_bos + ["$A"] + [eos] * add_eos
        pairs = [(t, i) for t, i, on in ((bos, bos_id, add_bos), (eos, eos_id, add_eos)) if on]
        tok.post_processor = processors.TemplateProcessing(single=single, special_tokens=pairs)
        extra = tuple(i for i in (meta("ggml.eot_token_id"), meta("ggml.eom_token_id")) if i is not None)
        names = {"unk_token": meta("ggml.unknown_token_id"), "pad_token": meta("ggml.padding_token_id")}
        return cls(
            tok, bos, eos, meta("chat_template"), extra, {k: tokens[i] for k, i in names.items() if i is not None}
        )

    # ---- text <-> ids -------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def is_special(self, token_id: int) -> bool:
        return token_id in self.special_ids

    def id_to_token(self, token_id: int) -> str | None:
        return self.tokenizer.id_to_token(token_id)

    # ---- chat ---------------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """The prompt text for a conversation; kwargs reach the template (tools, enable_thinking...)."""
        if not self.chat_template:
            raise InvalidRequestError(
                "this model has no chat template: use the completions API with a plain prompt", "messages"
            )
        # Like transformers: keys set to None are dropped (templates test for presence, not for None).
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        variables = {"tools": None, "documents": None, **self.special_tokens, **kwargs}
        try:
            render = _compile(self.chat_template).render
            return render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)
        except jinja2.TemplateError as e:  # raise_exception() in the template, or a malformed conversation
            raise InvalidRequestError(f"chat template error: {e}", "messages") from e

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> list[int]:
        # The template writes BOS itself where the model wants one: adding specials again would double it.
        return self.encode(
            self.apply_chat_template(messages, add_generation_prompt, **kwargs), add_special_tokens=False
        )


# ---- pipelines rebuilt from GGUF metadata -----------------------------------------------------
def _byte_level_bpe(tokens: list[str], merges: list[str], pre: str) -> HFTokenizer:
    """GPT-2 style byte-level BPE (Llama 3, Qwen2/3, SmolLM2)."""
    split = _SPLITS.get(pre)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split is None)
    # Llama 3's tokenizer takes a whole word found in the vocab before trying merges; llama.cpp does too.
    model = models.BPE(
        {t: i for i, t in enumerate(tokens)},
        [tuple(m.split(" ", 1)) for m in merges],
        ignore_merges=split is _LLAMA3_SPLIT,
    )
    tok = HFTokenizer(model)
    if split is not None:
        steps = [pre_tokenizers.Split(Regex(split), "isolated"), byte_level]
    elif pre in _DIGIT_SPLIT:
        steps = [pre_tokenizers.Digits(individual_digits=True), byte_level]
    else:
        steps = [byte_level]
    tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
    if split is _QWEN2_SPLIT:
        tok.normalizer = normalizers.NFC()  # as in Qwen2's tokenizer.json
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece_bpe(
    tokens: list[str], scores: list[float] | None, merges: list[str] | None, add_space_prefix: bool
) -> HFTokenizer:
    """SentencePiece BPE with byte fallback (Llama 2, Mistral, TinyLlama), as transformers' LlamaTokenizer."""
    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges] if merges else _merges_from_scores(tokens, scores)
    tok = HFTokenizer(models.BPE(vocab, pairs, fuse_unk=True, byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if add_space_prefix else "never", split=False
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + [decoders.Strip(" ", 1, 0)] * bool(add_space_prefix))
    return tok


def _merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """SentencePiece GGUFs carry scores, not merges: every split of a token into two vocab pieces is a
    merge, ranked by the merged token's score (transformers' `generate_merges`, for identical ids)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for token, score in dict(zip(tokens, scores)).items():
        found = [(token[:k], token[k:]) for k in range(1, len(token)) if token[:k] in vocab and token[k:] in vocab]
        found.sort(key=lambda p: (vocab[p[0]], vocab[p[1]]))
        merges += [(left, right, score) for left, right in found]
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


# ---- chat templates ---------------------------------------------------------------------------
class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks: render it as is."""

    tags: ClassVar[set[str]] = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _raise_exception(message: str):
    raise jinja2.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # jinja's own tojson escapes HTML characters; templates expect plain JSON
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    # Same environment as transformers: templates come from model repos, so they run sandboxed.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def _token_text(token) -> str | None:
    """tokenizer_config.json spells special tokens as a string or as {"content": ...}."""
    return token.get("content") if isinstance(token, dict) else token


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}
