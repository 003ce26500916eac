"""One rank of data-parallel trainings, launched by tests/test_multiprocess.py through torch's launcher:

    python -m torch.distributed.run --standalone --nproc_per_node 2 multiprocess_worker.py SPEC.json

SPEC: {"instance_dir", "output_root", "phases": [PHASE, ...]}; the phases run one after another in the same
processes (as a long-lived process runs queued prompts). PHASE: {"out_dir", "settings": {changes to
tiny_settings}, "resume": "auto", "stop_at": step or null, "fail_rank": rank or null, "fail_at": step,
"expect_error": false, "half": false (the model loaded in bf16), "sample": false (rank 0 samples the result),
"validation_losses": null or the subject losses rank 0's validations report, in turn (validation.measure scripted)}. Each rank writes out_dir/rank-R.json (run path, steps, interrupted, its log lines, the
error when expect_error) and out_dir/rank-R.safetensors (its trained tensors), so the test can compare ranks.
"""
from __future__ import annotations

import json
import os
import sys


def main(spec_path: str) -> int:
    with open(spec_path, encoding="utf-8") as f:
        spec = json.load(f)
    for phase in spec["phases"]:
        run_phase(spec, phase)
    return 0


def run_phase(spec: dict, phase: dict) -> None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from safetensors.torch import save_file
    from trainer_fixtures import tiny_settings

    from comfyui_dreambooth.training import trainer
    from comfyui_dreambooth.training.data.settings import ConceptSettings
    from comfyui_dreambooth.training.models import build_tiny_model

    rank = int(os.environ["RANK"])
    settings = tiny_settings(**phase["settings"])
    concept = ConceptSettings(instance_dir=spec["instance_dir"], instance_prompt="a photo of sks dog",
                              class_prompt="a photo of dog", num_class_images_per_image=0)
    steps = []
    if phase.get("fail_rank") == rank:           # this rank fails mid-run; the others must not hang
        from comfyui_dreambooth.training import loop

        real = loop.micro_batch_loss

        def failing(job, plan_item, step, te_frozen):
            if step + 1 >= phase["fail_at"]:
                raise RuntimeError(f"injected failure on rank {rank} at step {step + 1}")
            return real(job, plan_item, step, te_frozen)
        loop.micro_batch_loss = failing      # run_steps looks it up in loop.py at each batch
    if phase.get("validation_losses") and rank == 0:     # only the main process validates
        from comfyui_dreambooth.training import validation

        losses = iter(phase["validation_losses"])
        validation.measure = lambda job: dict.fromkeys(("loss", "loss_low", "loss_mid", "loss_high"),
                                                       next(losses)) | {"prior_drift": 0.0}
    stop_at = phase.get("stop_at")
    said = []
    callbacks = trainer.TrainCallbacks(progress=lambda p: steps.append(p["step"]), log=said.append,
                                       should_stop=(lambda: bool(steps) and steps[-1] >= stop_at) if stop_at else None)
    record = {"rank": rank, "log": said}
    model = None
    try:
        model = build_tiny_model("sd1")
        if phase.get("half"):
            import torch

            model = model.replace(unet=model.unet.to(torch.bfloat16),
                                  text_encoders=[te.to(torch.bfloat16) for te in model.text_encoders])
        result = trainer.train(model, [concept], settings,
                               output_root=phase.get("output_root", spec["output_root"]),
                               resume=phase.get("resume", "auto"), callbacks=callbacks)
        record.update(run=result.run_dir, steps=result.steps, loss=result.final_loss)
        model = result.model
        if phase.get("sample") and rank == 0:
            import torch

            from comfyui_dreambooth.training.sampling import generate

            images = generate(model, "a photo of sks dog", steps=2, width=64, height=64)
            record["sampled"] = [list(images.shape), bool(torch.isfinite(images).all())]
    except trainer.TrainingInterrupted as e:
        record.update(run=e.run_dir, steps=e.step, interrupted=True, checkpoint=e.checkpoint)
    except Exception as e:
        if not phase.get("expect_error"):
            raise
        record["error"] = f"{type(e).__name__}: {e}"
    record["progress_steps"] = steps
    os.makedirs(phase["out_dir"], exist_ok=True)
    if model is not None:
        tensors = {f"unet.{k}": v for k, v in model.unet.state_dict().items() if "lora" in k}
        for i, te in enumerate(model.text_encoders):
            tensors.update({f"te{i}.{k}": v for k, v in te.state_dict().items() if "lora" in k})
        save_file({k: v.detach().float().contiguous() for k, v in tensors.items()},
                  os.path.join(phase["out_dir"], f"rank-{rank}.safetensors"))
    with open(os.path.join(phase["out_dir"], f"rank-{rank}.json"), "w", encoding="utf-8") as f:
        json.dump(record, f)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
