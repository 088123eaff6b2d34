"""Synthetic model files: real key names, shapes and dtypes, deterministic random values.

    python -m harness.synthetic list
    python -m harness.synthetic write flux-dev t5xxl clip-l flux-ae --size full --device cuda --models-dir X

    from harness.synthetic import ensure, model_options
    path = ensure("t5xxl", "tiny", models_dir)        # written once, reused while current
    model_options(path)                               # {"t5xxl_model_config": {...}} for tiny text encoders

Sizes: `full` is the published file's exact key set; `tiny` keeps whatever ComfyUI 0.3.75's detection
reads (Flux: 1 double + 1 single block at width 3072; NewBie/Z-Image: 1 main layer; SDXL: the
Segmind-Vega UNet topology with full text towers and VAE; text encoders: fewer layers/heads/FFN through
a model_options override stored in the file's metadata, output width kept where a DiT consumes it;
VAEs: full; LoRAs: the blocks of the tiny model they patch, at the full rank). Each family module's docstring says why.

No ComfyUI import here: the specs are written from architecture facts; the integration tests
cross-check them against ComfyUI's own modules built on the meta device.
"""
from .cache import ensure, merged_model_options, model_options, model_path, read_info, write_sparse_model
from .registry import REGISTRY, SIZES, SPEC_VERSION, UnknownModelError, get
from .spec import TensorSpec, count_params

__all__ = ["REGISTRY", "SIZES", "SPEC_VERSION", "TensorSpec", "UnknownModelError", "count_params",
           "ensure", "get", "merged_model_options", "model_options", "model_path", "read_info", "write_sparse_model"]
