"""LazyVAEDecode: a VAE decode that plans its memory before it starts, and gives the VRAM back after."""
from __future__ import annotations

from ._tiling import TILING_MODES


class LazyVAEDecode:
    """Decode latents to images with the VAE moved to the GPU only for the decode, tiled when needed."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "samples": ("LATENT", {"tooltip": "The latents to decode [B, C, H, W]; C must match the VAE "
                                              "(16 for Flux, SD3, Z-Image and NewBie; 4 for SDXL)."}),
            "vae": ("VAE", {"tooltip": "The VAE. Its weights stay in host memory until this node runs."}),
            "tiling": (list(TILING_MODES), {"default": "auto", "tooltip":
                       "auto: tile only when the estimated decode does not fit the free VRAM (or 2 GiB), "
                       "or when VRAMGuard asks for tiles; never: decode whole images (a warning says when "
                       "VRAMGuard asked for tiles); always: decode in tiles (no larger than VRAMGuard asks)."}),
            "tile_size": ("INT", {"default": 0, "min": 0, "max": 8192, "step": 64, "tooltip":
                          "Tile side in pixels when tiling; 0 chooses it from the free VRAM."}),
            "overlap": ("INT", {"default": 64, "min": 0, "max": 1024, "step": 8, "tooltip":
                        "Pixels shared by neighbouring tiles, blended smoothly (at most a quarter of the tile)."}),
            "offload_after_decode": ("BOOLEAN", {"default": True, "tooltip":
                                     "Move the VAE back to host memory after decoding, leaving the VRAM free."}),
        }}

    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("The decoded images [B, H, W, 3], values 0..1.",)
    FUNCTION = "decode"
    CATEGORY = "lowvram/latent"
    DESCRIPTION = (
        "Decodes latents like VAE Decode, for small GPUs. The VAE comes to the GPU only for this decode and "
        "leaves after it. Before decoding, the node estimates the decode's peak memory and compares it with "
        "the free VRAM: in auto mode it tiles when that does not fit (or exceeds 2 GiB), choosing the tile "
        "size itself; in a prompt guarded by VRAMGuard it also follows the guard's request for tiles. Tiles "
        "blend over their overlap without seams. If the GPU still runs out of memory it "
        "retries with smaller tiles, then on the CPU, with a warning each time. For 2-D image VAEs "
        "(SDXL, SD1.5, Flux/SD3 AE); cancel works between tiles.")

    def decode(self, samples, vae, tiling, tile_size, overlap, offload_after_decode):
        from ._vae_comfy import DecodeSettings, decode_lazily
        settings = DecodeSettings(tiling=tiling, tile_size=tile_size, overlap=overlap,
                                  offload_after_decode=offload_after_decode)
        image, _plan = decode_lazily(vae, samples, settings)
        return (image,)
