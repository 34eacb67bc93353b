"""The config file: its typed model, its defaults and how it is loaded.

The YAML format is a contract: a ``config.yaml`` written for the original
implementation (``tests/data/legacy-config.yaml`` has its shapes) must load here.
Loading never half-works: every problem is collected and reported at once, one
line per problem, each naming the key path and what to do about it.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any, Literal

import regex
import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from . import safe_yaml
from .config_file import FILE_NAME, INIT_COMMAND, find_config
from .dialects import DEFAULT_TITLE_PATTERN
from .headers import ACCEPT_ENCODING, is_empty_value
from .patterns import nested_repetition
from .redact import is_secret_header

StatusCode = Annotated[int, Field(ge=100, le=599)]
NonNegative = Annotated[float, Field(ge=0)]
Positive = Annotated[float, Field(gt=0)]

ROLES = frozenset({"user", "assistant", "system", "tool", "developer", "all"})
FLAG_LETTERS = "imsx"
DEFAULT_PORT = 8765
MIN_SECRET_LENGTH = 16

# The spec's lists, de-overlapped: in the spec's own defaults the codes it lists
# twice resolve to fail (411-421) or retry (423-451) anyway, so the behaviour is
# the same and the defaults load without a warning.
DEFAULT_RETRY_CODES = [429, 502, 503, 504, 505, 507, 508, 511, 408, 409, 410]
DEFAULT_RETRY_CODES += [423, 424, 425, 426, 428, 431, 451]
DEFAULT_FAIL_CODES = [400, 401, 403, 405, 406, 407, 411, 412, 413, 414, 415, 416, 417, 418]
DEFAULT_FAIL_CODES += [421, 422]
DEFAULT_CONDITIONAL_CODES = [404]


class Section(BaseModel):
    """Base of every config section: strict about types, tolerant of unknown keys.

    Unknown keys are reported as warnings (with a did-you-mean) by the loader,
    so a typo never stops a proxy that otherwise works.
    """

    model_config = ConfigDict(extra="ignore", validate_default=True, frozen=True)


def check_flags(value: str) -> str:
    bad = sorted({c for c in value if c not in FLAG_LETTERS})
    if bad:
        raise ValueError(f"unknown flag letter(s) {', '.join(map(repr, bad))}; use only i, m, s, x")
    return value


def check_pattern(value: str) -> str:
    try:
        regex.compile(value, regex.V0)
    except regex.error as exc:
        raise ValueError(f"invalid regular expression: {exc}") from None
    return value


class PatternRule(Section):
    pattern: str
    description: str = ""

    _pattern_ok = field_validator("pattern")(check_pattern)


REGEX_FLAGS = {"i": regex.IGNORECASE, "m": regex.MULTILINE, "s": regex.DOTALL, "x": regex.VERBOSE}


def compile_flags(flags: str) -> int:
    """The ``regex`` flags for a rule's flag letters, in ``re``-compatible (V0) mode."""
    value = regex.V0
    for letter in flags:
        value |= REGEX_FLAGS[letter]
    return int(value)


def template_problem(pattern: str, flags: str, replacement: str) -> str | None:
    """Why ``replacement`` cannot be used with ``pattern`` (e.g. ``\\2`` with one group).

    ``re`` only notices a bad template at the first match, in the middle of a
    request; this finds it at load time. The pattern plus an empty alternative
    always matches and has the same groups, so expanding the template on that
    match checks every group reference and escape.
    """
    try:
        probe = regex.compile(pattern + "\n|", compile_flags(flags)).match("")
        if probe is not None:  # always, by construction
            probe.expand(replacement)
    except (regex.error, IndexError) as exc:
        return f"invalid replacement {replacement!r}: {exc}"
    return None


