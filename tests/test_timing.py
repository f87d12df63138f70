"""ComponentTimer (idcrafter/utils/timing.py) and the pipeline's component timer."""

from __future__ import annotations

import time

import pytest
import torch


class Work:
    def outer(self):
        time.sleep(0.05)
        return self.inner() + 1

    def inner(self):
        time.sleep(0.03)
        return 1


def test_nested_calls_bill_the_outer_component_and_methods_are_restored():
    from idcrafter.utils.timing import ComponentTimer

    work = Work()
    timer = ComponentTimer([("a", work, "outer"), ("b", work, "inner")], sync=lambda: None)
    with timer:
        assert work.outer() == 2  # inner inside outer: all of it is "a"
        assert work.inner() == 1
        timer.on_step_end(None, 0, None, {})
    assert "outer" not in vars(work) and "inner" not in vars(work)  # the class methods again
    assert 0.08 <= timer.seconds["a"] < 0.5 and 0.03 <= timer.seconds["b"] < 0.2
    summary = timer.summary(step_component="a")
    assert summary["steps"] == 1 and summary["s_per_step"] == timer.seconds["a"]
    assert summary["share_a"] + summary["share_b"] + summary["share_other"] == pytest.approx(1.0)


def test_pipeline_timer_counts_steps_and_every_component():
    from PIL import Image

    from idcrafter.video.config import IDCrafterConfig
    from idcrafter.video.pipeline import IDCrafterPipeline
    from idcrafter.video.presets import build_components

    pipe = IDCrafterPipeline.from_components(build_components(IDCrafterConfig.from_preset("tiny")))
    pipe.set_progress_bar_config(disable=True)
    calls = []
    pipe.transformer.register_forward_hook(lambda *a: calls.append(1))
    timer = pipe.component_timer()
    with timer:
        pipe("a toy", [Image.new("RGB", (64, 64), "red")], num_inference_steps=3, num_frames=5,
             generator=torch.Generator().manual_seed(0), callback_on_step_end=timer.on_step_end)
    summary = timer.summary()
    assert summary["steps"] == 3 and len(calls) == 3  # one batched three-pass forward per step
    assert set(summary) == {"steps", "s_per_step", "total_s", "share_transformer", "share_vae",
                            "share_text_encoder", "share_other"}  # no VLM in this pipeline
    assert all(summary[k] > 0 for k in ("share_transformer", "share_vae", "share_text_encoder"))
    shares = sum(v for k, v in summary.items() if k.startswith("share_"))
    assert shares == pytest.approx(1.0) and 0 < summary["s_per_step"] < summary["total_s"]
    assert "forward" not in vars(pipe.transformer) and "encode_prompt" not in vars(pipe)
