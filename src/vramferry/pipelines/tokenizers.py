"""Tokenizers built in code, with no files and no network.

Real diffusers pipelines need real tokenizers, and every public one lives on the Hugging Face Hub. These
builders make small but genuine ones from a fixed word list, deterministically (same ids in every process):

- :func:`build_clip_tokenizer`: byte-level BPE in the openai/CLIP layout (Flux, SD3).
- :func:`build_t5_tokenizer`: a Unigram vocabulary made by hand (Flux, SD3, Wan, LTX).
- :func:`build_qwen2_tokenizer`: byte-level BPE whose merges turn every word of QwenImage's chat template
  into one token, so the template prefix has the 34 tokens the pipeline drops.
- :func:`build_gemma_tokenizer`: BPE with byte fallback, the layout of Gemma 3 (LTX-2).

Each builder checks the size of what it built: a tokenizer that silently fell back to a handful of ids
would tokenize every prompt to ``<unk>`` and the prompt would never reach the image.
"""

from __future__ import annotations

import string
from typing import Any

from .extras import require_extra

#: Sentences whose words the vocabularies know as whole tokens; tests and the demo prompt draw from them.
SENTENCES: tuple[str, ...] = (
    "a photo of a cat",
    "a painting of a squirrel eating a burger",
    "a dog on the beach",
    "dance monkey",
    "bad quality",
    "blurry",
    "deformed",
    "an astronaut riding a horse on the moon",
    "a red car in the city at night",
    "the quick brown fox jumps over the lazy dog",
    "high quality photograph, detailed, sharp focus",
    "low resolution, jpeg artifacts",
)

CLIP_WORDS = ("a", "photo", "of", "cat", "the", "painting", "squirrel", "eating", "burger", "dog", "quality")
CLIP_VOCAB_SIZE = 555
T5_VOCAB_SIZE = 235
CLIP_MAX_LENGTH = 77
T5_MAX_LENGTH = 512

# Every word of QwenImagePipeline.prompt_template_encode, then a few prompt words ("Ġ" marks a leading space).
QWEN_TEMPLATE_WORDS = (
    "system", "user", "assistant", "Describe", "Ġthe", "Ġimage", "Ġby", "Ġdetailing", "Ġcolor", "Ġshape",
    "Ġsize", "Ġtexture", "Ġquantity", "Ġtext", "Ġspatial", "Ġrelationships", "Ġof", "Ġobjects", "Ġand",
    "Ġbackground",
)  # fmt: skip
QWEN_PROMPT_WORDS = ("Ġa", "Ġphoto", "Ġcat", "dance", "Ġmonkey", "bad", "Ġquality")
QWEN_SPECIALS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
QWEN_VOCAB_SIZE = 394

GEMMA_SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>")
GEMMA_VOCAB_SIZE = 698


def sentence_words() -> list[str]:
    """The distinct words of :data:`SENTENCES`, punctuation stripped, in first-seen order."""
    words: dict[str, None] = {}
    for sentence in SENTENCES:
        for word in sentence.split():
            words.setdefault(word.strip(string.punctuation), None)
    return [w for w in words if w]