class RewriteRule(PatternRule):
    flags: str = ""
    replacement: str = ""

    _flags_ok = field_validator("flags")(check_flags)

    @field_validator("replacement")
    @classmethod
    def _template_ok(cls, value: str, info: ValidationInfo) -> str:
        pattern, flags = info.data.get("pattern"), info.data.get("flags")
        if pattern is not None and flags is not None:
            problem = template_problem(pattern, flags, value)
            if problem:
                raise ValueError(problem)
        return value


class MessageRule(RewriteRule):
    apply_to: str | list[str] = "all"

    @field_validator("apply_to")
    @classmethod
    def _roles_ok(cls, value: str | list[str]) -> str | list[str]:
        roles = [value] if isinstance(value, str) else value
        unknown = [r for r in roles if r not in ROLES]
        if unknown:
            raise ValueError(
                f"unknown role(s) {', '.join(map(repr, unknown))}; "
                f"use {', '.join(sorted(ROLES))} or a list of them"
            )
        return value

    @property
    def roles(self) -> frozenset[str]:
        return frozenset([self.apply_to] if isinstance(self.apply_to, str) else self.apply_to)


KeyStrategy = Literal["round_robin", "fill_first"]
StreamUpstream = Literal["auto", "always", "never"]
#: The headers a key can travel in; the pool replaces the client's key in all of them.
KEY_HEADERS = ("authorization", "x-api-key", "x-goog-api-key", "api-key")


class KeyPool(Section):
    """A pool of keys for one upstream (``keys``), each request using one of them."""

    keys: list[str] = Field(default_factory=list)
    #: Authorization: sent as "Bearer <key>"; any other header: the key as it is.
    key_header: str = "Authorization"
    key_strategy: KeyStrategy = "round_robin"


class TargetProxy(KeyPool):
    """The one upstream of a simple config, and the defaults of every ``upstreams`` entry."""

    url: str = ""
    headers: dict[str, str] = Field(default_factory=dict)
    timeout: Positive = 30
    connect_timeout: Positive = 10
    #: JSON requests sent upstream as streams and assembled: when a CDN cuts a slow reply
    #: (auto), always, or never.
    stream_upstream: StreamUpstream = "auto"
    max_reply_mb: Positive = 50


#: The name of the upstream that ``target_proxy`` alone stands for.
DEFAULT_UPSTREAM = "default"


class Upstream(KeyPool):
    """One entry of ``upstreams``: where to send, and which models it serves."""

    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][\w.-]*$")]
    url: Annotated[str, Field(min_length=1)]
    headers: dict[str, str] = Field(default_factory=dict)
    #: None: target_proxy's (filled in when the config is loaded).
    timeout: Positive | None = None
    connect_timeout: Positive | None = None
    #: Model names or globs (``claude-*``) it serves; None: every model.
    models: list[str] | None = None
    #: Our model name -> the name this upstream knows it by.
    model_map: dict[str, str] = Field(default_factory=dict)
    stream_upstream: StreamUpstream | None = None


FailoverOn = Literal[
    "connection_error",
    "timeout",
    "circuit_open",
    "retries_exhausted",
    "model_not_found",
    "empty_response",
    "fail_code",
    "hard_stop",
]


DEFAULT_FAILOVER_ON: tuple[FailoverOn, ...] = (
    "connection_error",
    "timeout",
    "circuit_open",
    "retries_exhausted",
    "model_not_found",
)


class Routing(Section):
    """How a request picks its upstream, and when it moves on to the next."""

    strategy: Literal["priority", "round_robin"] = "priority"
    failover_on: list[FailoverOn] = Field(default_factory=lambda: list(DEFAULT_FAILOVER_ON))
    #: Retryable failures on one upstream before moving to the next.
    retries_per_upstream: Annotated[int, Field(ge=0)] = 1


class RegexReplacement(Section):
    enabled: bool = True
    rules: list[MessageRule] = Field(default_factory=list)
    timeout_ms: Positive = 100


class ResponseProcessing(Section):
    enabled: bool = True
    rules: list[RewriteRule] = Field(default_factory=list)
    max_match_chars: Annotated[int, Field(ge=0)] = 64
    timeout_ms: Positive = 100


