"""Prompt tuning on 2 processes (CPU, gloo): DDP, FSDP2, HF Trainer (checkpoint + resume), mixed-adapter
batches under DDP, DeepSpeed ZeRO-2 and ZeRO-3 (every parameter partitioned, tied GPT-2 word table),
ZeRO-3 init (HF ``from_pretrained`` partitioned, TEXT / SAMPLE_VOCAB init), and the shared prompt prefix
(``share_prompt_prefix=True``) under DDP, FSDP2, mixed DDP and ZeRO-2; P-tuning (MLP, LSTM) and multitask
prompt tuning under DDP, FSDP2 and ZeRO-3 (every encoder weight partitioned), every trained parameter of
the prompt module compared.

One ``torchrun --nproc-per-node 2`` launch runs every case in sequence (``tests/distributed/worker.py``);
each test compares its case's trained tables, from BOTH ranks, with PEFT's own path in this process on
the whole global batch (fp32, 1e-5) and fails if any rank ran fewer fused ``prompt_concat`` calls than
forwards or fell back to the unfused path once. DeepSpeed cases skip when deepspeed is not installed.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "distributed"))

import cases  # noqa: E402

peft = pytest.importorskip("peft")

WORLD = 2
TORCH_CASES = [
    "ddp",
    "fsdp2",
    "mixed_ddp",
    "trainer",
    "ddp_shared",
    "fsdp2_shared",
    "mixed_ddp_shared",
    "ptuning_ddp",
    "ptuning_ddp_shared",
    "multitask_ddp_shared",
    "ptuning_fsdp2_shared",
    "qwen3_moe_ddp_shared",
    "gemma3_text_ddp_shared",
    "gemma3_text_fsdp2_shared",
]
DEEPSPEED_CASES = [
    "ptuning_zero3",
    "ptuning_zero3_word",
    "ptuning_zero3_mixed",
    "ptuning_lstm_zero3_shared",
    "multitask_zero3",
    "zero2",
    "zero3",
    "zero3_mixed",
    "zero3_init",
    "zero2_shared",
    "zero3_shared",
    "zero3_mixed_shared",
    "qwen3_moe_zero3_shared",
]
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
LAUNCH_TIMEOUT_S = 900
TOL = dict(atol=1e-5, rtol=1e-5)

needs_deepspeed = pytest.mark.skipif(
    not HAS_DEEPSPEED, reason="deepspeed is not installed (pip install 'fastprompt[deepspeed]')"
)


class Launch:
    def __init__(self, out: str, data: str, proc: subprocess.CompletedProcess, seconds: float):
        self.out, self.data, self.proc, self.seconds = out, data, proc, seconds

    def results(self, case: str) -> list[dict]:
        """The case's per-rank results, or a test failure with the rank's traceback / the launch log."""
        found = []
        for rank in range(WORLD):
            error = os.path.join(self.out, f"{case}.rank{rank}.error")
            if os.path.exists(error):
                with open(error) as file:
                    pytest.fail(f"case {case!r} raised on rank {rank}:\n{file.read()}")
            path = os.path.join(self.out, f"{case}.rank{rank}.pt")
            if not os.path.exists(path):
                log = (self.proc.stdout or "")[-4000:] + (self.proc.stderr or "")[-8000:]
                code = self.proc.returncode
                pytest.fail(f"case {case!r} left no result for rank {rank} (launch exit {code}):\n{log}")
            found.append(torch.load(path, weights_only=False))
        return found


def _prepare_data(directory) -> str:
    """The saved tiny GPT-2 and tokenizer the ZeRO-3 init case loads."""
    from fastprompt.testing import tiny_models

    cases.base_model().save_pretrained(os.path.join(directory, "model"))
    tiny_models.save_tokenizer(os.path.join(directory, "tokenizer"))
    return str(directory)


def run_worker(out, data, names, timeout: float = LAUNCH_TIMEOUT_S) -> Launch:
    """One ``torchrun`` launch of ``tests/distributed/worker.py`` running the cases ``names``."""
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        DS_ACCELERATOR="cpu",
        TOKENIZERS_PARALLELISM="false",
        PYTHONWARNINGS="ignore",
        PYTHONPATH=os.pathsep.join(filter(None, [HERE, env.get("PYTHONPATH")])),
    )
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={WORLD}",
        os.path.join(HERE, "distributed", "worker.py"),
        f"--out={out}",
        f"--data={data}",
        f"--cases={','.join(names)}",
    ]
    start = time.perf_counter()
    try:
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        proc = subprocess.CompletedProcess(command, -1, exc.stdout or "", f"timed out: {exc}")
    return Launch(str(out), str(data), proc, time.perf_counter() - start)


@pytest.fixture(scope="module")
def launch(tmp_path_factory) -> Launch:
    out = tmp_path_factory.mktemp("distributed")
    data = _prepare_data(tmp_path_factory.mktemp("distributed_data"))
    return run_worker(out, data, TORCH_CASES + (DEEPSPEED_CASES if HAS_DEEPSPEED else []))


def _check_fused(results: list[dict], forwards: int) -> None:
    """Every rank ran ``forwards`` fused concats (the op reached the dispatcher) and no unfused one."""
    for rank, result in enumerate(results):
        assert result["world"] == WORLD
        assert result["shared"] == 0, f"rank {rank} shared the prompt {result['shared']}x"
        assert result["unfused"] == 0, f"rank {rank} fell back to the unfused path {result['unfused']}x"
        assert result["fused"] == forwards, f"rank {rank}: {result['fused']} fused, {forwards} forwards"
        assert result["ops"] == forwards, f"rank {rank}: {result['ops']} prompt_concat calls"


def _check_tables(results: list[dict], reference: dict, family: str = cases.FAMILY) -> None:
    base = cases.base_model(family)
    initial = cases.prompt_model(
        peft.get_peft_model, base=base, adapters=tuple(reference), **cases.family_config(family)
    )
    for name, expected in reference.items():
        assert not torch.allclose(expected, cases.table(initial, name), **TOL)  # the reference trained
        for rank, result in enumerate(results):
            torch.testing.assert_close(result["tables"][name], expected, **TOL, msg=f"rank {rank}, {name}")


@pytest.fixture(scope="module")
def reference() -> dict:
    return cases.reference_tables()


@pytest.fixture(scope="module")
def mixed_reference() -> dict:
    return cases.reference_tables(adapters=cases.MIXED_ADAPTERS, mixed=True)


@pytest.mark.parametrize(
    "case",
    [
        "ddp",
        "fsdp2",  # fully_shard on every block and the root
        "mixed_ddp",  # adapter_names=[...]: rows alternate two adapters, both tables trained
        pytest.param("zero2", marks=needs_deepspeed),
        pytest.param("zero3", marks=needs_deepspeed),  # persistence threshold 0: every table partitioned
        pytest.param("zero3_mixed", marks=needs_deepspeed),
    ],
)
def test_trains_like_one_process(launch, reference, mixed_reference, case):
    results = launch.results(case)
    if case == "fsdp2":
        assert all(r["sharded"] for r in results)  # the prompt table really was a sharded DTensor
    if case.startswith("zero3"):
        assert all(r["partitioned"] == {"word": True, "prompt": True} for r in results)
    _check_fused(results, cases.STEPS)
    _check_tables(results, mixed_reference if "mixed" in case else reference)


@pytest.mark.parametrize(
    "case",
    [
        "ddp_shared",
        "fsdp2_shared",  # every block runs twice per forward: the prompt pass, then the tokens
        "mixed_ddp_shared",  # one prompt pass of batch 2 (both adapters) per step
        pytest.param("zero2_shared", marks=needs_deepspeed),
        pytest.param("zero3_shared", marks=needs_deepspeed),  # every parameter partitioned
        pytest.param("zero3_mixed_shared", marks=needs_deepspeed),
    ],
)
def test_shared_prompt_trains_like_one_process(launch, reference, mixed_reference, case):
    """share_prompt_prefix=True under the engines: every forward shares, the tables equal PEFT's."""
    results = launch.results(case)
    for rank, result in enumerate(results):
        assert result["shared"] == cases.STEPS, f"rank {rank} shared {result['shared']} of {cases.STEPS}"
        assert result["unfused"] == 0
    if case == "fsdp2_shared":
        assert all(r["sharded"] for r in results)
    _check_tables(results, mixed_reference if "mixed" in case else reference)


