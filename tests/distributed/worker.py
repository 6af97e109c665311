"""One rank of the distributed tests: ``torchrun --nproc-per-node 2 worker.py --out DIR --cases a,b,...``.

Runs the named cases one after another in one process group (gloo, CPU), so the whole suite pays for
one launch. For each case every rank writes ``DIR/<case>.rank<R>.pt``: the trained prompt table(s) (whole,
gathered where the engine shards them), the number of fused and unfused concats it ran (fastprompt's
``CALLS``) and of ``torch.ops.fastprompt.prompt_concat`` calls that reached the dispatcher, how many
forwards shared the prompt (``share_prompt_prefix``), and what the case checked about sharding. A case
that raises writes ``DIR/<case>.rank<R>.error`` and the rank exits (torchrun then stops the other one):
the tests of the cases after it report that they did not run.

``--data DIR`` holds what the ZeRO-3 init case loads: a saved tiny GPT-2 (``model/``) and tokenizer
(``tokenizer/``), written by the test.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import os
import sys
import traceback

import torch
import torch.distributed as dist

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]  # cases.py, then tests/ (tiny_models, peft_helpers)

import cases  # noqa: E402
from peft_helpers import FastpromptOps  # noqa: E402

import fastprompt  # noqa: E402
from fastprompt.prompt_once import policy as shared_prefix  # noqa: E402
from fastprompt.prompted_embeds import CALLS  # noqa: E402


def _rank_batches():
    rows = cases.rows(dist.get_rank(), dist.get_world_size())
    return rows, [ids[rows] for ids in cases.batches()]


def _train(model, step_fn, mixed: bool = False, tasks: bool = False) -> None:
    """STEPS steps on this rank's rows; ``step_fn(input_ids, kwargs)`` runs forward, backward, step.
    ``mixed``: rows alternate adapters; ``tasks``: rows alternate tasks (multitask's ``task_ids``)."""
    rows, batches = _rank_batches()
    extra = {"adapter_names": cases.mixed_names(rows)} if mixed else {}
    if tasks:
        extra["task_ids"] = cases.task_ids(rows)
    for ids in batches:
        step_fn(ids, extra)


def _torch_step(model, optimizer):
    def step(ids, extra):
        model(input_ids=ids, labels=ids, **extra).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    return step


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    full = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor  # FSDP2: a DTensor
    return full.detach().clone()


# ------------------------------------------------------------------------------------ torch engines


def _get_peft_model(share: bool):
    """fastprompt's get_peft_model, with ``share_prompt_prefix=True`` as the model's default if ``share``
    (the cases' batches are too small for the default to share)."""
    if not share:
        return fastprompt.get_peft_model
    return lambda *args, **kwargs: fastprompt.get_peft_model(*args, share_prompt_prefix=True, **kwargs)


def case_ddp(mixed: bool = False, share: bool = False, family: str = cases.FAMILY) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    adapters = cases.MIXED_ADAPTERS if mixed else ("default",)
    base = cases.base_model(family)
    model = cases.prompt_model(
        _get_peft_model(share), base=base, adapters=adapters, **cases.family_config(family)
    )
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(cases.trainable(model), lr=cases.LR)
    _train(ddp, _torch_step(ddp, optimizer), mixed=mixed)
    return {"tables": {name: _whole(cases.table(model, name)) for name in adapters}}


def case_mixed_ddp() -> dict:
    return case_ddp(mixed=True)


def case_ddp_shared() -> dict:
    return case_ddp(share=True)


def case_mixed_ddp_shared() -> dict:
    return case_ddp(mixed=True, share=True)


def case_fsdp2_shared() -> dict:
    return case_fsdp2(share=True)


def case_fsdp2(share: bool = False, family: str = cases.FAMILY) -> dict:
    from torch.distributed.fsdp import fully_shard

    model = cases.prompt_model(
        _get_peft_model(share), base=cases.base_model(family), **cases.family_config(family)
    )
    for block in cases.decoder_blocks(model):
        fully_shard(block)
    fully_shard(model)
    sharded = hasattr(cases.table(model), "full_tensor")
    optimizer = torch.optim.SGD(cases.trainable(model), lr=cases.LR)
    _train(model, _torch_step(model, optimizer))
    return {"tables": {"default": _whole(cases.table(model))}, "sharded": sharded}


def _whole_params(model) -> dict:
    return {key: _whole(param) for key, param in cases.prompt_params(model).items()}


def _method_ddp(method: str, share: bool = False) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    model = cases.prompt_model(_get_peft_model(share), method=method)
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(cases.trainable(model), lr=cases.LR)
    _train(ddp, _torch_step(ddp, optimizer), tasks=method == "multitask")
    return {"params": _whole_params(model)}


def case_ptuning_ddp() -> dict:
    return _method_ddp("ptuning")


def case_ptuning_ddp_shared() -> dict:
    return _method_ddp("ptuning", share=True)


def case_multitask_ddp_shared() -> dict:
    return _method_ddp("multitask", share=True)


def case_ptuning_fsdp2_shared() -> dict:
    """fully_shard on every block and the root: the encoder's weights are sharded DTensors of the root."""
    return _method_fsdp2("ptuning", share=True)


def _method_fsdp2(method: str, share: bool = False) -> dict:
    from torch.distributed.fsdp import fully_shard

    model = cases.prompt_model(_get_peft_model(share), method=method)
    for block in cases.decoder_blocks(model):
        fully_shard(block)
    fully_shard(model)
    sharded = all(hasattr(p, "full_tensor") for p in cases.prompt_params(model).values())
    optimizer = torch.optim.SGD(cases.trainable(model), lr=cases.LR)
    _train(model, _torch_step(model, optimizer))
    return {"params": _whole_params(model), "sharded": sharded}


def case_trainer() -> dict:
    """HF Trainer (DDP over the launch's process group): TRAINER_SAVE_AT steps with a checkpoint, then a
    new model and Trainer resumed from it to TRAINER_STEPS."""
    from safetensors.torch import load_file

    output_dir = os.path.join(ARGS.out, "trainer")
    per_device = cases.GLOBAL_BATCH // dist.get_world_size()
    model = cases.prompt_model(fastprompt.get_peft_model)
    cases.train_with_trainer(model, output_dir, cases.TRAINER_SAVE_AT, per_device, save=True)
    checkpoint = os.path.join(output_dir, f"checkpoint-{cases.TRAINER_SAVE_AT}")
    saved = load_file(os.path.join(checkpoint, "adapter_model.safetensors"))["prompt_embeddings"]
    first = _whole(cases.table(model))
    resumed = cases.prompt_model(fastprompt.get_peft_model)
    cases.train_with_trainer(resumed, output_dir, cases.TRAINER_STEPS, per_device, resume=checkpoint)
    return {
        "tables": {"default": _whole(cases.table(resumed))},
        "at_checkpoint": first,
        "checkpoint_file": saved,
    }


# ------------------------------------------------------------------------------------------ DeepSpeed


def _ds_config(stage: int) -> dict:
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")  # takes the launch's process group
    return {
        "train_micro_batch_size_per_gpu": cases.GLOBAL_BATCH // dist.get_world_size(),
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }


def _gathered(param: torch.Tensor) -> torch.Tensor:
    import deepspeed

    with deepspeed.zero.GatheredParameters([param]):
        return param.detach().clone()


def _deepspeed_train(model, stage: int, mixed: bool = False, tasks: bool = False) -> dict:
    """Train under DeepSpeed ZeRO-``stage``: the trained tables ("tables"), every prompt-module
    parameter ("params"), and which were partitioned (0 elements) between steps."""
    import deepspeed

    optimizer = torch.optim.SGD(cases.trainable(model), lr=cases.LR)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=_ds_config(stage))
    params = cases.prompt_params(model)
    partitioned = {
        "word": model.word_embeddings.weight.numel() == 0,
        "prompt": all(p.numel() == 0 for p in params.values()),
    }

    def step(ids, extra):
        engine.backward(engine(input_ids=ids, labels=ids, **extra).loss)
        engine.step()

    _train(engine, step, mixed=mixed, tasks=tasks)
    read = _gathered if stage == 3 else _whole
    tables = {name: read(cases.table(model, name)) for name in model.prompt_encoder}
    trained = {key: read(param) for key, param in params.items()}
    if model.word_embeddings.weight.requires_grad:
        trained["word"] = read(model.word_embeddings.weight)
    engine.destroy()
    return {"tables": tables, "params": trained, "partitioned": partitioned}


