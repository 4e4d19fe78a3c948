"""Text to token ids to batches (layer 6): tokenizers, the default corpus, the in-step sampler.

`from dantinox_eqx.data import prepare_data, sample_batch, DataError` keeps working: the
sampling names are re-exported from `data.sampling`.
"""

from .sampling import DataError, Dataset, encode_corpus, prepare_data, read_corpus, sample_batch, split

__all__ = ["DataError", "Dataset", "read_corpus", "encode_corpus", "split", "sample_batch", "prepare_data"]
