"""The differentiable neural computer (memory.py): its equations on hand-made cases, against an
independent step-serial reference, state carried across calls, and long runs free of NaN."""
import pytest
import torch

import bench
from dnc import (DNC, DNCConfig, allocation_weights, content_weights, dense_link_reads, dense_link_update,
                    detach_dnc_state, load_dnc_state, memory_step, save_dnc_state, sparse_link_reads,
                    sparse_link_update, split_interface)


def one_hot(i, n):
    return torch.eye(n)[i]


def test_allocation_picks_the_least_used_slot():
    usage = torch.tensor([[0.9, 0.2, 0.0, 0.6]])  # slot 2 is free
    a = allocation_weights(usage)[0]
    assert a.argmax().item() == 2 and a[2].item() == pytest.approx(1.0, abs=1e-5)
    # nothing free: phi = (1, 3, 0); a[phi_j] = (1 - u[phi_j]) * prod of the usages before it
    usage = torch.tensor([[0.9, 0.2, 0.5, 0.6]])
    a = allocation_weights(usage)[0]
    expected = torch.tensor([0.1 * 0.2 * 0.5 * 0.6, 0.8, 0.5 * 0.2, 0.4 * 0.2 * 0.5])
    torch.testing.assert_close(a, expected, atol=1e-5, rtol=1e-4)
    assert a.argmax().item() == 1


def test_content_addressing_finds_the_matching_row():
    memory = torch.tensor([[[1.0, 0, 0], [0, 1, 0], [0, 0, 0], [1, 1, 0]]])
    w = content_weights(memory, torch.tensor([[[0.0, 2.0, 0.0]]]), torch.tensor([[50.0]]))[0, 0]
    assert w.argmax().item() == 1 and w[1] > 0.99  # cosine: the length of the key does not matter
    w = content_weights(memory, torch.tensor([[[0.0, 2.0, 0.0]]]), torch.tensor([[1.0]]))[0, 0]
    assert w[1] > w[3] > w[0] > 0 and w.sum().item() == pytest.approx(1.0)  # low strength: soft


def test_interface_is_split_in_the_documented_order():
    R, W = 2, 3
    size = R * W + 3 * W + 5 * R + 3
    assert DNCConfig(4, 4, word_size=W, read_heads=R).interface_size == size == 28
    xi = torch.arange(size, dtype=torch.float32)[None]
    p = split_interface(xi, R, W)
    torch.testing.assert_close(p["read_keys"][0], torch.tensor([[0.0, 1, 2], [3, 4, 5]]))
    torch.testing.assert_close(p["read_strengths"][0], 1 + torch.nn.functional.softplus(torch.tensor([6.0, 7])))
    torch.testing.assert_close(p["write_key"][0], torch.tensor([8.0, 9, 10]))
    torch.testing.assert_close(p["write_strength"][0], 1 + torch.nn.functional.softplus(torch.tensor([11.0])))
    torch.testing.assert_close(p["erase"][0], torch.sigmoid(torch.tensor([12.0, 13, 14])))
    torch.testing.assert_close(p["write_vector"][0], torch.tensor([15.0, 16, 17]))
    torch.testing.assert_close(p["free_gates"][0], torch.sigmoid(torch.tensor([18.0, 19])))
    torch.testing.assert_close(p["alloc_gate"][0], torch.sigmoid(torch.tensor([20.0])))
    torch.testing.assert_close(p["write_gate"][0], torch.sigmoid(torch.tensor([21.0])))
    torch.testing.assert_close(p["read_modes"][0], torch.softmax(torch.tensor([[22.0, 23, 24], [25, 26, 27]]), -1))


def hand_interface(N, W, R, write_vector, alloc=1.0, erase=1.0, write=1.0, modes=(0.0, 0.0, 1.0)):
    """A fully specified interface: by default a write by allocation with erase 1, reads forward."""
    return {"read_keys": torch.zeros(1, R, W), "read_strengths": torch.ones(1, R),
            "write_key": torch.zeros(1, W), "write_strength": torch.ones(1, 1),
            "erase": torch.full((1, W), erase), "write_vector": write_vector[None],
            "free_gates": torch.zeros(1, R), "alloc_gate": torch.tensor([[alloc]]),
            "write_gate": torch.tensor([[write]]), "read_modes": torch.tensor([modes] * R)[None]}


