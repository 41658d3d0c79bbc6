"""Multimodal inputs without torch: image size rules, fetching, hashing, token counting."""
