"""The state package's pure helpers alone: paging and thinning (Page, stride_for), publication,
and each transition of the job state machine (service.state.jobs). No store, no Redis."""

from datetime import UTC, datetime, timedelta

import pytest

from service.core.errors import Fenced, JobAlreadyEnded
from service.core.schemas import FitReport, Job, JobParams, JobStatus, Model, Quadratic
from service.state import jobs
from service.state.base import Page, stride_for

PARAMS = JobParams(
    epochs=10, learning_rate=0.01, init_w=1.0, batch_size=1, fit_intercept=False, seed=1
)
T0 = datetime(2026, 1, 1, tzinfo=UTC)
T1 = T0 + timedelta(seconds=5)


def running(attempts: int = 1, epoch: int = 4) -> Job:
    job = jobs.started(jobs.new_job(PARAMS, 3, T0), T0)
    at = jobs.progress(job.params, epoch)
    return job.model_copy(update={"attempts": attempts, "progress": at})


# -- paging and stride ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("count", "max_points", "stride"),
    [(0, 10, 1), (10, 10, 1), (11, 10, 2), (1000, 10, 111), (1000, 2, 999), (5, 2, 4)],
)
def test_stride_picks_at_most_max_points_with_the_last(
    count: int, max_points: int, stride: int
) -> None:
    assert stride_for(count, max_points) == stride
    picked = [*range(0, count, stride)]
    if count and (count - 1) % stride:
        picked.append(count - 1)
    assert len(picked) <= max_points


def test_a_page_within_the_budget_is_every_epoch() -> None:
    page = Page.of(total=100, since=10, limit=20, max_points=1000)
    assert (page.start, page.end, page.stride, page.tail) == (10, 30, 1, [])
    assert page.epochs == list(range(10, 30))


def test_a_thinned_page_keeps_its_last_epoch_as_the_tail() -> None:
    page = Page.of(total=1000, since=0, limit=None, max_points=7)
    assert page.stride == 167
    assert page.tail == [999]
    assert page.epochs == [0, 167, 334, 501, 668, 835, 999]


def test_a_page_whose_stride_lands_on_the_last_epoch_has_no_tail() -> None:
    page = Page.of(total=5, since=0, limit=None, max_points=3)
    assert (page.stride, page.tail, page.epochs) == (2, [], [0, 2, 4])


def test_a_page_past_the_end_is_empty() -> None:
    page = Page.of(total=10, since=50, limit=5, max_points=10)
    assert (page.start, page.end, page.epochs) == (10, 10, [])


def test_a_page_says_where_the_next_one_starts_while_more_may_come() -> None:
    job = running()
    page = Page.of(total=10, since=0, limit=4, max_points=100)
    history = page.history(job, [1.0] * 4, None, [0.5] * 4)
    assert (history.since, history.count, history.next_since) == (0, 4, 4)
    last = Page.of(total=10, since=4, limit=None, max_points=100)
    ended = jobs.ended(job, JobStatus.cancelled, None, T1)
    assert last.history(ended, [1.0] * 6, None, [0.5] * 6).next_since is None
    assert last.history(job, [1.0] * 6, None, [0.5] * 6).next_since == 10  # still running


# -- publication -----------------------------------------------------------------------------

VAL = Quadratic(w_opt=2.0, b_opt=0.0, loss_opt=0.1, mean_x=0.0, var_x=1.0, var_y=5.0)


def report(w: float, val: Quadratic | None = VAL) -> FitReport:
    mse = None if val is None else val.mse(w, 0.0)
    plain = FitReport.plain(w, 0.0, 0.5, 0.25)
    return plain.model_copy(update={"val": val, "val_mse": mse})


def served(w: float) -> Model:
    return jobs.model_of(running(), 1, FitReport.plain(w, 0.0, 0.5, 0.25), T0)


def with_publish(publish: str) -> Job:
    return running().model_copy(update={"params": PARAMS.model_copy(update={"publish": publish})})


def test_always_publishes_whatever_is_served() -> None:
    assert jobs.publication(with_publish("always"), report(9.0), served(2.0)) == (True, None)


def test_never_publishes_and_says_how_to_serve_it() -> None:
    serve, why = jobs.publication(with_publish("never"), report(2.0), None)
    assert not serve
    assert why is not None
    assert "POST /models/{version}/serve" in why


def test_if_better_publishes_a_lower_validation_mse_only() -> None:
    job = with_publish("if_better")
    assert jobs.publication(job, report(2.1), served(3.0)) == (True, None)
    serve, why = jobs.publication(job, report(3.0), served(2.1))
    assert not serve
    assert why is not None
    assert "not lower than that of the served version 1" in why
    serve, _ = jobs.publication(job, report(2.5), served(2.5))  # equal is not better
    assert not serve


def test_if_better_publishes_when_there_is_nothing_to_compare() -> None:
    job = with_publish("if_better")
    assert jobs.publication(job, report(9.0), None) == (True, None)  # nothing served
    assert jobs.publication(job, report(9.0, val=None), served(2.0)) == (True, None)  # no split


def test_a_result_names_its_version_and_whether_it_was_served() -> None:
    job = running()
    model = jobs.model_of(job, 7, report(2.0), T1)
    assert (model.version, model.job_id, model.trained_at, model.w) == (7, job.id, T1, 2.0)
    result = jobs.result_of(model, report(2.0), False, "why")
    assert (result.model_version, result.published, result.not_published_because) == (
        7,
        False,
        "why",
    )


# -- transitions -----------------------------------------------------------------------------


