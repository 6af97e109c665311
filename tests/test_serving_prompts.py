"""The serving layer's parts that need no vLLM: the word table read from checkpoint files, and each
request's prompt embeddings (adapter rows, then rows equal to the model's own embedding layer's)."""

from __future__ import annotations

import pytest
import torch

from fastprompt.serving.prompts import PromptAdapters
from fastprompt.serving.word_table import read_word_table
from fastprompt.testing import tiny_models
from fastprompt.testing.adapter_files import save_prompt_adapter

CASES = {
    "llama": {},  # model.embed_tokens.weight, one safetensors file
    "gpt2": {},  # transformer.wte.weight
    "gemma3": {},  # scaled embeddings (a buffer)
    "llama-sharded": {"max_shard_size": "20KB"},  # model.safetensors.index.json
    "llama-bin": {},  # pytorch_model.bin (written below: transformers 5 saves safetensors only)
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_request_rows_equal_the_models_own_embedding_layer(tmp_path, case, dtype):
    family = case.split("-")[0]
    model = tiny_models.build(family, "CAUSAL_LM")
    model.save_pretrained(tmp_path / "base", **CASES[case])
    if case == "llama-bin":
        (tmp_path / "base" / "model.safetensors").unlink()
        torch.save(model.state_dict(), tmp_path / "base" / "pytorch_model.bin")
    files = sorted(p.name for p in (tmp_path / "base").iterdir())
    expected_file = {"llama-sharded": "model.safetensors.index.json", "llama-bin": "pytorch_model.bin"}
    assert expected_file.get(case, "model.safetensors") in files
    word = read_word_table(str(tmp_path / "base"), dtype)
    assert word.weight.dtype == dtype and word.dim == tiny_models.HIDDEN
    table = torch.randn(5, tiny_models.HIDDEN, generator=torch.Generator().manual_seed(0))
    save_prompt_adapter(tmp_path / "adapter", table)
    adapters = PromptAdapters(word, reserved=("base",))
    adapters.load(tmp_path / "adapter", "a")
    ids = [1, 7, 30, 99]
    embeds = adapters.embeds("a", ids)
    with torch.no_grad():
        rows = model.to(dtype).get_input_embeddings()(torch.tensor(ids))
    assert embeds.shape == (5 + len(ids), tiny_models.HIDDEN) and embeds.dtype == dtype
    assert torch.equal(embeds[:5], table.to(dtype)) and torch.equal(embeds[5:], rows)
    assert torch.equal(embeds, adapters.embeds("a", ids))  # byte-identical from request to request


def test_names_and_errors(tmp_path):
    model = tiny_models.build("llama", "CAUSAL_LM")
    model.save_pretrained(tmp_path / "base")
    adapters = PromptAdapters(read_word_table(str(tmp_path / "base"), torch.float32), reserved=("base",))
    save_prompt_adapter(tmp_path / "x", torch.zeros(3, tiny_models.HIDDEN))
    with pytest.raises(ValueError, match="is the base model's name"):
        adapters.load(tmp_path / "x", "base")
    adapters.load(tmp_path / "x", "x")
    assert adapters.names() == ["x"] and adapters.path("x") == str(tmp_path / "x")
    with pytest.raises(ValueError, match=r"Unknown prompt adapter 'y'; the loaded adapters are \['x'\]"):
        adapters.embeds("y", [1])
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 128\)"):
        adapters.embeds("x", [128])


