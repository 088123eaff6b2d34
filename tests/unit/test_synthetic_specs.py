"""harness.synthetic without ComfyUI: full-size key sets by the numbers, the streaming writer, the cache
and the CLI. Full-size files are never written here (a sparse look-alike at most)."""
from __future__ import annotations

import doctest
import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from harness import synthetic
from harness.synthetic import REGISTRY, cache, count_params, ensure, get, read_info, write_sparse_model
from harness.synthetic.__main__ import main
from harness.synthetic.spec import BYTES, TensorSpec
from harness.synthetic.writer import read_header, write_specs

# Parameter counts of the published files (research/models.md tables 0 and 0.1). Where ComfyUI's
# module and the published file differ, the file wins (the CLI writes look-alikes of users' files):
CLIP_L_PROJECTION = 768 * 768              # not in clip_l.safetensors (246 MB = 123,060,480 x 2 B)
T5_DUPLICATE_EMBED = 32128 * 4096          # t5xxl_fp16 stores encoder.embed_tokens besides shared
FULL_PARAMS = {
    "jina-clip-v2": 558_314_496,  # text tower only (models.md section 1.4)
    "flux-dev": 11_901_408_320,
    "flux-schnell": 11_891_178_560,
    # UNet + CLIP-L + CLIP-G + VAE; sd_xl_base_1.0 has no CLIP-L projection, and keeps the OpenCLIP
    # logit_scale scalar (+1).
    "sdxl": 3_469_427_691 - CLIP_L_PROJECTION + 1,
    "newbie": 3_486_636_096,
    "z-image-turbo": 6_154_912_576,
    # rank 32 x 7 projections x 34 blocks: 34 x 32 x (4 x 2 x 3840 + 3 x (3840 + 10240))
    "z-image-turbo-distill-lora": 79_380_480,
    "clip-l": 123_650_304 - CLIP_L_PROJECTION,
    "clip-g": 694_659_840,
    "t5xxl": 4_762_310_656 + T5_DUPLICATE_EMBED,
    "gemma3-4b": 3_880_263_168,
    "qwen3-4b": 4_022_468_096,
    "flux-ae": 83_819_683,
    "sdxl-vae": 83_653_863,
}
FULL_TENSORS = {"flux-dev": 780, "flux-schnell": 776, "z-image-turbo-distill-lora": 476}


def test_every_name_has_a_count():
    assert set(FULL_PARAMS) == set(REGISTRY)


@pytest.mark.parametrize("name", sorted(FULL_PARAMS))
def test_full_parameter_count(name):
    specs = get(name).specs("full")
    assert count_params(specs) == FULL_PARAMS[name]
    if name in FULL_TENSORS:
        assert len(specs) == FULL_TENSORS[name]


def test_full_sizes_match_published_files():
    gb = {n: cache.model_bytes(n, "full") / 1e9 for n in REGISTRY}
    assert round(gb["flux-dev"], 2) == 23.80
    assert round(gb["t5xxl"], 2) == 9.79
    assert round(gb["sdxl"], 2) == 6.94
    assert round(gb["clip-l"], 3) == 0.246
    assert round(gb["z-image-turbo"], 2) == 12.31
    # The published file is 158,826,336 bytes: these bf16 tensors plus a 65,376-byte JSON header.
    assert cache.model_bytes("z-image-turbo-distill-lora", "full") == 158_826_336 - 65_376


def test_sdxl_checkpoint_parts_and_dtypes():
    specs = get("sdxl").specs("full")
    unet = [s for s in specs if s.key.startswith("model.diffusion_model.")]
    assert count_params(unet) == 2_567_463_684 and len(unet) == 1680
    assert {s.dtype for s in specs} == {torch.float16, torch.int64}   # int64: CLIP-L position_ids
    keys = {s.key for s in specs}
    assert "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight" in keys
    assert "first_stage_model.post_quant_conv.weight" in keys