def bytes_to_unicode() -> dict[int, str]:
    """The GPT-2/CLIP table that maps each byte to a printable unicode character."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return dict(sorted(table.items()))


def _chain_merges(symbols: list[str]) -> list[tuple[str, str]]:
    """Merges that build ``symbols`` left to right into one token: (s0, s1), (s0s1, s2), ..."""
    merges = []
    current = symbols[0]
    for symbol in symbols[1:]:
        merges.append((current, symbol))
        current += symbol
    return merges


def _add_merges(vocab: dict[str, int], merges: list[tuple[str, str]], new: list[tuple[str, str]]) -> None:
    for pair in new:
        if pair not in merges:
            merges.append(pair)
            vocab.setdefault(pair[0] + pair[1], len(vocab))


def _check_size(tokenizer: Any, expected: int, what: str) -> None:
    if len(tokenizer) != expected:
        raise RuntimeError(
            f"the built {what} tokenizer has {len(tokenizer)} tokens, expected {expected}; "
            "the installed transformers may construct tokenizers differently"
        )


def build_clip_tokenizer() -> Any:
    """A CLIP byte-level BPE tokenizer (555 tokens, ``model_max_length=77``, eos last).

    Returns:
        A ``transformers.CLIPTokenizer``.
    """
    transformers = require_extra("transformers")
    symbols = list(bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": i + len(symbols) for i, s in enumerate(symbols)})
    merges: list[tuple[str, str]] = []
    for word in CLIP_WORDS:
        if len(word) > 1:
            _add_merges(vocab, merges, _chain_merges([*word[:-1], word[-1] + "</w>"]))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    # model_max_length must be set: FluxPipeline copies it into an int and the default (1e30) overflows.
    tokenizer = transformers.CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CLIP_MAX_LENGTH)
    _check_size(tokenizer, CLIP_VOCAB_SIZE, "CLIP")
    if tokenizer.convert_tokens_to_ids("<|endoftext|>") != len(tokenizer) - 1:
        raise RuntimeError("the built CLIP tokenizer does not give <|endoftext|> the last id")
    return tokenizer


def t5_vocab() -> list[tuple[str, float]]:
    """The hand-made Unigram vocabulary: specials, ``▁``, whole words, then single characters."""
    pieces: dict[str, float] = {"<pad>": 0.0, "</s>": 0.0, "<unk>": 0.0, "▁": -3.0}
    for i, word in enumerate(sentence_words()):
        # A tiny decreasing offset fixes the order, so the ids never depend on ties.
        pieces.setdefault("▁" + word, -5.0 - 1e-3 * i)
    chars = string.ascii_letters + string.digits + string.punctuation
    for char in chars:
        pieces.setdefault(char, -10.0)
    for char in chars:
        pieces.setdefault("▁" + char, -10.5)
    return list(pieces.items())


def build_t5_tokenizer() -> Any:
    """A T5 Unigram tokenizer over :func:`t5_vocab` (235 pieces; ids 0/1/2 are pad, eos, unk as in T5).

    Returns:
        A ``transformers.T5Tokenizer``.
    """
    transformers = require_extra("transformers")
    tokenizer = transformers.T5Tokenizer(vocab=t5_vocab(), extra_ids=0, model_max_length=T5_MAX_LENGTH)
    _check_size(tokenizer, T5_VOCAB_SIZE, "T5")
    return tokenizer


def build_qwen2_tokenizer() -> Any:
    """A Qwen2 byte-level BPE tokenizer whose template words are single tokens (394 tokens).

    QwenImagePipeline drops the first 34 hidden states, the length of its chat-template prefix under the real
    Qwen vocabulary. With plain bytes the prefix would be ~150 tokens and the user prompt would be cut off,
    so each template word is merged into one token here.

    Returns:
        A ``transformers.Qwen2Tokenizer``.
    """
    transformers = require_extra("transformers")
    byte_symbols = bytes_to_unicode()
    vocab = {s: i for i, s in enumerate(byte_symbols.values())}
    merges: list[tuple[str, str]] = []
    for word in QWEN_TEMPLATE_WORDS + QWEN_PROMPT_WORDS:
        _add_merges(vocab, merges, _chain_merges(list(word)))
    for special in QWEN_SPECIALS:
        vocab[special] = len(vocab)
    tokenizer = transformers.Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        model_max_length=32768,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=list(QWEN_SPECIALS[1:]),
    )
    _check_size(tokenizer, QWEN_VOCAB_SIZE, "Qwen2")
    return tokenizer


def build_gemma_tokenizer() -> Any:
    """A Gemma-style BPE tokenizer with byte fallback (698 tokens), as Gemma 3 text encoders expect.

    Layout: the specials (``<pad>``=0, ``<eos>``=1, ``<bos>``=2, ``<unk>``, ``<mask>``), the 256 byte-fallback
    tokens, ``▁`` and the printable ASCII characters, then merges that make each sentence word (with and
    without its leading ``▁``) one token.

    Returns:
        A ``transformers.GemmaTokenizer`` (left padding, adds ``<bos>``).
    """
    transformers = require_extra("transformers")
    vocab = {s: i for i, s in enumerate(GEMMA_SPECIALS)}
    vocab.update({f"<0x{b:02X}>": len(GEMMA_SPECIALS) + b for b in range(256)})
    for char in "▁" + string.ascii_letters + string.digits + string.punctuation:
        vocab[char] = len(vocab)
    merges: list[tuple[str, str]] = []
    # The "▁word" merges rank first, so "▁the" becomes one token rather than "▁" + "the".
    for spelled in ["▁" + w for w in sentence_words()] + [w for w in sentence_words() if len(w) > 1]:
        _add_merges(vocab, merges, _chain_merges(list(spelled)))
    tokenizer = transformers.GemmaTokenizer(
        vocab=vocab, merges=merges, model_max_length=1024, add_bos_token=True, add_eos_token=False
    )
    _check_size(tokenizer, GEMMA_VOCAB_SIZE, "Gemma")
    return tokenizer