class RecategorizationRule(PatternRule):
    original_status: StatusCode | None = None
    new_status: StatusCode


class StatusRecategorization(Section):
    enabled: bool = True
    rules: list[RecategorizationRule] = Field(default_factory=list)
    timeout_ms: Positive = 100


class JsonExtraction(Section):
    enabled: bool = True
    paths: list[str] = Field(
        default_factory=lambda: ["error.message", "proxy_note", "choices[0].finish_reason"]
    )


class ParsingLogging(Section):
    enabled: bool = True
    log_recategorization: bool = True
    include_original_status: bool = True
    include_new_status: bool = True
    include_matched_pattern: bool = True


class DisguisedErrors(Section):
    """Errors that community proxies send as a reply's text (see ``dialects``)."""

    enabled: bool = True
    title_pattern: str = DEFAULT_TITLE_PATTERN

    _pattern_ok = field_validator("title_pattern")(check_pattern)


class ResponseParsing(Section):
    enabled: bool = True
    disguised_errors: DisguisedErrors = Field(default_factory=DisguisedErrors)
    status_recategorization: StatusRecategorization = Field(default_factory=StatusRecategorization)
    json_extraction: JsonExtraction = Field(default_factory=JsonExtraction)
    logging: ParsingLogging = Field(default_factory=ParsingLogging)


class HardStopRule(PatternRule):
    user_message: str = ""
    preserve_original_response: bool = True
    add_user_message: bool = True


class HardStopConditions(Section):
    enabled: bool = True
    rules: list[HardStopRule] = Field(default_factory=list)
    timeout_ms: Positive = 100


class EmptyResponse(Section):
    enabled: bool = True
    max_retries: Annotated[int, Field(ge=0)] = 3
    finish_reasons: list[str] = Field(
        default_factory=lambda: ["SAFETY", "RECITATION", "OTHER", "error"]
    )
    deliver_last: bool = False


class StreamResume(Section):
    """Finishing a stream that broke after its first content (see ``resume``)."""

    enabled: bool = False
    max_resumes: Annotated[int, Field(ge=1)] = 2
    #: A user message after the prefill, for upstreams that do not continue a prefill.
    continue_instruction: str = ""


class ErrorHandling(Section):
    retry_codes: list[StatusCode] = Field(default_factory=lambda: list(DEFAULT_RETRY_CODES))
    fail_codes: list[StatusCode] = Field(default_factory=lambda: list(DEFAULT_FAIL_CODES))
    conditional_retry_codes: list[StatusCode] = Field(
        default_factory=lambda: list(DEFAULT_CONDITIONAL_CODES)
    )
    max_retries: Annotated[int, Field(ge=0)] = 10
    base_delay: NonNegative = 1
    max_delay: NonNegative = 60
    conditional_retry_enabled: bool = True
    conditional_retry_max_attempts: Annotated[int, Field(ge=0)] = 2
    conditional_retry_delay_multiplier: NonNegative = 0.5
    max_total_seconds: Positive | None = 60
    quota_cooldown_seconds: Positive = 3600
    exhausted_429_status: StatusCode = 503
    stream_keepalive_seconds: Positive = 10
    stream_resume: StreamResume = Field(default_factory=StreamResume)
    hard_stop_conditions: HardStopConditions = Field(default_factory=HardStopConditions)
    empty_response: EmptyResponse = Field(default_factory=EmptyResponse)


class CircuitBreaker(Section):
    enabled: bool = True
    failure_threshold: Annotated[int, Field(ge=1)] = 5
    recovery_timeout: NonNegative = 30
    half_open_max_requests: Annotated[int, Field(ge=1)] = 1


def check_secret(value: str) -> str:
    """An admin token or client key: long enough that guessing it is hopeless.

    The value itself is never part of the message: it is a secret.
    """
    if len(value) < MIN_SECRET_LENGTH or any(c.isspace() for c in value):
        raise ValueError(
            f"must be at least {MIN_SECRET_LENGTH} characters without spaces (got "
            f'{len(value)}); make one with: python -c "import secrets; '
            'print(secrets.token_urlsafe())"'
        )
    return value


