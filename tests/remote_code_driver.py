"""Test instrumentation for tests/test_self_contained.py (not a test itself): loads self-contained DFM folders with
plain diffusers in a process where ``dfm_diffusers`` cannot be imported, and saves what it generates.

Usage: ``python remote_code_driver.py SPEC.json``; SPEC: {"flux": folder, "dit": folder, "hub_commit": sha,
"resaved": folder, "out": file}. Writes {name: image tensor} to ``out`` with torch.save.
"""

import importlib.abc
import json
import os
import shutil
import sys


class BlockDfmDiffusers(importlib.abc.MetaPathFinder):
    """Makes ``import dfm_diffusers`` fail, as in an environment where the library is not installed."""

    def find_spec(self, name, path, target=None):
        if name.split(".")[0] == "dfm_diffusers":
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
        return None


def main(spec_path):
    sys.meta_path.insert(0, BlockDfmDiffusers())
    try:
        import dfm_diffusers  # noqa: F401
    except ModuleNotFoundError:
        pass
    else:
        raise SystemExit("dfm_diffusers is importable: the test would prove nothing")

    import torch
    from diffusers import AutoModel, DiffusionPipeline
    from huggingface_hub.constants import HF_HUB_CACHE

    with open(spec_path) as f:
        spec = json.load(f)
    out, classes = {}, {}

    def run(name, pipe, **call):
        pipe.set_progress_bar_config(disable=True)
        classes[name] = [type(pipe).__module__, type(pipe.transformer).__module__, type(pipe.scheduler).__module__]
        out[name] = pipe(generator=torch.Generator().manual_seed(0), output_type="pt", **call).images

    flux_call = dict(prompt="a cat", height=32, width=32)
    run("flux", DiffusionPipeline.from_pretrained(spec["flux"], trust_remote_code=True), **flux_call)
    run("dit", DiffusionPipeline.from_pretrained(spec["dit"], trust_remote_code=True), class_labels=[1, 2])

    # the Hub path: the same folder as the snapshot of a repo in the (offline) Hub cache, loaded at a pinned revision
    repo_dir = os.path.join(HF_HUB_CACHE, "models--someone--tiny-dfm")
    shutil.copytree(spec["flux"], os.path.join(repo_dir, "snapshots", spec["hub_commit"]))
    os.makedirs(os.path.join(repo_dir, "refs"), exist_ok=True)
    with open(os.path.join(repo_dir, "refs", "main"), "w") as f:
        f.write(spec["hub_commit"])
    hub = DiffusionPipeline.from_pretrained("someone/tiny-dfm", revision=spec["hub_commit"], trust_remote_code=True)
    run("hub", hub, **flux_call)

    # a model alone, through AutoModel and its config's auto_map: the pipeline's very class
    model = AutoModel.from_pretrained(os.path.join(spec["flux"], "transformer"), trust_remote_code=True)
    classes["automodel_is_pipeline_class"] = type(model) is type(hub.transformer)
    out["automodel_weights_equal"] = torch.tensor(
        all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), hub.transformer.state_dict().values()))
    )

    # saving the remote-code pipeline writes a self-contained folder again
    hub.save_pretrained(spec["resaved"])
    run("resaved", DiffusionPipeline.from_pretrained(spec["resaved"], trust_remote_code=True), **flux_call)

    classes["dfm_diffusers_imported"] = any(m.split(".")[0] == "dfm_diffusers" for m in sys.modules)
    out["classes"] = classes
    torch.save(out, spec["out"])


if __name__ == "__main__":
    main(sys.argv[1])
