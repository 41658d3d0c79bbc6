"""Scheduling core: requests, page and radix-cache bookkeeping, the
continuous-batching scheduler and incremental detokenization. No torch."""
