"""The reward server's settings: defaults here, overridden by a YAML file, overridden by environment
variables (`RCGRPO_REWARD_<FIELD>`, nested with `__`, e.g. `RCGRPO_REWARD_BATCHING__MAX_BATCH_SIZE`),
overridden by explicit arguments (the CLI's flags). The auth token comes from `RCGRPO_REWARD_TOKEN`
or `token_file`, never from the YAML file.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict, YamlConfigSettingsSource

from rcgrpo.config import ConfigSection
from rcgrpo.rewards import DEFAULT_WEIGHTS
from services.keys import DEFAULT_RUN_NAME, ROLLOUTS_GROUP, RunKeys
from services.schemas import MAX_ITEMS_PER_REQUEST, Composition

DEFAULT_KEYS = RunKeys(DEFAULT_RUN_NAME)


class BatchingSettings(ConfigSection):
    enabled: bool = True  # False: every model-based item runs alone (the benchmark's baseline)
    max_batch_size: int = Field(32, ge=1)  # N
    max_wait_ms: float = Field(5.0, ge=0)  # T: how long the first queued item waits for company
    max_queue_items: int = Field(1024, ge=1)  # pending model-based items before 503
    retry_after_s: int = Field(1, ge=1)  # the Retry-After a full queue answers with


class StreamSettings(ConfigSection):
    renamed = {"payload_dir": "blob_dir"}

    enabled: bool = False
    redis_url: str | None = None  # None: REDIS_URL, else an embedded redis-server
    # by default the streams of the shipped default run (services.keys)
    rollouts: str = DEFAULT_KEYS.rollouts  # stream of rollout-group records (services.record.RolloutGroup)
    scored: str = DEFAULT_KEYS.scored  # the same records, scored
    group: str = ROLLOUTS_GROUP  # consumer group
    consumer: str = "reward-server-0"
    namespace: str = DEFAULT_KEYS.reward_namespace  # prefix of the idempotency (done) keys
    blob_prefix: str = DEFAULT_KEYS.blob_prefix  # BlobStore prefix of image parts too large to inline
    # the run's blob_dir when its blob_store is "directory": the image parts are files there
    blob_dir: Path | None = None
    read_count: int = Field(8, ge=1)  # groups taken per read (scored concurrently, batched together)
    block_ms: int = Field(200, ge=1)
    reclaim_idle_ms: int = Field(60_000, ge=1)  # a pending group idle this long is taken over
    max_deliveries: int = Field(5, ge=1)  # then it goes to the dead-letter stream
    scored_maxlen: int | None = Field(100_000, ge=1)


JUDGE_SYSTEM = (
    "You grade instruction-guided image edits. You see the source image, then the edited image"
    " (and the edit region when given). Answer with one line: SCORE: <integer 0-10>."
)
JUDGE_PROMPT = (
    "Instruction: {instruction}\nThe edit region should show: {caption}\n"
    "How well does the edited image follow the instruction while keeping everything else unchanged?"
)
PROMPT_FIELDS = ("instruction", "caption")


class JudgeSettings(ConfigSection):
    """An OpenAI-compatible chat-completions endpoint (vLLM, SGLang) used as the `vlm_judge` reward."""

    base_url: str = Field(min_length=1)  # up to /v1, e.g. http://vllm:8000/v1
    model: str = Field(min_length=1)  # the served model name
    api_key_env: str | None = None  # environment variable holding the endpoint's key (never in YAML)
    system: str | None = JUDGE_SYSTEM
    prompt: str = JUDGE_PROMPT  # {instruction} and {caption} are filled in per item
    # the images sent after the prompt, in order: mask = the edit region as a grayscale image,
    # edit_crop = the edit cropped to the mask's bounding box
    images: list[Literal["source", "edit", "mask", "edit_crop"]] = Field(
        default_factory=lambda: ["source", "edit"], min_length=1
    )
    score_pattern: str = r"(?i)score\s*[:=]\s*(-?\d+(?:\.\d+)?)"  # one group: the number
    score_range: tuple[float, float] = (0.0, 10.0)  # mapped linearly onto [0, 1]; outside: unparseable
    max_tokens: int = Field(64, ge=1)
    temperature: float = Field(0.0, ge=0)
    max_concurrency: int = Field(8, ge=1)  # requests in flight to the endpoint, across all callers
    timeout_s: float = Field(60.0, gt=0)  # per attempt
    max_attempts: int = Field(3, ge=1)  # timeouts, connection errors, 429/5xx and unparseable answers
    backoff_s: float = Field(0.5, ge=0)  # before retry k: backoff_s * 2^(k-1)

    @field_validator("score_pattern")
    @classmethod
    def _one_group(cls, pattern: str) -> str:
        try:
            groups = re.compile(pattern).groups
        except re.error as error:
            raise ValueError(f"score_pattern is not a regular expression: {error}") from error
        if groups != 1:
            raise ValueError(f"score_pattern must have exactly one group (the score); it has {groups}")
        return pattern

    @field_validator("prompt")
    @classmethod
    def _known_fields(cls, prompt: str) -> str:
        try:
            prompt.format(**{name: "" for name in PROMPT_FIELDS})
        except (KeyError, IndexError, ValueError) as error:
            raise ValueError(f"prompt may use only {{instruction}} and {{caption}}: {error!r}") from error
        return prompt

    @model_validator(mode="after")
    def _range(self):
        low, high = self.score_range
        if not low < high:
            raise ValueError(f"score_range must be (low, high) with low < high; got {self.score_range}")
        return self


class RewardModelSettings(ConfigSection):
    """A local transformers image classifier used as the `reward_model` reward."""

    path: Path  # directory with the model (AutoModelForImageClassification) and its image processor
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    label_index: int = Field(0, ge=0)  # which logit is the score

    @field_validator("path")
    @classmethod
    def _directory(cls, path: Path) -> Path:
        if not path.is_dir():
            raise ValueError(f"{str(path)!r} is not a directory")
        return path


class RewardServerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RCGRPO_REWARD_", env_nested_delimiter="__", extra="forbid")

    host: str = "127.0.0.1"  # loopback unless configured
    port: int = Field(8600, ge=0, le=65535)
    token: SecretStr | None = None
    token_file: Path | None = None
    insecure_no_auth: bool = False  # local development only
    # The rewards this server serves and their weights for REST requests that give none (names from
    # reward_server.registry). Stream groups carry their run's weights. By default the default rewards
    # but region_adherence, which needs a ground-truth target a REST caller may not have.
    rewards: dict[str, float] = Field(
        default_factory=lambda: {name: w for name, w in DEFAULT_WEIGHTS.items() if name != "region_adherence"}
    )
    # how sub-scores become the total for REST requests that give none (stream groups carry their run's)
    composition: Composition = Field(default_factory=Composition)
    models: dict[str, Path] = Field(default_factory=dict)  # model name -> local directory, e.g. clip
    judge: JudgeSettings | None = None  # the vlm_judge reward's endpoint
    reward_model: RewardModelSettings | None = None  # the reward_model reward's model
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024)
    max_items_per_request: int = Field(256, ge=1, le=MAX_ITEMS_PER_REQUEST)
    max_image_pixels: int = Field(1024 * 1024, ge=1)  # per image, checked before decoding
    torch_threads: int | None = Field(None, ge=1)
    batching: BatchingSettings = Field(default_factory=BatchingSettings)
    stream: StreamSettings = Field(default_factory=StreamSettings)

    @model_validator(mode="after")
    def _consistent(self):
        if self.max_items_per_request > self.batching.max_queue_items:
            raise ValueError(
                f"max_items_per_request={self.max_items_per_request} exceeds batching.max_queue_items="
                f"{self.batching.max_queue_items}: such a request could never be queued"
            )
        return self

    @classmethod
    def settings_customise_sources(
        cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings
    ):
        return (init_settings, env_settings, YamlConfigSettingsSource(settings_cls))


def load_settings(config: str | Path | None = None, **overrides) -> RewardServerSettings:
    """Settings from a YAML file (optional) with environment and `overrides` on top."""
    if config is None:
        return RewardServerSettings(**overrides)
    config = Path(config)
    if not config.is_file():
        raise FileNotFoundError(f"reward server config {config} does not exist")

    class FromFile(RewardServerSettings):
        model_config = SettingsConfigDict(yaml_file=config)

    return FromFile(**overrides)
