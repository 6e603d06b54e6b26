"""The Redis key layout of a training run, and the only place it is spelled out.

Every key and stream of a run lives under "rcgrpo:<run name>:", so runs share a Redis without meeting.
The driver, the components (through services.bus) and a reward server started for the run
(deploy.reward_process) all take their names from here.
"""

from __future__ import annotations

from dataclasses import dataclass

# the run a reward server's streams default to: the shipped default run's
DEFAULT_RUN_NAME = "tiny-shapes"
# the consumer group of each work stream
TASKS_GROUP = "rollout-workers"
ROLLOUTS_GROUP = "reward-server"
SCORED_GROUP = "learner"


def reward_done_key(namespace: str, group_id: str) -> str:
    """A reward server's mark that it scored this group (under the namespace its settings give)."""
    return f"{namespace}:done:{group_id}"


@dataclass(frozen=True)
class RunKeys:
    run: str  # the run's name

    def key(self, suffix: str) -> str:
        return f"rcgrpo:{self.run}:{suffix}"

    # the work streams: tasks -> rollouts -> scored
    @property
    def tasks(self) -> str:
        return self.key("tasks")

    @property
    def rollouts(self) -> str:
        return self.key("rollouts")

    @property
    def scored(self) -> str:
        return self.key("scored")

    def task_done(self, group_id: str) -> str:
        """A task's completion mark: per group id, not per policy version, so a task reclaimed by a
        worker holding a newer policy is still published once."""
        return self.key(f"tasks:done:{group_id}")

    @property
    def tasks_cursor(self) -> str:
        """How many tasks the driver has fed (a separate learner process reads it)."""
        return self.key("tasks:cursor")

    @property
    def reward_namespace(self) -> str:
        """The reward server's prefix of its idempotency (done) keys."""
        return self.key("reward")

    def reward_done(self, group_id: str) -> str:
        return reward_done_key(self.reward_namespace, group_id)

    # payloads: image parts too large to inline (read by the reward server); training tensors (learner)
    @property
    def blob_prefix(self) -> str:
        return self.key("blob:")

    @property
    def train_prefix(self) -> str:
        return self.key("train:")

    # policy versions and what workers refused
    @property
    def lora(self) -> str:
        return self.key("lora")

    @property
    def lora_rejected(self) -> str:
        return self.key("lora:rejected")

    # what the learner last said
    @property
    def learner_stats(self) -> str:
        return self.key("learner:last")

    @property
    def groups_consumed(self) -> str:
        return self.key("learner:consumed")

    @property
    def stop(self) -> str:
        return self.key("stop")
