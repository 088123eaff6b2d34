"""The synthetic model files through ComfyUI 0.3.75's own detection and loading code (CPU, in-process).

For every registry name:
  tiny: the real file is written and loaded the way a user's file would be; the detected class, the
        keys the module did not get (none, unless the real file has the same leftovers) and, where
        cheap, one forward pass are checked.
  full: a sparse look-alike (header only, truncated to full length: no data on disk) goes through
        detection, and the full key set/shapes are compared with ComfyUI's own module built on the
        meta device (an independent reference: the generators are written from architecture facts).
LoRAs: every key of both sizes is taken by ComfyUI's LoRA loader for the model it patches (tiny: the
written file; full: the spec's shapes on the meta device) and lands on a weight of its shape.
"""
from __future__ import annotations

import logging

import pytest
import torch

from harness.synthetic import REGISTRY, SIZES, get, merged_model_options, model_options, read_info, write_sparse_model

pytestmark = pytest.mark.comfy

DITS = ("flux-dev", "flux-schnell", "newbie", "z-image-turbo")
TES = ("clip-l", "clip-g", "t5xxl", "gemma3-4b", "qwen3-4b")
VAES = ("flux-ae", "sdxl-vae")
LORAS = {"z-image-turbo-distill-lora": "z-image-turbo"}   # LoRA -> the model it patches
# NewBie's Jina pooled path has no module in 0.3.75's NextDiT: ComfyUI drops exactly these ("unet unexpected").
NEWBIE_JINA_KEYS = {"clip_text_pooled_proj.0.weight", "clip_text_pooled_proj.1.weight",
                    "clip_text_pooled_proj.1.bias", "time_text_embed.1.weight", "time_text_embed.1.bias"}

# name -> (supported_models class for tiny, for full, model_base class, ModelType name, file keys ComfyUI drops)
DIT_EXPECT = {
    "flux-dev": ("Flux", "Flux", "Flux", "FLUX", set()),
    "flux-schnell": ("FluxSchnell", "FluxSchnell", "Flux", "FLOW", set()),
    "newbie": ("Lumina2", "Lumina2", "Lumina2", "FLOW", NEWBIE_JINA_KEYS),
    "z-image-turbo": ("ZImage", "ZImage", "Lumina2", "FLOW", set()),
}

# name -> (other files loaded with it, CLIPType name, TEModel of this file, cond_stage_model class, cond width)
TE_EXPECT = {
    "clip-l": ((), "STABLE_DIFFUSION", "CLIP_L", "SD1ClipModel", 768),
    "clip-g": ((), "STABLE_DIFFUSION", "CLIP_G", "SDXLRefinerClipModel", 64),
    "t5xxl": (("clip-l",), "FLUX", "T5_XXL", "FluxClipModel_", 4096),     # the Flux pair
    "gemma3-4b": ((), "LUMINA2", "GEMMA_3_4B", "LuminaTEModel_", 2560),
    "qwen3-4b": ((), "STABLE_DIFFUSION", "QWEN3_4B", "ZImageTEModel_", 2560),
}

VAE_EXPECT = {"flux-ae": (16, "AutoencodingEngine"), "sdxl-vae": (4, "AutoencoderKL")}


def _file_keys(path) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return set(f.keys())


# Jina CLIP v2 has no loader in ComfyUI 0.3.75; tests/integration/test_newbie.py covers it with ours.
NOT_IN_COMFY_0_3_75 = {"jina-clip-v2"}


def test_every_registry_name_is_covered():
    assert set(REGISTRY) == set(DITS) | set(TES) | set(VAES) | set(LORAS) | {"sdxl"} | NOT_IN_COMFY_0_3_75


# ---------------------------------------------------------------- tiny: real files, real loaders