@pytest.fixture(scope="module")
def family_references() -> dict:
    return {
        family: cases.reference_tables(base=cases.base_model(family), **cases.family_config(family))
        for family in cases.FAMILIES
    }


@pytest.mark.parametrize(
    "case,family",
    [
        ("qwen3_moe_ddp_shared", "qwen3_moe"),  # a MoE family
        ("gemma3_text_ddp_shared", "gemma3_text"),  # sliding-window layers, N above the window
        ("gemma3_text_fsdp2_shared", "gemma3_text"),
        pytest.param("qwen3_moe_zero3_shared", "qwen3_moe", marks=needs_deepspeed),
    ],
)
def test_other_families_share_under_the_engines(launch, family_references, case, family):
    """The generic shared forward under DDP / FSDP2 / ZeRO-3 on a MoE and a sliding-window family: every
    forward shares, the tables equal PEFT's one-process training."""
    results = launch.results(case)
    for rank, result in enumerate(results):
        assert result["shared"] == cases.STEPS, f"rank {rank} shared {result['shared']} of {cases.STEPS}"
        assert result["unfused"] == 0
    if "fsdp2" in case:
        assert all(r["sharded"] for r in results)
    _check_tables(results, family_references[family], family=family)


@pytest.fixture(scope="module")
def method_references() -> dict:
    references = {method: cases.reference_params(method) for method in cases.METHODS}
    references["ptuning_word"] = cases.reference_params("ptuning", train_word=True)
    references["ptuning_mixed"] = cases.reference_params("ptuning", mixed=True)
    return references