Secret = Annotated[str, AfterValidator(check_secret)]
OptionalSecret = Annotated[str, AfterValidator(lambda v: check_secret(v) if v else v)]


class Server(Section):
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = DEFAULT_PORT
    debug: bool = False
    cors_origins: list[str] = Field(default_factory=list)
    allowed_hosts: list[str] = Field(default_factory=list)
    max_body_mb: Positive = 50
    shutdown_grace_seconds: NonNegative = 30
    reload_on_change: bool = True
    uvloop: bool = True
    client_timeout: Positive = 30
    max_connections: Annotated[int, Field(ge=1)] = 2048
    #: Required on the admin endpoints (dashboard, /metrics, /logs); empty: generated
    #: at start-up when listening beyond loopback, not required on loopback.
    admin_token: OptionalSecret = ""
    #: Client keys the chat endpoints accept; empty: any client.
    api_keys: list[Secret] = Field(default_factory=list)


class Logging(Section):
    enabled: bool = True
    folder: str = "logs"
    include_request_data: bool = True
    include_response_data: bool = True
    include_headers: bool = True
    include_timing: bool = True
    max_files: Annotated[int, Field(ge=1)] = 1000
    max_age_days: Positive = 30


class ErrorLogging(Section):
    enabled: bool = True
    folder: str = "logs/errors"
    include_stack_traces: bool = True
    include_request_context: bool = True
    include_timing: bool = True
    max_file_size_mb: Positive = 10
    max_files: Annotated[int, Field(ge=1)] = 100


class Usage(Section):
    """Token and request totals per day, upstream, key and model (``usage``)."""

    enabled: bool = True
    #: A SQLite file; relative: to the config file's folder.
    database: Annotated[str, Field(min_length=1)] = "usage.sqlite3"
    #: Ask streaming upstreams for usage (``stream_options.include_usage``).
    track_streams: bool = False


class Config(Section):
    target_proxy: TargetProxy = Field(default_factory=TargetProxy)
    #: Filled from ``target_proxy`` (one entry, named "default") when the file has none.
    upstreams: list[Upstream] = Field(default_factory=list)
    routing: Routing = Field(default_factory=Routing)
    regex_replacement: RegexReplacement = Field(default_factory=RegexReplacement)
    response_processing: ResponseProcessing = Field(default_factory=ResponseProcessing)
    response_parsing: ResponseParsing = Field(default_factory=ResponseParsing)
    error_handling: ErrorHandling = Field(default_factory=ErrorHandling)
    circuit_breaker: CircuitBreaker = Field(default_factory=CircuitBreaker)
    server: Server = Field(default_factory=Server)
    logging: Logging = Field(default_factory=Logging)
    error_logging: ErrorLogging = Field(default_factory=ErrorLogging)
    usage: Usage = Field(default_factory=Usage)


class ConfigError(Exception):
    """The config cannot be used. ``problems`` holds one line per problem."""

    def __init__(
        self, problems: list[str], source: str = "config", warnings: list[str] | None = None
    ) -> None:
        self.problems = problems
        self.warnings = warnings or []
        self.source = source
        super().__init__(f"{source}: " + "; ".join(problems))


@dataclass(frozen=True)
class LoadedConfig:
    """A validated config, where it came from, and what was odd about it.

    ``path`` is None when no config file was found; ``searched`` then lists the
    places looked. ``empty``: the file holds no settings (blank or only comments).
    """

    config: Config
    path: Path | None = None
    warnings: list[str] = field(default_factory=list)
    searched: tuple[Path, ...] = ()
    empty: bool = False

    @property
    def demo(self) -> bool:
        """No upstream configured: the proxy answers with its built-in demo upstream."""
        return not self.config.upstreams