def case_ptuning_zero3() -> dict:
    return _deepspeed_train(cases.prompt_model(fastprompt.get_peft_model, method="ptuning"), stage=3)


def case_ptuning_zero3_word() -> dict:
    """A trainable (tied) word table: the fused op runs inside the word module's call, whose ZeRO-3 hooks
    gather the table for the forward and the backward."""
    model = cases.prompt_model(fastprompt.get_peft_model, method="ptuning", train_word=True)
    return _deepspeed_train(model, stage=3)


def case_ptuning_zero3_mixed() -> dict:
    """Rows alternate two P-tuning adapters: one fused op over both encoders' rows."""
    model = cases.prompt_model(fastprompt.get_peft_model, adapters=cases.MIXED_ADAPTERS, method="ptuning")
    return _deepspeed_train(model, stage=3, mixed=True)


def case_ptuning_lstm_zero3_shared() -> dict:
    model = cases.prompt_model(_get_peft_model(share=True), method="ptuning_lstm")
    return _deepspeed_train(model, stage=3)


def case_multitask_zero3() -> dict:
    model = cases.prompt_model(fastprompt.get_peft_model, method="multitask")
    return _deepspeed_train(model, stage=3, tasks=True)


def case_prefix_ddp() -> dict:
    """Prefix tuning (projection MLP) under DDP: the encoder once per step, its keys/values in the cache."""
    return _method_ddp("prefix")


def case_prefix_fsdp2() -> dict:
    """fully_shard on every block and the root: the prefix encoder's weights are sharded DTensors of the
    root, gathered for the forward that runs it once."""
    return _method_fsdp2("prefix")


