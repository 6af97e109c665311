"""What the distributed tests train, shared by the 2-process worker (``worker.py``) and the single-process
references computed in the pytest process (``tests/test_distributed.py``).

The method cases (``METHODS``) train P-tuning (MLP and LSTM encoders) and multitask prompt tuning (rows
alternate two tasks) the same way and compare every trainable parameter of the prompt module (the
encoder's table and weights; the task factors), not only a table.

Every case prompt-tunes a tiny GPT-2 (tied word embeddings: the hard case for ZeRO-3) for ``STEPS`` SGD
steps on a global batch of ``GLOBAL_BATCH`` rows; with W processes, rank r trains rows
``[r * B/W, (r + 1) * B/W)`` of each step's batch. Same token count in every row (no padding), so the
mean loss of a half batch averaged over the ranks is the mean loss of the whole batch: the trained
tables must equal one process training on the whole batch (fp32, 1e-5).
"""

from __future__ import annotations

import os

import torch

STEPS = 3
GLOBAL_BATCH = 8
SEQ_LEN = 6
NUM_VIRTUAL_TOKENS = 3
LR = 0.5
FAMILY = "gpt2"
TASK = "CAUSAL_LM"
MIXED_ADAPTERS = ("a", "b")
INIT_TEXT = "classify the sentiment of this review"

# Other families, shared under the engines by the same generic machinery: a MoE and a sliding-window
# family (window 16 of ``causal_lms``), with more virtual tokens than the window so that it matters.
FAMILIES = ("qwen3_moe", "gemma3_text")
FAMILY_VIRTUAL_TOKENS = 18

# Trainer cases: 4 steps, a checkpoint after 2, then a resumed run to 4.
TRAINER_STEPS = 4
TRAINER_SAVE_AT = 2


def batches(steps: int = STEPS) -> torch.Tensor:
    """[steps, GLOBAL_BATCH, SEQ_LEN] int64 token ids in [4, VOCAB)."""
    from fastprompt.testing import tiny_models

    generator = torch.Generator().manual_seed(0)
    return torch.randint(4, tiny_models.VOCAB, (steps, GLOBAL_BATCH, SEQ_LEN), generator=generator)


def rows(rank: int, world: int) -> slice:
    """The rows of a global batch that ``rank`` of ``world`` trains."""
    per_rank = GLOBAL_BATCH // world
    return slice(rank * per_rank, (rank + 1) * per_rank)


def mixed_names(batch_rows: slice) -> list[str]:
    """Adapter of each row of a mixed batch: rows alternate "a", "b" (every rank's half has both)."""
    return [MIXED_ADAPTERS[i % 2] for i in range(batch_rows.start, batch_rows.stop)]


# The other soft-prompt methods: method name -> PEFT config keywords.
METHODS = {
    "ptuning": dict(encoder_reparameterization_type="MLP"),
    "ptuning_lstm": dict(encoder_reparameterization_type="LSTM"),
    "multitask": {},
}
ENCODER_HIDDEN = 8
NUM_TASKS = 2


def peft_config(method: str = "prompt_tuning", **kwargs):
    """PEFT's config of ``method``: "prompt_tuning", "prefix" or a key of ``METHODS``."""
    import peft

    common = {"task_type": TASK, "num_virtual_tokens": NUM_VIRTUAL_TOKENS, **kwargs}
    if method == "prompt_tuning":
        return peft.PromptTuningConfig(**common)
    if method == "multitask":
        return peft.MultitaskPromptTuningConfig(num_tasks=NUM_TASKS, **METHODS[method], **common)
    if method == "prefix":  # prefix tuning with its projection MLP
        return peft.PrefixTuningConfig(prefix_projection=True, encoder_hidden_size=ENCODER_HIDDEN, **common)
    return peft.PromptEncoderConfig(encoder_hidden_size=ENCODER_HIDDEN, **METHODS[method], **common)


