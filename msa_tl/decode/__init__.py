"""Decode over a paged cache on the GPU: index scan, top-k, split attention and combine (TileLang), and :class:`msa_tl.decode.plan.DecodePlan`, which launches them."""