@pytest.mark.parametrize("name", DITS)
def test_tiny_dit_loads_and_runs(comfy, tiny_model, comfy_cleanup, name):
    tiny_cls, _, base_cls, model_type, dropped = DIT_EXPECT[name]
    path = tiny_model(name)
    patcher = comfy.sd.load_diffusion_model(str(path))
    model = patcher.model
    assert type(model.model_config).__name__ == tiny_cls
    assert type(model).__name__ == base_cls
    assert model.model_type.name == model_type
    module_keys = set(model.diffusion_model.state_dict())
    assert module_keys - _file_keys(path) == set(), "keys the module expects but the file lacks"
    assert _file_keys(path) - module_keys == dropped

    x = torch.randn(1, 16, 8, 8)
    if name.startswith("flux"):
        conds = {"c_crossattn": torch.randn(1, 4, 4096), "y": torch.randn(1, 768)}
        if name == "flux-dev":
            conds["guidance"] = torch.tensor([3.5])
    else:
        conds = {"c_crossattn": torch.randn(1, 4, 2560), "num_tokens": 4}
    with torch.no_grad():
        out = model.apply_model(x, torch.tensor([0.5]), **conds)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_tiny_sdxl_checkpoint_loads_and_runs(comfy, tiny_model, comfy_cleanup):
    path = tiny_model("sdxl")
    patcher, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=True)
    model = patcher.model
    # The smallest topology 0.3.75 still routes to model_base.SDXL is Segmind-Vega's (an SDXL subclass).
    assert type(model.model_config) is comfy.supported_models.Segmind_Vega
    assert isinstance(model.model_config, comfy.supported_models.SDXL)
    assert type(model) is comfy.model_base.SDXL and model.model_type.name == "EPS"

    file_keys = _file_keys(path)
    unet_keys = {k.removeprefix("model.diffusion_model.") for k in file_keys if k.startswith("model.diffusion_model.")}
    assert set(model.diffusion_model.state_dict()) == unet_keys

    clip_sd = model.model_config.process_clip_state_dict(comfy.utils.load_torch_file(str(path)))
    clip_module_keys = set(clip.cond_stage_model.state_dict())
    # The real sd_xl_base_1.0 file has no CLIP-L projection/logit scale (ComfyUI only debug-logs that)
    # and an old-transformers position_ids buffer that ComfyUI's CLIP has no slot for.
    assert clip_module_keys - set(clip_sd) == {"clip_l.transformer.text_projection.weight", "clip_l.logit_scale"}
    assert set(clip_sd) - clip_module_keys == {"clip_l.transformer.text_model.embeddings.position_ids"}
    assert vae.latent_channels == 4

    cond = clip.encode_from_tokens_scheduled(clip.tokenize("a photo of a cat"))
    context, pooled = cond[0][0], cond[0][1]["pooled_output"]
    assert context.shape == (1, 77, 2048) and pooled.shape == (1, 1280)
    y = torch.cat([pooled, torch.zeros(1, 2816 - 1280)], dim=1)
    with torch.no_grad():
        out = model.apply_model(torch.randn(1, 4, 8, 8), torch.tensor([500.0]), c_crossattn=context, y=y)
    assert out.shape == (1, 4, 8, 8) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", TES)
def test_tiny_text_encoder_loads_with_its_override(comfy, tiny_model, comfy_cleanup, name):
    partners, clip_type, te_model, cls_name, width = TE_EXPECT[name]
    path = tiny_model(name)
    paths = [str(tiny_model(p)) for p in partners] + [str(path)]
    sd = comfy.utils.load_torch_file(str(path))
    assert comfy.sd.detect_te_model(sd) == comfy.sd.TEModel[te_model]

    opts = merged_model_options(paths)
    assert model_options(path) and set(model_options(path)) <= set(opts)   # tiny TEs need an override
    clip = comfy.sd.load_clip(paths, clip_type=comfy.sd.CLIPType[clip_type], model_options=opts)
    assert type(clip.cond_stage_model).__name__ == cls_name

    # Every module weight is in the files, bar CLIP-L's projection (absent from the real clip_l too).
    module_keys = {k.split(".", 1)[1].removeprefix("transformer.") for k in clip.cond_stage_model.state_dict()
                   if k.split(".", 1)[1].startswith("transformer.")}
    file_keys = set().union(*(_file_keys(p) for p in paths))
    uses_clip_l = name == "clip-l" or "clip-l" in partners
    assert module_keys - file_keys == ({"text_projection.weight"} if uses_clip_l else set())

    cond = clip.encode_from_tokens_scheduled(clip.tokenize("a photo of a cat, <quality>best</quality>"))
    hidden = cond[0][0]
    assert hidden.shape[0] == 1 and hidden.shape[-1] == width and torch.isfinite(hidden).all()


