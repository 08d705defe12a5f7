"""Pretrained models in and out in the Hugging Face format: load a model directory (the class its
``config.json`` names), build a student from a teacher's config with overrides, save a student with
``save_pretrained`` (and its tokenizer). ``transformers`` is imported only by the functions that
need it; the rest is duck typing."""
from __future__ import annotations

import copy
import os
from typing import Any, Mapping

from torch import nn

from .._atomic import save_atomic
from ..features.paths import is_peft_model, unwrap_model

HINT = "transformers is needed for Hugging Face models: pip install 'distillx[hf]'"


def _transformers():
    try:
        import transformers  # noqa: PLC0415 - heavy optional dependency, imported when used
    except ImportError as exc:
        raise ImportError(HINT) from exc
    return transformers


def is_pretrained(model: Any) -> bool:
    """Whether ``model`` is a transformers ``PreTrainedModel`` (duck typed: ``save_pretrained`` and a ``config``)."""
    return isinstance(model, nn.Module) and callable(getattr(model, "save_pretrained", None)) \
        and getattr(model, "config", None) is not None


def is_causal_lm(model: Any) -> bool:
    """Whether ``model`` is a causal language model (``*ForCausalLM``, ``*LMHeadModel``), inside
    its wrappers (a ``PeftModel`` around one is)."""
    model = unwrap_model(model) if isinstance(model, nn.Module) else model
    return is_pretrained(model) and type(model).__name__.endswith(("ForCausalLM", "LMHeadModel"))


def save_model(model: nn.Module, path: str, tokenizer: Any = None, merge: bool = False) -> str:
    """A ``PreTrainedModel`` with ``save_pretrained(path)`` (a directory; the tokenizer, when given,
    next to it), so ``AutoModel.from_pretrained(path)`` loads it; any other model's ``state_dict``
    to the file ``path`` (atomically). Returns ``path``.

    A PEFT model (``peft.get_peft_model``) writes its adapter with its own ``save_pretrained``
    (``adapter_config.json`` and the adapter weights: ``PeftModel.from_pretrained(base, path)``
    loads it); with ``merge=True``, the adapters merged into a copy of the base model
    (``merge_and_unload``; the model given is never changed) saved as above. ``merge=True`` on a
    model without adapters is a ``ValueError``: there is nothing to merge."""
    if not isinstance(merge, bool):
        raise TypeError(f"merge must be True or False, got {merge!r}")
    if merge:
        if not is_peft_model(model):
            raise ValueError(f"merge=True merges a PEFT student's adapters into its base model, but the student "
                             f"({type(model).__name__}) is no PEFT model; save it with merge=False")
        # A copy: merging writes the adapters' update into the base weights, and the model given
        # may go on training (or be saved again as an adapter).
        merged = copy.deepcopy(model).merge_and_unload()
        return save_model(merged, path, tokenizer)
    if is_pretrained(model):
        os.makedirs(path, exist_ok=True)
        model.save_pretrained(path)
        if tokenizer is not None:
            tokenizer.save_pretrained(path)
        return path
    if tokenizer is not None:
        raise ValueError(f"a tokenizer is saved next to a Hugging Face model only; {type(model).__name__} is saved "
                         "as a state dict file")
    save_atomic({k: v.detach().cpu() for k, v in model.state_dict().items()}, path)
    return path


def _check_dir(path: str, key: str) -> str:
    if not isinstance(path, str) or not path:
        raise ValueError(f"{key} must be the path of a model directory, got {path!r}")
    if not os.path.isfile(os.path.join(path, "config.json")):
        why = "does not exist" if not os.path.exists(path) else "has no config.json"
        raise FileNotFoundError(f"{key}: {path!r} {why}: a Hugging Face model directory (save_pretrained) is expected")
    return path


def model_class(config: Any) -> type:
    """The transformers class a config's ``architectures`` names (else ``AutoModel``'s choice)."""
    transformers = _transformers()
    for name in getattr(config, "architectures", None) or ():
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    return transformers.AutoModel._model_mapping[type(config)]


def load_pretrained(path: str, key: str = "pretrained", **kwargs: Any) -> nn.Module:
    """The model saved in directory ``path``, as the class its ``config.json`` names."""
    transformers = _transformers()
    config = transformers.AutoConfig.from_pretrained(_check_dir(path, key))
    return model_class(config).from_pretrained(path, **kwargs)


def load_tokenizer(path: str, key: str = "pretrained") -> Any:
    """``AutoTokenizer.from_pretrained(path)``; one without a pad token pads with its eos token."""
    tok = _transformers().AutoTokenizer.from_pretrained(_check_dir(path, key))
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


#: config attributes that follow from the head counts and widths (recomputed when those change)
_DERIVED = {"head_dim": lambda c: c.hidden_size // c.num_attention_heads}


def config_with(config: Any, overrides: Mapping[str, Any], key: str = "config") -> Any:
    """A copy of a transformers config with ``overrides`` set; an unknown attribute is an error that
    lists the config's attributes. Derived attributes (``head_dim``) follow changed widths."""
    new = config.__class__.from_dict(config.to_dict())
    for name, value in overrides.items():
        if not hasattr(new, name):
            known = ", ".join(sorted(k for k in config.to_dict() if not k.startswith("_"))[:40])
            raise ValueError(f"{key}.{name}: {type(config).__name__} has no attribute {name!r}; it has: {known}")
        setattr(new, name, value)
    changed = {"hidden_size", "num_attention_heads", "n_embd", "n_head", "dim", "n_heads"} & set(overrides)
    for name, derive in _DERIVED.items():
        if changed and name not in overrides and getattr(new, name, None) is not None:
            try:
                setattr(new, name, derive(new))
            except (AttributeError, ZeroDivisionError):
                pass
    return new


def student_from_config(teacher: nn.Module, overrides: Mapping[str, Any], key: str = "student.config") -> nn.Module:
    """A randomly initialised model of the teacher's class with the teacher's config and ``overrides``
    (``num_hidden_layers``, ``hidden_size``, ``num_attention_heads``, ``intermediate_size``...)."""
    if not is_pretrained(teacher):
        raise ValueError(f"{key}: a student built from the teacher's config needs a Hugging Face teacher, got "
                         f"{type(teacher).__name__}")
    config = config_with(teacher.config, overrides, key)
    try:
        return type(teacher)(config)
    except (ValueError, TypeError, AttributeError, RuntimeError) as exc:
        raise ValueError(f"{key}: {type(teacher).__name__} cannot be built with {dict(overrides)}: {exc}") from exc


__all__ = ["is_pretrained", "is_causal_lm", "save_model", "load_pretrained", "load_tokenizer", "config_with",
           "student_from_config", "model_class", "HINT"]
