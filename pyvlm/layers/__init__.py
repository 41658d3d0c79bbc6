"""Shared torch layers of the language and vision models (norms, rotary
embeddings, fused linear projections, gated MLPs, paged attention)."""