@pytest.mark.parametrize(
    "case,method",
    [
        ("ptuning_ddp", "ptuning"),
        ("ptuning_ddp_shared", "ptuning"),  # one prompt pass per step, the gradient into the MLP
        ("multitask_ddp_shared", "multitask"),  # rows alternate 2 tasks: one pass per task
        ("ptuning_fsdp2_shared", "ptuning"),  # the encoder's weights sharded DTensors of the root
        pytest.param("ptuning_zero3", "ptuning", marks=needs_deepspeed),  # every weight partitioned
        pytest.param("ptuning_zero3_word", "ptuning_word", marks=needs_deepspeed),  # word table trained
        pytest.param("ptuning_zero3_mixed", "ptuning_mixed", marks=needs_deepspeed),  # adapter_names
        pytest.param("ptuning_lstm_zero3_shared", "ptuning_lstm", marks=needs_deepspeed),
        pytest.param("multitask_zero3", "multitask", marks=needs_deepspeed),
    ],
)
def test_prompt_methods_train_like_one_process(launch, method_references, case, method):
    """P-tuning and multitask prompt tuning: every parameter of the prompt module (the encoder's table,
    MLP / LSTM weights; the task factors) equals PEFT's one process on the whole batch, on both ranks;
    the fused concat ran on every forward (or the prompt was shared on every forward), never unfused."""
    results = launch.results(case)
    expected = method_references[method]
    train_word, mixed = method.endswith("_word"), method.endswith("_mixed")
    adapters = cases.MIXED_ADAPTERS if mixed else ("default",)
    base_method = method.removesuffix("_word").removesuffix("_mixed")
    model = cases.prompt_model(
        peft.get_peft_model, adapters=adapters, method=base_method, train_word=train_word
    )
    initial = cases.prompt_params(model)
    if train_word:
        initial["word"] = model.word_embeddings.weight
    assert sorted(initial) == sorted(expected)
    for rank, result in enumerate(results):
        assert result["unfused"] == 0, f"rank {rank} fell back to the unfused path {result['unfused']}x"
        if case.endswith("_shared"):
            assert result["shared"] == cases.STEPS, f"rank {rank} shared {result['shared']}x"
        else:
            _check_fused([result], cases.STEPS)
        if "fsdp2" in case:
            assert result["sharded"]
        if "zero3" in case:
            assert result["partitioned"] == {"word": True, "prompt": True}
        assert sorted(result["params"]) == sorted(expected)
        for key, value in expected.items():
            if "weight_hh" not in key:  # (the LSTM's reverse recurrent weights move by less than TOL)
                assert not torch.allclose(value, initial[key], **TOL), f"{key} did not train"
            torch.testing.assert_close(result["params"][key], value, **TOL, msg=f"rank {rank}, {key}")


def test_trainer_checkpoint_and_resume(launch, tmp_path):
    results = launch.results("trainer")
    expected = cases.reference_trainer_tables(tmp_path)
    _check_fused(results, cases.TRAINER_STEPS)  # 2 steps, then 2 more after resuming
    for rank, result in enumerate(results):
        at_checkpoint = expected[cases.TRAINER_SAVE_AT]
        torch.testing.assert_close(result["at_checkpoint"], at_checkpoint, **TOL, msg=f"rank {rank}")
        torch.testing.assert_close(result["checkpoint_file"], at_checkpoint, **TOL, msg=f"rank {rank}")
        final = expected[cases.TRAINER_STEPS]
        assert not torch.allclose(final, at_checkpoint, **TOL)
        torch.testing.assert_close(result["tables"]["default"], final, **TOL, msg=f"rank {rank}")


@needs_deepspeed
def test_deepspeed_zero3_init_text_and_sample_vocab(launch, tmp_path):
    """The model loaded partitioned (HF zero3 init): TEXT init through get_peft_model, fastprompt's
    PromptEmbedding (TEXT, SAMPLE_VOCAB) and the trained table equal the unpartitioned single process."""
    from transformers import AutoModelForCausalLM

    results = launch.results("zero3_init")

    def base():
        return AutoModelForCausalLM.from_pretrained(os.path.join(launch.data, "model")).train()

    config = cases.text_init_config(launch.data)
    initial = cases.table(cases.prompt_model(peft.get_peft_model, base=base(), **config)).detach().clone()
    own = cases.own_prompt_embeddings(base().get_input_embeddings(), launch.data)
    expected = cases.reference_tables(base=base(), **config)
    _check_fused(results, cases.STEPS)
    for rank, result in enumerate(results):
        assert result["word_partitioned_at_init"] and result["partitioned"] == {"word": True, "prompt": True}
        torch.testing.assert_close(result["initial"], initial, atol=0, rtol=0, msg=f"rank {rank}")
        for init in ("TEXT", "SAMPLE_VOCAB"):
            torch.testing.assert_close(result["own"][init], own[init], atol=0, rtol=0, msg=f"{rank} {init}")
        torch.testing.assert_close(result["tables"]["default"], expected["default"], **TOL)
        raw = result["raw_init"]  # built under a plain deepspeed.zero.Init(), no HF config
        assert raw["was_partitioned"]
        for init in ("TEXT", "SAMPLE_VOCAB"):
            torch.testing.assert_close(raw["partitioned"][init], raw["plain"][init], atol=0, rtol=0)
