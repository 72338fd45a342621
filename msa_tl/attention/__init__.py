"""The main branch on the GPU: the scheduler, KV-outer / Q-outer / shared-tile attention, the LSE combine and the backward (TileLang)."""
