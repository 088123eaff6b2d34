"""ChunkedOffloadUNet on SDXL (in-process, CPU): a streamed UNet computes every block from device memory.

SDXL's blocks are TimestepEmbedSequentials that ComfyUI never calls: forward_timestep_embed calls their
children, so the streamed units are the children. On an H200, the benchmark's second streamed row of a
model (the next budget, same loaded model) took the units from the HiddenBlocks that the first row's clone
had left on the shared diffusion model (ComfyUI swaps clones without unpatching object patches): the units
were the Sequentials, their hooks never fired, streamed weights stayed in host memory ("Input type
(torch.cuda.HalfTensor) and weight type (torch.HalfTensor)") and the block timer met unrecorded events.

On the CPU the host is the "device", so host weights give the right numbers: the check here is where
each weight lives while its module runs, the resident arena or a transfer slot, never anywhere else.
"""
import importlib

import pytest
import torch

pytestmark = pytest.mark.comfy
MiB = 1 << 20
LISTS = ("input_blocks", "middle_block", "output_blocks")


@pytest.fixture(scope="module")
def streaming(comfy):
    from harness.pack_import import import_pack

    import_pack()
    return importlib.import_module("lowvram_kit.nodes.comfy_block_streaming")


@pytest.fixture(scope="module")
def sdxl(comfy, tiny_model):
    """The tiny SDXL UNet (Segmind-Vega topology, 31 stream units) without its text towers and VAE."""
    import comfy.sd

    patcher = comfy.sd.load_checkpoint_guess_config(str(tiny_model("sdxl")), output_vae=False, output_clip=False)[0]
    yield patcher
    comfy.model_management.unload_all_models()


def sample(comfy, model, seed=0):
    import comfy.sample

    g = torch.Generator().manual_seed(seed)
    latent = torch.zeros(1, 4, 8, 8)
    noise = torch.randn(latent.shape, generator=g)
    cond = [[torch.randn(1, 8, 2048, generator=g), {"pooled_output": torch.randn(1, 1280, generator=g)}]]
    with torch.no_grad():
        return comfy.sample.sample(model, noise, 1, 1.0, "euler", "simple", cond, cond, latent, seed=seed)


def expected_units(dm) -> list[torch.nn.Module]:
    """The children of every TimestepEmbedSequential, in call order (read before anything is patched)."""
    return [child for name in LISTS for seq in ([getattr(dm, name)] if name == "middle_block" else getattr(dm, name))
            for child in seq]


class WhereWeightsLive:
    """Forward pre-hooks on every module holding parameters inside the blocks: each of its weights must
    lie in the streamer's resident arena or in one of its slots when the module runs."""

    def __init__(self, units, session):
        self.session, self.bad, self.calls = session, [], 0
        self.handles = [m.register_forward_pre_hook(lambda mod, args, n=name: self.check(n, mod))
                        for k, unit in enumerate(units) for name, m in unit.named_modules(prefix=f"unit{k}")
                        if any(True for _ in m.parameters(recurse=False))]

    def device_ranges(self):
        s = self.session.streamer
        bufs = ([s._arena] if s._arena is not None else []) + ([sl.buffer for sl in s._slots.slots] if s._slots else [])
        return [(b.data_ptr(), b.data_ptr() + b.nbytes) for b in bufs]

    def check(self, name, module):
        self.calls += 1
        ranges = self.device_ranges() if self.session.streamer is not None else []
        for pname, p in module.named_parameters(recurse=False):
            if not any(lo <= p.data_ptr() < hi for lo, hi in ranges):
                self.bad.append(f"{name}.{pname} ({type(module).__name__})")

    def remove(self):
        for h in self.handles:
            h.remove()


def test_second_streamed_clone_streams_the_children_from_device_memory(comfy, streaming, sdxl, comfy_cleanup):
    units = expected_units(sdxl.model.diffusion_model)
    assert len(units) == 31 and not any(isinstance(u, torch.nn.Sequential) for u in units)
    ref = sample(comfy, sdxl)

    # The benchmark's order: one streamed row with everything resident (8 GiB on the H200) ...
    everything = streaming.StreamingSettings(1 << 40, 0, 0, False)
    first, s1 = streaming.stream_blocks(sdxl, everything)
    assert s1.blocks == units
    assert torch.equal(sample(comfy, first), ref)
    # ... leaves its HiddenBlocks on the model all clones share, as ComfyUI keeps object patches applied
    # when it swaps clones; the next row (a smaller budget) is built from the same base model now.
    assert isinstance(sdxl.model.diffusion_model.input_blocks, streaming.HiddenBlocks)

    sizes = [sum(p.numel() * p.element_size() for p in u.parameters()) for u in units]
    # activations (~8 MiB at 8x8) + the 256 MiB margin + half the blocks resident + 2 slots of the largest
    budget = 264 * MiB + sum(sizes) // 2 + 2 * max(sizes)
    second, s2 = streaming.stream_blocks(sdxl, streaming.StreamingSettings(budget, 0, 0, False))
    assert s2.blocks == units, [type(b).__name__ for b in s2.blocks]
    assert [p for p, _ in s2.named_blocks()][:3] == [f"diffusion_model.input_blocks.{i}.0" for i in range(3)]
    watch = WhereWeightsLive(units, s2)
    try:
        out = sample(comfy, second)
    finally:
        watch.remove()
    assert s2.streamer is not None and s2.streamer.plan.streamed_groups and s2.streamer.copies > 0, s2.plan_text
    assert watch.calls > 0 and not watch.bad, f"{len(watch.bad)} weights not in device memory: {watch.bad[:5]}"
    assert torch.equal(out, ref)
    # The clone's object patch wraps the model's own list, not the first clone's stand-in.
    assert second.object_patches["diffusion_model.input_blocks"].original is s1.lists["input_blocks"]
    comfy.model_management.unload_all_models()
    assert s2.streamer is None
    assert torch.equal(sample(comfy, sdxl), ref)


class FakeEvent:
    """Behaves as torch.cuda.Event does for the timer: elapsed_time of an unrecorded event raises."""

    def __init__(self):
        self.recorded = False

    def record(self, stream=None):
        self.recorded = True

    def synchronize(self):
        pass

    def elapsed_time(self, end):
        if not (self.recorded and end.recorded):
            raise ValueError("Both events must be recorded before calculating elapsed time.")
        return 1.0


@pytest.mark.parametrize("events", ["fake", "cuda"])
def test_block_timer_reports_no_times_when_a_block_was_not_called(streaming, events):
    """A unit whose hooks never fire leaves unrecorded events: no measurement, not an error (torch raises
    ValueError or RuntimeError for them, by version)."""
    if events == "cuda" and not torch.cuda.is_available():
        pytest.skip("CUDA events need a GPU")
    device = "cuda" if events == "cuda" else "cpu"
    new_event = FakeEvent if events == "fake" else None
    blocks = [torch.nn.Linear(8, 8).to(device) for _ in range(3)]
    x = torch.randn(2, 8, device=device)
    with streaming.BlockTimer(blocks, new_event) as timer:
        blocks[2](blocks[0](x))
    assert timer.seconds() is None
    with streaming.BlockTimer(blocks, new_event) as timer:
        blocks[2](blocks[1](blocks[0](x)))
    seconds = timer.seconds()
    assert seconds is not None and len(seconds) == 3 and all(s >= 0 for s in seconds)
