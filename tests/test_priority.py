"""Priority levels in ``sdtrt serve`` (``--priority-levels N``; a request's ``priority``, as
Triton's schedule-policy parameter): a higher level is admitted first and lower levels do
not take the rows it waits for; within a level, arrival order; every protocol takes it."""

from __future__ import annotations

import base64
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
from conftest import noise_picture, png_bytes, serving

from sdtrt.errors import InvalidInputError
from sdtrt.serve.admission import admit
from sdtrt.serve.batcher import StepBatcher
from sdtrt.serve.options import ServeOptions


@pytest.fixture(scope="module")
def image():
    return noise_picture(3, 32, 32)


def _job(batcher, image, priority, images=1):
    request = batcher.request(image=image, num_inference_steps=4, num_images_per_prompt=images)
    return batcher.prepare(request, priority=priority)


@pytest.mark.parametrize("policy", ["step", "request", "single"])
def test_a_higher_level_is_admitted_first_then_arrival_order(pipe, image, policy):
    """One guided job per call (2 rows): two default-level jobs queued, then a level-1 one;
    the level-1 job runs first, the others in the order they came, whatever the policy."""
    options = ServeOptions(max_rows=2, priority_levels=2, policy=policy, queue_delay=0)
    batcher = StepBatcher(pipe, options, start=False)
    first, second, urgent = (
        _job(batcher, image, 0),
        _job(batcher, image, 0),
        _job(batcher, image, 1),
    )
    assert (first.priority, urgent.priority) == (2, 1)  # 0: the lowest level
    for job in (first, second, urgent):
        batcher.submit(job)
    batcher.start()
    try:
        for job in (first, second, urgent):
            job.future.result(timeout=60)
    finally:
        batcher.close()
    assert urgent.admitted < first.admitted < second.admitted


def _waiting(name, rows, priority, size=(32, 32), key="a", submitted=0.0):
    """What admission reads of a job."""
    return SimpleNamespace(name=name, rows=rows, priority=priority, size=size,
                           same_batch_key=key, submitted=submitted)  # fmt: skip


def _names(jobs):
    return [job.name for job in jobs]


def test_a_lower_level_does_not_take_the_rows_a_higher_one_waits_for():
    """4 rows a size; a job of 2 runs. A level-1 job of 4 rows waits; a level-2 job of 2
    rows, which would fit now, waits too, so that the level-1 job starts as soon as the
    running one ends. Of one level, the job that fits still goes ahead (as without levels);
    another size's rows are its own."""
    running = [_waiting("running", 2, 2)]
    high, low = _waiting("high", 4, 1), _waiting("low", 2, 2)
    assert admit("step", [high, low], running, 4, 0.0, 0.0) == []
    assert _names(admit("step", [high, low], [], 4, 0.0, 0.0)) == ["high"]
    same = _waiting("same", 4, 2)
    assert _names(admit("step", [same, low], running, 4, 0.0, 0.0)) == ["low"]
    other = _waiting("other", 2, 2, size=(64, 64))
    assert _names(admit("step", [high, low, other], running, 4, 0.0, 0.0)) == ["other"]


def test_the_request_and_single_policies_take_the_highest_level_first():
    """Nothing runs: ``single`` takes the first of the highest level; ``request`` it and the
    jobs identical to it, once full or after the queue delay."""
    old, twin = _waiting("old", 2, 2, submitted=0.0), _waiting("twin", 2, 2, submitted=0.5)
    urgent = _waiting("urgent", 2, 1, key="b", submitted=1.0)  # another request
    assert _names(admit("single", [old, twin, urgent], [], 8, 0.1, 2.0)) == ["urgent"]
    assert admit("single", [old], [_waiting("running", 2, 2)], 8, 0.1, 2.0) == []
    assert _names(admit("request", [old, twin], [], 8, 0.1, 2.0)) == ["old", "twin"]
    assert admit("request", [old, twin], [], 8, 5.0, 2.0) == []  # waiting for more
    assert _names(admit("request", [old, twin], [], 4, 5.0, 2.0)) == ["old", "twin"]  # full
    assert _names(admit("request", [old, twin, urgent], [], 8, 0.1, 2.0)) == ["urgent"]
    like = _waiting("like", 2, 1, submitted=1.0)  # identical to the others: one batch
    assert _names(admit("request", [old, twin, like], [], 8, 0.1, 2.0)) == ["like", "old", "twin"]


