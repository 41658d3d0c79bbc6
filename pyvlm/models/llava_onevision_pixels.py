"""Pixel tiles of LLaVA-OneVision images: the LLaVA families' shared
pixels (pyvlm.models.llava_pixels) under OneVision's names."""

from pyvlm.models.llava_pixels import llava_pixel_values, paste_on_canvas  # noqa: F401

llava_onevision_pixel_values = llava_pixel_values
