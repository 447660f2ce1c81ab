import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory):
    """A tiny random Qwen2.5-shaped model with the real Qwen2.5 tokenizer, built offline."""
    from qwen_cpt import make_tiny_model

    return str(
        make_tiny_model(
            tmp_path_factory.mktemp("models") / "tiny-qwen",
            hidden_size=32,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            intermediate_size=64,
        )
    )


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    from qwen_cpt import make_tiny_model

    return str(
        make_tiny_model(
            tmp_path_factory.mktemp("models") / "tiny-llama",
            arch="llama",
            hidden_size=32,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            intermediate_size=64,
        )
    )


@pytest.fixture(scope="session")
def tokenizer(tiny_qwen):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_qwen)


SAMPLE_TEXTS = [
    "Continued pretraining adapts a language model to a new domain by training on raw text.",
    "The court held that the contract was void for lack of consideration.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n",
    "Patients with hypertension were randomised to receive either the drug or placebo.",
    "Qwen2.5 models use grouped-query attention and rotary position embeddings.",
    "一个中文句子，用来测试分词器和打包。",
] * 4
