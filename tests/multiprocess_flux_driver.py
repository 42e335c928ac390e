"""Test instrumentation for tests/test_multiprocess.py (not a test itself): train_dfm_flux.main under
``accelerate launch``, recording per rank what it did into ``<output_dir>/rank<r>.json``: the (epoch, index) of every
training sample it loaded, its sample_fn / export_fn calls, the images it saved, its cache builds, the process
group it saw. Usage: ``accelerate launch ... tests/multiprocess_flux_driver.py <train_dfm_flux.py arguments>``."""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import PIL.Image  # noqa: E402

import train_dfm_flux  # noqa: E402
from dfm_diffusers.training import flux, flux_cache, loop  # noqa: E402


def main(argv):
    output_dir = argv[argv.index("--output_dir") + 1]
    record = {"samples": [], "sample_fn_steps": [], "export_fn_calls": 0, "images_saved": [], "cache_builds": []}

    def patch(owner, name, wrapper):
        original = getattr(owner, name)
        setattr(owner, name, lambda *a, **k: wrapper(original, *a, **k))

    def getitem(original, self, index):
        record["samples"].append([self.epoch, int(index)])
        return original(self, index)

    def sample_fn(original, self, model, step):
        record["sample_fn_steps"].append(step)
        return original(self, model, step)

    def export_fn(original, self, model, folder):
        record["export_fn_calls"] += 1
        return original(self, model, folder)

    def save_image(original, self, fp, *a, **k):
        record["images_saved"].append(os.path.relpath(str(fp), output_dir))
        return original(self, fp, *a, **k)

    def build(original, self, *a, **k):
        counts = original(self, *a, **k)
        record["cache_builds"].append(counts)
        return counts

    patch(loop.SeededSamples, "__getitem__", getitem)
    patch(flux.FluxTask, "sample_fn", sample_fn)
    patch(flux.FluxTask, "export_fn", export_fn)
    patch(PIL.Image.Image, "save", save_image)
    patch(flux_cache.FluxEmbeddingCache, "build", build)
    try:
        result = train_dfm_flux.main(argv)
        record["global_step"] = result["global_step"]
    finally:
        state = flux.distributed_state()
        record.update(rank=state.process_index, num_processes=state.num_processes,
                      distributed_type=str(state.distributed_type))
        with open(os.path.join(output_dir, f"rank{state.process_index}.json"), "w") as f:
            json.dump(record, f)


if __name__ == "__main__":
    main(sys.argv[1:])
