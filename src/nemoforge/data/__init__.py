"""Training text: readers (txt, jsonl, directories, s3://, hf://), the teacher corpus, packing and splits.

``corpus``: :func:`~nemoforge.data.corpus.prepare_corpus` / :func:`~nemoforge.data.corpus.load_corpus`;
``packing``: rows of ``seq_len_tokens`` with EOS between documents, per-document positions, digests.
"""
