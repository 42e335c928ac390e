"""A live coarse-to-fine demo of a DFM pipeline in the browser (Gradio).

    pip install "dfm-diffusers[app]"
    python -m dfm_diffusers.app --pipeline PATH_OR_REPO [--device cuda] [--dtype bfloat16] [--port 7860] [--share]

A DFMPipeline folder (text-to-image) asks for a prompt, a DFMDiTPipeline folder for a class label; both take the
steps per stage, the stage thresholds, the guidance and the seed. Each stage's preview is shown as soon as the stage
is done (``callback_on_stage_end``), then the final image, next to a plot of the per-stage sigma schedule.
"""

from __future__ import annotations

import argparse
import os
import queue
import sys
import tempfile
import threading

import torch

from .visualize import line_plot

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def import_gradio():
    """gradio, or a clear error saying how to install it (it is the optional ``app`` extra)."""
    try:
        import gradio
    except ImportError:
        raise SystemExit('the demo needs gradio: pip install "dfm-diffusers[app]" (or pip install gradio)') from None
    return gradio


def load_pipeline(path: str, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """The DFMPipeline or DFMDiTPipeline saved at ``path`` (a folder or a Hub id), on ``device``."""
    import json

    from .pipelines import DFMDiTPipeline, DFMPipeline
    from .pipelines.hub import pipeline_class_name

    folder = path
    if not os.path.isdir(path):
        from huggingface_hub import snapshot_download

        folder = snapshot_download(path, allow_patterns=["model_index.json"])
    index_path = os.path.join(folder, "model_index.json")
    if not os.path.isfile(index_path):
        raise ValueError(f"{path} has no model_index.json: not a pipeline folder")
    with open(index_path, encoding="utf-8") as f:
        name = pipeline_class_name(json.load(f))
    classes = {"DFMPipeline": DFMPipeline, "DFMDiTPipeline": DFMDiTPipeline}
    if name not in classes:
        raise ValueError(f"{path} holds a {name}; the demo runs a DFMPipeline or a DFMDiTPipeline")
    pipe = classes[name].from_pretrained(path, dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def parse_numbers(text: str, kind, name: str):
    """"30, 10" -> [30, 10]; "" -> None (the scheduler's own); ValueError naming the field otherwise."""
    text = (text or "").strip()
    if not text:
        return None
    try:
        return [kind(x) for x in text.replace(",", " ").split()]
    except ValueError:
        raise ValueError(f"{name}: expected numbers separated by commas, got {text!r}") from None


def schedule_plot(scheduler, path: str) -> str:
    """PNG of every stage's sigma against the step (after ``set_timesteps``)."""
    sigmas = scheduler.sigmas.float().cpu()
    series = {f"stage {s}": sigmas[:, s].tolist() for s in range(sigmas.shape[1])}
    return line_plot(series, path, title="per-stage sigma", xlabel="step", ylabel="sigma", size=(560, 320))


def generate(pipe, condition, steps: str = "", thresholds: str = "", guidance_scale: float = 1.0,
             true_cfg_scale: float = 1.0, seed: int = 0, size: int | None = None, workdir: str | None = None):
    """Run ``pipe`` in a worker thread and yield (previews, final image or None, schedule plot path or None, status)
    each time a stage is done. ``condition``: the prompt (DFMPipeline) or the class label (DFMDiTPipeline)."""
    from .pipelines import DFMDiTPipeline

    steps_per_stage = parse_numbers(steps, int, "steps per stage")
    stage_thresholds = parse_numbers(thresholds, float, "stage thresholds")
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    num_stages = pipe.transformer.config.num_stages
    events: queue.Queue = queue.Queue()
    call = dict(steps_per_stage=steps_per_stage, stage_thresholds=stage_thresholds, generator=generator,
                guidance_scale=float(guidance_scale), output_type="pil",
                callback_on_stage_end=lambda p, stage, images: events.put(("stage", stage, images[0])))
    if isinstance(pipe, DFMDiTPipeline):
        call["class_labels"] = [int(condition)]
    else:
        size = int(size or pipe.default_sample_size * pipe.vae_scale_factor)
        call.update(prompt=condition, true_cfg_scale=float(true_cfg_scale), height=size, width=size)

    def work():
        try:
            pipe(**call)
            events.put(("done", None, None))
        except Exception as err:  # shown to the user as one message
            events.put(("error", None, err))

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    previews, plot = [], None
    workdir = workdir or tempfile.mkdtemp(prefix="dfm-app-")
    while True:
        kind, stage, payload = events.get()
        if kind == "error":
            raise payload
        if kind == "done":
            break
        if plot is None:
            plot = schedule_plot(pipe.scheduler, os.path.join(workdir, f"schedule-{seed}.png"))
        final = payload if stage == num_stages - 1 else None
        previews.append(payload)
        status = "done" if final is not None else f"stage {stage + 1} of {num_stages} done"
        yield list(previews), final, plot, status
    worker.join()


def build_demo(pipe, title: str = "DFM: coarse-to-fine generation"):
    """The Gradio Blocks app for ``pipe`` (API name ``/generate``, streaming one update per stage)."""
    gr = import_gradio()
    from .pipelines import DFMDiTPipeline

    is_dit = isinstance(pipe, DFMDiTPipeline)
    sched = pipe.scheduler.config

    def run(condition, steps, thresholds, guidance_scale, true_cfg_scale, seed, size):
        try:
            yield from generate(pipe, condition, steps, thresholds, guidance_scale, true_cfg_scale, seed, size)
        except ValueError as err:
            raise gr.Error(str(err)) from None

    with gr.Blocks(title=title) as demo:
        gr.Markdown(f"## {title}\n{type(pipe).__name__}, {sched.num_stages} stages: each stage's preview appears as "
                    f"soon as it is ready, coarse to fine.")
        with gr.Row():
            with gr.Column():
                if is_dit:
                    condition = gr.Number(label="class label", value=0, precision=0)
                else:
                    condition = gr.Textbox(label="prompt", value="a photo of a cat")
                steps = gr.Textbox(label="steps per stage", value=", ".join(map(str, sched.steps_per_stage)))
                thresholds = gr.Textbox(label="stage thresholds (sigma at which the next stage starts)",
                                        value=", ".join(map(str, sched.stage_thresholds)))
                guidance = gr.Number(label="guidance scale" + (" (CFG)" if is_dit else " (FLUX guidance input)"),
                                     value=1.0 if is_dit else 3.5)
                true_cfg = gr.Number(label="true CFG scale", value=1.0, visible=not is_dit)
                seed = gr.Number(label="seed", value=0, precision=0)
                size = gr.Number(label="size (pixels)", precision=0, visible=not is_dit,
                                 value=None if is_dit else pipe.default_sample_size * pipe.vae_scale_factor)
                button = gr.Button("Generate", variant="primary")
            with gr.Column():
                status = gr.Markdown("")
                previews = gr.Gallery(label="stage previews, coarse to fine", columns=sched.num_stages, height=260,
                                      format="png")
                final = gr.Image(label="final image", type="pil", format="png")
                plot = gr.Image(label="schedule", type="filepath")
        button.click(run, [condition, steps, thresholds, guidance, true_cfg, seed, size],
                     [previews, final, plot, status], api_name="generate")
    return demo.queue()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", required=True, help="a DFMPipeline or DFMDiTPipeline folder or Hub id")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="default: bfloat16 on a GPU, float32 on the CPU")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="also open a public Gradio link")
    args = parser.parse_args(argv)
    import_gradio()
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
    try:
        pipe = load_pipeline(args.pipeline, args.device, dtype)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    build_demo(pipe).launch(server_port=args.port, share=args.share)
    return 0


if __name__ == "__main__":
    sys.exit(main())