def test_tiny_gemma_tokenizer_ids_stay_inside_the_vocab(comfy, tiny_model):
    from comfy.text_encoders.lumina2 import NTokenizer

    path = tiny_model("gemma3-4b")
    sd = comfy.utils.load_torch_file(str(path))
    tok = NTokenizer(tokenizer_data={"spiece_model": sd["spiece_model"]})
    vocab = model_options(path)["gemma3_4b_model_config"]["vocab_size"]
    ids = [t[0] for t in tok.tokenize_with_weights("1girl, <character_1> 日本語 ✨ über")["gemma3_4b"][0]]
    assert ids[0] == 2 and max(ids) < vocab == sd["model.embed_tokens.weight"].shape[0]


@pytest.mark.parametrize("name", VAES)
def test_tiny_vae_loads_and_decodes(comfy, tiny_model, comfy_cleanup, name):
    channels, cls_name = VAE_EXPECT[name]
    path = tiny_model(name)
    vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(path)))
    assert vae.latent_channels == channels
    assert type(vae.first_stage_model).__name__ == cls_name
    assert set(vae.first_stage_model.state_dict()) == _file_keys(path)
    image = vae.decode(torch.randn(1, channels, 8, 8))
    assert image.shape == (1, 64, 64, 3) and torch.isfinite(image).all()


# ---------------------------------------------------------------- full: sparse files and meta modules