def test_tiny_variants_keep_what_detection_reads():
    flux_tiny = {s.key: s.shape for s in get("flux-dev").specs("tiny")}
    assert flux_tiny["img_in.weight"] == (3072, 64) and "guidance_in.in_layer.weight" in flux_tiny
    assert not any(k.startswith(("double_blocks.1.", "single_blocks.1.")) for k in flux_tiny)
    assert "guidance_in.in_layer.weight" not in {s.key for s in get("flux-schnell").specs("tiny")}
    for name, dim in (("newbie", 2304), ("z-image-turbo", 3840)):
        shapes = {s.key: s.shape for s in get(name).specs("tiny")}
        assert shapes["cap_embedder.1.weight"] == (dim, 2560) and "layers.0.attention.qkv.weight" in shapes
    assert "clip_text_pooled_proj.1.weight" in {s.key for s in get("newbie").specs("tiny")}
    # The tiny LoRA patches exactly the tiny Z-Image's blocks (layers.0 and the 2 + 2 refiners), at full rank.
    full = {s.key: s.shape for s in get("z-image-turbo-distill-lora").specs("full")}
    tiny = {s.key: s.shape for s in get("z-image-turbo-distill-lora").specs("tiny")}
    blocks = {k.split(".attention.")[0].split(".feed_forward.")[0].removeprefix("diffusion_model.") for k in tiny}
    assert blocks == {"layers.0", "noise_refiner.0", "noise_refiner.1", "context_refiner.0", "context_refiner.1"}
    assert all(full[k] == shape for k, shape in tiny.items()) and len(tiny) == 5 * 7 * 2


def test_tiny_text_encoders_carry_their_override():
    assert get("t5xxl").model_options["tiny"] == {"t5xxl_model_config": {"num_heads": 2, "d_kv": 32, "d_ff": 64}}
    assert set(get("clip-l").model_options["tiny"]) == {"model_config"}
    assert get("gemma3-4b").model_options["tiny"]["gemma3_4b_model_config"]["vocab_size"] == 512
    assert set(get("qwen3-4b").model_options["tiny"]) == {"qwen3_4b_model_config"}
    assert all(not e.model_options.get("full") for e in REGISTRY.values())


def test_unknown_name_error_lists_the_known_names(capsys):
    with pytest.raises(synthetic.UnknownModelError) as e:
        get("flux-pro")
    assert "flux-dev" in str(e.value) and "qwen3-4b" in str(e.value)
    assert main(["write", "flux-dev", "flux-pro"]) == 2
    err = capsys.readouterr().err
    assert "flux-pro" in err and "known names" in err and "sdxl-vae" in err


def test_cli_refuses_full_size_on_the_cpu(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["write", "flux-dev", "--size", "full", "--models-dir", str(tmp_path)]) == 2
    assert "--device cuda" in capsys.readouterr().err and list(tmp_path.iterdir()) == []


def test_cli_module_entry_point(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(cache.REPO_ROOT)}
    bad = subprocess.run([sys.executable, "-m", "harness.synthetic", "write", "nope", "--models-dir", str(tmp_path)],
                         capture_output=True, text=True, env=env, cwd=cache.REPO_ROOT)
    assert bad.returncode == 2 and "known names" in bad.stderr
    listing = subprocess.run([sys.executable, "-m", "harness.synthetic", "list"], capture_output=True, text=True,
                             env=env, cwd=cache.REPO_ROOT, check=True)
    assert all(name in listing.stdout for name in REGISTRY) and "23.80 GB" in listing.stdout


# ---------------------------------------------------------------- the writer

def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_tiny_round_trip_is_deterministic_and_never_zero(tmp_path):
    # gemma3-4b tiny: 21 MB, and it has the uint8 tokenizer payload besides bf16 weights.
    path = ensure("gemma3-4b", "tiny", tmp_path / "a", seed=7)
    assert path == tmp_path / "a" / "text_encoders" / "gemma_3_4b_it_bf16.safetensors"
    specs = get("gemma3-4b").specs("tiny")
    with safe_open(str(path), "pt") as f:
        assert list(f.keys()) == sorted(s.key for s in specs)
        meta = f.metadata()
        for s in specs:
            t = f.get_tensor(s.key)
            assert tuple(t.shape) == s.shape and t.dtype == s.dtype
            assert t.count_nonzero() > 0, s.key
    info = json.loads(meta["lowvram.synthetic"])
    assert (info["name"], info["size"], info["seed"]) == ("gemma3-4b", "tiny", 7)
    assert info["model_options"] == get("gemma3-4b").model_options["tiny"] == synthetic.model_options(path)
    assert _sha(ensure("gemma3-4b", "tiny", tmp_path / "b", seed=7)) == _sha(path)
    assert _sha(ensure("gemma3-4b", "tiny", tmp_path / "c", seed=8)) != _sha(path)


