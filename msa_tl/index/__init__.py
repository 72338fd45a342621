"""The index branch on the GPU: block scoring and the exp-free top-k (TileLang)."""
