"""Ray Train retries only worker loss: the failure policy every zeroplane trainer runs with, fed the
exception objects Ray Train's controller builds (no cluster needed)."""

from __future__ import annotations

from ray.exceptions import ActorDiedError
from ray.train import FailureConfig
from ray.train.v2._internal.exceptions import UserExceptionWithTraceback, WorkerHealthCheckFailedError
from ray.train.v2._internal.execution.failure_handling.failure_policy import FailureDecision
from ray.train.v2.api.exceptions import WorkerGroupError

from zeroplane.errors import SpecError, ZeroplaneError
from zeroplane.runtime.train.driver import build_trainer
from zeroplane.runtime.train.failures import WorkerLossOnlyPolicy, ZeroplaneTorchTrainer, is_deterministic
from zeroplane.spec import parse_spec
from zeroplane.storage import Storage


def _user(exc: BaseException) -> UserExceptionWithTraceback:
    return UserExceptionWithTraceback(exc, f"Traceback (most recent call last):\n{type(exc).__name__}: {exc}")


def _group(*failures) -> WorkerGroupError:
    return WorkerGroupError("test", dict(enumerate(failures)))


MISMATCH = ZeroplaneError("checkpoint was written by 2 ranks, this job has 1; resume with scaling.num_workers=2")
LOST = WorkerHealthCheckFailedError("worker 1 died", ActorDiedError())


def test_mistakes_raise_on_first_failure_despite_max_failures():
    # Ray 2.60's controller passes the worker's exception itself (seen on a real run); a wrapped one too
    for failures in ([MISMATCH], [MISMATCH, MISMATCH], [FileNotFoundError("x.txt")], [ValueError("bad n_head")],
                     [AssertionError("train_batch_size")], [SpecError("model.config")], [_user(MISMATCH)]):
        policy = WorkerLossOnlyPolicy(FailureConfig(max_failures=3))
        assert is_deterministic(_group(*failures))
        assert policy.make_decision(_group(*failures)) == FailureDecision.RAISE


def test_worker_loss_is_retried_max_failures_times():
    # a killed rank: its health check fails, the survivor's collective breaks (RuntimeError)
    for failures in ([LOST], [RuntimeError("Connection closed by peer"), LOST], [ActorDiedError()],
                     [RuntimeError("Connection closed by peer")], [MISMATCH, LOST], [OSError("connection reset")],
                     [_user(RuntimeError("Connection closed by peer"))]):
        policy = WorkerLossOnlyPolicy(FailureConfig(max_failures=2))
        assert not is_deterministic(_group(*failures))
        assert [policy.make_decision(_group(*failures)) for _ in range(3)] == [
            FailureDecision.RETRY, FailureDecision.RETRY, FailureDecision.RAISE]


def test_every_job_trainer_uses_the_policy(tmp_path):
    spec = parse_spec({"name": "t", "checkpoint": {"storage_path": str(tmp_path)}, "failure": {"max_failures": 2}})
    trainer = build_trainer(spec, "t-1", Storage.from_uri(str(tmp_path)), {})
    assert isinstance(trainer, ZeroplaneTorchTrainer)
    assert trainer.run_config.failure_config.max_failures == 2
