"""The pack in both dependency worlds ComfyUI installs have (issue 9):
  (a) transformers 4.x + huggingface-hub 0.x + diffusers <= 0.37, (b) transformers 5 + hub >= 1 + the newest diffusers.
CI runs the whole suite in (b) and this module in (a) (`.ci/world-a-constraints.txt`), so everything here must pass
in both: offline tokenizers, loading both layouts, LoRA with the text encoder under gradient checkpointing, full
fine-tune, kohya LoRA + checkpoint export, sampling. Tiny models, ~1 min on one CPU thread.
"""
import pytest

pytestmark = pytest.mark.usefixtures("single_thread")


def test_versions_reported():
    """Which world this run is in, for the log (`pytest -rA` / failures show it)."""
    import diffusers
    import huggingface_hub
    import transformers

    world = "a" if int(transformers.__version__.split(".")[0]) < 5 else "b"
    print(f"world {world}: transformers {transformers.__version__}, huggingface-hub {huggingface_hub.__version__}, "
          f"diffusers {diffusers.__version__}")


# --------------------------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pad,pad_id", [("<|endoftext|>", 49407), ("!", 0)])
def test_clip_tokenizer_offline(pad, pad_id, tmp_path):
    from comfyui_dreambooth.training.models import tokenizing

    tokenizing.clip_tokenizer.cache_clear()
    tok = tokenizing.clip_tokenizer(pad)
    assert len(tok) == 49408 and tok.model_max_length == 77
    assert tok.pad_token_id == pad_id and tok.bos_token_id == 49406 and tok.eos_token_id == 49407
    assert tok("a photo of sks dog").input_ids == [49406, 320, 1125, 539, 48136, 1929, 49407]
    assert tok("A Photo of SKS, dog")["input_ids"][1:-1] == [320, 1125, 539, 48136, 267, 1929]
    padded = tok("a dog", padding="max_length", max_length=77, truncation=True).input_ids
    assert len(padded) == 77 and padded[:3] == [49406, 320, 1929] and padded[3:5] == [49407, pad_id]
    long = tok(" ".join(["dog"] * 100), add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
    assert long == [1929] * 100
    tok.save_pretrained(str(tmp_path / "tok"))            # a diffusers folder carries it; reloads the same
    again = type(tok).from_pretrained(str(tmp_path / "tok"))
    assert again("a photo of sks dog").input_ids == [49406, 320, 1125, 539, 48136, 1929, 49407]
    assert again.pad_token_id == pad_id
