"""``fastprompt.vllm.LLM``: soft prompts served by vLLM's offline engine, checked token for token against
transformers' base model, and the prefix cache, adapter replacement, deletion and bad files."""

from __future__ import annotations

import shutil

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed (the serving tests run in the vLLM venv)")

from vllm_helpers import BLOCK, ENGINE, TENANTS, table, task_factors  # noqa: E402

import fastprompt  # noqa: E402
from fastprompt.prompted_embeds.adapter_files import load_prompt_adapter  # noqa: E402
from fastprompt.testing.adapter_files import (  # noqa: E402
    ESCAPING_NAMES,
    SERVING_BAD_FILES,
    corrupt_adapter,
    save_multitask_adapter,
    save_prompt_adapter,
    save_ptuning_adapter,
)

NEW = 8


@pytest.fixture(scope="module")
def llm(base_dir, adapter_dirs, tenant_dir):
    from fastprompt.vllm import LLM

    engine = LLM(
        base_dir,
        prompt_adapters=dict(adapter_dirs),
        prompt_adapter_dir=tenant_dir,
        max_loaded_adapters=4,
        **ENGINE,
    )
    yield engine
    engine.shutdown()


def greedy(new_tokens=NEW):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)


def _table_of(directory):
    return load_prompt_adapter(directory).table


def test_settings_that_make_the_prompt_cacheable(llm):
    config = llm.engine.llm_engine.vllm_config
    assert config.cache_config.block_size == BLOCK and config.cache_config.enable_prefix_caching
    assert config.model_config.enable_prompt_embeds and config.model_config.dtype == torch.float32


def test_mixed_batch_equals_transformers(llm, adapter_dirs, reference, tokenize):
    """Adapters, None, text and token-id prompts in one generate call; each row's greedy tokens equal
    transformers' base model generating from cat(that adapter's table, embed(ids))."""
    prompts = [
        "the movie was great",
        {"prompt_token_ids": [7, 30, 41, 12, 9]},
        "the food was bad but the service was fine",
        {"prompt_token_ids": [5, 6, 7, 8]},
        "answer the question",
        "translate english to german : hello world",
    ]
    names = ["alpha", "beta", None, "gamma", "alpha", None]
    outputs = llm.generate(prompts, greedy(), adapter_names=names, use_tqdm=False)
    assert len(outputs) == len(prompts)
    for output, prompt, name in zip(outputs, prompts, names, strict=True):
        ids = tokenize(prompt) if isinstance(prompt, str) else prompt["prompt_token_ids"]
        expected = reference(None if name is None else _table_of(adapter_dirs[name]), ids, NEW)
        assert list(output.outputs[0].token_ids) == expected, (name, prompt)
        if isinstance(prompt, str):
            assert output.prompt == prompt
    # the adapter changes what is generated (the test would not see a dropped prompt otherwise)
    assert (
        outputs[0].outputs[0].token_ids
        != llm.generate(prompts[:1], greedy(), use_tqdm=False)[0].outputs[0].token_ids
    )


def test_prompt_rows_are_the_adapter_rows_byte_for_byte(llm, adapter_dirs, base_dir):
    """What vLLM receives: the adapter's rows (cast to the model dtype) then the word-table rows."""
    from safetensors import safe_open

    first, second = llm.build_prompts(["the movie", {"prompt_token_ids": [4, 5]}], ["gamma", "gamma"])
    rows = _table_of(adapter_dirs["gamma"])
    n = rows.shape[0]
    for built in (first, second):
        embeds = built["prompt_embeds"]
        assert embeds.dtype == torch.float32 and embeds.shape[1] == rows.shape[1]
        assert torch.equal(embeds[:n], rows)
    assert first["prompt_embeds"][:n].numpy().tobytes() == second["prompt_embeds"][:n].numpy().tobytes()
    with safe_open(f"{base_dir}/model.safetensors", framework="pt") as file:
        word = file.get_tensor("model.embed_tokens.weight")
    assert torch.equal(second["prompt_embeds"][n:], word[[4, 5]])