def load_config(
    path: Path | None = None, env: Mapping[str, str] | None = None, *, required: bool = False
) -> LoadedConfig:
    """Load and validate the config at ``path``, else the first one found (see
    :func:`config_file.find_config`).

    No file anywhere is demo mode unless ``required``; a named file that is
    missing, and everything else that is wrong, raises :class:`ConfigError`
    listing every problem.
    """
    env = os.environ if env is None else env
    lookup = find_config(path, env)
    path = lookup.path
    if path is None or not path.exists():
        if required or path is not None:
            where = path or Path(FILE_NAME)
            raise ConfigError(
                [f"no such file; write a starter config there with: {INIT_COMMAND} {where}"],
                str(where),
            )
        loaded = parse_config({}, base_dir=Path.cwd(), env=env)
        return replace(loaded, searched=lookup.searched)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"cannot read the file: {exc}"], str(path)) from None
    try:
        data = safe_yaml.load(text)
    except yaml.YAMLError as exc:
        raise ConfigError([f"not valid YAML: {_yaml_problem(exc)}"], str(path)) from None
    except safe_yaml.TooNested as exc:
        raise ConfigError([str(exc)], str(path)) from None
    empty = data is None
    if empty:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(["the top level must be a mapping of sections"], str(path))
    loaded = parse_config(data, base_dir=path.resolve().parent, env=env, source=str(path))
    warnings = loaded.warnings
    if empty:
        warnings = [f"{path} is empty: built-in defaults apply", *warnings]
    return replace(loaded, path=path, empty=empty or not data, warnings=warnings)


def parse_config(
    data: dict[str, Any],
    *,
    base_dir: Path,
    env: Mapping[str, str] | None = None,
    source: str = "config",
) -> LoadedConfig:
    """Validate a config mapping; apply ``${VAR}`` expansion and ``FHP_*`` overrides."""
    env = os.environ if env is None else env
    problems: list[str] = []
    data = _expand_env(data, env, "", problems)
    _apply_env_overrides(data, env, problems)
    warnings = list(_unknown_keys(Config, data, ""))
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        problems += [_format_error(err) for err in exc.errors()]
    else:
        problems += _upstream_problems(config)
    if problems:
        raise ConfigError(problems, source, warnings)
    config = _resolve_upstreams(_resolve_folders(config, base_dir))
    warnings += _semantic_warnings(config)
    return LoadedConfig(config, None, warnings)


def _upstream_problems(config: Config) -> list[str]:
    problems = []
    if config.upstreams and (config.target_proxy.url or config.target_proxy.keys):
        problems.append(
            "target_proxy.url: both target_proxy.url and upstreams are set; use one. Move "
            "target_proxy.url (and its headers and keys) into upstreams as an entry, or remove "
            "upstreams (target_proxy's timeouts may stay: they are the entries' defaults)"
        )
    pools: list[tuple[str, TargetProxy | Upstream]] = [("target_proxy", config.target_proxy)]
    pools += [(f"upstreams[{i}]", entry) for i, entry in enumerate(config.upstreams)]
    for where, pool in pools:
        if not pool.keys:
            continue
        named = {pool.key_header.lower(), *KEY_HEADERS}
        clash = [h for h, v in pool.headers.items() if h.lower() in named and not is_empty_value(v)]
        if clash:
            problems.append(
                f"{where}.keys: a key pool and a key in {where}.headers ({clash[0]}) are both "
                f"set; each request uses one key of the pool, sent in {pool.key_header}: remove "
                f"{clash[0]} from headers, or remove keys"
            )
    return problems