@pytest.mark.parametrize("task_type", ["SEQ_2_SEQ_LM", "SEQ_CLS"])
def test_adapters_of_other_task_types_are_refused(tmp_path, task_type):
    """A Seq2Seq adapter holds 2N rows (encoder and decoder prompts): prepending them all would be silently
    wrong; a classification adapter was not trained to generate. Both are AdapterFileError, nothing kept."""
    import json

    from fastprompt import AdapterFileError

    model = tiny_models.build("llama", "CAUSAL_LM")
    model.save_pretrained(tmp_path / "base")
    adapters = PromptAdapters(read_word_table(str(tmp_path / "base"), torch.float32))
    save_prompt_adapter(tmp_path / "a", torch.zeros(6, tiny_models.HIDDEN), task_type=task_type)
    if task_type == "SEQ_2_SEQ_LM":  # PEFT's file: num_virtual_tokens=3, 2 x 3 rows
        config_file = tmp_path / "a" / "adapter_config.json"
        config = json.loads(config_file.read_text())
        config.update(num_virtual_tokens=3, num_transformer_submodules=2)
        config_file.write_text(json.dumps(config))
    with pytest.raises(AdapterFileError, match=f"adapter_config.json is a {task_type} adapter"):
        adapters.load(tmp_path / "a", "a")
    assert adapters.names() == []


def test_adapter_dirs_are_checked_before_an_engine_starts(tmp_path):
    from fastprompt import AdapterFileError
    from fastprompt.serving.prompts import check_adapter_dirs

    save_prompt_adapter(tmp_path / "good", torch.zeros(3, tiny_models.HIDDEN))
    save_prompt_adapter(tmp_path / "bad", torch.full((3, tiny_models.HIDDEN), float("nan")))
    check_adapter_dirs({"good": tmp_path / "good"})
    with pytest.raises(AdapterFileError, match="values that are not finite"):
        check_adapter_dirs({"good": tmp_path / "good", "bad": tmp_path / "bad"})
    with pytest.raises(ValueError, match="adapter_name must be a non-empty string, got ''"):
        check_adapter_dirs({"": tmp_path / "good"})


def test_no_checkpoint_is_a_clear_error(tmp_path):
    tiny_models.config("llama").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="No checkpoint in"):
        read_word_table(str(tmp_path), torch.float32)


def test_llm_checks_adapters_before_the_engine_starts(tmp_path, monkeypatch):
    """``fastprompt.vllm.LLM`` reads and checks the adapters before it builds vLLM's engine (a stand-in
    ``vllm`` module records whether it was asked to)."""
    import sys
    import types

    from fastprompt import AdapterFileError
    from fastprompt.serving.offline import LLM

    started = []
    stand_in = types.ModuleType("vllm")
    stand_in.LLM = lambda **kwargs: started.append(kwargs)
    monkeypatch.setitem(sys.modules, "vllm", stand_in)
    save_prompt_adapter(tmp_path / "bad", torch.full((3, tiny_models.HIDDEN), float("inf")))
    with pytest.raises(AdapterFileError, match="values that are not finite"):
        LLM(str(tmp_path / "base"), prompt_adapters={"a": tmp_path / "bad"})
    with pytest.raises(ValueError, match="adapter_name must be a non-empty string"):
        LLM(str(tmp_path / "base"), prompt_adapters={"": tmp_path / "bad"})
    assert started == []


def test_ptuning_and_multitask_adapters_serve_peft_rows(tmp_path):
    """A P-tuning adapter serves the rows PEFT stores (the encoder's final output, what ``get_prompt``
    gives); a multitask adapter loaded as NAME serves task T as ``NAME.taskT``, PEFT's rows of that task."""
    peft = pytest.importorskip("peft")
    model = tiny_models.build("llama", "CAUSAL_LM")
    model.save_pretrained(tmp_path / "base")
    word = read_word_table(str(tmp_path / "base"), torch.float32)
    adapters = PromptAdapters(word, reserved=("base",))
    torch.manual_seed(0)
    ptuning = peft.get_peft_model(
        tiny_models.build("llama", "CAUSAL_LM"),
        peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=8),
    )
    ptuning.save_pretrained(tmp_path / "pt")
    adapters.load(tmp_path / "pt", "pt")
    with torch.no_grad():
        expected = ptuning.get_prompt(1)[0]
    assert torch.equal(adapters.table("pt"), expected)
    assert torch.equal(adapters.embeds("pt", [5, 6])[:4], expected)
    multitask = peft.get_peft_model(
        tiny_models.build("llama", "CAUSAL_LM"),
        peft.MultitaskPromptTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=4, num_tasks=3, num_ranks=2
        ),
    )
    multitask.save_pretrained(tmp_path / "mt")
    adapters.load(tmp_path / "mt", "mt")
    assert adapters.names() == ["pt", "mt.task0", "mt.task1", "mt.task2"]
    with torch.no_grad():
        rows = multitask.get_prompt(3, task_ids=torch.tensor([0, 1, 2]))
    for task in range(3):
        torch.testing.assert_close(adapters.table(f"mt.task{task}"), rows[task], rtol=0, atol=1e-6)
        assert "/" not in f"mt.task{task}"
    adapters.delete("mt.task1")
    assert adapters.names() == ["pt", "mt.task0", "mt.task2"]
    adapters.delete("mt")
    assert adapters.names() == ["pt"]
    prefix = peft.get_peft_model(
        tiny_models.build("llama", "CAUSAL_LM"),
        peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
    )
    prefix.save_pretrained(tmp_path / "prefix")
    with pytest.raises(ValueError, match="PREFIX_TUNING adapter: its keys/values go into every attention"):
        adapters.load(tmp_path / "prefix", "prefix")


