"""Which training failures Ray Train retries: only the loss of a worker, never a mistake.

Ray Train 2.60's default failure policy retries every worker-group error up to
``failure.max_failures`` times. A mistake in the job (a checkpoint written by another number of ranks, a
file that is not there, a value DeepSpeed or transformers refuses) fails the same way on every try, so
each retry only costs a new worker group (tens of seconds to minutes) before the same message.
:class:`WorkerLossOnlyPolicy` raises those at once and keeps the retries for what a new worker group can
fix: a worker process or node that died, a health check that failed, a collective broken by a lost
peer, a device running out of memory.
"""

from __future__ import annotations

from ray.train.torch import TorchTrainer
from ray.train.v2._internal.exceptions import UserExceptionWithTraceback
from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy
from ray.train.v2._internal.execution.failure_handling.failure_policy import FailureDecision
from ray.train.v2.api.exceptions import WorkerGroupError

from ...errors import ZeroplaneError

#: Exceptions raised by the training code that no retry can fix: zeroplane's own refusals (bad spec, a
#: checkpoint of another world size, a file that does not match its marker) and the built-in errors
#: Python, DeepSpeed and transformers raise for bad input or code (DeepSpeed checks its config with
#: ``assert``). Not listed, so retried: ``RuntimeError`` (a collective broken by a lost peer, CUDA/CPU
#: out of memory), ``OSError`` other than a missing file (network, storage), Ray's own errors.
DETERMINISTIC_ERRORS = (ZeroplaneError, ValueError, TypeError, KeyError, IndexError, AttributeError,
                        ImportError, FileNotFoundError, NotImplementedError, AssertionError)


def is_deterministic(error: BaseException) -> bool:
    """Whether a worker-group failure is a mistake that fails the same way on every try.

    True for a ``WorkerGroupError`` whose every worker failure is an exception the training code raised
    of a :data:`DETERMINISTIC_ERRORS` type (Ray 2.60 hands the policy the exception itself; one still
    wrapped in ``UserExceptionWithTraceback`` is unwrapped). False as soon as one worker failure is
    anything else: a worker that died (``RayActorError``, a failed health check: Ray's own error types),
    or an error of another type, e.g. the ``RuntimeError`` the surviving ranks raise when a peer's
    process is killed.
    """
    if not isinstance(error, WorkerGroupError) or not error.worker_failures:
        return False
    for failure in error.worker_failures.values():
        if isinstance(failure, UserExceptionWithTraceback):
            failure = getattr(failure, "_base_exc", None)
        if not isinstance(failure, DETERMINISTIC_ERRORS):
            return False
    return True


class WorkerLossOnlyPolicy(DefaultFailurePolicy):
    """Ray Train's default policy (``failure.max_failures`` retries of worker-group errors, controller
    and preemption limits unchanged), except that a deterministic failure (:func:`is_deterministic`) is
    raised on its first occurrence."""

    def make_decision(self, training_failed_error) -> FailureDecision:
        """``RAISE`` for a deterministic failure, else the default policy's decision."""
        if is_deterministic(training_failed_error):
            return FailureDecision.RAISE
        return super().make_decision(training_failed_error)


class ZeroplaneTorchTrainer(TorchTrainer):
    """``TorchTrainer`` whose controller decides retries with :class:`WorkerLossOnlyPolicy`.

    Ray Train 2.60 builds its policy from ``RunConfig.failure_config`` inside ``fit()`` and hands it to
    the controller it starts; this replaces that one argument (the policy is pickled into the controller
    actor, so it must be importable there: zeroplane travels with every job).
    """

    def _initialize_and_run_controller(self, **controller_init_kwargs):
        controller_init_kwargs["failure_policy"] = WorkerLossOnlyPolicy(self.run_config.failure_config)
        return super()._initialize_and_run_controller(**controller_init_kwargs)
