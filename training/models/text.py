"""Prompt encoding shared by sampling, training and the text-embedding cache (one definition of clip skip).

clip_skip follows the A1111 convention: 1 = the last layer, 2 = the penultimate, ... Each family has its own
default (`SDModel.default_clip_skip`): SD1 uses the last layer, SD2 and SDXL the penultimate. SD1/SD2 apply the
encoder's final layer norm to the chosen layer (as their UNets saw in training); SDXL takes raw hidden states
from both encoders and the pooled, projected embedding from the second.
"""
from __future__ import annotations

from dataclasses import dataclass

CHUNK_TOKENS = 75          # tokens per 77-token window, without the start/end tokens


@dataclass
class TextEmbeds:
    embeds: "object"          # (B, 77*k, D) tensor
    pooled: "object" = None   # (B, P) for SDXL, else None


def valid_text(prompt: str) -> str:
    """`prompt` with lone surrogates (what a non-UTF-8 file name becomes in [filewords]) as U+FFFD: the
    tokenizer refuses them with a TypeError."""
    return prompt.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


def _ids(tokenizer, prompt: str) -> list[int]:
    return tokenizer(valid_text(prompt), add_special_tokens=False, truncation=False, verbose=False)["input_ids"]


def _token_chunks(tokenizer, prompt: str, long_prompts: str) -> list[list[int]]:
    ids = _ids(tokenizer, prompt)
    if long_prompts == "chunk" and len(ids) > CHUNK_TOKENS:
        return [ids[i:i + CHUNK_TOKENS] for i in range(0, len(ids), CHUNK_TOKENS)]
    return [ids[:CHUNK_TOKENS]]


def _window(tokenizer, ids: list[int]) -> list[int]:
    body = [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]
    return body + [tokenizer.pad_token_id] * (CHUNK_TOKENS + 2 - len(body))


def tokenize(model, prompts: list[str], long_prompts: str = "truncate", min_chunks: int = 1):
    """Token ids per encoder: list of LongTensor (B, chunks, 77). All prompts share the largest chunk count."""
    import torch

    out = []
    for tok in model.tokenizers:
        per_prompt = [_token_chunks(tok, p, long_prompts) for p in prompts]
        n = max([min_chunks, *(len(c) for c in per_prompt)])
        rows = [[_window(tok, c) for c in chunks] + [_window(tok, [])] * (n - len(chunks)) for chunks in per_prompt]
        out.append(torch.tensor(rows, dtype=torch.long))
    return out


def tokens_over_limit(model, prompt: str) -> int:
    """How many tokens of `prompt` fall beyond one 75-token window (0 when it fits)."""
    return max(0, len(_ids(model.tokenizers[0], prompt)) - CHUNK_TOKENS)


def _layer(te, ids, skip: int, final_norm: bool):
    out = te(ids, output_hidden_states=True)
    if skip <= 1 and final_norm:
        return out, out.last_hidden_state
    hidden = out.hidden_states[-max(skip, 1)]
    if final_norm:
        hidden = te.text_model.final_layer_norm(hidden) if hasattr(te, "text_model") else te.final_layer_norm(hidden)
    return out, hidden


def max_clip_skip(model) -> int:
    """The deepest clip_skip the model's text encoder(s) have a layer for (1 = the last layer)."""
    return min(te.config.num_hidden_layers for te in model.text_encoders) + model.dropped_text_layers


def check_clip_skip(model, clip_skip: int | None) -> None:
    """ValueError naming the allowed range when `clip_skip` is not 0/None (the default) or 1..max_clip_skip."""
    deepest = max_clip_skip(model)
    if clip_skip is not None and not 0 <= clip_skip <= deepest:
        raise ValueError(f"clip_skip {clip_skip}: this model's text encoder has {deepest} layers; choose 1..{deepest} "
                         f"(1 = the last layer, 2 = the penultimate) or 0 for the model's default "
                         f"({model.default_clip_skip})")


def encode_tokens(model, token_ids: list, clip_skip: int | None = None) -> TextEmbeds:
    """Embeddings from `tokenize` output. Runs with whatever grad mode the caller set (training needs grads)."""
    import torch

    check_clip_skip(model, clip_skip)
    skip = clip_skip or model.default_clip_skip
    device = model.text_encoders[0].device
    batch, chunks = token_ids[0].shape[:2]
    if model.family != "sdxl":
        te = model.text_encoders[0]
        ids = token_ids[0].reshape(batch * chunks, -1).to(device)
        _, hidden = _layer(te, ids, skip - model.dropped_text_layers, final_norm=True)
        return TextEmbeds(hidden.reshape(batch, chunks * hidden.shape[1], hidden.shape[2]))
    parts, pooled = [], None
    for te, ids in zip(model.text_encoders, token_ids):
        flat = ids.reshape(batch * chunks, -1).to(device)
        out, hidden = _layer(te, flat, skip, final_norm=False)
        parts.append(hidden.reshape(batch, chunks * hidden.shape[1], hidden.shape[2]))
        if hasattr(out, "text_embeds"):
            pooled = out.text_embeds.reshape(batch, chunks, -1)[:, 0]   # SDXL pools the first window
    return TextEmbeds(torch.cat(parts, dim=-1), pooled)


def encode_prompts(model, prompts, clip_skip: int | None = None, long_prompts: str = "truncate",
                   min_chunks: int = 1) -> TextEmbeds:
    """Encode prompts with the model's text encoder(s). `long_prompts`: "truncate" (to 75 tokens) or "chunk"
    (A1111-style: 75-token windows encoded separately and concatenated)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if long_prompts not in ("truncate", "chunk"):
        raise ValueError(f"long_prompts={long_prompts!r}: choose 'truncate' or 'chunk'")
    return encode_tokens(model, tokenize(model, list(prompts), long_prompts, min_chunks), clip_skip)


def sdxl_time_ids(original_hw, crop_top_left, target_hw):
    """SDXL's size/crop conditioning: (orig_h, orig_w, crop_top, crop_left, target_h, target_w)."""
    import torch

    return torch.tensor([*original_hw, *crop_top_left, *target_hw], dtype=torch.float32)