@pytest.fixture(scope="module")
def sparse_full(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sparse-full")

    def make(name):
        path = folder / get(name).filename
        if not path.exists():
            write_sparse_model(name, "full", path)
        return path
    return make


@pytest.mark.parametrize("name", DITS + ("sdxl",))
def test_full_size_detection(comfy, sparse_full, name):
    path = sparse_full(name)
    assert path.stat().st_blocks * 512 < 64 << 20, "the look-alike must be sparse"
    assert read_info(path)["config"] == get(name).config_dict("full")
    sd = comfy.utils.load_torch_file(str(path))                     # mmap: no data is read
    prefix = "model.diffusion_model." if name == "sdxl" else ""
    config = comfy.model_detection.model_config_from_unet(sd, prefix)
    expected = "SDXL" if name == "sdxl" else DIT_EXPECT[name][1]
    assert type(config).__name__ == expected
    if name == "newbie":
        assert config.unet_config["n_layers"] == 36 and config.unet_config["cap_feat_dim"] == 2560
    if name == "z-image-turbo":
        assert config.unet_config["n_layers"] == 30 and config.unet_config.get("pad_tokens_multiple") == 32
    if name.startswith("flux"):
        assert (config.unet_config["depth"], config.unet_config["depth_single_blocks"]) == (19, 38)


@pytest.mark.parametrize("name", TES)
def test_full_size_text_encoder_detection(comfy, sparse_full, name):
    sd = comfy.utils.load_torch_file(str(sparse_full(name)))
    assert comfy.sd.detect_te_model(sd) == comfy.sd.TEModel[TE_EXPECT[name][2]]


def _meta_state_dict(name, size):
    return {s.key: torch.empty(s.shape, dtype=s.dtype, device="meta") for s in get(name).specs(size)}


def _meta_model(comfy, name, size, prefix=""):
    """ComfyUI's model_base object for our (name, size) spec, detected and built on the meta device."""
    sd = _meta_state_dict(name, size)
    config = comfy.model_detection.model_config_from_unet(sd, prefix)
    return config.get_model(sd, prefix, device=torch.device("meta"))


def _meta_reference(comfy, name):
    """ComfyUI's own module for the full-size model, built on the meta device: its state_dict shapes."""
    meta = torch.device("meta")
    if name in DITS or name == "sdxl":
        prefix = "model.diffusion_model." if name == "sdxl" else ""
        module = _meta_model(comfy, name, "full", prefix).diffusion_model
        return {prefix + k: tuple(v.shape) for k, v in module.state_dict().items()}
    if name in TES:
        import comfy.sd1_clip
        import comfy.sdxl_clip
        import comfy.text_encoders.lumina2
        import comfy.text_encoders.sd3_clip
        import comfy.text_encoders.z_image
        cls = {"clip-l": comfy.sd1_clip.SDClipModel, "clip-g": comfy.sdxl_clip.SDXLClipG,
               "t5xxl": comfy.text_encoders.sd3_clip.T5XXLModel,
               "gemma3-4b": comfy.text_encoders.lumina2.Gemma3_4BModel,
               "qwen3-4b": comfy.text_encoders.z_image.Qwen3_4BModel}[name]
        module = cls(device=meta, dtype=torch.float16).transformer
        return {k: tuple(v.shape) for k, v in module.state_dict().items()}
    raise KeyError(name)


# Keys where the real files and ComfyUI's modules differ, as the published files do.
META_ONLY = {"clip-l": {"text_projection.weight"}}            # clip_l.safetensors (246 MB) has none
FILE_ONLY = {"newbie": NEWBIE_JINA_KEYS,
             "t5xxl": {"encoder.embed_tokens.weight"},         # t5xxl_fp16 stores the token table twice
             "gemma3-4b": {"spiece_model"}}                    # the tokenizer travels inside the file


@pytest.mark.parametrize("name", DITS + TES + ("sdxl",))
def test_full_keys_and_shapes_equal_comfy_meta_module(comfy, name):
    ours = {s.key: s.shape for s in get(name).specs("full")}
    if name == "sdxl":   # only the UNet part here: the CLIPs and VAE are full size in the tiny file too
        ours = {k: v for k, v in ours.items() if k.startswith("model.diffusion_model.")}
    reference = _meta_reference(comfy, name)
    assert set(reference) - set(ours) == META_ONLY.get(name, set())
    assert set(ours) - set(reference) == FILE_ONLY.get(name, set())
    mismatched = {k: (ours[k], reference[k]) for k in set(ours) & set(reference) if ours[k] != reference[k]}
    assert mismatched == {}


@pytest.mark.parametrize("name", VAES)
def test_full_size_vae_is_the_tiny_one(name):
    entry = get(name)
    assert [(s.key, s.shape) for s in entry.specs("full")] == [(s.key, s.shape) for s in entry.specs("tiny")]


# ---------------------------------------------------------------- LoRAs: through ComfyUI's LoRA loader

@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("name", sorted(LORAS))
def test_every_lora_key_is_loaded_onto_a_weight_of_its_shape(comfy, tiny_model, caplog, name, size):
    import comfy.lora as comfy_lora    # (after the comfy fixture put ComfyUI on sys.path)

    model = _meta_model(comfy, LORAS[name], size)
    specs = get(name).specs(size)
    # tiny: the written file, read as ComfyUI reads a user's; full (160 MB): the spec's shapes on the meta device.
    lora = comfy.utils.load_torch_file(str(tiny_model(name))) if size == "tiny" else _meta_state_dict(name, size)
    assert set(lora) == {s.key for s in specs}
    key_map = comfy_lora.model_lora_keys_unet(model, {})
    with caplog.at_level(logging.WARNING):
        patches = comfy_lora.load_lora(lora, key_map)
    assert "lora key not loaded" not in caplog.text
    assert len(patches) == len(specs) // 2                      # one patch per down/up pair
    weights = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    dim = get(LORAS[name]).config(size).dim
    qkv_offsets = {}
    for target, adapter in patches.items():
        # q/k/v land on row slices of the fused qkv weight: (key, (dim 0, offset, length)).
        key, (_, offset, length) = target if isinstance(target, tuple) else (target, (0, 0, None))
        up, down = adapter.weights[0], adapter.weights[1]
        rows, cols = weights[key]
        assert (up.shape[0], down.shape[1]) == (length or rows, cols), target
        if isinstance(target, tuple):
            qkv_offsets.setdefault(key, set()).add(offset)
    assert qkv_offsets and all(v == {0, dim, 2 * dim} for v in qkv_offsets.values())
