"""Every number the learner reports per update, declared once.

A statistic's key names it in the update's result, so in metrics.jsonl and every experiment tracker; the
Prometheus gauge it sets (services/metrics.py builds the gauges from this table) and the driver's
progress line (progress_line) are derived from here too. docs/METHOD.md says how to read them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Statistic:
    key: str  # in the update's result and metrics.jsonl
    help: str  # what it is: the Prometheus help text
    # the Prometheus gauge it sets: "" for rcgrpo_learner_<key>, None for none (counts, per-group rows and
    # timings, which are counters or histograms in services/metrics.py, or only in metrics.jsonl)
    gauge: str | None = ""
    # a mapping-valued statistic: one sample per key, under this label; or (label, value) for a
    # statistic that is one labelled sample of a gauge it shares with others
    label: str | tuple[str, str] | None = None

    @property
    def gauge_name(self) -> str | None:
        return f"rcgrpo_learner_{self.key}" if self.gauge == "" else self.gauge

    @property
    def label_name(self) -> str | None:
        return self.label[0] if isinstance(self.label, tuple) else self.label


LEARNER_STATISTICS = (
    # -- where the run is
    Statistic("step", "Optimiser steps taken"),
    Statistic("policy_version", "Newest published policy version"),  # also set on each publish
    Statistic("groups", "Groups in the update's batch", gauge=None),
    Statistic("num_groups", "Groups that carried gradient in the update", gauge=None),
    Statistic("num_updates", "Optimiser steps taken on the batch (update_epochs, or 0)", gauge=None),
    # -- the objective
    Statistic("loss", "Surrogate loss of the last update"),
    Statistic("surrogate_loss", "The clipped surrogate alone, last update", gauge=None),
    Statistic(
        "background_anchor_loss",
        "Background anchor term mean_bg ||v_theta - v_ref||^2, last update",
        gauge="rcgrpo_learner_background_anchor",
    ),
    # -- the rewards of the batch
    Statistic("reward_mean", "Mean total reward of the last batch"),
    Statistic("reward_std", "Mean within-group reward std of the last batch"),
    Statistic("instruction_reward_mean", "Mean of the instruction terms of the last batch", gauge=None),
    Statistic("acd_mean", "Mean ACD reward of the last batch"),
    Statistic("term_std", "Mean within-group std of each reward r_j, last batch", gauge=None),
    Statistic("term_spread", "Mean within-group std of w_j * r_j, last batch", label="reward"),
    Statistic(
        "instruction_share", "Share of the advantages' variance explained by the instruction term, last batch"
    ),
    Statistic(
        "instruction_dominant",
        "Share of the last batch's groups whose largest reward spread is the instruction term's",
    ),
    Statistic(
        "advantage_instruction_corr",
        "Mean corr of the advantages of r and of r_instr, last batch",
        gauge=None,
    ),
    Statistic("acd_instruction_corr", "Mean corr of R_ACD and r_instr within groups, last batch", gauge=None),
    # -- which groups carry the gradient
    Statistic("zero_variance_ratio", "Share of groups dropped for zero reward std"),
    Statistic(
        "noise_floor_groups", "Groups of the batch below the reward's noise floor", gauge=None
    ),  # rcgrpo_learner_noise_floor_groups_total counts them by task kind
    Statistic(
        "noise_gradient_share",
        "Share of the last update's gradient carried by groups below the reward's noise floor",
    ),
    Statistic(
        "group_signal", "Per group: its task, reward spread, gradient share, hacking flags", gauge=None
    ),
    # -- is the policy moving
    Statistic("clip_fraction", "Fraction of clipped ratios in the last update"),
    Statistic("ratio_mean", "Mean ratio r over the last update", gauge=None),
    Statistic("ratio_min", "Smallest ratio r of the last update", gauge=None),
    Statistic("ratio_max", "Largest ratio r of the last update", gauge=None),
    Statistic(
        "ratio_deviation_p50",
        "Quantile of |r - 1| over the last update's ratios",
        gauge="rcgrpo_learner_ratio_deviation",
        label=("quantile", "p50"),
    ),
    Statistic(
        "ratio_deviation_p90",
        "Quantile of |r - 1| over the last update's ratios",
        gauge="rcgrpo_learner_ratio_deviation",
        label=("quantile", "p90"),
    ),
    Statistic(
        "ratio_deviation_max",
        "Quantile of |r - 1| over the last update's ratios",
        gauge="rcgrpo_learner_ratio_deviation",
        label=("quantile", "max"),
    ),
    Statistic("approx_kl", "Estimated KL(pi_old || pi_theta) of the last update"),
    Statistic("policy_entropy", "Mean entropy of pi_old over the G candidates (nats)"),
    Statistic("effective_neighbours", "Mean exp(entropy of pi_old): candidates pi_old spreads over"),
    Statistic(
        "distance_scale",
        "Mean distance between candidates and the anchor at a grid step, last update",
        label="grid_step",
    ),
    # -- the gradient
    Statistic("grad_norm", "LoRA gradient norm before clipping, last update"),
    Statistic(
        "surrogate_gradient_norm",
        "Norm of a term's gradient in the last update (surrogate, anchor)",
        gauge="rcgrpo_learner_gradient_norm",
        label=("term", "surrogate"),
    ),
    Statistic(
        "anchor_gradient_norm",
        "Norm of a term's gradient in the last update (surrogate, anchor)",
        gauge="rcgrpo_learner_gradient_norm",
        label=("term", "anchor"),
    ),
    Statistic(
        "anchor_surrogate_cosine",
        "Cosine between the background anchor's and the surrogate's gradients, last update",
    ),
    # -- time and freshness
    Statistic("staleness_mean", "Mean policy versions the batch's groups lag the learner", gauge=None),
    Statistic("wait_seconds", "The learner idle, waiting for scored groups", gauge=None),
    Statistic("update_seconds", "Wall time of the update", gauge=None),  # rcgrpo_learner_step_seconds
    Statistic("publish_seconds", "Wall time of publishing the policy version", gauge=None),
    Statistic("publish_error", "Why the last publish failed (only then)", gauge=None),
)
# what the driver adds to each metrics.jsonl row
DRIVER_STATISTICS = (
    Statistic("time", "Wall clock of the row (Unix seconds)", gauge=None),
    Statistic("streams", "Length, pending and dead letters of each work stream", gauge=None),
    Statistic("images_per_s", "Edits sampled per second since the run (re)started", gauge=None),
)
# the driver's progress line (a bar's text in a terminal, a line per step in a job's log)
PROGRESS_LINE = (
    "reward {reward_mean:.3f}±{reward_std:.3f}  instr {instruction_reward_mean:.3f} ({instruction_share:.0%} of A)  "
    "{update}  stale {staleness_mean:.2f}  {images_per_s:.1f} img/s"
)


def progress_line(stats: dict) -> str:
    """PROGRESS_LINE for one step's stats; a step in which no group carried gradient says why (its
    clip fraction and ratios are undefined)."""
    if stats["num_groups"] > 0:
        update = "clip {clip_fraction:.1%}  |r-1| {ratio_deviation_p90:.3f}".format(**stats)
    else:
        update = f"no update: no group with spread ({stats['noise_floor_groups']} under the noise floor)"
    return PROGRESS_LINE.format(**stats, update=update)
