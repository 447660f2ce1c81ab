from transformers import AutoTokenizer

from qwen_cpt.tokenizer import QWEN25_SPECIAL_TOKENS


def test_tokenizer_matches_qwen25_ids(tiny_qwen):
    tok = AutoTokenizer.from_pretrained(tiny_qwen)
    assert tok("Hello, world!")["input_ids"] == [9707, 11, 1879, 0]
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == 151643
    assert tok.pad_token_id == 151643
    assert tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [151644, 151645]
    ids = tok.convert_tokens_to_ids(list(QWEN25_SPECIAL_TOKENS))
    assert ids == list(range(151643, 151665))
    assert len(tok) == 151665


def test_tokenizer_splits_digits_and_round_trips(tokenizer):
    ids = tokenizer("12345", add_special_tokens=False)["input_ids"]
    assert len(ids) == 5  # Qwen's pattern splits digits one at a time
    text = "混合 text with ünïcode and <|endoftext|> inside"
    enc = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert 151643 in enc  # the special token is recognised, not spelled out
    assert tokenizer.decode(enc) == text
