"""``torchrun ... tests/data_worker.py CONFIG.yaml``: the trainer's run of CONFIG, counting the
characters each rank tokenizes (every tokenizer call of the data pipeline), printed per rank as
``TOKENIZED rank=R chars=N``. Used by tests/test_sharded_reading.py and tests/test_hsdp.py."""

from __future__ import annotations

import os
import sys


def count_tokenizing(set_attr=setattr) -> list[int]:
    """Wrap the data pipeline's tokenizer calls; the returned list's one item counts chars.
    ``set_attr``: pytest's ``monkeypatch.setattr`` in a test, so that it is undone."""
    import qwen_cpt.data.streams as S
    import qwen_cpt.data.tokenize as T

    count = [0]
    real = T.encode_batch

    def counting(tokenizer, texts):
        count[0] += sum(len(t) for t in texts)
        return real(tokenizer, texts)

    set_attr(T, "encode_batch", counting)
    set_attr(S, "encode_batch", counting)
    return count


if __name__ == "__main__":
    from qwen_cpt import CPTConfig, CPTTrainer

    count = count_tokenizing()
    CPTTrainer(CPTConfig.from_yaml(sys.argv[1])).train()
    print(f"TOKENIZED rank={os.environ.get('RANK', '0')} chars={count[0]}", flush=True)