def _resolve_upstreams(config: Config) -> Config:
    """Every upstream as one list: ``target_proxy`` alone is a list of one, named "default";
    an entry's missing timeouts come from ``target_proxy``."""
    target = config.target_proxy
    entries = config.upstreams
    if not entries and target.url:
        entries = [
            Upstream(
                name=DEFAULT_UPSTREAM,
                url=target.url,
                headers=dict(target.headers),
                keys=list(target.keys),
                key_header=target.key_header,
                key_strategy=target.key_strategy,
            )
        ]
    resolved = [
        entry.model_copy(
            update={
                "timeout": entry.timeout or target.timeout,
                "connect_timeout": entry.connect_timeout or target.connect_timeout,
                "stream_upstream": entry.stream_upstream or target.stream_upstream,
                "keys": [key.strip() for key in entry.keys if key.strip()],
            }
        )
        for entry in entries
    ]
    return config.model_copy(update={"upstreams": resolved})


def _yaml_problem(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    if mark is not None:
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    return str(problem)


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-(.*?))?\}")


def _expand_env(value: Any, env: Mapping[str, str], path: str, problems: list[str]) -> Any:
    if isinstance(value, str) and "${" in value:

        def sub(match: re.Match[str]) -> str:
            # Shell semantics: ${VAR:-default} also replaces an empty VAR; ${VAR}
            # only needs VAR to be set.
            name, default = match.group(1), match.group(2)
            value = env.get(name)
            if default is not None:
                return value or default
            if value is not None:
                return value
            problems.append(
                f"{path or '<root>'}: environment variable {name} is not set "
                f"(set it, or write ${{{name}:-fallback}} for a default)"
            )
            return ""

        return _ENV_REF.sub(sub, value)
    if isinstance(value, dict):
        return {k: _expand_env(v, env, _join(path, str(k)), problems) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v, env, f"{path}[{i}]", problems) for i, v in enumerate(value)]
    return value


def _apply_env_overrides(data: dict[str, Any], env: Mapping[str, str], problems: list[str]) -> None:
    def section(name: str) -> dict[str, Any]:
        current = data.get(name)
        if not isinstance(current, dict):
            current = {}
            data[name] = current
        return current

    # With an upstreams list, the overrides apply to its first entry.
    listed = data.get("upstreams")
    first = (
        listed[0] if isinstance(listed, list) and listed and isinstance(listed[0], dict) else None
    )
    if env.get("FHP_TARGET_URL"):
        (first if first is not None else section("target_proxy"))["url"] = env["FHP_TARGET_URL"]
    if env.get("FHP_TARGET_API_KEY"):
        target = first if first is not None else section("target_proxy")
        headers = target.get("headers")
        headers = dict(headers) if isinstance(headers, dict) else {}
        for name in [h for h in headers if str(h).lower() == "authorization"]:
            del headers[name]
        headers["Authorization"] = f"Bearer {env['FHP_TARGET_API_KEY']}"
        target["headers"] = headers
    if env.get("FHP_ADMIN_TOKEN"):
        section("server")["admin_token"] = env["FHP_ADMIN_TOKEN"]
    if env.get("FHP_HOST"):
        section("server")["host"] = env["FHP_HOST"]
    if env.get("FHP_PORT"):
        try:
            section("server")["port"] = int(env["FHP_PORT"])
        except ValueError:
            problems.append(f"FHP_PORT: {env['FHP_PORT']!r} is not a port number (use 1-65535)")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _format_error(err: Any) -> str:
    path = ""
    for part in err["loc"]:
        path = f"{path}[{part}]" if isinstance(part, int) else _join(path, str(part))
    message = str(err["msg"])
    message = message.removeprefix("Value error, ")
    if err["type"] == "missing":
        message = "required key is missing"
    elif "input" in err and err["type"] not in ("value_error",):
        message = f"{message} (got {err['input']!r})"
    return f"{path}: {message}"


def _model_of(annotation: Any) -> type[Section] | None:
    """The Section class inside ``annotation`` (directly, or as a list item)."""
    if isinstance(annotation, type) and issubclass(annotation, Section):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_of(arg)
        if found is not None:
            return found
    return None


