"""The replica's opportunistic batcher (serve_app.batcher): calls that arrive while a batch runs form the
next batch together, up to its size; a failing batch fails only its own calls; a call given up is skipped."""

from __future__ import annotations

import asyncio

import pytest

from serve_app.batcher import Batcher


class SlowDoubler:
    """A batch function that takes `seconds` and records the batches it saw."""

    def __init__(self, seconds: float = 0.05, fail_on: int | None = None) -> None:
        self.seconds, self.fail_on, self.batches = seconds, fail_on, []

    async def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        await asyncio.sleep(self.seconds)
        if self.fail_on in items:
            raise ValueError(f"cannot take {self.fail_on}")
        return [2 * item for item in items]


async def arrive(batcher: Batcher, items: range, gap_s: float = 0.0) -> list:
    calls = []
    for item in items:
        calls.append(asyncio.create_task(batcher(item)))
        await asyncio.sleep(gap_s)
    return await asyncio.gather(*calls, return_exceptions=True)


def test_calls_arriving_while_a_batch_runs_form_the_next_batch_up_to_its_size():
    model = SlowDoubler(0.1)

    async def scenario() -> list:
        batcher = Batcher(model, max_batch_size=8)
        first = asyncio.create_task(batcher(0))
        await asyncio.sleep(0.02)  # its batch is running
        rest = asyncio.create_task(arrive(batcher, range(1, 20)))
        return [await first, *await rest]

    results = asyncio.run(scenario())
    assert results == [2 * n for n in range(20)]
    assert model.batches[0] == [0]  # the first call found the model free
    assert [len(batch) for batch in model.batches[1:]] == [8, 8, 3]  # the rest queued while it ran
    assert sum(model.batches, []) == list(range(20))  # in arrival order, each once


def test_a_batch_waits_for_more_calls_when_asked_to():
    model = SlowDoubler(0.01)
    asyncio.run(arrive(Batcher(model, max_batch_size=8, wait_s=0.2), range(5), gap_s=0.01))
    assert model.batches == [[0, 1, 2, 3, 4]]


def test_a_failing_batch_fails_its_own_calls_and_the_next_batch_still_runs():
    model = SlowDoubler(0.05, fail_on=3)
    results = asyncio.run(arrive(Batcher(model, max_batch_size=4), range(9), gap_s=0.001))
    failed = {n for n, result in enumerate(results) if isinstance(result, ValueError)}
    batch_with_3 = next(batch for batch in model.batches if 3 in batch)
    assert failed == set(batch_with_3) and 3 in failed
    assert all(results[n] == 2 * n for n in range(9) if n not in failed)


def test_a_call_given_up_before_its_batch_is_left_out():
    model = SlowDoubler(0.1)

    async def scenario() -> list:
        batcher = Batcher(model, max_batch_size=8)
        first = asyncio.create_task(batcher(0))
        await asyncio.sleep(0.01)
        gone = asyncio.create_task(batcher(1))
        kept = asyncio.create_task(batcher(2))
        await asyncio.sleep(0.01)
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        return [await first, await kept]

    assert asyncio.run(scenario()) == [0, 4]
    assert model.batches == [[0], [2]]


def test_a_batch_function_answering_too_few_items_fails_those_calls_instead_of_leaving_them_waiting():
    async def loses_one(items: list[int]) -> list[int]:
        return items[1:]

    async def scenario() -> list:
        batcher = Batcher(loses_one, max_batch_size=4)
        return await asyncio.wait_for(arrive(batcher, range(3)), timeout=5)

    results = asyncio.run(scenario())
    assert all(isinstance(result, RuntimeError) and "answered" in str(result) for result in results), results
