"""CLI flags and configuration of remp_sglang, and the checks made at launch.

The launcher parses ``--remp*`` (an AFTER hook on ``ServerArgs.add_cli_args``), refuses
launch options a reshape would break and SGLang versions the integration was not
written for, and exports a `RempConfig` to its subprocesses through ``REMP_SGLANG_CONFIG``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

#: Environment variable that carries the REMP configuration to SGLang's subprocesses.
ENV_CONFIG = "REMP_SGLANG_CONFIG"
#: The SGLang release whose internals the integration reaches into (see
#: docs/architecture.md); another version is refused unless this variable is set to 1.
SGLANG_VERSION = "0.5.23"
ENV_ANY_VERSION = "REMP_ALLOW_ANY_SGLANG_VERSION"
#: How long a reshape may take by default (--remp-reshape-timeout); its rollback gets
#: as long again. A peer whose heartbeat stops for --remp-stall-timeout is lost.
RESHAPE_TIMEOUT_S = 600.0
STALL_TIMEOUT_S = 30.0
POLICIES = ("manual", "auto")


@dataclass(frozen=True)
class RempConfig:
    """What ``--remp*`` asked for, plus the launch layout (every rank the server may use)."""

    launch_tp: int = 1
    launch_pp: int = 1
    launch_dp: int = 1  # --dp-size: replicas, fed by SGLang's data-parallel controller
    initial_tp: int | None = None
    initial_pp: int | None = None
    plane_path: str = ""  # the control/migration plane's store (a private directory)
    reshape_timeout_s: float = RESHAPE_TIMEOUT_S
    stall_timeout_s: float = STALL_TIMEOUT_S
    cache_aware: bool = False  # replicas: dispatch by cached prefix (--remp-cache-aware)
    policy: str = "manual"  # --remp-policy: "auto" reshapes by itself
    policy_settings: dict = field(default_factory=dict)  # --remp-policy-config (PolicyConfig)

    @property
    def initial_layout(self) -> tuple[int, int]:
        return (self.initial_tp or self.launch_tp, self.initial_pp or self.launch_pp)

    @property
    def launch_world_size(self) -> int:
        return self.launch_dp * self.launch_tp * self.launch_pp

    def validate(self) -> None:
        if self.launch_tp < 1 or self.launch_pp < 1 or self.launch_dp < 1:
            raise ValueError(f"invalid launch layout dp={self.launch_dp} tp={self.launch_tp} "
                             f"pp={self.launch_pp}")
        for name in ("initial_tp", "initial_pp"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--remp-{name.replace('_', '-')} must be >= 1, got {value}")
        if not (self.reshape_timeout_s > 0 and self.stall_timeout_s > 0):
            raise ValueError("--remp-reshape-timeout and --remp-stall-timeout must be > 0")
        if self.policy not in POLICIES:
            raise ValueError(f"--remp-policy must be one of {POLICIES}, got {self.policy!r}")
        from remp_sglang.policy import PolicyConfig

        try:
            PolicyConfig.from_dict(self.policy_settings)
        except (TypeError, ValueError) as error:
            raise ValueError(f"--remp-policy-config: {error}") from error
        tp = self.initial_tp or self.launch_tp
        pp = self.initial_pp or self.launch_pp
        if self.launch_dp * tp * pp > self.launch_world_size:
            raise ValueError(
                f"--remp initial layout tp={tp} pp={pp} needs {self.launch_dp * tp * pp} ranks, "
                f"but the server is launched with {self.launch_world_size} (--dp-size "
                f"{self.launch_dp} --tp {self.launch_tp} --pp-size {self.launch_pp}); launch at "
                "the largest layout you will use"
            )

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RempConfig:
        data = json.loads(text)
        return cls(**{key: data[key] for key in cls.__dataclass_fields__ if key in data})


def config_from_env(environ: Mapping[str, str] | None = None) -> RempConfig | None:
    """The configuration the launcher exported, or None when ``--remp`` is off."""
    text = (os.environ if environ is None else environ).get(ENV_CONFIG)
    if not text:
        return None
    try:
        return RempConfig.from_json(text)
    except (ValueError, TypeError) as error:
        raise ValueError(f"malformed {ENV_CONFIG}={text!r}: {error}") from error


def _after_add_cli_args(result: Any, parser: Any) -> None:
    if "--remp" in getattr(parser, "_option_string_actions", {}):
        return None  # the same parser seen twice
    group = parser.add_argument_group("remp_sglang (runtime TP/PP reshaping)")
    group.add_argument(
        "--remp",
        action="store_true",
        help="Enable remp_sglang: runtime TP/PP reshaping that keeps the KV and prefix cache. "
        "Launch with --tp/--pp-size covering every rank the server may use.",
    )
    group.add_argument(
        "--remp-initial-tp",
        type=int,
        default=None,
        help="With --remp: the TP degree to serve with first (default: --tp).",
    )
    group.add_argument(
        "--remp-initial-pp",
        type=int,
        default=None,
        help="With --remp: the PP degree to serve with first (default: --pp-size).",
    )
    group.add_argument(
        "--remp-reshape-timeout",
        type=float,
        default=RESHAPE_TIMEOUT_S,
        help="With --remp: seconds a reshape may take; past that every rank rolls back "
        f"to the old layout (default {RESHAPE_TIMEOUT_S:.0f}).",
    )
    group.add_argument(
        "--remp-stall-timeout",
        type=float,
        default=STALL_TIMEOUT_S,
        help="With --remp: a rank whose heartbeat stops this long during a reshape is "
        f"taken as lost and the reshape rolls back (default {STALL_TIMEOUT_S:.0f}).",
    )
    group.add_argument(
        "--remp-cache-aware",
        action="store_true",
        help="With --remp and --dp-size: send each request to the replica that most likely "
        "caches the longest prefix of its prompt, unless that replica is much busier.",
    )
    group.add_argument(
        "--remp-policy",
        choices=POLICIES,
        default="manual",
        help="With --remp: 'auto' reshapes (dp, tp, pp) by itself as the load changes; "
        "'manual' (default) only on POST /remp/reshape. GET /remp/policy shows its "
        "decisions; POST /remp/policy {\"paused\": true} pauses it.",
    )
    group.add_argument(
        "--remp-policy-config",
        default=None,
        help="With --remp-policy auto: its settings, a JSON object or the path of a JSON "
        "file (keys of remp_sglang.policy.PolicyConfig, e.g. {\"min_dwell_s\": 30}; "
        "\"hardware\" overrides the step-time model's device figures).",
    )
    return None


def policy_settings(text: str | None) -> dict:
    """--remp-policy-config: a JSON object, or the path of a file holding one."""
    if not text:
        return {}
    if not text.lstrip().startswith("{"):
        try:
            with open(text) as f:
                text = f.read()
        except OSError as error:
            raise ValueError(f"--remp-policy-config: cannot read {text!r}: {error}") from error
    try:
        data = json.loads(text)
    except ValueError as error:
        raise ValueError(f"--remp-policy-config is not valid JSON: {error}") from error
    if not isinstance(data, dict):
        raise ValueError("--remp-policy-config must be a JSON object")
    return data


#: Launch options whose effect a reshape does not rebuild: (field, the value that is
#: supported, what to say).
UNSUPPORTED_OPTIONS = (
    ("speculative_algorithm", None, "speculative decoding"),
    ("enable_dp_attention", False, "DP attention"),
    ("attn_dp_size", 1, "DP attention"),
    ("attn_cp_size", 1, "context parallel attention"),
    ("dcp_size", 1, "decode context parallelism"),
    ("nnodes", 1, "more than one node (--nnodes)"),
    ("enable_lora", None, "LoRA adapters"),
    ("lora_paths", None, "LoRA adapters"),
    ("ep_size", 1, "expert parallelism"),
    ("enable_two_batch_overlap", False, "two-batch overlap"),
    ("enable_single_batch_overlap", False, "single-batch overlap"),
    ("disaggregation_mode", "null", "prefill/decode disaggregation"),
    ("enable_hierarchical_cache", False, "the hierarchical (host) KV cache"),
    ("enable_pdmux", False, "PD multiplexing"),
    ("page_size", 1, "a KV page size other than 1"),
    ("startup_weight_load_mode", "serial", "overlapped start-up weight loading"),
    ("enable_symm_mem", False, "symmetric-memory collectives"),
    ("enable_torch_symm_mem", False, "torch symmetric-memory collectives"),
)


def check_launch_options(server_args: Any) -> None:
    """Refuse, at launch, options a reshape would silently break; ValueError naming the
    option. `None` in the table means: unset (None or False)."""
    for name, supported, what in UNSUPPORTED_OPTIONS:
        value = getattr(server_args, name, supported)
        ok = (not value) if supported is None else value in (supported, None)
        if not ok:
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"--remp does not support {what} ({flag}={value!r}): a reshape "
                             "does not rebuild it; launch without it")


def check_sglang_version(installed: str | None = None,
                         environ: Mapping[str, str] | None = None) -> None:
    """The integration reaches into SGLang internals of one release; refuse others."""
    if installed is None:
        from sglang.version import __version__ as installed
    if installed != SGLANG_VERSION and (os.environ if environ is None else environ).get(
            ENV_ANY_VERSION) != "1":
        raise RuntimeError(f"remp_sglang was written for SGLang {SGLANG_VERSION}, found "
                           f"{installed}; set {ENV_ANY_VERSION}=1 to try it anyway")


def private_plane_path() -> str:
    """A store file in a fresh directory only this user can open (mode 0700), removed
    when the launcher exits: the plane's only rendezvous point, reachable by no port."""
    import atexit
    import shutil
    import tempfile

    root = tempfile.mkdtemp(prefix="remp-plane-")
    atexit.register(shutil.rmtree, root, True)
    return os.path.join(root, "store")