def test_repeated_adapter_is_served_from_the_prefix_cache(llm):
    """gamma's 40 rows fill one 32-row block: every later request with gamma reads that block from the
    cache, whatever its text; the same full prompt again has every full block but the last token's cached."""
    texts = ["the actors were good", "classify the sentiment of this review", "the movie was great"]
    first = llm.generate(texts[:1], greedy(2), adapter_names=["gamma"], use_tqdm=False)[0]
    later = llm.generate(texts[1:], greedy(2), adapter_names=["gamma", "gamma"], use_tqdm=False)
    assert all(out.num_cached_tokens >= BLOCK for out in later), [o.num_cached_tokens for o in later]
    again = llm.generate(texts[:1], greedy(2), adapter_names=["gamma"], use_tqdm=False)[0]
    prompt_len = 40 + len(llm.get_tokenizer()(texts[0])["input_ids"])
    assert again.num_cached_tokens == (prompt_len - 1) // BLOCK * BLOCK
    assert again.outputs[0].token_ids == first.outputs[0].token_ids
    # another adapter's rows hash differently: nothing of gamma's block is reused for alpha's new prompt
    other = llm.generate(["the service was fine"], greedy(2), adapter_names=["alpha"], use_tqdm=False)[0]
    fresh = llm.generate(["the service was fine"], greedy(2), adapter_names=["alpha"], use_tqdm=False)[0]
    assert other.num_cached_tokens in (0, BLOCK)  # alpha's block may be cached by the mixed-batch test
    assert fresh.num_cached_tokens >= BLOCK


def test_replace_and_delete(llm, tmp_path, reference, tokenize):
    ids = tokenize("the food was bad")
    replacement = table(40, seed=99)
    save_prompt_adapter(tmp_path / "new", replacement)
    llm.load_adapter(tmp_path / "new", "delta")
    assert "delta" in llm.adapter_names
    before = llm.generate(["the food was bad"], greedy(), adapter_names=["delta"], use_tqdm=False)[0]
    assert list(before.outputs[0].token_ids) == reference(replacement, ids, NEW)
    # replace: the next request uses the new rows (never a stale prompt, even with its blocks cached)
    other = table(40, seed=7)
    save_prompt_adapter(tmp_path / "other", other)
    llm.load_adapter(tmp_path / "other", "delta")
    after = llm.generate(["the food was bad"], greedy(), adapter_names=["delta"], use_tqdm=False)[0]
    assert list(after.outputs[0].token_ids) == reference(other, ids, NEW)
    assert after.num_cached_tokens == 0  # new rows, new block hashes
    llm.delete_adapter("delta")
    assert "delta" not in llm.adapter_names
    with pytest.raises(ValueError, match=r"Unknown prompt adapter 'delta'.*'alpha'"):
        llm.generate(["the food was bad"], greedy(), adapter_names=["delta"], use_tqdm=False)
    with pytest.raises(ValueError, match="'delta'"):
        llm.delete_adapter("delta")


@pytest.mark.parametrize("how", SERVING_BAD_FILES)
def test_bad_file_changes_nothing(llm, adapter_dirs, tmp_path, how):
    directory = tmp_path / "bad"
    shutil.copytree(adapter_dirs["alpha"], directory)
    corrupt_adapter(directory, how)
    served = llm.build_prompts(["the movie"], ["alpha"])[0]["prompt_embeds"]
    with pytest.raises(fastprompt.AdapterFileError) as info:
        llm.load_adapter(directory, "alpha")  # replacing a served adapter
    assert str(directory) in str(info.value)
    with pytest.raises(fastprompt.AdapterFileError):
        llm.load_adapter(directory, "new")  # adding one
    assert "new" not in llm.adapter_names
    assert torch.equal(llm.build_prompts(["the movie"], ["alpha"])[0]["prompt_embeds"], served)


def test_adapters_keep_serving_after_bad_files(llm, adapter_dirs, reference, tokenize):
    output = llm.generate(["the movie was great"], greedy(), adapter_names=["alpha"], use_tqdm=False)[0]
    assert list(output.outputs[0].token_ids) == reference(
        _table_of(adapter_dirs["alpha"]), tokenize("the movie was great"), NEW
    )


def test_bad_arguments(llm, base_dir):
    with pytest.raises(ValueError, match=r"Unknown prompt adapter 'nope'.*\['alpha', 'beta', 'gamma'"):
        llm.generate(["the movie", "the food"], greedy(), adapter_names=["alpha", "nope"])
    with pytest.raises(ValueError, match="adapter_names has 1 entries but there are 2 prompts"):
        llm.generate(["the movie", "the food"], greedy(), adapter_names=["alpha"])
    with pytest.raises(TypeError, match="one adapter name"):
        llm.generate(["the movie"], greedy(), adapter_names="alpha")
    with pytest.raises(ValueError, match="token ids must lie in"):
        llm.generate([{"prompt_token_ids": [1, 500]}], greedy(), adapter_names=["alpha"])
    with pytest.raises(ValueError, match="adapter_name must be a non-empty string"):
        llm.load_adapter(base_dir, "")


