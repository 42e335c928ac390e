"""The live demo (dfm_diffusers.app) on a tiny DFMPipeline, driven through gradio_client like a browser would."""

import socket

import numpy as np
import pytest
import torch

pytest.importorskip("gradio", reason="the demo's optional extra: pip install 'dfm-diffusers[app]'")
gradio_client = pytest.importorskip("gradio_client")

from diffusers import FluxPipeline  # noqa: E402
from PIL import Image  # noqa: E402

from dfm_diffusers import DFMPipeline  # noqa: E402
from dfm_diffusers.app import build_demo, generate, main  # noqa: E402


@pytest.fixture(scope="module")
def pipe(tokenizer_dir):
    from conftest import make_tiny_flux_components

    pipe = DFMPipeline.from_flux_pipeline(FluxPipeline(**make_tiny_flux_components(tokenizer_dir)), num_stages=2,
                                          steps_per_stage=[2, 2], stage_thresholds=[0.3])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_demo_streams_each_stage_then_the_final_image(pipe, monkeypatch):
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    demo = build_demo(pipe)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        client = gradio_client.Client(f"http://127.0.0.1:{port}/", verbose=False)
        job = client.submit("a cat", "2, 2", "0.3", 3.5, 1.0, 7, 32, api_name="/generate")
        updates = [update for update in job]  # one update per finished stage, as they arrive
    finally:
        demo.close()
    assert len(updates) == 2
    (previews_0, final_0, plot_0, status_0), (previews_1, final_1, _, status_1) = updates
    assert len(previews_0) == 1 and final_0 is None and status_0.startswith("stage 1 of 2")
    assert len(previews_1) == 2 and status_1 == "done"
    assert Image.open(previews_0[0]["image"]).size == (16, 16)  # stage 0's preview at its own resolution
    reference = pipe("a cat", height=32, width=32, steps_per_stage=[2, 2], stage_thresholds=[0.3],
                     guidance_scale=3.5, generator=torch.Generator().manual_seed(7)).images[0]
    final = np.asarray(Image.open(final_1).convert("RGB"))
    assert final.shape == (32, 32, 3)
    assert np.abs(final.astype(int) - np.asarray(reference).astype(int)).max() <= 1  # the pipeline's own image
    assert Image.open(plot_0).size[0] > 100  # the schedule plot


def test_bad_fields_are_one_message(pipe):
    with pytest.raises(ValueError, match="steps per stage: expected numbers"):
        next(generate(pipe, "a cat", steps="two, 2"))
    with pytest.raises(ValueError, match="steps_per_stage"):
        next(generate(pipe, "a cat", steps="1, 2, 3", size=32))


def test_cli_refuses_a_folder_that_is_not_a_pipeline(tmp_path, capsys):
    assert main(["--pipeline", str(tmp_path), "--device", "cpu"]) == 2
    assert "has no model_index.json" in capsys.readouterr().err
