"""``PromptTuningConfig`` and ``PromptTuningInit``: PEFT 0.21's prompt-tuning configuration, without PEFT.

The fields, their order and defaults, the ``__post_init__`` checks and their messages are those of
``peft.PromptTuningConfig`` (which inherits from ``PromptLearningConfig`` and ``PeftConfig``), so a config
written for PEFT runs unchanged here and the two serialize to the same ``adapter_config.json``.
Everything that takes one of our configs also takes PEFT's own: :func:`to_peft_config` converts either
into PEFT's class (PEFT must be installed for that), :func:`from_peft_config` goes the other way.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib.metadata
import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

CONFIG_NAME = "adapter_config.json"
PROMPT_TUNING = "PROMPT_TUNING"
P_TUNING = "P_TUNING"
MULTITASK_PROMPT_TUNING = "MULTITASK_PROMPT_TUNING"
# PEFT's soft-prompt methods whose N rows are put before the token rows (their ``inputs_embeds``):
# fastprompt's machinery serves them all. Prefix tuning and CPT stay PEFT's.
PREPENDED_PROMPT_TYPES = (PROMPT_TUNING, P_TUNING, MULTITASK_PROMPT_TUNING)

# PEFT's ``TaskType`` values, in PEFT's order (used in the validation message).
TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")


class PromptTuningInit(str, enum.Enum):
    """How the virtual-token table is initialized (the same values as ``peft.PromptTuningInit``).

    Members compare equal to their string values and to PEFT's members, in both directions.
    """

    TEXT = "TEXT"
    SAMPLE_VOCAB = "SAMPLE_VOCAB"
    RANDOM = "RANDOM"


INIT_CHOICES = tuple(member.value for member in PromptTuningInit)


def _value(member: Any) -> Any:
    """The string of an enum member (ours or PEFT's), anything else as it is."""
    return member.value if isinstance(member, enum.Enum) else member


def check_prompt_tuning_init(init: Any) -> None:
    """Raise ValueError unless ``init`` is one of TEXT, SAMPLE_VOCAB, RANDOM (a string or either
    library's ``PromptTuningInit``). Stricter than PEFT, which treats any other value as RANDOM."""
    if _value(init) not in INIT_CHOICES:
        raise ValueError(
            f"prompt_tuning_init={_value(init)!r} is not a prompt-tuning init: expected one of "
            f"{', '.join(INIT_CHOICES)} (a string or PromptTuningInit); PEFT would silently use RANDOM."
        )


def check_for_model(config: Any) -> None:
    """Raise ValueError if a prompt-tuning ``config`` (fastprompt's or PEFT's) cannot set up a model.

    ``task_type`` must be one of ``TASK_TYPES`` (PEFT's ``get_peft_model`` fails with a bare
    ``KeyError: None`` without one) and ``prompt_tuning_init`` one of ``INIT_CHOICES``. Configs of other
    adapter types are left to PEFT.
    """
    if _value(getattr(config, "peft_type", None)) != PROMPT_TUNING:
        return
    task_type = _value(getattr(config, "task_type", None))
    if task_type not in TASK_TYPES:
        raise ValueError(
            f"task_type={task_type!r}: a prompt-tuning model needs a task type, one of "
            f"{', '.join(TASK_TYPES)} (e.g. PromptTuningConfig(task_type='CAUSAL_LM', ...))."
        )
    check_prompt_tuning_init(getattr(config, "prompt_tuning_init", None))


def _installed_peft_version() -> str | None:
    """PEFT fills ``peft_version`` with its own version; without PEFT the field stays None."""
    try:
        return importlib.metadata.version("peft")
    except importlib.metadata.PackageNotFoundError:
        return None


@dataclass
class PromptTuningConfig:
    """Configuration of a prompt-tuning adapter: PEFT's ``PromptTuningConfig``, field for field.

    Args:
        task_type: one of ``SEQ_CLS``, ``SEQ_2_SEQ_LM``, ``CAUSAL_LM``, ``TOKEN_CLS``, ``QUESTION_ANS``,
            ``FEATURE_EXTRACTION`` (or None).
        peft_type: always ``"PROMPT_TUNING"`` after construction.
        inference_mode: a loaded adapter; skips the TEXT / SAMPLE_VOCAB initialization.
        num_virtual_tokens: N, the number of virtual tokens (per transformer submodule).
        token_dim: D, the model's hidden size (filled from the model config when the adapter is added).
        num_transformer_submodules: S, 2 for SEQ_2_SEQ_LM and 1 otherwise when left None; the prompt
            table has N * S rows.
        prompt_tuning_init: RANDOM (default), SAMPLE_VOCAB or TEXT (anything else: ValueError; PEFT
            treats unknown strings as RANDOM).
        prompt_tuning_init_text: the TEXT init text (required, may be empty, for TEXT).
        tokenizer_name_or_path: the tokenizer for TEXT init (required for TEXT).
        tokenizer_kwargs: keyword arguments of ``AutoTokenizer.from_pretrained`` (TEXT only).
    """

    task_type: Any = field(default=None, metadata={"help": "Task type"})
    peft_type: Any = field(default=None, metadata={"help": "Peft type"})
    auto_mapping: dict | None = field(default=None, metadata={"help": "An auto mapping dict."})
    peft_version: str | None = field(
        default=None, metadata={"help": "PEFT version, leave empty to auto-fill."}
    )
    base_model_name_or_path: str | None = field(default=None, metadata={"help": "The base model."})
    revision: str | None = field(default=None, metadata={"help": "The specific base model version."})
    inference_mode: bool = field(default=False, metadata={"help": "Whether to use inference mode"})
    num_virtual_tokens: int = field(default=None, metadata={"help": "Number of virtual tokens"})
    token_dim: int = field(
        default=None, metadata={"help": "The hidden embedding dimension of the base model"}
    )
    num_transformer_submodules: int | None = field(default=None, metadata={"help": "Number of submodules"})
    num_attention_heads: int | None = field(default=None, metadata={"help": "Number of attention heads"})
    num_layers: int | None = field(default=None, metadata={"help": "Number of transformer layers"})
    modules_to_save: list[str] | None = field(default=None, metadata={"help": "Extra trainable modules"})
    prompt_tuning_init: PromptTuningInit | str = field(
        default=PromptTuningInit.RANDOM, metadata={"help": "How to initialize the prompt tuning parameters"}
    )
    prompt_tuning_init_text: str | None = field(default=None, metadata={"help": "The TEXT init text"})
    tokenizer_name_or_path: str | None = field(default=None, metadata={"help": "The TEXT init tokenizer"})
    tokenizer_kwargs: dict | None = field(
        default=None, metadata={"help": "AutoTokenizer.from_pretrained kwargs"}
    )

    def __post_init__(self):
        # PeftConfigMixin
        if (self.task_type is not None) and (self.task_type not in TASK_TYPES):
            raise ValueError(
                f"Invalid task type: '{self.task_type}'. Must be one of the following task types: "
                f"{', '.join(TASK_TYPES)}."
            )
        if self.peft_version is None:
            self.peft_version = _installed_peft_version()
        # PromptTuningConfig
        self.peft_type = PROMPT_TUNING
        check_prompt_tuning_init(self.prompt_tuning_init)  # beyond PEFT: it falls back to RANDOM
        if (self.prompt_tuning_init == PromptTuningInit.TEXT) and not self.tokenizer_name_or_path:
            raise ValueError(
                f"When prompt_tuning_init='{PromptTuningInit.TEXT.value}', "
                f"tokenizer_name_or_path can't be {self.tokenizer_name_or_path}."
            )
        if (self.prompt_tuning_init == PromptTuningInit.TEXT) and self.prompt_tuning_init_text is None:
            raise ValueError(
                f"When prompt_tuning_init='{PromptTuningInit.TEXT.value}', "
                f"prompt_tuning_init_text can't be {self.prompt_tuning_init_text}."
            )
        if self.tokenizer_kwargs and (self.prompt_tuning_init != PromptTuningInit.TEXT):
            raise ValueError(
                f"tokenizer_kwargs only valid when using prompt_tuning_init='{PromptTuningInit.TEXT.value}'."
            )

    @property
    def is_prompt_learning(self) -> bool:
        """Always True, as for PEFT's prompt-learning configs."""
        return True

    @property
    def is_adaption_prompt(self) -> bool:
        """Always False, as for PEFT's prompt-learning configs."""
        return False

    def to_dict(self) -> dict:
        """The fields as a dict (``dataclasses.asdict``), what ``adapter_config.json`` holds."""
        return dataclasses.asdict(self)

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """Write ``adapter_config.json`` into ``save_directory`` as PEFT does (indent 2, sorted keys)."""
        if os.path.isfile(save_directory):
            raise AssertionError(f"Provided path ({save_directory}) should be a directory, not a file")
        os.makedirs(save_directory, exist_ok=True)
        output = self.to_dict()
        if kwargs.get("auto_mapping_dict") is not None:
            output["auto_mapping"] = kwargs["auto_mapping_dict"]
        output = {key: list(value) if isinstance(value, set) else value for key, value in output.items()}
        with open(os.path.join(save_directory, CONFIG_NAME), "w") as writer:
            writer.write(json.dumps(output, indent=2, sort_keys=True))

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, subfolder: str | None = None
    ) -> PromptTuningConfig:
        """Read a local ``adapter_config.json``; unknown keys are dropped with a warning, like PEFT."""
        path = os.path.join(directory, subfolder) if subfolder is not None else directory
        config_file = os.path.join(path, CONFIG_NAME)
        if not os.path.isfile(config_file):
            raise ValueError(f"Can't find '{CONFIG_NAME}' at '{directory}'")
        with open(config_file) as file:
            loaded = json.load(file)
        loaded.pop("runtime_config", None)
        if loaded.get("peft_type", PROMPT_TUNING) != PROMPT_TUNING:
            raise ValueError(
                f"'{config_file}' is a {loaded['peft_type']} adapter, not a prompt-tuning adapter."
            )
        return cls._from_kwargs(loaded)

    @classmethod
    def _from_kwargs(cls, kwargs: dict) -> PromptTuningConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unexpected = sorted(set(kwargs) - names)
        if unexpected:
            warnings.warn(
                f"Unexpected keyword arguments {unexpected} for class {cls.__name__}, these are ignored. "
                "This probably means that you're loading a configuration file that was saved using a "
                "higher version of the library and additional parameters have been introduced since.",
                stacklevel=3,
            )
        return cls(**{key: value for key, value in kwargs.items() if key in names})


