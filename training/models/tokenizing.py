"""CLIP tokenizers built from the BPE list shipped in this folder: no hub, no network.

`bpe_simple_vocab_16e6.txt.gz` is OpenAI CLIP's merge list (MIT licence, as carried by open_clip). CLIP's
vocabulary is fully determined by it: the 256 byte-level symbols, the same with the end-of-word marker, one
entry per merge, then the two special tokens (49408 entries in all).
"""
from __future__ import annotations

import functools
import gzip
import json
import os
import tempfile

MAX_LENGTH = 77
_BPE_FILE = os.path.join(os.path.dirname(__file__), "tokenizer", "bpe_simple_vocab_16e6.txt.gz")
_N_MERGES = 49152 - 256 - 2


def _bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP's reversible byte → printable-character table, in vocabulary order."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    bytes_, chars, extra = printable[:], printable[:], 0
    for b in range(256):
        if b not in printable:
            bytes_.append(b)
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


@functools.lru_cache(maxsize=1)
def _vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    with gzip.open(_BPE_FILE, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1:_N_MERGES + 1]]
    symbols = _bytes_to_unicode()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


@functools.lru_cache(maxsize=2)
def clip_tokenizer(pad_token: str = "<|endoftext|>"):
    """SD1.x / SDXL-te1 use pad = <|endoftext|>; OpenCLIP encoders (SD2, SDXL te2) pad with "!" (id 0).

    Cached: tokenizers are stateless for our use, and building one takes ~1 s.
    """
    from transformers import CLIPTokenizer

    vocab, merges = _vocab_and_merges()
    # The constructors differ between major versions (transformers 5 takes vocab=/merges= objects and ignores
    # vocab_file=; 4.x requires vocab_file/merges_file and rejects the objects). A folder with vocab.json +
    # merges.txt loaded by from_pretrained reads the same in both, and never touches the network (a local path).
    with tempfile.TemporaryDirectory(prefix="clip_tokenizer_") as folder:
        with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
            json.dump(vocab, f, ensure_ascii=False)
        with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
        tok = CLIPTokenizer.from_pretrained(folder, local_files_only=True, unk_token="<|endoftext|>",
                                            bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                                            pad_token=pad_token, model_max_length=MAX_LENGTH)
    tok.model_max_length = MAX_LENGTH
    return tok


def tokenizers_for_family(family: str) -> list:
    if family == "sd1":
        return [clip_tokenizer("<|endoftext|>")]
    if family == "sd2":
        return [clip_tokenizer("!")]
    if family == "sdxl":
        return [clip_tokenizer("<|endoftext|>"), clip_tokenizer("!")]
    raise ValueError(f"unknown model family {family!r}")