def test_ptuning_and_multitask_files_written_without_peft_are_peft_files(tmp_path):
    """``save_ptuning_adapter`` / ``save_multitask_adapter`` (the vLLM venv's tests have no PEFT) write what
    PEFT writes: its config keys, and files PEFT loads to the rows they were given."""
    peft = pytest.importorskip("peft")
    import json

    from fastprompt.testing.adapter_files import save_multitask_adapter, save_ptuning_adapter

    generator = torch.Generator().manual_seed(0)
    rows = torch.randn(4, tiny_models.HIDDEN, generator=generator)
    shared = torch.randn(4, tiny_models.HIDDEN, generator=generator)
    cols = torch.randn(3, 4, 2, generator=generator)
    task_rows = torch.randn(3, 2, tiny_models.HIDDEN, generator=generator)
    save_ptuning_adapter(tmp_path / "pt", rows)
    save_multitask_adapter(tmp_path / "mt", shared, cols, task_rows)
    configs = {
        "pt": peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=8),
        "mt": peft.MultitaskPromptTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=4, num_tasks=3, num_ranks=2
        ),
    }
    for name, config in configs.items():
        peft.get_peft_model(tiny_models.build("llama", "CAUSAL_LM"), config).save_pretrained(
            tmp_path / "p" / name
        )
        with (
            open(tmp_path / name / "adapter_config.json") as ours,
            open(tmp_path / "p" / name / "adapter_config.json") as theirs,
        ):
            ours, theirs = json.load(ours), json.load(theirs)
        for key in ("peft_version", "num_attention_heads", "num_layers"):  # PEFT's version; the base model's
            theirs.pop(key)
        assert ours == theirs
    loaded = peft.PeftModel.from_pretrained(tiny_models.build("llama", "CAUSAL_LM"), tmp_path / "pt")
    multitask = peft.PeftModel.from_pretrained(tiny_models.build("llama", "CAUSAL_LM"), tmp_path / "mt")
    with torch.no_grad():
        assert torch.equal(loaded.get_prompt(1)[0], rows)
        got = multitask.get_prompt(3, task_ids=torch.tensor([0, 1, 2]))
    torch.testing.assert_close(got, shared * torch.matmul(cols, task_rows), rtol=0, atol=1e-6)