def test_a_write_with_erase_one_replaces_the_row():
    N, W = 3, 4
    dnc = DNC(DNCConfig(2, 2, memory_slots=N, word_size=W, read_heads=1))
    state = dnc.initial_state(1)
    state["memory"] = torch.tensor([[[5.0, 5, 5, 5], [7, 7, 7, 7], [9, 9, 9, 9]]])
    state["usage"] = torch.tensor([[1.0, 0.0, 1.0]])  # slot 1 is the free one
    v = torch.tensor([1.0, -2.0, 3.0, 0.5])
    new = memory_step(state, hand_interface(N, W, 1, v))
    torch.testing.assert_close(new["write_weights"][0], one_hot(1, N), atol=1e-5, rtol=0)
    torch.testing.assert_close(new["memory"][0], torch.stack([torch.full((W,), 5.0), v, torch.full((W,), 9.0)]),
                               atol=1e-4, rtol=0)
    # erase 0 adds instead
    new = memory_step(state, hand_interface(N, W, 1, v, erase=0.0))
    torch.testing.assert_close(new["memory"][0, 1], 7 + v, atol=1e-4, rtol=0)


def test_links_record_write_order_and_reads_follow_it():
    """Write three words into slots chosen by allocation; a read that starts on the first word
    and follows the forward links visits them in write order, the backward links in reverse."""
    N, W = 5, 5
    for K in (0, 2):  # dense links, and sparse ones keeping only 2 per slot
        dnc = DNC(DNCConfig(2, 2, memory_slots=N, word_size=W, read_heads=1, sparse_links=K))
        state = dnc.initial_state(1)
        for i, slot in enumerate([3, 0, 4]):  # free exactly that slot, then write word i into it
            state["usage"] = torch.ones(1, N) - one_hot(slot, N)[None]
            state = memory_step(state, hand_interface(N, W, 1, one_hot(i, W)))
        if K == 0:
            link = state["link"][0]
            expected = torch.zeros(N, N)
            expected[0, 3] = expected[4, 0] = 1  # L[i, j] = 1: i was written right after j
            torch.testing.assert_close(link, expected, atol=1e-4, rtol=0)
        read = one_hot(3, N)[None, None]
        fwd = [read]
        for _ in range(2):
            f, b = (dense_link_reads(state["link"], fwd[-1]) if K == 0
                    else sparse_link_reads(state["link_idx"], state["link_val"], fwd[-1]))
            fwd.append(f)
        assert [w[0, 0].argmax().item() for w in fwd] == [3, 0, 4]
        assert fwd[2][0, 0, 4].item() == pytest.approx(1.0, abs=1e-4)
        # a whole memory step without a write: the read head moves on from slot 0 to slot 4, reading word 2
        state["read_weights"] = one_hot(0, N)[None, None]
        new = memory_step(state, hand_interface(N, W, 1, torch.zeros(W), write=0.0))
        _, b = (dense_link_reads(state["link"], one_hot(4, N)[None, None]) if K == 0
                else sparse_link_reads(state["link_idx"], state["link_val"], one_hot(4, N)[None, None]))
        assert b[0, 0].argmax().item() == 0  # backward from the last word: the one before it
        torch.testing.assert_close(new["read_vectors"][0, 0], one_hot(2, W), atol=1e-4, rtol=0)


def test_dense_link_update_backward_passes_gradcheck():
    """The link update's hand-written backward against finite differences, in float64."""
    torch.manual_seed(0)
    link = torch.rand(2, 5, 5, dtype=torch.float64).requires_grad_()
    prec = torch.rand(2, 5, dtype=torch.float64).requires_grad_()
    w = (torch.rand(2, 5, dtype=torch.float64) / 5).requires_grad_()
    assert torch.autograd.gradcheck(dense_link_update, (link, prec, w))
    expected = (1 - w[:, :, None] - w[:, None, :]) * link + w[:, :, None] * prec[:, None, :]
    torch.testing.assert_close(dense_link_update(link, prec, w), expected * (1 - torch.eye(5, dtype=torch.float64)))


@pytest.mark.parametrize("K", [0, 6])
def test_vectorised_dnc_equals_step_serial_reference(K):
    """memory.DNC (dense links, and sparse links with K = N, which must be exact) against
    bench.naive_dnc_forward, written one sample and one head at a time: outputs and gradients."""
    torch.manual_seed(0)
    dnc = DNC(DNCConfig(5, 3, memory_slots=6, word_size=4, read_heads=2, hidden_size=8, sparse_links=K))
    x = torch.randn(3, 12, 5) * 3
    y, _ = dnc(x)
    y_ref = bench.naive_dnc_forward(dnc, x)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    probe = torch.randn_like(y)
    grads = torch.autograd.grad((y * probe).sum(), list(dnc.parameters()))
    grads_ref = torch.autograd.grad((y_ref * probe).sum(), list(dnc.parameters()))
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-4)
    _, state = dnc(x)
    assert state["read_vectors"].abs().max() > 0.01  # the memory takes part: it reads what was written


