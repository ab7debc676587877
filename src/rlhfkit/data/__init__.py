"""Files → validated examples → tokenised batches.

``sources.read_rows`` reads any supported file into row dicts; ``preference``, ``pointwise`` and ``prompts``
validate rows into examples (errors name file, 1-based row and field); ``tokenize`` turns examples into token
ids under an over-long policy, pads and collates them, and groups batches by length.
"""

from rlhfkit.data.pointwise import PointwiseExample, load_pointwise, parse_pointwise
from rlhfkit.data.preference import ExampleList, PreferenceExample, load_preferences, parse_preferences
from rlhfkit.data.prompts import load_prompts, parse_prompts
from rlhfkit.data.sources import SUPPORTED_EXTENSIONS, read_rows
from rlhfkit.data.tokenize import (
    CONVENTIONS,
    OVERLONG_POLICIES,
    LengthGroupedBatchSampler,
    PromptGroupedBatchSampler,
    TokenizedPair,
    TokenizedPoint,
    TokenizeReport,
    collate_pairs,
    collate_points,
    encode_for_rm,
    encode_prompt,
    encode_response,
    end_with_eos,
    left_pad,
    prompt_key,
    render,
    render_prompt,
    render_response,
    right_pad,
    tokenize_pointwise,
    tokenize_preferences,
    tokenize_prompts,
)

__all__ = [
    "CONVENTIONS", "ExampleList", "LengthGroupedBatchSampler", "OVERLONG_POLICIES", "PointwiseExample",
    "PreferenceExample", "PromptGroupedBatchSampler", "SUPPORTED_EXTENSIONS", "TokenizeReport", "TokenizedPair",
    "TokenizedPoint", "collate_pairs", "collate_points", "encode_for_rm", "encode_prompt", "encode_response",
    "end_with_eos", "left_pad", "load_pointwise", "load_preferences", "load_prompts", "parse_pointwise",
    "parse_preferences", "parse_prompts", "read_rows", "render", "prompt_key", "render_prompt", "render_response",
    "right_pad", "tokenize_pointwise", "tokenize_preferences", "tokenize_prompts",
]