def test_multitask_and_ptuning_adapters_in_a_served_directory(tmp_path, caplog):
    """In ``--adapter-dir``: a P-tuning adapter is the model NAME; a multitask adapter NAME's tasks are the
    models ``NAME.taskT`` (listed as such), NAME itself and a task past ``num_tasks`` unknown (404), its bad
    factors a 400 (``AdapterFileError``); a real ``NAME.taskT`` directory wins; an ``--adapter`` of the same
    NAME hides the directory's tasks."""
    from fastprompt.prompted_embeds.adapter_files import AdapterFileError
    from fastprompt.serving.adapter_dir import UnknownAdapterError
    from fastprompt.testing.adapter_files import corrupt_adapter, save_multitask_adapter, save_ptuning_adapter

    tiny_models.build("llama", "CAUSAL_LM").save_pretrained(tmp_path / "base")
    word = read_word_table(str(tmp_path / "base"), torch.float32)
    generator = torch.Generator().manual_seed(0)
    dim = tiny_models.HIDDEN
    root = tmp_path / "adapters"
    ptuned = torch.randn(4, dim, generator=generator)
    save_ptuning_adapter(root / "pt", ptuned)
    shared, cols, task_rows = (
        torch.randn(5, dim, generator=generator),
        torch.randn(3, 5, 2, generator=generator),
        torch.randn(3, 2, dim, generator=generator),
    )
    save_multitask_adapter(root / "mt", shared, cols, task_rows)
    own = torch.randn(6, dim, generator=generator)
    save_prompt_adapter(root / "mt.task1", own)  # a real directory of that name wins
    adapters = PromptAdapters(word, reserved=("base",), adapter_dir=root)
    assert adapters.directory_names() == ["mt.task0", "mt.task1", "mt.task2", "pt"]
    assert torch.equal(adapters.resolve("pt"), ptuned)
    tasks = shared[None] * torch.matmul(cols, task_rows)
    caplog.set_level("INFO", logger="fastprompt.serving.adapter_dir")
    torch.testing.assert_close(adapters.resolve("mt.task0"), tasks[0], rtol=0, atol=1e-6)
    assert "Loaded prompt adapter 'mt': 3 tasks of 5 rows" in caplog.text
    torch.testing.assert_close(adapters.resolve("mt.task2"), tasks[2], rtol=0, atol=1e-6)
    assert torch.equal(adapters.resolve("mt.task1"), own)
    assert adapters.embeds("mt.task2", [5, 6], adapters.resolve("mt.task2")).shape == (7, dim)
    for unknown in ("mt", "mt.task3", "mt.task01", "nope.task0", "pt.task0"):
        with pytest.raises(UnknownAdapterError):
            adapters.resolve(unknown)
    # a multitask adapter whose own name has the task form: its tasks are listed, and its name means the
    # task of the adapter it names (as listed), never the multitask directory itself
    save_multitask_adapter(root / "mt.task2", shared, cols, task_rows)
    assert adapters.directory_names() == [
        "mt.task0", "mt.task1", "mt.task2", "mt.task2.task0", "mt.task2.task1", "mt.task2.task2", "pt"
    ]  # fmt: skip
    torch.testing.assert_close(adapters.resolve("mt.task2"), tasks[2], rtol=0, atol=1e-6)
    torch.testing.assert_close(adapters.resolve("mt.task2.task1"), tasks[1], rtol=0, atol=1e-6)
    # a task-form name of an adapter that is not multitask: a 404, and that adapter is not even loaded
    # (its bad files stay its own requests' 400)
    events = []
    adapters.directory.listeners = [lambda event, name, details: events.append((event, name))]
    corrupt_adapter(root / "pt", "nan")
    with pytest.raises(UnknownAdapterError):
        adapters.resolve("pt.task0")
    assert events == []
    with pytest.raises(AdapterFileError, match="not finite"):
        adapters.resolve("pt")
    # the config's num_tasks must be the task factors' (PEFT builds from the config): a 400
    corrupt_adapter(root / "mt", "num_tasks_config")
    with pytest.raises(AdapterFileError, match="num_tasks=4, but the task factors"):
        adapters.resolve("mt.task0")
    save_multitask_adapter(root / "mt", shared, cols, task_rows)
    corrupt_adapter(root / "mt", "task_rows_nan")
    with pytest.raises(AdapterFileError, match="task factors hold NaN"):
        adapters.resolve("mt.task0")
    save_ptuning_adapter(tmp_path / "other", ptuned)
    adapters.load(tmp_path / "other", "mt")  # --adapter mt: hides the directory's mt and its tasks
    assert "mt.task0" not in adapters.directory_names()
    with pytest.raises(UnknownAdapterError):
        adapters.resolve("mt.task0")