def test_a_new_job_is_queued_with_no_progress() -> None:
    job = jobs.new_job(PARAMS, 3, T0)
    assert (job.status, job.created_at, job.n_samples, job.attempts) == (
        JobStatus.queued,
        T0,
        3,
        0,
    )
    assert (job.progress.epoch, job.progress.epochs) == (0, PARAMS.epochs)
    assert job.started_at is None
    assert jobs.new_job(PARAMS, 3, T0).id != job.id


def test_starting_runs_the_next_attempt_from_epoch_zero() -> None:
    queued = jobs.new_job(PARAMS, 3, T0)
    first = jobs.started(queued, T0)
    assert (first.status, first.started_at, first.attempts, first.progress.epoch) == (
        JobStatus.running,
        T0,
        1,
        0,
    )
    assert queued.status is JobStatus.queued  # a transition makes a new job, never changes one


def test_a_requeued_job_starts_again_as_its_next_attempt_when_it_first_started() -> None:
    back = jobs.requeued(running(attempts=1, epoch=4))
    assert back.status is JobStatus.queued
    again = jobs.started(back, T1)
    assert (again.attempts, again.started_at, again.progress.epoch) == (2, T0, 0)


def test_a_retry_is_the_next_attempt_from_epoch_zero() -> None:
    again = jobs.retried(running(attempts=1, epoch=4))
    assert (again.status, again.attempts, again.progress.epoch) == (JobStatus.running, 2, 0)
    with pytest.raises(JobAlreadyEnded, match="is queued, not running"):
        jobs.retried(jobs.new_job(PARAMS, 3, T0))


def test_progress_counts_recorded_epochs() -> None:
    job = jobs.progressed(running(epoch=0), 7)
    assert (job.progress.epoch, job.progress.epochs) == (7, PARAMS.epochs)


def test_ending_keeps_the_problem_and_no_result() -> None:
    problem = {"type": "diverged", "title": "t", "status": 422, "detail": "d", "epoch": 7}
    failed = jobs.ended(running(), JobStatus.failed, problem, T1)
    assert (failed.status, failed.finished_at, failed.result) == (JobStatus.failed, T1, None)
    assert failed.error is not None
    assert failed.error.model_dump()["epoch"] == 7
    cancelled = jobs.ended(running(), JobStatus.cancelled, None, T1)
    assert (cancelled.status, cancelled.error) == (JobStatus.cancelled, None)


def test_succeeding_keeps_the_result() -> None:
    job = running()
    result = jobs.result_of(jobs.model_of(job, 1, report(2.0), T1), report(2.0), True, None)
    done = jobs.succeeded(job, result, T1)
    assert (done.status, done.finished_at, done.result, done.error) == (
        JobStatus.succeeded,
        T1,
        result,
        None,
    )


def test_an_ended_job_is_refused_any_other_end() -> None:
    jobs.check_open(jobs.new_job(PARAMS, 3, T0))
    jobs.check_open(running())
    ended = jobs.ended(running(), JobStatus.cancelled, None, T1)
    with pytest.raises(JobAlreadyEnded, match="already ended as cancelled"):
        jobs.check_open(ended)
    with pytest.raises(JobAlreadyEnded):
        jobs.check_owner(ended, 1)


def test_only_the_current_attempt_owns_a_running_job() -> None:
    job = running(attempts=2)
    jobs.check_owner(job, 2)
    jobs.check_owner(job, None)  # not a worker's write: not fenced
    with pytest.raises(Fenced, match="attempt 1 of job"):
        jobs.check_owner(job, 1)
    with pytest.raises(Fenced):
        jobs.check_owner(jobs.requeued(job), 2)  # back on the queue: nobody owns it


def test_an_end_sent_twice_by_its_attempt_is_a_replay() -> None:
    ended = jobs.ended(running(attempts=2), JobStatus.failed, None, T1)
    assert jobs.replayed(ended, JobStatus.failed, 2)
    assert not jobs.replayed(ended, JobStatus.failed, 1)
    assert not jobs.replayed(ended, JobStatus.succeeded, 2)
    assert not jobs.replayed(ended, JobStatus.failed, None)


# -- retention -------------------------------------------------------------------------------


def test_the_jobs_that_ended_longest_ago_go_but_never_the_served_models() -> None:
    assert jobs.evicted_jobs(["a", "b", "c", "d"], None, 2) == ["a", "b"]
    assert jobs.evicted_jobs(["a", "b", "c", "d"], "a", 2) == ["b"]  # served: kept, not counted
    assert jobs.evicted_jobs(["a", "b"], None, 2) == []
    assert jobs.evicted_jobs([], None, 0) == []


def test_the_oldest_versions_go_the_served_one_counted_but_kept() -> None:
    assert jobs.evicted_versions([1, 2, 3, 4], None, 2) == [1, 2]
    assert jobs.evicted_versions([1, 2, 3, 4], 1, 2) == [2, 3]
    assert jobs.evicted_versions([1, 2], 2, 2) == []


def test_the_errors_both_stores_raise_name_what_is_missing() -> None:
    assert "no job 'x'" in str(jobs.job_not_found("x"))
    assert "no model version 3" in str(jobs.version_not_found(3))
    assert "'k' was used with another body" in str(jobs.key_reused("k"))
    assert "no job has started yet" in str(jobs.no_history())
    assert "job x has not started yet" in str(jobs.no_history("x"))
    full = jobs.queue_full(5, 5)
    assert full.headers["Retry-After"] == "2"
    assert "SGD_MAX_QUEUED_JOBS=5" in str(full)
