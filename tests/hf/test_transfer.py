"""layer_map and select on BERT-, GPT-2- and LLaMA-style stacks: separate, fused and grouped-query
q/k/v shrunk per head, tied weights stay tied, every tensor in the report."""
from __future__ import annotations

import torch

import distillx as dx
from distillx.transfer import transferable_tensors
from distillx.transfer.adapt import uniform_indices

from .models import bert, gpt2, llama, token_batch


def per_head(heads, t_width, s_width):
    """Teacher rows of each student head: head h's dims selected uniformly inside teacher head h."""
    return [h * t_width + i for h in range(heads) for i in uniform_indices(t_width, s_width)]


def names(report):
    return {r.name for r in report}


def test_layer_map_on_bert_copies_every_other_layer_and_selects_per_head():
    torch.manual_seed(0)
    teacher, student = bert(4, 32, 4), bert(2, 16, 4)
    report = dx.transfer("layer_map", teacher, student, map="every")
    assert report.complete and names(report) == set(transferable_tensors(student, aliases=True))
    assert report.counts()["skipped"] == 0  # the pooler is not an output layer whose rows must match
    t_q, s_q = teacher.encoder.layer[2].attention.self.query, student.encoder.layer[1].attention.self.query
    cols = uniform_indices(32, 16)
    torch.testing.assert_close(s_q.weight, t_q.weight[per_head(4, 8, 4)][:, cols], rtol=0, atol=0)
    t_o, s_o = teacher.encoder.layer[2].attention.output.dense, student.encoder.layer[1].attention.output.dense
    torch.testing.assert_close(s_o.weight, t_o.weight[cols][:, per_head(4, 8, 4)], rtol=0, atol=0)
    assert "per block, 4 blocks in dim 0" in report["encoder.layer.1.attention.self.query.weight"].how
    # equal widths: an exact copy of teacher layer 2 into student layer 1
    same_width = bert(2, 32, 4)
    dx.transfer("layer_map", teacher, same_width, map="every")
    for a, b in zip(same_width.encoder.layer[1].parameters(), teacher.encoder.layer[2].parameters()):
        assert torch.equal(a, b)


def test_select_on_grouped_query_llama_keeps_tied_weights_tied():
    torch.manual_seed(0)
    teacher, student = llama(4, 32, 4, 2, tied=True), llama(2, 16, 4, 2, tied=True)
    report = dx.transfer("select", teacher, student)
    assert report.complete and names(report) == set(transferable_tensors(student, aliases=True))
    assert student.lm_head.weight is student.model.embed_tokens.weight
    cols = uniform_indices(32, 16)
    torch.testing.assert_close(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight[:, cols],
                               rtol=0, atol=0)
    k_t, k_s = teacher.model.layers[1].self_attn.k_proj, student.model.layers[1].self_attn.k_proj
    torch.testing.assert_close(k_s.weight, k_t.weight[per_head(2, 8, 4)][:, cols], rtol=0, atol=0)  # 2 kv heads
    o_t, o_s = teacher.model.layers[1].self_attn.o_proj, student.model.layers[1].self_attn.o_proj
    torch.testing.assert_close(o_s.weight, o_t.weight[cols][:, per_head(4, 8, 4)], rtol=0, atol=0)
    assert "tied to 'model.embed_tokens.weight'" in report["lm_head.weight"].reason
    student(**token_batch(2, 5))  # still a working model


def test_select_on_gpt2_splits_the_fused_projection_into_q_k_v_heads():
    torch.manual_seed(0)
    teacher, student = gpt2(2, 32, 4), gpt2(1, 16, 4)
    report = dx.transfer("select", teacher, student)
    assert report.complete and report.counts()["skipped"] == 0
    t_attn, s_attn = teacher.transformer.h[0].attn.c_attn, student.transformer.h[0].attn.c_attn  # Conv1D (in, 3H)
    rows = uniform_indices(32, 16)
    torch.testing.assert_close(s_attn.weight, t_attn.weight[rows][:, per_head(12, 8, 4)], rtol=0, atol=0)
    torch.testing.assert_close(s_attn.bias, t_attn.bias[per_head(12, 8, 4)], rtol=0, atol=0)
    assert student.lm_head.weight is student.transformer.wte.weight
    # heads that differ in number: one block per q/k/v, never mixing q with k
    narrow = gpt2(1, 16, 2)
    dx.transfer("select", teacher, narrow)
    q_cols = uniform_indices(32, 16)
    torch.testing.assert_close(narrow.transformer.h[0].attn.c_attn.weight[:, :16], t_attn.weight[rows][:, q_cols],
                               rtol=0, atol=0)