def _unknown_keys(model: type[Section], data: Any, path: str) -> list[str]:
    if not isinstance(data, dict):
        return []
    warnings: list[str] = []
    fields = model.model_fields
    for key, value in data.items():
        key_path = _join(path, str(key))
        if key not in fields:
            import difflib  # only for a config with an unknown key

            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            warnings.append(f"{key_path}: unknown key, ignored{hint}")
            continue
        if model in (TargetProxy, Upstream) and key in ("headers", "model_map", "keys"):
            continue
        sub = _model_of(fields[key].annotation)
        if sub is None:
            continue
        if isinstance(value, list):
            for i, item in enumerate(value):
                warnings += _unknown_keys(sub, item, f"{key_path}[{i}]")
        else:
            warnings += _unknown_keys(sub, value, key_path)
    return warnings


def _resolve_folders(config: Config, base_dir: Path) -> Config:
    def resolve(folder: str) -> str:
        p = Path(folder).expanduser()
        return str(p if p.is_absolute() else (base_dir / p))

    return config.model_copy(
        update={
            "logging": config.logging.model_copy(update={"folder": resolve(config.logging.folder)}),
            "error_logging": config.error_logging.model_copy(
                update={"folder": resolve(config.error_logging.folder)}
            ),
            "usage": config.usage.model_copy(update={"database": resolve(config.usage.database)}),
        }
    )


LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


def is_local_host(host: str) -> bool:
    """An address only this machine can reach."""
    if host in LOCAL_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def serves(patterns: list[str] | None, model: str) -> bool:
    """Whether an upstream with these ``models`` (names or globs; None: all) serves ``model``."""
    if patterns is None:
        return True
    return any(fnmatch.fnmatchcase(model, pattern) for pattern in patterns)


def _upstream_warnings(upstreams: list[Upstream]) -> list[str]:
    warnings: list[str] = []
    seen: dict[str, int] = {}
    for i, entry in enumerate(upstreams):
        if entry.name in seen:
            warnings.append(
                f"upstreams[{i}].name: {entry.name!r} is also the name of upstreams"
                f"[{seen[entry.name]}]; give each upstream its own name, or logs and health "
                "cannot tell them apart"
            )
        seen.setdefault(entry.name, i)
        for model in entry.model_map:
            if not serves(entry.models, model):
                warnings.append(
                    f"upstreams[{i}].model_map: {model!r} is mapped but not in this "
                    "upstream's models, so no request for it is sent here"
                )
    named = {m for e in upstreams for m in e.models or () if not _is_glob(m)}
    for model in sorted(named | {m for e in upstreams for m in e.model_map}):
        if not any(serves(e.models, model) for e in upstreams):
            warnings.append(f"upstreams: no upstream serves the model {model!r}")
    return warnings


def _is_glob(name: str) -> bool:
    return any(c in name for c in "*?[")