def test_priorities_are_checked_against_the_servers_levels(pipe, image):
    batcher = StepBatcher(pipe, ServeOptions(priority_levels=2), start=False)
    without = StepBatcher(pipe, start=False)
    try:
        with pytest.raises(InvalidInputError) as refused:
            _job(batcher, image, 3)
        assert str(refused.value) == (
            "priority must be in [0, 2] (1 the highest; 0: the default, 2), got 3"
        )
        with pytest.raises(InvalidInputError, match="must be an integer >= 0, got -1"):
            _job(batcher, image, -1)
        with pytest.raises(InvalidInputError, match="this server has no priority levels"):
            _job(without, image, 1)
        assert _job(without, image, 0).priority == 0
    finally:
        batcher.close()
        without.close()
    with pytest.raises(InvalidInputError, match="priority_levels must be an integer >= 0"):
        ServeOptions(priority_levels=-1)


def test_every_protocol_takes_a_priority(pipe, image):
    """/v1's field, /v2's parameter (Triton's name), each refused past the levels with the
    batcher's words; the command line's --priority-levels."""
    from sdtrt.cli import build_parser

    args = build_parser().parse_args(["serve", "--priority-levels", "3"])
    assert args.priority_levels == 3
    with serving(pipe, ServeOptions(priority_levels=2)) as running:
        body = {"image": base64.b64encode(png_bytes(image)).decode(), "num_inference_steps": 2}
        url = f"{running.url}/v1/img2img"
        assert httpx.post(url, json={**body, "priority": 1}, timeout=60).status_code == 200
        answer = httpx.post(url, json={**body, "priority": 5}, timeout=60)
        assert answer.status_code == 422 and "priority must be in [0, 2]" in answer.json()["error"]
        pixels = np.asarray(image)
        tensor = {"name": "image", "datatype": "UINT8", "shape": list(pixels.shape),
                  "data": pixels.reshape(-1).tolist()}  # fmt: skip
        infer = f"{running.url}/v2/models/img2img/infer"
        for priority, status in ((2, 200), (3, 422)):
            request = {"inputs": [tensor], "parameters": {"num_inference_steps": 2,
                                                          "priority": priority}}  # fmt: skip
            assert httpx.post(infer, json=request, timeout=60).status_code == status


def test_the_queue_depth_by_level_is_a_metric(pipe, image):
    """/metrics' sdtrt_queue_depth_by_priority: the waiting requests of each level (every
    level shown); a server without levels has none."""
    from prometheus_client import generate_latest

    from sdtrt.serve.metrics import Metrics

    batcher = StepBatcher(pipe, ServeOptions(priority_levels=3), start=False)
    without = StepBatcher(pipe, start=False)
    try:
        for priority in (1, 0, 0):
            batcher.submit(_job(batcher, image, priority))
        text = generate_latest(Metrics(batcher).registry).decode()
        assert 'sdtrt_queue_depth_by_priority{priority="1"} 1.0' in text
        assert 'sdtrt_queue_depth_by_priority{priority="2"} 0.0' in text
        assert 'sdtrt_queue_depth_by_priority{priority="3"} 2.0' in text  # 0: the lowest
        assert "sdtrt_queue_depth 3.0" in text
        assert "by_priority" not in generate_latest(Metrics(without).registry).decode()
    finally:
        batcher.close()
        without.close()
