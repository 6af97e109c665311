"""Prefix tuning on 2 processes (CPU, gloo): DDP, FSDP2 (every block and the root sharded) and DeepSpeed
ZeRO-3 with every weight partitioned (the prefix encoder's embedding and projection MLP too). Every parameter
of the prefix encoder, from both ranks, equals PEFT's own path trained in this process on the whole global
batch (fp32, 1e-5). The same worker as ``tests/test_distributed.py``, launched for these cases only."""

from __future__ import annotations

import pytest
import torch
from test_distributed import HAS_DEEPSPEED, TOL, Launch, cases, needs_deepspeed, run_worker

peft = pytest.importorskip("peft")

CASES = ["prefix_ddp", "prefix_fsdp2"] + (["prefix_zero3"] if HAS_DEEPSPEED else [])


@pytest.fixture(scope="module")
def launch(tmp_path_factory) -> Launch:
    out = tmp_path_factory.mktemp("distributed_prefix")
    return run_worker(out, out, CASES)


@pytest.fixture(scope="module")
def expected() -> dict:
    return cases.reference_params("prefix")


@pytest.mark.parametrize(
    "case", ["prefix_ddp", "prefix_fsdp2", pytest.param("prefix_zero3", marks=needs_deepspeed)]
)
def test_prefix_trains_like_one_process(launch, expected, case):
    results = launch.results(case)
    initial = cases.prompt_params(cases.prompt_model(peft.get_peft_model, method="prefix"))
    assert sorted(initial) == sorted(expected) and any("transform" in key for key in expected)
    for rank, result in enumerate(results):
        if case.endswith("zero3"):
            assert result["partitioned"] == {"word": True, "prompt": True}
        if case.endswith("fsdp2"):
            assert result["sharded"]
        assert sorted(result["params"]) == sorted(expected)
        for key, value in expected.items():
            assert not torch.allclose(value, initial[key], **TOL), f"{key} did not train"
            torch.testing.assert_close(result["params"][key], value, **TOL, msg=f"rank {rank}, {key}")
