import pytest
import torch
from transformers import AutoModelForCausalLM

from qwen_cpt.data import collate, count_loss_tokens, pack_documents
from qwen_cpt.loss import lm_loss_sum, supports_chunked_loss
from qwen_cpt.optim import build_optimizers, split_parameters

from .conftest import SAMPLE_TEXTS


def _batch(tokenizer, n_blocks=4, max_length=48):
    docs = tokenizer(SAMPLE_TEXTS, add_special_tokens=False)["input_ids"]
    blocks = list(pack_documents(docs, max_length, tokenizer.eos_token_id))[:n_blocks]
    return blocks


@pytest.mark.parametrize("fixture", ["tiny_qwen", "tiny_llama"])
def test_chunked_loss_matches_hf_loss_and_grads(request, fixture, tokenizer):
    path = request.getfixturevalue(fixture)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert supports_chunked_loss(model)
    batch = collate(_batch(tokenizer, 2, 64))
    n = count_loss_tokens(batch)
    # reference: HF's own loss (mean over label tokens, shift inside the model)
    ref = model(
        input_ids=batch["input_ids"],
        position_ids=batch["position_ids"],
        labels=batch["labels"],
        use_cache=False,
    ).loss
    ref.backward()
    ref_grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    ours = lm_loss_sum(model, batch, chunked=True, chunk_size=16) / n  # several chunks
    ours.backward()
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[k], atol=1e-5, rtol=1e-4, msg=k)
    model.zero_grad()
    plain = lm_loss_sum(model, batch, chunked=False) / n
    torch.testing.assert_close(plain, ref, atol=1e-5, rtol=1e-5)


def test_a_frozen_head_gets_no_weight_gradient(tiny_llama, tokenizer):
    """LoRA and freeze-tuning with frozen embeddings: the chunked loss gives the trained
    tensors HF's gradients and builds no vocab x hidden gradient for the frozen head (on
    Qwen2.5-7B that buffer is 2.2 GB, and its matmul a third of the head's backward)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    model.lm_head.requires_grad_(False)  # and the embedding (the same shape): adapters only
    model.get_input_embeddings().requires_grad_(False)
    batch = collate(_batch(tokenizer, 2, 64))
    n = count_loss_tokens(batch)
    model(**{k: batch[k] for k in ("input_ids", "position_ids", "labels")}).loss.backward()
    ref = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    head_shape = tuple(model.lm_head.weight.shape)

    class HeadSized(TorchDispatchMode):
        made = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and tuple(out.shape) == head_shape:
                HeadSized.made += 1
            return out

    with HeadSized():
        (lm_loss_sum(model, batch, chunked=True, chunk_size=16) / n).backward()
    assert HeadSized.made == 0
    assert model.lm_head.weight.grad is None
    for k, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, ref[k], atol=1e-5, rtol=1e-4, msg=k)


def test_gradient_accumulation_is_invariant_to_the_split(tiny_qwen, tokenizer):
    """One micro-batch of 8 blocks and eight micro-batches of 1 give the same loss and grads."""
    blocks = _batch(tokenizer, 8, 40)
    blocks[-1].labels[20:] = [-100] * 20  # unequal token counts per block, as with a padded tail
    assert len(blocks) == 8
    results = []
    for split in (1, 8):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_qwen, dtype=torch.float32)
        group = [collate(blocks[i : i + 8 // split]) for i in range(0, 8, 8 // split)]
        n = sum(count_loss_tokens(b) for b in group)
        total = 0.0
        for b in group:
            loss = lm_loss_sum(model, b, chunked=True, chunk_size=64)
            (loss / n).backward()
            total += loss.item()
        results.append((total / n, {k: p.grad.clone() for k, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert abs(loss_a - loss_b) < 1e-5
    for k in grads_a:
        torch.testing.assert_close(grads_a[k], grads_b[k], atol=1e-5, rtol=1e-4, msg=k)


class _Cfg:
    learning_rate = 1e-3
    weight_decay = 0.1
    adam_beta1, adam_beta2, adam_epsilon = 0.9, 0.95, 1e-8
    muon_momentum = 0.95

    def __init__(self, use_muon):
        self.use_muon_optimizer = use_muon


def test_muon_gets_hidden_matrices_and_adamw_the_rest(tiny_qwen):
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen, dtype=torch.float32)
    split = split_parameters(model, use_muon=True)
    muon_names = {n for n, _ in split.muon}
    assert muon_names and all(p.ndim == 2 for _, p in split.muon)
    assert all(
        any(
            k in n
            for k in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
        )
        for n in muon_names
    )
    adam_names = {n for n, _ in split.adamw_decay + split.adamw_no_decay}
    assert "model.embed_tokens.weight" in adam_names  # tied with lm_head, listed once
    assert any("norm" in n for n in adam_names) and any(n.endswith("bias") for n in adam_names)
    assert not muon_names & adam_names
    n_all = sum(p.numel() for p in model.parameters())
    assert (
        split.count(split.muon) + split.count(split.adamw_decay) + split.count(split.adamw_no_decay)
        == n_all
    )
    opts = build_optimizers(model, _Cfg(True))
    assert isinstance(opts.optimizers["muon"], torch.optim.Muon)
    assert opts.optimizers["muon"].defaults["adjust_lr_fn"] == "match_rms_adamw"
    assert set(opts.optimizers) == {"muon", "adamw"}
    assert set(build_optimizers(model, _Cfg(False)).optimizers) == {"adamw"}


def test_muon_refuses_a_model_with_no_matrices(tiny_qwen):
    from qwen_cpt.optim import OptimizerSetupError

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen, dtype=torch.float32)
    for n, p in model.named_parameters():
        if "proj" in n:
            p.requires_grad_(False)
    with pytest.raises(OptimizerSetupError, match="no parameter qualifies for Muon"):
        split_parameters(model, use_muon=True)


def test_muon_never_gets_a_table_or_a_head(tmp_path):
    """Muon is for hidden matrices only: every nn.Embedding (learned positions too) and every
    head goes to AdamW, also when untied or when get_output_embeddings does not return it."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from qwen_cpt import make_tiny_model

    gpt2 = GPT2LMHeadModel(
        GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=300, n_positions=64)
    )
    muon = {n for n, _ in split_parameters(gpt2, use_muon=True).muon}
    assert "transformer.wpe.weight" not in muon and "transformer.wte.weight" not in muon
    assert muon and all(".h." in n for n in muon)

    untied = AutoModelForCausalLM.from_pretrained(
        make_tiny_model(tmp_path / "untied", hidden_size=32, num_layers=2, num_heads=4,
                        num_kv_heads=2, intermediate_size=64, tie_word_embeddings=False)
    )  # fmt: skip
    untied.get_output_embeddings = lambda: None  # a model that does not say which is its head
    split = split_parameters(untied, use_muon=True)
    adam = {n for n, _ in split.adamw_decay}
    assert {"lm_head.weight", "model.embed_tokens.weight"} <= adam
    assert not {"lm_head.weight", "model.embed_tokens.weight"} & {n for n, _ in split.muon}
