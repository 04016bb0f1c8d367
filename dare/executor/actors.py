"""The Ray actors: one class per role, each the plain role class made remote.

Resources (``num_cpus``, ``num_gpus``) come from the recipe's ``learner``, ``rollout``
and ``evaluator`` sections when the driver creates them.
"""
from __future__ import annotations

import ray

from dare.executor.roles import Evaluator, Learner, Rollout

LearnerWorker = ray.remote(Learner)
RolloutWorker = ray.remote(Rollout)
EvaluatorWorker = ray.remote(Evaluator)