def case_prefix_zero3() -> dict:
    """Prefix tuning under ZeRO-3, every weight (the encoder's embedding and MLP too) partitioned."""
    return _deepspeed_train(cases.prompt_model(fastprompt.get_peft_model, method="prefix"), stage=3)


def case_qwen3_moe_ddp_shared() -> dict:
    return case_ddp(share=True, family="qwen3_moe")


def case_gemma3_text_fsdp2_shared() -> dict:
    return case_fsdp2(share=True, family="gemma3_text")


def case_qwen3_moe_zero3_shared() -> dict:
    base = cases.base_model("qwen3_moe")
    model = cases.prompt_model(_get_peft_model(share=True), base=base, **cases.family_config("qwen3_moe"))
    return _deepspeed_train(model, stage=3)


def case_gemma3_text_ddp_shared() -> dict:
    return case_ddp(share=True, family="gemma3_text")


def case_zero2() -> dict:
    return _deepspeed_train(cases.prompt_model(fastprompt.get_peft_model), stage=2)


def case_zero3_shared() -> dict:
    return _deepspeed_train(cases.prompt_model(_get_peft_model(share=True)), stage=3)


def case_zero3_mixed_shared() -> dict:
    model = cases.prompt_model(_get_peft_model(share=True), adapters=cases.MIXED_ADAPTERS)
    return _deepspeed_train(model, stage=3, mixed=True)


def case_zero2_shared() -> dict:
    return _deepspeed_train(cases.prompt_model(_get_peft_model(share=True)), stage=2)


def case_zero3() -> dict:
    return _deepspeed_train(cases.prompt_model(fastprompt.get_peft_model), stage=3)


def case_zero3_mixed() -> dict:
    model = cases.prompt_model(fastprompt.get_peft_model, adapters=cases.MIXED_ADAPTERS)
    return _deepspeed_train(model, stage=3, mixed=True)


def case_zero3_init() -> dict:
    """HF's ZeRO-3 init: ``from_pretrained`` under ``HfDeepSpeedConfig`` partitions the model as it
    loads; then TEXT init through ``fastprompt.get_peft_model`` (PEFT's PromptEmbedding gathers the word
    rows), fastprompt's own ``PromptEmbedding`` (TEXT and SAMPLE_VOCAB) on the partitioned word table,
    and training under ZeRO-3."""
    import deepspeed
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    # A plain deepspeed.zero.Init (no HF config): fastprompt.PromptEmbedding on the partitioned table,
    # and on an ordinary nn.Embedding holding the same (gathered) rows.
    torch.manual_seed(3)
    with deepspeed.zero.Init(config_dict_or_path=_ds_config(3)):
        raw = torch.nn.Embedding(128, 16)
    raw_partitioned = raw.weight.numel() == 0
    plain = torch.nn.Embedding.from_pretrained(_gathered(raw.weight))
    raw_init = {
        "partitioned": cases.own_prompt_embeddings(raw, ARGS.data),
        "plain": cases.own_prompt_embeddings(plain, ARGS.data),
        "was_partitioned": raw_partitioned,
    }

    hf_config = HfDeepSpeedConfig(_ds_config(3))  # noqa: F841 - must stay alive while the model loads
    base = AutoModelForCausalLM.from_pretrained(os.path.join(ARGS.data, "model")).train()
    word_partitioned = base.get_input_embeddings().weight.numel() == 0
    model = cases.prompt_model(fastprompt.get_peft_model, base=base, **cases.text_init_config(ARGS.data))
    initial = _gathered(cases.table(model))
    own = cases.own_prompt_embeddings(model.word_embeddings, ARGS.data)
    result = _deepspeed_train(model, stage=3)
    result.update(initial=initial, own=own, word_partitioned_at_init=word_partitioned, raw_init=raw_init)
    del hf_config
    return result


# ------------------------------------------------------------------------------------------------ main

CASES = {name[len("case_") :]: fn for name, fn in dict(globals()).items() if name.startswith("case_")}
ARGS = None


def main() -> None:
    global ARGS
    parser = argparse.ArgumentParser()
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None)  # deepspeed launcher
    parser.add_argument("--out", required=True)
    parser.add_argument("--data", default=None)
    parser.add_argument("--cases", required=True)
    ARGS = parser.parse_args()
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=180))
    rank = dist.get_rank()
    for name in ARGS.cases.split(","):
        dist.barrier()
        before = collections.Counter(CALLS)
        shared_before = shared_prefix.CALLS["shared"]
        try:
            with FastpromptOps() as ops:
                result = CASES[name]()
        except BaseException:
            with open(os.path.join(ARGS.out, f"{name}.rank{rank}.error"), "w") as file:
                file.write(traceback.format_exc())
            traceback.print_exc()
            sys.stdout.flush()
            os._exit(1)
        result.update(
            fused=CALLS["fused"] - before["fused"],
            unfused=CALLS["unfused"] - before["unfused"],
            ops=ops.forward,
            shared=shared_prefix.CALLS["shared"] - shared_before,
            world=dist.get_world_size(),
        )
        torch.save(result, os.path.join(ARGS.out, f"{name}.rank{rank}.pt"))
        print(f"[worker rank {rank}] {name}: done", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
