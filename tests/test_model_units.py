"""Unit tests of the model's pieces against independent references (HF's get_rope_index, F.interpolate)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hf_oracle import hf_model
from mm_inputs import IMG, VID, chat, image_tokens, video_tokens
from qwen_vl_distributed.model.batch import SeqLayout
from qwen_vl_distributed.model.config import preset
from qwen_vl_distributed.model.moe import EXPERTS_IMPLS, route
from qwen_vl_distributed.model.positions import batch_rope_positions, decode_positions, rope_positions, token_types
from qwen_vl_distributed.model.rope import mrope_axis_map
from qwen_vl_distributed.model.vision import bilinear_taps, merge_block_coords


@pytest.fixture(scope="module")
def hf():
    return hf_model(preset("tiny"))


def test_positions_match_hf_get_rope_index_with_left_padding_images_and_video(hf):
    a = chat([5] + image_tokens(4, 6) + [7, 8] + video_tokens(3, 4, 4) + [9] + image_tokens(8, 4))
    b = chat([1, 2, 3] + image_tokens(6, 6))
    pad = len(a) - len(b)
    ids = torch.tensor([a, [151643] * pad + b])
    mask = torch.tensor([[1] * len(a), [0] * pad + [1] * len(b)])
    img = torch.tensor([[1, 4, 6], [1, 8, 4], [1, 6, 6]])
    vid = torch.tensor([[3, 4, 4]])
    mm = (ids == IMG).int() + 2 * (ids == VID).int()
    ref_pos, ref_delta = hf.model.get_rope_index(ids, mm, img, vid.clone(), mask)
    pos, delta = batch_rope_positions(ids, mask, IMG, VID, img, vid, merge=2)
    assert torch.equal(pos, ref_pos)
    assert delta.tolist() == ref_delta.view(-1).tolist()


def test_image_positions_by_hand():
    types = [0, 0] + [1] * 6 + [0]  # 2 text, an image of merged grid 2 x 3, 1 text
    pos, delta = rope_positions(types, [(1, 4, 6)], None, merge=2)
    assert pos[:, :2].tolist() == [[0, 1]] * 3
    assert pos[0, 2:8].tolist() == [2] * 6  # t stays at the cursor
    assert pos[1, 2:8].tolist() == [2, 2, 2, 3, 3, 3]  # rows
    assert pos[2, 2:8].tolist() == [2, 3, 4, 2, 3, 4]  # cols
    assert pos[:, 8].tolist() == [5, 5, 5]  # cursor advanced by max(2, 3)
    assert delta == 6 - 9
    assert decode_positions(9, delta).tolist() == [[6], [6], [6]]


def test_placeholder_count_must_match_grid():
    with pytest.raises(ValueError, match="placeholder run of 5 tokens does not match its grid"):
        rope_positions([1] * 5, [(1, 4, 4)], None, merge=2)


def test_generated_image_pad_is_just_a_token():
    """Token types come from the prompt; a decoded <|image_pad|> gets a plain decode position."""
    assert token_types([IMG, 5], IMG, VID) == [1, 0]
    assert decode_positions(40, -10).tolist() == [[30], [30], [30]]


def test_row_tables_give_each_rows_block_and_offset():
    # a chunk, a prompt, a decode row; blocks of 4 tokens
    layout = SeqLayout([[7, 2], [0, 3], [9, 1, 4]], starts=[3, 0, 9], lens=[2, 3, 1])
    blocks, offsets = layout.row_tables("cpu", 4)
    assert blocks.tolist() == [7, 2, 0, 0, 0, 4] and offsets.tolist() == [3, 0, 0, 1, 2, 1]
    assert layout.row_tables("cpu", 4)[0] is blocks  # built once per step
    table = layout.block_table("cpu")
    assert table.tolist() == [[7, 2, 0], [0, 3, 0], [9, 1, 4]] and table.stride(0) % 16 == 0
    odd = SeqLayout([[1, 5]], starts=[0], lens=[5])  # both tables 16-byte aligned (Triton specialises on it)
    assert [t.data_ptr() % 16 for t in odd.row_tables("cpu", 4)] == [0, 0]
    assert odd.row_tables("cpu", 4)[0].tolist() == [1, 1, 1, 1, 5]


def test_a_sequence_s_keys_gathered_from_its_blocks():
    from qwen_vl_distributed.model.kv_cache import gather_kv

    cache = torch.arange(5 * 2 * 4 * 3).reshape(5, 2, 4, 3)  # [NB, KVH, BS, D]
    got = gather_kv(cache, [3, 0, 4], 10)
    assert got.shape == (2, 10, 3)
    assert torch.equal(got, torch.cat([cache[3], cache[0], cache[4][:, :2]], dim=1))
    one = gather_kv(cache, [2, 1], 3)  # within one block: a view
    assert one.data_ptr() == cache[2].data_ptr() and torch.equal(one, cache[2, :, :3])


def test_interleaved_mrope_axis_map():
    axis = mrope_axis_map(64, (24, 20, 20))
    assert axis.count(0) == 24 and axis.count(1) == 20 and axis.count(2) == 20
    assert axis[:6] == (0, 1, 2, 0, 1, 2) and axis[60:] == (0, 0, 0, 0)


@pytest.mark.parametrize("h,w", [(4, 6), (1 * 2, 10), (16, 8), (48, 48)])
def test_position_embedding_interpolation_equals_bilinear_align_corners(h, w):
    side, d = 12, 5
    table = torch.randn(side * side, d)
    idx, wts = bilinear_taps(h, w, side, merge=2)
    ours = (table[idx] * wts[:, :, None]).sum(1)  # [h*w, d] in merge-block order
    grid = table.view(side, side, d).permute(2, 0, 1)[None]
    ref = F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=True)[0].permute(1, 2, 0)  # [h, w, d]
    rows, cols = merge_block_coords(h, w, 2)
    torch.testing.assert_close(ours, ref[rows, cols], rtol=1e-5, atol=1e-5)


def test_merge_block_order():
    rows, cols = merge_block_coords(4, 4, 2)
    assert list(zip(rows.tolist(), cols.tolist()))[:8] == [(0, 0), (0, 1), (1, 0), (1, 1), (0, 2), (0, 3), (1, 2), (1, 3)]


def test_routing_softmax_topk_renormalise():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 0.0, 5.0, 0.1]])
    w, ids = route(logits, 2, normalize=True)
    p = torch.softmax(logits, -1)
    assert ids.tolist() == [[0, 1], [2, 3]]
    torch.testing.assert_close(w, torch.stack([p[0, :2] / p[0, :2].sum(), p[1, [2, 3]] / p[1, [2, 3]].sum()]))
    torch.testing.assert_close(w.sum(-1), torch.ones(2))


def test_reference_experts_against_dense_computation():
    t, h, i, e, k = 7, 16, 6, 5, 2
    x = torch.randn(t, h)
    gate_up, down = torch.randn(e, 2 * i, h), torch.randn(e, h, i)
    w, ids = route(torch.randn(t, e), k, normalize=True)
    out = EXPERTS_IMPLS["reference"](x, ids, w, gate_up, down)
    ref = torch.zeros(t, h)
    for r in range(t):
        for j in range(k):
            g, u = (gate_up[ids[r, j]] @ x[r]).split(i)
            ref[r] += w[r, j] * (down[ids[r, j]] @ (F.silu(g) * u))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