def test_sparse_links_equal_dense_links_restricted_to_top_k():
    """With K < N: the sparse update equals the dense update applied to the top-K write weights
    and precedences, as long as no row holds more than K links."""
    torch.manual_seed(1)
    B, N, K = 2, 8, 3
    dense = torch.zeros(B, N, N)
    idx, val = torch.arange(K).expand(B, N, K).contiguous(), torch.zeros(B, N, K)
    prec = torch.zeros(B, N)
    for _ in range(2):  # two writes: at most 2 links per row
        w = torch.softmax(torch.randn(B, N) * 3, -1) * 0.9
        top = lambda v: torch.zeros_like(v).scatter(-1, v.topk(K, -1).indices, v.topk(K, -1).values)
        dense = dense_link_update(dense, top(prec), top(w))
        idx, val = sparse_link_update(idx, val, prec, w)
        prec = (1 - w.sum(-1, keepdim=True)) * prec + w
    rebuilt = torch.zeros(B, N, N).scatter_add(2, idx, val)
    torch.testing.assert_close(rebuilt, dense, atol=1e-6, rtol=0)
    assert (idx.sort(-1).values.diff(dim=-1) > 0).all()  # no slot listed twice in a row


def test_state_persists_across_calls_and_round_trips_through_a_file(tmp_path):
    torch.manual_seed(0)
    for controller, K in (("lstm", 0), ("gpt", 3)):
        dnc = DNC(DNCConfig(4, 3, memory_slots=5, word_size=3, read_heads=2, hidden_size=8, n_head=2,
                            controller=controller, window=4, sparse_links=K))
        x = torch.randn(2, 10, 4)
        whole, _ = dnc(x)
        first, state = dnc(x[:, :6])
        path = tmp_path / f"{controller}.pt"
        save_dnc_state(detach_dnc_state(state), str(path))
        second, _ = dnc(x[:, 6:], load_dnc_state(str(path), dnc))
        torch.testing.assert_close(torch.cat([first, second], 1), whole, atol=1e-6, rtol=0)
        fresh, _ = dnc(x[:, 6:])  # no state: a new, empty memory gives other outputs
        assert (fresh - whole[:, 6:]).abs().max() > 1e-3


def test_bad_input_and_state_give_clear_errors(tmp_path):
    dnc = DNC(DNCConfig(4, 3, memory_slots=5, word_size=3, read_heads=1))
    with pytest.raises(ValueError, match=r"input must be \(batch, time, 4\)"):
        dnc(torch.zeros(2, 3, 5))
    _, state = dnc(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="batch 3.*state=None"):
        dnc(torch.zeros(3, 3, 4), state)
    other = DNC(DNCConfig(4, 3, memory_slots=5, word_size=3, read_heads=1, sparse_links=2))
    with pytest.raises(ValueError, match="sparse_links and controller must match"):
        other(torch.zeros(2, 3, 4), state)
    with pytest.raises(ValueError, match="sparse_links must be between 0"):
        DNCConfig(4, 3, memory_slots=5, sparse_links=6)
    with pytest.raises(ValueError, match="controller must be 'lstm' or 'gpt'"):
        DNCConfig(4, 3, controller="gru")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a state")
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_dnc_state(str(bad), dnc)


@pytest.mark.parametrize("controller,K", [("lstm", 0), ("lstm", 4), ("gpt", 0)])
def test_thousand_steps_without_nan_or_inf(controller, K):
    """1,000 steps with large inputs (saturated gates, one-hot-sharp addressing): outputs and every
    gradient stay finite. The memory is carried over 10 calls of 100 steps, gradients through all."""
    torch.manual_seed(0)
    dnc = DNC(DNCConfig(6, 4, memory_slots=8, word_size=6, read_heads=2, hidden_size=16, n_head=2, window=16,
                        controller=controller, sparse_links=K))
    with torch.no_grad():
        for p in dnc.parameters():
            p.mul_(5)  # sharp gates, strengths in the hundreds
    state, outputs = None, []
    for call in range(10):
        x = torch.randn(2, 100, 6) * 10
        x[:, ::7] = 0  # exact zeros too
        y, state = dnc(x, state)
        outputs.append(y)
    y = torch.cat(outputs, 1)
    assert y.shape == (2, 1000, 4) and torch.isfinite(y).all()
    y.pow(2).mean().backward()
    for name, p in dnc.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert all(torch.isfinite(v).all() for v in state.values())
    assert 0 <= state["usage"].min() and state["usage"].max() <= 1
