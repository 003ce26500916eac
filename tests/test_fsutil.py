"""training/fsutil.py: atomic writes, and outputs that honour the user's umask (other users and programs — a web
server, a shared models folder — can read a LoRA, checkpoint or sample as they can any other file the user makes)."""
import os
import stat

import pytest

torch = pytest.importorskip("torch")

from comfyui_dreambooth.training import fsutil  # noqa: E402

pytestmark = [pytest.mark.usefixtures("single_thread"),
              pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")]

UMASKS = (0o022, 0o077)


@pytest.fixture(params=UMASKS, ids=lambda m: f"umask{m:03o}")
def umask(request):
    before = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(before)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def assert_tree_modes(root, mask):
    """`root` (a file, or a folder and everything in it) has exactly the modes a plain open()/mkdir() would give."""
    if os.path.isfile(root):
        assert mode(root) == 0o666 & ~mask, f"{root}: {mode(root):o}"
        return
    assert mode(root) == 0o777 & ~mask, f"{root}: {mode(root):o}"
    n = 0
    for folder, dirs, files in os.walk(root):
        for d in dirs:
            assert mode(os.path.join(folder, d)) == 0o777 & ~mask, os.path.join(folder, d)
        for f in files:
            n += 1
            assert mode(os.path.join(folder, f)) == 0o666 & ~mask, f"{os.path.join(folder, f)}: {mode(os.path.join(folder, f)):o}"
    assert n, f"{root} is empty"


def test_atomic_path_and_text_honour_the_umask(tmp_path, umask):
    fsutil.atomic_write_text(str(tmp_path / "a.txt"), "hello")
    with fsutil.atomic_path(str(tmp_path / "b.bin")) as tmp:
        with open(tmp, "wb") as f:
            f.write(b"x")
    fsutil.atomic_write_json(str(tmp_path / "sub" / "c.json"), {"a": 1})
    for name in ("a.txt", "b.bin", "sub/c.json"):
        assert mode(tmp_path / name) == 0o666 & ~umask, name
    assert mode(tmp_path / "sub") == 0o777 & ~umask
    assert sorted(os.listdir(tmp_path)) == ["a.txt", "b.bin", "sub"]     # no temporary files left behind


def test_atomic_path_replacing_a_file_takes_the_umask_mode(tmp_path, umask):
    target = tmp_path / "out.txt"
    target.write_text("old")
    os.chmod(target, 0o600)
    fsutil.atomic_write_text(str(target), "new")
    assert target.read_text() == "new" and mode(target) == 0o666 & ~umask


def test_atomic_temporary_names_never_collide(tmp_path):
    seen = set()
    for _ in range(20):
        with fsutil.atomic_path(str(tmp_path / "x")) as tmp:
            assert tmp not in seen and os.path.dirname(tmp) == str(tmp_path)
            seen.add(tmp)
    assert os.listdir(tmp_path) == ["x"]


def test_atomic_folder_honours_the_umask(tmp_path, umask):
    with fsutil.atomic_folder(str(tmp_path / "folder")) as tmp:
        os.makedirs(os.path.join(tmp, "inner"))
        with fsutil.atomic_path(os.path.join(tmp, "inner", "w.safetensors")) as t:
            open(t, "wb").close()
    assert_tree_modes(str(tmp_path / "folder"), umask)


def test_saved_models_honour_the_umask(tmp_path, sd1, umask):
    from comfyui_dreambooth.training.export.lora import save_kohya_lora
    from comfyui_dreambooth.training.models import save_diffusers, save_single_file
    from comfyui_dreambooth.training.setup import adapters as A

    lora = save_kohya_lora(A.add_adapters(sd1, rank=2, alpha=2.0, lora_type="lora"), str(tmp_path / "loras" / "x.safetensors"))
    assert_tree_modes(lora, umask)
    assert mode(tmp_path / "loras") == 0o777 & ~umask
    for name in ("m.safetensors", "m.ckpt"):
        assert_tree_modes(save_single_file(sd1, str(tmp_path / name), dtype="fp16"), umask)
    assert_tree_modes(save_diffusers(sd1, str(tmp_path / "diffusers" / "m"), dtype="fp16"), umask)


def test_run_folder_files_honour_the_umask(tmp_path, umask):
    from comfyui_dreambooth.training.runs import RunFolder

    run = RunFolder.create(str(tmp_path), "perm", {"a": 1})
    run.append_loss({"step": 1, "loss": 0.5})
    run.truncate_loss(1)

    def write(folder):
        with fsutil.atomic_path(os.path.join(folder, "trainable.safetensors")) as t:
            open(t, "wb").close()
        fsutil.atomic_write_json(os.path.join(folder, "state.json"), {"step": 1})
        os.close(os.open(os.path.join(folder, "optimizer.pt"), os.O_WRONLY | os.O_CREAT, 0o600))   # as safetensors does

    run.save_checkpoint(1, write)
    run.save_final(write)
    assert_tree_modes(str(tmp_path / "dreambooth"), umask)
    assert os.path.exists(run.config_path) and os.path.exists(run.loss_log)


def test_samples_and_class_images_honour_the_umask(tmp_path, umask):
    from PIL import Image

    from comfyui_dreambooth.cli import save_image
    from comfyui_dreambooth.training.data.class_images import _save_png

    image = Image.new("RGB", (8, 8), (10, 20, 30))
    save_image(image, str(tmp_path / "samples" / "s.png"), "a photo")
    _save_png(image, str(tmp_path / "class" / "0001.png"), "a dog", "seed 1")
    assert_tree_modes(str(tmp_path / "samples"), umask)
    assert_tree_modes(str(tmp_path / "class"), umask)
    assert sorted(os.listdir(tmp_path / "class")) == ["0001.png", "0001.txt"]
