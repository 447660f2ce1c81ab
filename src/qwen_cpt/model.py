"""Loading models and tokenizers, choosing device, precision and attention, and the tiny model.

Everything here goes through transformers' Auto classes, so any HF causal LM works; Qwen2.5 is
the case we tune for.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .tokenizer import EOS_TOKEN_ID, QWEN25_EMBEDDING_ROWS, save_qwen25_tokenizer

log = logging.getLogger("qwen_cpt")


class ModelLoadError(RuntimeError):
    """The model or tokenizer could not be loaded; the message names the path."""


@dataclass(frozen=True)
class Runtime:
    """Decisions made once at start-up from the config and the machine."""

    device: torch.device
    autocast_dtype: torch.dtype | None  # None: run in fp32
    attn_implementation: str

    @property
    def autocast(self):
        if self.autocast_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)


def resolve_runtime(
    device: str, use_bf16: bool, use_flash_attention: bool, attention: str = "auto"
) -> Runtime:
    """Device, autocast dtype and the attention the model is loaded with.

    ``attention`` is the ``attention_implementation`` field. ``auto`` loads flash_attention_2
    when CUDA, flash-attn and ``use_flash_attention`` allow it, else SDPA; on CUDA the trainer
    may then measure FlexAttention against SDPA (qwen_cpt.autotune). A named kernel is checked
    here, so a run that cannot use it stops before loading anything.
    """
    if device == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ModelLoadError(f"device: {device!r} was asked for, but CUDA is not available")
    if dev.type == "cuda":
        dev = select_cuda_device(dev)

    dtype = None
    if use_bf16:
        if dev.type == "cuda" and not torch.cuda.is_bf16_supported():
            log.warning("precision: fp32 (use_bf16: this GPU has no bf16 support)")
        elif dev.type == "cpu" and not cpu_has_native_bf16():
            # Without AMX/AVX512-BF16, bf16 matmuls are emulated: measured 3x slower than fp32
            # on an AVX-512 CPU (BENCHMARKS.md), so bf16 would only cost time.
            log.info("precision: fp32 (use_bf16: this CPU has no native bf16 matmul)")
        else:
            dtype = torch.bfloat16
            log.info("precision: bf16 autocast, fp32 master weights")

    if dev.type == "cpu":
        tune_cpu_allocator()
    attn = attention if attention != "auto" else "sdpa"
    if attention == "flex_attention" and dev.type != "cuda":
        raise ModelLoadError(
            "attention_implementation: flex_attention has no backward on a CPU in torch "
            f"{torch.__version__}; use sdpa or auto"
        )
    wants_flash = attention == "flash_attention_2" or (attention == "auto" and use_flash_attention)
    has_flash = dev.type == "cuda" and importlib.util.find_spec("flash_attn") is not None
    if wants_flash and has_flash:
        attn = "flash_attention_2"
    elif attention == "flash_attention_2":
        raise ModelLoadError(
            "attention_implementation: flash_attention_2 needs CUDA and flash-attn "
            "(pip install qwen-cpt[gpu]); use auto or sdpa"
        )
    return Runtime(device=dev, autocast_dtype=dtype, attn_implementation=attn)


def select_cuda_device(dev: torch.device) -> torch.device:
    """Make ``dev`` (``cuda`` or ``cuda:N``) the current CUDA device and return it with its index.

    Tensors placed on ``cuda:N`` go there, but kernels launched without an explicit device
    (Triton's, hence Liger's; ``torch.cuda.*`` calls without an argument) use the *current*
    device, which stays 0 unless set."""
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        raise ModelLoadError(
            f"device: cuda:{index} was asked for, but this machine has "
            f"{torch.cuda.device_count()} GPU(s)"
        )
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


CUBLAS_WORKSPACE = ":4096:8"


def set_deterministic(enabled: bool) -> None:
    """``deterministic: true``: the same inputs give the same bits on a GPU, at some speed.

    Sets ``torch.use_deterministic_algorithms(True)`` (an op with no deterministic
    implementation then raises, naming itself), the cuBLAS workspace
    ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` that cuBLAS needs for reproducible results (read when
    the first cuBLAS handle is made: before the model loads), cuDNN without autotuning, and
    ``FLASH_ATTENTION_DETERMINISTIC=1``, which transformers passes to flash-attn's backward.
    Off (the default): nothing is changed, and the attention backward on CUDA may sum in a
    different order from one run to the next (docs/design.md, "Determinism on CUDA").
    """
    if not enabled:
        return
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE
    os.environ["FLASH_ATTENTION_DETERMINISTIC"] = "1"
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    log.info("deterministic: on (deterministic algorithms, cuBLAS workspace %s)", CUBLAS_WORKSPACE)


# --- FlexAttention under autocast ---------------------------------------------------------------


def flex_in_autocast_dtype(flex_forward):
    """``flex_forward`` (transformers' ``flex_attention_forward``) with q, k and v cast to the
    autocast dtype first.

    Under autocast, HF's rotary embedding multiplies bf16 q/k by fp32 cos/sin, so q and k come
    out fp32 while v is bf16; FlexAttention, which autocast does not cover, would then run in
    fp32 (or refuse the mix), which is slow and makes the start-up measurement reject it for
    the wrong reason."""

    def forward(module, query, key, value, *args, **kwargs):
        device = query.device.type
        if torch.is_autocast_enabled(device):
            dtype = torch.get_autocast_dtype(device)
            query, key, value = (t.to(dtype) for t in (query, key, value))
        return flex_forward(module, query, key, value, *args, **kwargs)

    forward.wrapped_for_autocast = flex_forward
    return forward


def install_flex_autocast() -> None:
    """Route ``flex_attention`` through :func:`flex_in_autocast_dtype` (once per process)."""
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    current = ALL_ATTENTION_FUNCTIONS.get("flex_attention")
    if current is None or hasattr(current, "wrapped_for_autocast"):
        return
    AttentionInterface.register("flex_attention", flex_in_autocast_dtype(current))


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def tune_cpu_allocator() -> bool:
    """Keep freed large blocks in glibc's heap instead of returning them to the OS.

    CPU training allocates and frees the same large buffers every step (a chunk of
    152k-vocabulary logits is 150 MB). glibc serves blocks above its mmap threshold (32 MB at
    most) with fresh mmap()s, so every step page-faults them in again: on the 2-core CI machine
    that was 45% of the time spent in the kernel. Raising the mmap and trim thresholds is what
    PyTorch's CPU tuning guide gets by swapping in jemalloc/tcmalloc. Returns False where it
    does not apply (not glibc).
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name or "libc.so" not in name:
        return False
    try:
        libc = ctypes.CDLL(name)
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(
            libc.mallopt(m_mmap_threshold, 1 << 30) and libc.mallopt(m_trim_threshold, 1 << 31)
        )
    except (OSError, AttributeError):
        return False


def cpu_has_native_bf16() -> bool:
    """True when the CPU multiplies bf16 in hardware (AMX or AVX512-BF16)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as fh:
            flags = next((line for line in fh if line.startswith("flags")), "")
    except OSError:
        return False
    return any(f in flags.split() for f in ("amx_bf16", "avx512_bf16"))


def _check_source(path: str, what: str) -> None:
    """Fail early, naming the path, when ``path`` is neither a directory nor a hub id."""
    if Path(path).expanduser().is_dir():
        return
    if path.startswith((".", "/", "~")) or not _HUB_ID.match(path) or Path(path).exists():
        raise ModelLoadError(
            f"{what}: {path!r} is not a directory (expected a local model folder with config.json, "
            "or a hub id such as Qwen/Qwen2.5-7B)"
        )


_TOKENIZER_PROBE = "Hello, world! 你好"


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    _check_source(path, "tokenizer_name_or_path")
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise ModelLoadError(f"could not load a tokenizer from {path!r}: {exc}") from exc
    try:  # a folder without tokenizer files gives an empty tokenizer: every text becomes []
        sample = tok(_TOKENIZER_PROBE, add_special_tokens=False)["input_ids"]
    except Exception as exc:
        raise ModelLoadError(f"tokenizer at {path!r} cannot encode text: {exc}") from exc
    if not sample:
        raise ModelLoadError(
            f"no usable tokenizer found at {path!r}: it encodes {_TOKENIZER_PROBE!r} to no "
            "tokens (are the tokenizer files missing? set tokenizer_name_or_path)"
        )
    if tok.eos_token_id is None:
        raise ModelLoadError(
            f"tokenizer at {path!r} has no eos token; packing needs one between documents"
        )
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(
    path: str,
    runtime: Runtime,
    trust_remote_code: bool = False,
    dtype: torch.dtype | str = torch.float32,
    quantize_4bit: bool = False,
):
    """Load a causal LM on ``runtime.device``, by default in fp32 master weights.

    ``dtype="auto"`` keeps the checkpoint's dtype (for FSDP2, which casts layer by layer).
    ``quantize_4bit`` (QLoRA's base, ``use_qlora``): the decoder's linear layers in 4-bit NF4
    with double quantization, computing in the run's autocast dtype (fp32 without one), through
    transformers' bitsandbytes integration; everything else (embeddings, head, norms, biases)
    in ``dtype``.
    """
    from transformers import AutoModelForCausalLM

    _check_source(path, "model_name_or_path")
    install_flex_autocast()  # the trainer may switch to flex_attention after measuring
    extra = {}
    if quantize_4bit:
        from transformers import BitsAndBytesConfig

        from .optim import import_bitsandbytes

        import_bitsandbytes("use_qlora")
        extra = dict(
            quantization_config=BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=runtime.autocast_dtype or torch.float32,
            ),
            device_map={"": runtime.device},  # quantized as it loads; .to() cannot move it
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=dtype,
            attn_implementation=runtime.attn_implementation,
            trust_remote_code=trust_remote_code,
            **extra,
        )
    except Exception as exc:
        raise ModelLoadError(f"could not load a causal LM from {path!r}: {exc}") from exc
    # training never caches, and packing needs the cache off
    # (docs/design.md, "Packing and document boundaries")
    model.config.use_cache = False
    if quantize_4bit:
        for module in model.modules():
            # bitsandbytes repacks a 4-bit weight in place for its CPU inference kernel the
            # first time the layer runs in eval mode, and that kernel needs in_features of at
            # least its 64-element block: keep training and evaluation on one layout and path
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
        return model
    return model.to(runtime.device)


def build_model_skeleton(path: str, runtime: Runtime, trust_remote_code: bool = False):
    """The model of ``path`` on the meta device: its structure without memory for weights.

    The ranks other than 0 of a sharded run start from this; FSDP2 then gives them storage for
    their shards only, and rank 0's weights are broadcast into them.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    _check_source(path, "model_name_or_path")
    install_flex_autocast()
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(
                config,
                attn_implementation=runtime.attn_implementation,
                trust_remote_code=trust_remote_code,
            )
    except Exception as exc:
        raise ModelLoadError(f"could not build a causal LM from {path!r}: {exc}") from exc
    model.config.use_cache = False
    return model


def enable_activation_checkpointing(model, every_n_layers: int = 1) -> None:
    """Recompute decoder-layer activations in backward (``use_gradient_checkpointing``)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
        model.activation_checkpointing_enable(kwargs, every_n_layers=every_n_layers)
    else:
        if every_n_layers != 1:
            log.warning(
                "gradient_checkpointing_every_n_layers=%d needs transformers' "
                "activation_checkpointing_enable; this version checkpoints every layer",
                every_n_layers,
            )
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def check_vocab(tokenizer, model, model_path: str) -> None:
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        raise ModelLoadError(
            f"tokenizer has {len(tokenizer)} ids but the model at {model_path!r} has only "
            f"{rows} embedding rows; use the tokenizer that belongs to this model"
        )


def count_parameters(model) -> tuple[int, int]:
    """(total, non-embedding) parameter counts; tied weights are counted once."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    emb = {id(model.get_input_embeddings().weight)}
    out = model.get_output_embeddings()
    if out is not None:
        emb.add(id(out.weight))
    emb_params = sum(p.numel() for p in model.parameters() if id(p) in emb)
    # parameters() yields a tied weight once, so emb_params counts it once too
    return total, total - emb_params


# --- the offline tiny model -----------------------------------------------------------------------


def make_tiny_model(
    directory: str | Path,
    *,
    arch: str = "qwen2",
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 176,
    vocab_size: int = QWEN25_EMBEDDING_ROWS,
    max_position_embeddings: int = 32768,
    seed: int = 0,
    tie_word_embeddings: bool | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write a randomly initialised HF model with Qwen2.5's layout plus the real Qwen2.5 tokenizer.

    ``arch="qwen2"`` gives GQA, q/k/v biases, tied embeddings, rope_theta 1e6, RMSNorm eps 1e-6
    and 151936 embedding rows, like Qwen2.5-0.5B at a fraction of the width. ``arch="llama"``
    gives the same sizes as a Llama (no biases, untied head), to exercise other HF causal LMs.
    ``tie_word_embeddings`` overrides the architecture's choice (Qwen2.5-7B's head is untied);
    ``dtype`` is the dtype written to disk (bf16 halves a big model's files, as Qwen's own).
    """
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError(
            f"hidden_size ({hidden_size}) must divide by num_heads ({num_heads}), "
            f"and num_heads by num_kv_heads ({num_kv_heads})"
        )
    common = dict(
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        vocab_size=vocab_size,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-6,
        hidden_act="silu",
        bos_token_id=None,
        # a vocabulary smaller than Qwen's (only to test mismatches) cannot hold its eos id
        eos_token_id=EOS_TOKEN_ID if vocab_size > EOS_TOKEN_ID else None,
        pad_token_id=EOS_TOKEN_ID if vocab_size > EOS_TOKEN_ID else None,
        use_cache=False,
    )
    tied = (
        {"qwen2": True, "llama": False}.get(arch)
        if tie_word_embeddings is None
        else tie_word_embeddings
    )
    if arch == "qwen2":
        config = Qwen2Config(tie_word_embeddings=tied, rope_theta=1e6, **common)
    elif arch == "llama":
        config = LlamaConfig(tie_word_embeddings=tied, rope_theta=1e6, **common)
    else:
        raise ValueError(f"arch must be 'qwen2' or 'llama', got {arch!r}")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    save_qwen25_tokenizer(directory)
    return directory