def task_ids(batch_rows: slice) -> torch.Tensor:
    """[rows] int64: the task of each row of a multitask batch (rows alternate tasks 0, 1)."""
    return torch.arange(batch_rows.start, batch_rows.stop) % NUM_TASKS


def base_model(family: str = FAMILY):
    """The tiny GPT-2 (random weights from seed 0), or a tiny model of another family of ``FAMILIES``
    (``fastprompt.testing.causal_lms``), in train mode (their dropouts are 0)."""
    from fastprompt.testing import causal_lms, tiny_models

    if family == FAMILY:
        return tiny_models.build(FAMILY, TASK, seed=0).train()
    return causal_lms.tiny_causal_lm(family, seed=0).train()


def family_config(family: str) -> dict:
    """The prompt config keywords of a family case (``FAMILY_VIRTUAL_TOKENS``)."""
    return {} if family == FAMILY else {"num_virtual_tokens": FAMILY_VIRTUAL_TOKENS}


def decoder_blocks(model) -> torch.nn.ModuleList:
    """The decoder layers of a prompt-tuned model's base (``transformer.h``, ``model.layers``, ...)."""
    for name, module in model.get_base_model().named_modules():
        if isinstance(module, torch.nn.ModuleList) and name.split(".")[-1] in ("h", "layers"):
            return module
    raise AttributeError("no decoder layers found")


def prompt_model(
    get_peft_model, base=None, adapters=("default",), method="prompt_tuning", train_word=False, **config
):
    """``get_peft_model`` (fastprompt's or PEFT's) on the base model; each adapter's prompt module from
    its own seed (1, 2, ...); every parameter of every prompt module trainable, and the word table too
    with ``train_word`` (GPT-2's, tied to its output layer)."""
    base = base_model() if base is None else base
    torch.manual_seed(1)
    model = get_peft_model(base, peft_config(method, **config), adapter_name=adapters[0])
    for k, name in enumerate(adapters[1:]):
        torch.manual_seed(2 + k)
        model.add_adapter(name, peft_config(method, **config))
    for name in adapters:
        model.prompt_encoder[name].requires_grad_(True)
    if train_word:
        model.word_embeddings.weight.requires_grad_(True)
    return model


def table(model, name: str = "default") -> torch.nn.Parameter:
    return model.prompt_encoder[name].embedding.weight


def prompt_params(model) -> dict:
    """{"ADAPTER.PARAM": parameter} for every parameter of every prompt module (the encoder's table and
    weights, the task factors)."""
    return {
        f"{name}.{param_name}": param
        for name, module in model.prompt_encoder.items()
        for param_name, param in module.named_parameters()
    }