def _semantic_warnings(config: Config) -> list[str]:
    warnings: list[str] = []
    eh = config.error_handling
    lists: list[tuple[str, list[int]]] = [
        ("fail_codes", eh.fail_codes),
        ("retry_codes", eh.retry_codes),
        ("conditional_retry_codes", eh.conditional_retry_codes),
    ]
    seen: dict[int, str] = {}
    overlaps: dict[tuple[str, str], list[int]] = {}
    for name, codes in lists:
        for code in codes:
            if code in seen and seen[code] != name:
                overlaps.setdefault((seen[code], name), []).append(code)
            else:
                seen.setdefault(code, name)
    for (winner, loser), codes in overlaps.items():
        listed = ", ".join(str(c) for c in sorted(set(codes)))
        warnings.append(
            f"error_handling.{loser}: {listed} also in {winner}; {winner} wins "
            "(precedence: fail_codes, then retry_codes, then conditional_retry_codes)"
        )
    configured = (  # target_proxy alone stands for upstreams[0] (see _resolve_upstreams)
        [("target_proxy", config.target_proxy.headers)]
        if config.target_proxy.url
        else [(f"upstreams[{i}]", u.headers) for i, u in enumerate(config.upstreams)]
    )
    for where, headers in configured:
        if any(name.lower() == "accept-encoding" for name in headers):
            warnings.append(
                f"{where}.headers.Accept-Encoding: ignored; the proxy asks the upstream "
                f"only for the encodings it can decode ({ACCEPT_ENCODING})"
            )
    if (
        not is_local_host(config.server.host)
        and not config.server.api_keys
        and any(
            is_secret_header(h) and not is_empty_value(v)
            for headers in [config.target_proxy.headers, *(u.headers for u in config.upstreams)]
            for h, v in headers.items()
        )
    ):
        warnings.append(
            f"server.host: listening on {config.server.host} exposes the key in "
            "target_proxy.headers to anyone on the network who can reach this port; "
            "use 127.0.0.1 unless other machines must connect, and then set "
            "server.api_keys so only your clients can use it"
        )
    warnings += _upstream_warnings(config.upstreams)
    if "*" in config.server.cors_origins:
        warnings.append(
            "server.cors_origins: '*' lets every web page open in your browser send chats "
            "through the proxy (spending your key); list only the origins that need it, "
            "or leave it empty: SillyTavern does not need CORS"
        )
    for section, rules in (
        ("regex_replacement", config.regex_replacement.rules),
        ("response_processing", config.response_processing.rules),
    ):
        for i, rule in enumerate(rules):
            if regex.compile(rule.pattern, compile_flags(rule.flags)).match("") is not None:
                warnings.append(
                    f"{section}.rules[{i}].pattern: {rule.pattern!r} matches the empty string, "
                    "so it rewrites between every character of every text; escape special "
                    "characters (e.g. '\\\\|' for a literal pipe)"
                )
    budget = eh.max_total_seconds
    if budget is not None and budget <= config.target_proxy.timeout:
        warnings.append(
            f"error_handling.max_total_seconds: {budget:g} s is not more than "
            f"target_proxy.timeout ({config.target_proxy.timeout:g} s): an upstream that hangs "
            "uses the whole time budget in one attempt and is never retried; raise "
            "max_total_seconds or lower target_proxy.timeout"
        )
    if budget is not None and eh.max_retries and eh.base_delay >= budget:
        warnings.append(
            f"error_handling.base_delay: {eh.base_delay:g} s leaves no retry room within "
            f"max_total_seconds ({budget:g} s): every request fails after one attempt"
        )
    if eh.exhausted_429_status == 429:
        warnings.append(
            "error_handling.exhausted_429_status: 429 makes SillyTavern retry a request the "
            "proxy already gave up on 5 more times by itself (about 155 s); 503 ends it"
        )
    warnings += _runaway_warnings(config)
    if eh.base_delay > eh.max_delay:
        warnings.append(
            f"error_handling.base_delay: {eh.base_delay} is above max_delay "
            f"({eh.max_delay}); every retry waits max_delay"
        )
    return warnings


def _runaway_warnings(config: Config) -> list[str]:
    """Patterns that can take exponential time on a text that almost matches."""
    eh, rp = config.error_handling, config.response_parsing
    sections: list[tuple[str, list[PatternRule]]] = [
        ("regex_replacement", list(config.regex_replacement.rules)),
        ("response_processing", list(config.response_processing.rules)),
        ("error_handling.hard_stop_conditions", list(eh.hard_stop_conditions.rules)),
        ("response_parsing.status_recategorization", list(rp.status_recategorization.rules)),
    ]
    warnings: list[str] = []
    for section, rules in sections:
        for i, rule in enumerate(rules):
            if nested_repetition(rule.pattern, getattr(rule, "flags", "")):
                warnings.append(
                    f"{section}.rules[{i}].pattern: {rule.pattern!r} repeats a group that itself "
                    "repeats or has alternatives, which can take exponential time on a text that "
                    f"almost matches; it runs under {section}.timeout_ms and is skipped for a "
                    "text when that runs out. Write it without the nesting (e.g. 'x+' rather "
                    "than '(x|xx)+')"
                )
    return warnings
