"""MSA inside other libraries' models. Each integration is its own module, imported only by users of that library:

    from msa_tl.integrations.transformers import use_msa_kernels, msa_cache, convert_to_msa
"""