def test_directory_adapters_more_than_held_in_one_call(llm, tenant_dir, adapter_dirs, reference, tokenize):
    """12 of the directory's adapters (4 tables held at most), the prompt_adapters' alpha (which wins over
    the directory's alpha) and the base model in one generate call: every row its own adapter's tokens."""
    names = [f"t{i:02d}" for i in range(0, TENANTS, 5)] + ["alpha", None]
    prompts = [f"the movie number {i} was great" for i in range(len(names))]
    outputs = llm.generate(prompts, greedy(), adapter_names=names, use_tqdm=False)
    for output, prompt, name in zip(outputs, prompts, names, strict=True):
        directory = adapter_dirs["alpha"] if name == "alpha" else name and f"{tenant_dir}/{name}"
        expected = reference(None if name is None else _table_of(directory), tokenize(prompt), NEW)
        assert list(output.outputs[0].token_ids) == expected, name
    assert len(llm.adapters.directory.loaded()) == 4
    assert {"alpha", "beta", "gamma", "t00", "t59"} <= set(llm.adapter_names)


def test_directory_adapters_bad_and_escaping(llm, tenant_dir, tmp_path):
    directory = f"{tenant_dir}/offline_bad"
    shutil.copytree(f"{tenant_dir}/t01", directory)
    corrupt_adapter(directory, "inf")
    with pytest.raises(
        fastprompt.AdapterFileError, match="offline_bad/adapter_model.safetensors: 'prompt_embed"
    ):
        llm.generate(["the movie"], greedy(), adapter_names=["offline_bad"], use_tqdm=False)
    shutil.rmtree(directory)
    for name in ESCAPING_NAMES:
        with pytest.raises(ValueError, match="Unknown prompt adapter"):
            llm.build_prompts(["the movie"], [name])


def test_ptuning_and_multitask_adapters(llm, tmp_path, tenant_dir, reference, tokenize):
    """A P-tuning adapter (PEFT stores the encoder's final rows) serves those rows, by name and from the
    served directory; a multitask adapter loaded as "mt" serves task T as "mt.taskT", each the rows
    ``shared * (cols[T] @ rows[T])``; one generate call mixes them, every row's tokens its own rows'."""
    ptuned = table(24, seed=61)
    save_ptuning_adapter(tmp_path / "pt", ptuned)
    shared = table(20, seed=62)
    cols, task_rows = task_factors(3, 20, 2, seed=63)
    save_multitask_adapter(tmp_path / "mt", shared, cols, task_rows)
    llm.load_adapter(tmp_path / "pt", "pt")
    llm.load_adapter(tmp_path / "mt", "mt")
    in_dir = table(16, seed=64)
    save_ptuning_adapter(f"{tenant_dir}/ptuned", in_dir)
    dir_cols, dir_rows = task_factors(2, 20, 2, seed=65)
    save_multitask_adapter(f"{tenant_dir}/mtd", shared, dir_cols, dir_rows)  # in the directory too
    try:
        assert {"pt", "mt.task0", "mt.task1", "mt.task2", "mtd.task0", "mtd.task1"} <= set(llm.adapter_names)
        tasks = shared[None] * torch.matmul(cols, task_rows)  # [3, 20, HIDDEN]
        expected_rows = {"pt": ptuned, "ptuned": in_dir, **{f"mt.task{t}": tasks[t] for t in range(3)}}
        expected_rows["mtd.task1"] = shared * torch.matmul(dir_cols[1], dir_rows[1])
        names = ["mt.task0", "pt", "mt.task2", "ptuned", "mt.task1", "mtd.task1"]
        prompts = [
            "the movie was great",
            "the food was bad",
            "answer the question",
            "hello world",
            "the movie",
            "the movie was great",
        ]
        outputs = llm.generate(prompts, greedy(), adapter_names=names, use_tqdm=False)
        got = [list(output.outputs[0].token_ids) for output in outputs]
        for tokens, name, prompt in zip(got, names, prompts, strict=True):
            assert tokens == reference(expected_rows[name], tokenize(prompt), NEW), name
        # the tasks differ: the same prompt under each task is not one answer three times
        same = llm.generate(
            ["the movie"] * 3, greedy(), adapter_names=[f"mt.task{t}" for t in range(3)], use_tqdm=False
        )
        assert len({tuple(output.outputs[0].token_ids) for output in same}) > 1
        llm.delete_adapter("mt")
        assert not any(name.startswith("mt.") for name in llm.adapter_names)
    finally:
        shutil.rmtree(f"{tenant_dir}/ptuned")
        shutil.rmtree(f"{tenant_dir}/mtd")
        for name in ("pt", "mt"):
            if name in llm.adapter_names or f"{name}.task0" in llm.adapter_names:
                llm.delete_adapter(name)
