"""HF <-> Megatron conversion: layouts (mapping), live-model bridge, and the file-level API."""


def mcore_to_hf(*args, **kwargs):
    """See ``megatron_pz.convert.api.mcore_to_hf`` (imported lazily: it pulls in Megatron)."""
    from megatron_pz.convert.api import mcore_to_hf as impl

    return impl(*args, **kwargs)


def hf_to_mcore(*args, **kwargs):
    """See ``megatron_pz.convert.api.hf_to_mcore``."""
    from megatron_pz.convert.api import hf_to_mcore as impl

    return impl(*args, **kwargs)