def _config_fields(config: Any) -> dict:
    """The PromptTuningConfig fields of ``config`` (ours, PEFT's, or any object with those attributes)."""
    return {
        f.name: getattr(config, f.name)
        for f in dataclasses.fields(PromptTuningConfig)
        if hasattr(config, f.name)
    }


def from_peft_config(config: Any) -> PromptTuningConfig:
    """A fastprompt ``PromptTuningConfig`` with the fields of ``config`` (PEFT's or ours)."""
    if isinstance(config, PromptTuningConfig):
        return config
    peft_type = getattr(config, "peft_type", PROMPT_TUNING)
    if peft_type is not None and peft_type != PROMPT_TUNING:
        raise ValueError(f"Expected a prompt-tuning config, got peft_type={peft_type!r}.")
    fields_ = _config_fields(config)
    fields_.pop("peft_type", None)
    return PromptTuningConfig(**fields_)


def to_peft_config(config: Any):
    """PEFT's ``PeftConfig`` for ``config``: PEFT configs are returned as they are, ours converted.

    Raises:
        ImportError: PEFT is not installed.
    """
    import peft

    if isinstance(config, peft.PeftConfig):
        return config
    if not isinstance(config, PromptTuningConfig):
        raise TypeError(
            f"Expected a PromptTuningConfig (fastprompt's or PEFT's), got {type(config).__name__}."
        )
    fields_ = _config_fields(config)
    fields_.pop("peft_type", None)
    fields_["prompt_tuning_init"] = peft.PromptTuningInit(_value(config.prompt_tuning_init))
    return peft.PromptTuningConfig(**fields_)