def trainable(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _reference_model(method: str, adapters, mixed: bool, base, train_word: bool, **config):
    """The model PEFT's own code path (not fastprompt) trains in one process on the whole batch each step.

    ``mixed``: rows alternate adapters "a" / "b"; PEFT cannot mix prompt adapters in a batch, so each
    adapter's rows run as their own sub-batch (``set_adapter``) and the losses are weighted by their
    row counts: the mean over the whole batch, as one mixed forward computes it. Multitask: ``task_ids``
    per row.
    """
    import peft

    model = prompt_model(
        peft.get_peft_model, base=base, adapters=adapters, method=method, train_word=train_word, **config
    )
    optimizer = torch.optim.SGD(trainable(model), lr=LR)
    for ids in batches():
        if mixed:
            names = mixed_names(slice(0, GLOBAL_BATCH))
            loss = 0.0
            for name in adapters:
                picked = torch.tensor([n == name for n in names])
                model.set_adapter(name)
                for other in adapters:
                    model.prompt_encoder[other].requires_grad_(True)  # set_adapter freezes the others
                sub = ids[picked]
                loss = loss + model(input_ids=sub, labels=sub).loss * (len(sub) / GLOBAL_BATCH)
        else:
            extra = {"task_ids": task_ids(slice(0, GLOBAL_BATCH))} if method == "multitask" else {}
            loss = model(input_ids=ids, labels=ids, **extra).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model


def reference_tables(adapters=("default",), mixed: bool = False, base=None, **config) -> dict:
    """Prompt tuning on PEFT's own path (:func:`_reference_model`): {adapter: trained table}."""
    model = _reference_model("prompt_tuning", adapters, mixed, base, False, **config)
    return {name: table(model, name).detach().clone() for name in adapters}


def reference_params(method: str, train_word: bool = False, mixed: bool = False) -> dict:
    """``method`` on PEFT's own path (:func:`_reference_model`; ``mixed``: adapters "a" / "b"):
    ``prompt_params`` of the trained model, detached, and with ``train_word`` its word table ("word")."""
    adapters = MIXED_ADAPTERS if mixed else ("default",)
    model = _reference_model(method, adapters, mixed, None, train_word)
    trained = {key: param.detach().clone() for key, param in prompt_params(model).items()}
    if train_word:
        trained["word"] = model.word_embeddings.weight.detach().clone()
    return trained


def text_init_config(data_dir: str) -> dict:
    return dict(
        prompt_tuning_init="TEXT",
        prompt_tuning_init_text=INIT_TEXT,
        tokenizer_name_or_path=os.path.join(data_dir, "tokenizer"),
    )


def own_prompt_embeddings(word_embeddings, data_dir: str) -> dict:
    """fastprompt.PromptEmbedding's TEXT and SAMPLE_VOCAB init from ``word_embeddings``: {init: table}."""
    from fastprompt import PromptEmbedding, PromptTuningConfig

    out = {}
    for init, extra in (("TEXT", text_init_config(data_dir)), ("SAMPLE_VOCAB", {})):
        config = PromptTuningConfig(
            task_type=TASK,
            num_virtual_tokens=NUM_VIRTUAL_TOKENS,
            token_dim=word_embeddings.embedding_dim,
            num_transformer_submodules=1,
            **{**extra, "prompt_tuning_init": init},
        )
        torch.manual_seed(7)
        out[init] = PromptEmbedding(config, word_embeddings).embedding.weight.detach().clone()
    return out


# ----------------------------------------------------------------------------------------------- Trainer


class TrainerData(torch.utils.data.Dataset):
    """TRAINER_STEPS global batches of causal-LM rows (labels = ids)."""

    def __init__(self):
        self.ids = batches(TRAINER_STEPS).reshape(-1, SEQ_LEN)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        ids = self.ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def trainer_args(output_dir, max_steps: int, per_device_batch: int, save: bool = False, **kwargs):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(output_dir),
        max_steps=max_steps,
        per_device_train_batch_size=per_device_batch,
        learning_rate=LR,
        optim="sgd",
        lr_scheduler_type="constant",
        train_sampling_strategy="sequential",
        report_to=[],
        use_cpu=True,
        logging_steps=1,
        save_strategy="steps" if save else "no",
        save_steps=TRAINER_SAVE_AT,
        save_only_model=False,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
        **kwargs,
    )


def train_with_trainer(model, output_dir, max_steps: int, per_device_batch: int, save=False, resume=None):
    """``Trainer(model, ...).train(resume_from_checkpoint=resume)``; returns the trainer."""
    from transformers import Trainer

    args = trainer_args(output_dir, max_steps, per_device_batch, save=save)
    trainer = Trainer(model=model, args=args, train_dataset=TrainerData())
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def reference_trainer_tables(output_dir) -> dict:
    """One process, PEFT's path, the Trainer over the whole global batch: {step: table} after
    TRAINER_SAVE_AT and TRAINER_STEPS steps."""
    import peft

    tables = {}
    for steps in (TRAINER_SAVE_AT, TRAINER_STEPS):
        model = prompt_model(peft.get_peft_model)
        train_with_trainer(model, os.path.join(str(output_dir), f"ref{steps}"), steps, GLOBAL_BATCH)
        tables[steps] = table(model).detach().clone()
    return tables
