"""Cache entries carry a checksum: damaged data under an intact header is recomputed, never used (issue 10)."""
import os

import pytest
import torch


def _entry(tmp_path):
    from comfyui_dreambooth.training.data.cache import TensorCache

    cache = TensorCache(str(tmp_path / "cache"))
    value = {"latents": torch.randn(4, 8, 8)}
    cache.put("ab" * 32, value)
    return cache, cache._path("ab" * 32), value


@pytest.mark.parametrize("damage", ["zeros", "flip"])
def test_damaged_data_with_an_intact_header_is_recomputed(tmp_path, damage):
    cache, path, value = _entry(tmp_path)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        header = int.from_bytes(f.read(8), "little")
        f.seek(8 + header + 16)                      # inside the tensor data, header untouched
        data = f.read(32)
        f.seek(8 + header + 16)
        f.write(b"\0" * 32 if damage == "zeros" else bytes(b ^ 0xFF for b in data))
    assert os.path.getsize(path) == size
    assert cache.get("ab" * 32) is None
    assert cache.stats()["recomputed"] == 1
    fresh = cache.get_or_compute("ab" * 32, lambda: value)
    assert torch.equal(fresh["latents"], value["latents"])
    assert torch.equal(cache.get("ab" * 32)["latents"], value["latents"])      # rewritten, valid again


def test_intact_entry_is_a_hit(tmp_path):
    cache, _, value = _entry(tmp_path)
    assert torch.equal(cache.get("ab" * 32)["latents"], value["latents"])
    assert cache.stats()["hits"] == 1 and cache.stats()["recomputed"] == 0


def test_entry_without_a_checksum_is_recomputed(tmp_path):
    from safetensors.torch import save_file

    cache, path, value = _entry(tmp_path)
    save_file({"latents": torch.zeros(4, 8, 8)}, path, metadata={"format": "1"})
    assert cache.get("ab" * 32) is None
