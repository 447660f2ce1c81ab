import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from qwen_cpt import data as D


def test_packing_layout_positions_and_labels():
    docs = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10]]
    blocks = list(D.pack_documents(docs, max_length=4, eos_id=0))
    # stream: 1 2 3 0 | 4 5 0 6 | 7 8 9 10 | 0 <pad> <pad> <pad>
    assert [b.input_ids for b in blocks] == [
        [1, 2, 3, 0],
        [4, 5, 0, 6],
        [7, 8, 9, 10],
        [0, 0, 0, 0],
    ]
    assert [b.position_ids for b in blocks] == [
        [0, 1, 2, 3],
        [0, 1, 2, 0],
        [0, 1, 2, 3],
        [0, 0, 1, 2],
    ]
    # the first token of a document inside a block is not a target (it would need the previous doc)
    assert blocks[1].labels == [4, 5, 0, D.IGNORE_INDEX]
    assert blocks[3].labels == [0, D.IGNORE_INDEX, D.IGNORE_INDEX, D.IGNORE_INDEX]


def test_packing_without_document_awareness_is_plain_group_texts():
    blocks = list(D.pack_documents([[1, 2, 3], [4, 5]], 3, eos_id=0, document_aware=False))
    assert [b.input_ids for b in blocks] == [[1, 2, 3], [0, 4, 5], [0, 0, 0]]
    assert all(b.position_ids == [0, 1, 2] for b in blocks)
    assert blocks[1].labels == [0, 4, 5]


def _doc_loss(model, ids, pos, labels):
    out = model(input_ids=torch.tensor([ids]), position_ids=torch.tensor([pos]), use_cache=False)
    logits = out.logits[0, :-1]
    y = torch.tensor(labels[1:])
    return torch.nn.functional.cross_entropy(logits, y, ignore_index=-100, reduction="none")


def test_document_loss_inside_packed_block_equals_its_loss_alone(tiny_qwen, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen, dtype=torch.float32).eval()
    a = tokenizer("The first document talks about contracts and courts.")["input_ids"]
    b = tokenizer("A second, unrelated document about medicine.")["input_ids"]
    (block,) = D.pack_documents([a, b], max_length=len(a) + len(b) + 2, eos_id=151643)
    with torch.no_grad():
        packed = _doc_loss(model, block.input_ids, block.position_ids, block.labels)
        start = len(a) + 1  # b's first token
        doc_b = b + [151643]
        alone = _doc_loss(model, doc_b, list(range(len(doc_b))), doc_b)
        # predictions for b's tokens 2.. come from positions start.. in the packed block
        torch.testing.assert_close(
            packed[start : start + len(doc_b) - 1], alone, atol=1e-5, rtol=1e-5
        )
        # and without document-aware positions they differ: the leak is real
        (leaky,) = D.pack_documents([a, b], len(a) + len(b) + 2, 151643, document_aware=False)
        mixed = _doc_loss(model, leaky.input_ids, leaky.position_ids, leaky.labels)
        assert (mixed[start : start + len(doc_b) - 1] - alone).abs().max() > 1e-3


def test_files_dirs_globs_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("doc a")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.jsonl").write_text(
        json.dumps({"text": "doc b"})
        + "\n\n"
        + json.dumps({"content": "x", "text": "doc c"})
        + "\n"
    )
    files = D.expand_paths([str(tmp_path)])
    assert [f.name for f in files] == ["a.txt", "b.jsonl"]
    assert list(D.read_documents(files)) == ["doc a", "doc b", "doc c"]
    assert D.expand_paths([str(tmp_path / "**" / "*.jsonl")]) == [tmp_path / "sub" / "b.jsonl"]


@pytest.mark.parametrize(
    "content, message",
    [
        (b'{"text": "ok"}\n{"text": broken\n', r"bad\.jsonl:2: malformed JSON"),
        (b'{"text": "ok"}\n{"body": "x"}\n', r"bad\.jsonl:2: record has no field 'text'"),
        (b'{"text": "ok"}\n{"text": "\xff\xfe"}\n', r"bad\.jsonl:2: not valid UTF-8"),
        (b'{"text": 5}\n', r"bad\.jsonl:1: field 'text' is int"),
    ],
)
def test_bad_jsonl_names_file_and_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(D.DataError, match=message):
        list(D.read_documents([path]))


def test_missing_paths_and_empty_globs_are_named(tmp_path):
    with pytest.raises(D.DataError, match="no such file or directory: '.*nope.txt'"):
        D.expand_paths([str(tmp_path / "nope.txt")])
    with pytest.raises(D.DataError, match=r"pattern '.*\*.jsonl' matches no file"):
        D.expand_paths([str(tmp_path / "*.jsonl")])
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(D.DataError, match="unsupported file type '.csv'"):
        D.expand_paths([str(tmp_path / "x.csv")])


def test_parallel_tokenization_keeps_order(tiny_qwen, tokenizer):
    texts = [f"document number {i} " * (i % 7 + 1) for i in range(300)]
    serial = list(D.tokenize_documents(texts, tokenizer))
    parallel = list(D.tokenize_documents(texts, tokenizer, num_workers=2, tokenizer_path=tiny_qwen))
    assert serial == parallel
