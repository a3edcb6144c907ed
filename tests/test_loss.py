"""The contrastive loss: hand-computed values, query negatives, and the gathered-negatives path in two processes."""

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from magiclens_core.learning.loss import ContrastiveLoss

QUERIES = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
TARGETS = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
NEGATIVES = torch.tensor([[1.0, 0.0], [0.8, 0.6]])  # the query images with the empty instruction


def _cross_entropy(logits: list[float], label: int) -> float:
    return -logits[label] + math.log(sum(math.exp(x) for x in logits))


def test_hand_computed_loss_with_query_negatives():
    # scale 2; row 1: q1·[t1, t2, n1, n2] = [0.6, 0, 1, 0.8]; row 2: q2·[...] = [0.8, 1, 0, 0.6]
    expected = (_cross_entropy([1.2, 0.0, 2.0, 1.6], 0) + _cross_entropy([1.6, 2.0, 0.0, 1.2], 1)) / 2
    loss = ContrastiveLoss()(QUERIES, TARGETS, NEGATIVES, 2.0)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_hand_computed_loss_without_query_negatives():
    expected = (_cross_entropy([1.2, 0.0], 0) + _cross_entropy([1.6, 2.0], 1)) / 2
    assert ContrastiveLoss()(QUERIES, TARGETS, None, 2.0).item() == pytest.approx(expected, rel=1e-6)


def test_query_negatives_push_the_query_image_away():
    """A query equal to its own query image (the model ignoring the instruction) costs more with negatives."""
    negatives = QUERIES.clone().requires_grad_(True)
    with_negatives = ContrastiveLoss()(QUERIES, TARGETS, negatives, 5.0)
    with_negatives.backward()
    assert with_negatives.item() > ContrastiveLoss()(QUERIES, TARGETS, None, 5.0).item()
    # the gradient moves each query negative away from its query (descent lowers their similarity)
    assert (negatives.grad * QUERIES).sum(dim=1).gt(0).all()


def test_learned_scale_gets_a_gradient():
    scale = torch.tensor(3.0, requires_grad=True)
    ContrastiveLoss()(QUERIES, TARGETS, NEGATIVES, scale).backward()
    assert scale.grad is not None and scale.grad.abs().item() > 0


WORLD, LOCAL = 2, 3


def _global_batch():
    generator = torch.Generator().manual_seed(7)
    tensors = [torch.nn.functional.normalize(torch.randn(WORLD * LOCAL, 8, generator=generator), dim=1)
               for _ in range(3)]
    return [*tensors, torch.tensor(4.0)]


def _rank_main(rank: int, init_file: str, out_file: str) -> None:
    """One process of two: the loss and its gradients over this rank's slice, gathering with and without
    gradient."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    rows = slice(rank * LOCAL, (rank + 1) * LOCAL)
    results = {}
    for with_grad in (True, False):
        queries, targets, negatives, scale = [t[rows].clone() if t.dim() else t.clone() for t in _global_batch()]
        for tensor in (queries, targets, negatives, scale):
            tensor.requires_grad_(True)
        loss = ContrastiveLoss(gather_with_grad=with_grad)(queries, targets, negatives, scale)
        loss.backward()
        results[with_grad] = {"loss": loss.detach(), "queries": queries.grad, "targets": targets.grad,
                              "negatives": negatives.grad, "scale": scale.grad}
    torch.save(results, f"{out_file}.{rank}")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> dict[bool, list[dict]]:
    """Per gathering mode, each rank's loss and gradients (two real processes over gloo)."""
    folder = tmp_path_factory.mktemp("gloo")
    out = folder / "grads"
    mp.spawn(_rank_main, args=(str(folder / "init"), str(out)), nprocs=WORLD, join=True)
    ranks = [torch.load(f"{out}.{rank}") for rank in range(WORLD)]
    return {mode: [r[mode] for r in ranks] for mode in (True, False)}


def _single_process():
    tensors = [t.clone().requires_grad_(True) for t in _global_batch()]
    loss = ContrastiveLoss()(*tensors)
    loss.backward()
    return loss.detach(), [t.grad for t in tensors]


def test_gathered_negatives_with_gradient_equal_the_global_batch_loss(two_processes):
    ranks = two_processes[True]
    loss, (queries, targets, negatives, scale) = _single_process()
    # the global loss is the mean of the ranks' losses; DDP averages gradients over ranks (÷ WORLD)
    torch.testing.assert_close(torch.stack([r["loss"] for r in ranks]).mean(), loss)
    for name, expected in (("queries", queries), ("targets", targets), ("negatives", negatives)):
        torch.testing.assert_close(torch.cat([r[name] for r in ranks]) / WORLD, expected)
    torch.testing.assert_close(torch.stack([r["scale"] for r in ranks]).mean(), scale)


def test_gathering_without_gradient_keeps_the_loss_but_drops_cross_rank_gradients(two_processes):
    ranks = two_processes[False]
    loss, (queries, targets, _, _) = _single_process()
    torch.testing.assert_close(torch.stack([r["loss"] for r in ranks]).mean(), loss)
    torch.testing.assert_close(torch.cat([r["queries"] for r in ranks]) / WORLD, queries)
    local_only = torch.cat([r["targets"] for r in ranks]) / WORLD
    assert (local_only - targets).abs().max() > 1e-3  # other ranks' queries no longer pull on these targets