def test_values_have_realistic_scales():
    from harness.synthetic.init import make_tensor

    w = make_tensor(TensorSpec("x.weight", (256, 1024), torch.float32, "weight"), seed=0)
    std = 1024 ** -0.5
    assert abs(w.std().item() / std - 1) < 0.1
    assert (w.abs() > 5 * std).sum(dim=1).min() >= 1           # outliers in every output channel
    norm = make_tensor(TensorSpec("n.weight", (1024,), torch.float32, "norm"), seed=0)
    assert abs(norm.mean().item() - 1) < 0.01 and norm.std() > 0
    bias = make_tensor(TensorSpec("b.bias", (1024,), torch.float32, "bias"), seed=0)
    assert bias.abs().max() < 0.2 and bias.count_nonzero() == 1024
    lora = make_tensor(TensorSpec("l.lora_up.weight", (3840, 32), torch.float32, "lora"), seed=0)
    assert abs(lora.std().item() / 0.01 - 1) < 0.05 and abs(lora.mean().item()) < 1e-3


def test_atomic_write_leaves_nothing_on_error(tmp_path):
    def explode():
        raise RuntimeError("disk on fire")

    specs = [TensorSpec("a.weight", (64, 64), torch.float16, "weight"),
             TensorSpec("blob", (16,), torch.uint8, BYTES, data=explode),
             TensorSpec("c.weight", (64, 64), torch.float16, "weight")]
    target = tmp_path / "m.safetensors"
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_specs(target, specs, {}, seed=0)
    assert list(tmp_path.iterdir()) == []

    target.write_bytes(b"previous file")                         # an existing file survives a failed rewrite
    with pytest.raises(RuntimeError):
        write_specs(target, specs, {}, seed=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]
    assert target.read_bytes() == b"previous file"


def test_ensure_reuses_a_current_file_and_rewrites_a_stale_one(tmp_path, monkeypatch):
    path = ensure("clip-g", "tiny", tmp_path)
    writes = []
    real_write = cache.write_specs
    monkeypatch.setattr(cache, "write_specs", lambda *a, **k: writes.append(a[0]) or real_write(*a, **k))
    assert ensure("clip-g", "tiny", tmp_path) == path and writes == []
    ensure("clip-g", "tiny", tmp_path, seed=1)                   # other seed -> rewritten
    assert len(writes) == 1 and read_info(path)["seed"] == 1
    with open(path, "r+b") as f:                                 # cut short -> rewritten
        f.truncate(path.stat().st_size - 10)
    ensure("clip-g", "tiny", tmp_path, seed=1)
    assert len(writes) == 2 and cache.is_current(path, "clip-g", "tiny", 1)
    path.write_bytes(b"not safetensors at all")                  # garbage -> rewritten
    ensure("clip-g", "tiny", tmp_path, seed=1)
    assert len(writes) == 3


def test_sparse_full_size_look_alike(tmp_path):
    path = tmp_path / "flux1-dev.safetensors"
    size = write_sparse_model("flux-dev", "full", path)
    assert path.stat().st_size == size > 23.8e9
    assert path.stat().st_blocks * 512 < 16 << 20                # no data blocks allocated
    header = read_header(path)
    assert len(header) == 781 and header["single_blocks.37.linear1.weight"]["shape"] == [21504, 3072]
    assert read_info(path)["sparse"] is True
    assert not cache.is_current(path, "flux-dev", "full", 0)     # never mistaken for a real file
    with safe_open(str(path), "pt") as f:
        assert len(list(f.keys())) == 780


def test_cuda_device_without_cuda_is_a_clear_error(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(RuntimeError, match="--device cpu"):
        write_specs(tmp_path / "x.safetensors", get("clip-g").specs("tiny"), {}, seed=0, device="cuda")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("module", ["spec", "init", "spm", "lora"])
def test_docstring_examples(module):
    import importlib

    mod = importlib.import_module(f"harness.synthetic.{module}")
    result = doctest.testmod(mod)
    assert result.attempted > 0 and result.failed == 0


def test_cli_disk_check_names_what_is_missing_and_where(tmp_path, capsys):
    free = shutil.disk_usage(tmp_path).free
    assert main(["disk", "--models-dir", str(tmp_path / "models"), "--scratch-gb", "0"]) == 0
    assert "needed" in capsys.readouterr().out
    # More scratch than the disk has: refused with the numbers and the way out.
    assert main(["disk", "--models-dir", str(tmp_path / "models"), "--scratch-gb", str(2 * free / 1e9)]) == 3
    err = capsys.readouterr().err
    assert "not yet written" in err and "LOWVRAM_SYNTHETIC_DIR" in err and str(tmp_path) in err
