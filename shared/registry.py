"""The model registry: versioned snapshots, aliases and their history, all stored in Redis.

Weights and manifests live in Redis beside the index, so trainer and inference containers share
nothing but the Redis URL. Every change that readers could observe half-done is one Lua script:

- publishing checks the job's lease (the fence), deduplicates by publication key, assigns the
  next version, writes weights and manifest, indexes the version, announces it on the
  model-events stream and prunes old versions, all at once; a reader that finds a version in the
  index always finds its weights and manifest.
- promote and rollback move an alias, append to the model's alias history and announce the
  move, all at once.

Aliases move only when someone asks. Rollback undoes the most recent move that has not been
undone yet, so rolling back twice after two promotions returns to where the alias started.
Retention keeps the last K versions plus every version an alias points to or would roll back
to; a retained version is never deleted while still in the index.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

import redis

from shared import defaults, keys
from shared.mlp import MLP
from shared.snapshot import (
    Snapshot,
    SnapshotError,
    check_name,
    decode_snapshot,
    encode_snapshot,
    manifest_json,
    parse_manifest,
)


# The exception names were agreed in the interface contract, hence no "Error" suffix.
class PublishFenced(RuntimeError):  # noqa: N818
    """The fence token no longer matches (the job's lease passed to another worker): nothing was
    published."""


class UnknownModel(LookupError):  # noqa: N818
    """No model of that name was ever published."""


class UnknownVersion(LookupError):  # noqa: N818
    """The model exists but the version, alias or rollback target asked for does not."""


# The Lua scripts build per-version key names from templates made by shared.keys, with this mark
# standing for the version; model names cannot contain braces, so it can occur nowhere else.
_VERSION_MARK: Any = "{version}"
_DIGITS = re.compile(r"[0-9]+")

# Replays a model's alias history: for each alias, the stack of targets that rollbacks pop.
_ALIAS_STACKS_LUA = """
local function alias_stacks(history_key)
  local stacks = {}
  for _, entry in ipairs(redis.call("XRANGE", history_key, "-", "+")) do
    local f = {}
    for i = 1, #entry[2], 2 do f[entry[2][i]] = entry[2][i + 1] end
    local stack = stacks[f.alias] or {}
    stacks[f.alias] = stack
    if f.action == "promote" then
      table.insert(stack, f.to)
    elseif f.action == "rollback" then
      table.remove(stack)
    end
  end
  return stacks
end
"""

# KEYS: 1 next-version counter, 2 version index, 3 model names, 4 publications, 5 model events,
#       6 aliases, 7 alias history, 8 fence key (present only when fenced)
# ARGV: 1 model, 2 weights key template, 3 manifest key template, 4 version mark, 5 weights,
#       6 manifest JSON object without "version", 7 publication or "", 8 fence token,
#       9 events maxlen, 10 versions to retain
_PUBLISH_LUA = (
    _ALIAS_STACKS_LUA
    + """
local function key_for(template, version)
  local at = string.find(template, ARGV[4], 1, true)
  return string.sub(template, 1, at - 1) .. version .. string.sub(template, at + #ARGV[4])
end
if #KEYS >= 8 and redis.call("GET", KEYS[8]) ~= ARGV[8] then
  return {"fenced"}
end
if ARGV[7] ~= "" then
  local existing = redis.call("HGET", KEYS[4], ARGV[7])
  if existing then return {"existing", tonumber(existing)} end
end
local version = redis.call("INCR", KEYS[1])
local v = string.format("%d", version)
redis.call("SET", key_for(ARGV[2], v), ARGV[5])
redis.call("SET", key_for(ARGV[3], v), '{"version":' .. v .. "," .. string.sub(ARGV[6], 2))
redis.call("ZADD", KEYS[2], version, v)
redis.call("SADD", KEYS[3], ARGV[1])
if ARGV[7] ~= "" then redis.call("HSET", KEYS[4], ARGV[7], v) end
redis.call("XADD", KEYS[5], "MAXLEN", "~", ARGV[9], "*",
           "event", "published", "model", ARGV[1], "version", v)
local keep = {}
for _, target in ipairs(redis.call("HVALS", KEYS[6])) do keep[target] = true end
for _, stack in pairs(alias_stacks(KEYS[7])) do
  if #stack >= 2 then keep[stack[#stack - 1]] = true end
end
local pruned = {}
for _, old in ipairs(redis.call("ZRANGE", KEYS[2], 0, -tonumber(ARGV[10]) - 1)) do
  if not keep[old] then
    redis.call("ZREM", KEYS[2], old)  -- out of the index before its data goes
    redis.call("DEL", key_for(ARGV[2], old), key_for(ARGV[3], old))
    table.insert(pruned, tonumber(old))
  end
end
return {"published", version, pruned}
"""
)

# KEYS: 1 version index, 2 aliases, 3 alias history, 4 model events
# ARGV: 1 "promote" or "rollback", 2 model, 3 alias, 4 version (promote only), 5 reason,
#       6 time, 7 events maxlen
_MOVE_ALIAS_LUA = (
    _ALIAS_STACKS_LUA
    + """
local alias = ARGV[3]
local current = redis.call("HGET", KEYS[2], alias)
local target = ARGV[4]
if ARGV[1] == "rollback" then
  if not current then return {"no-alias"} end
  local stack = alias_stacks(KEYS[3])[alias] or {}
  if #stack < 2 then return {"nothing-to-undo", current} end
  target = stack[#stack - 1]
elseif current == target then
  return {"unchanged", current}
end
if not redis.call("ZSCORE", KEYS[1], target) then return {"missing", target} end
redis.call("HSET", KEYS[2], alias, target)
redis.call("XADD", KEYS[3], "*", "action", ARGV[1], "alias", alias, "from", current or "",
           "to", target, "reason", ARGV[5], "at", ARGV[6])
redis.call("XADD", KEYS[4], "MAXLEN", "~", ARGV[7], "*",
           "event", "alias", "model", ARGV[2], "alias", alias, "version", target)
return {"moved", target, current or ""}
"""
)


class Registry:
    """Published model versions, their aliases and the stream announcing both."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        retention: int = defaults.RETENTION_VERSIONS,
        events_maxlen: int = defaults.MODEL_EVENTS_MAXLEN,
    ) -> None:
        if retention < 1:
            raise ValueError(f"retention must keep at least one version, got {retention}")
        self.client = _binary_client(client)
        self.retention = retention
        self.events_maxlen = events_maxlen
        self._publish = self.client.register_script(_PUBLISH_LUA)
        self._move_alias = self.client.register_script(_MOVE_ALIAS_LUA)

    # --- publishing -------------------------------------------------------------------------

    def publish_snapshot(
        self,
        model: MLP,
        manifest: dict,
        *,
        publication: str | None = None,
        fence: tuple[str, str] | None = None,
    ) -> int:
        """Publish ``model`` described by ``manifest`` as the model's next version."""
        weights, completed = encode_snapshot(model, manifest)
        return self.publish_encoded(weights, completed, publication=publication, fence=fence)

    def publish_encoded(
        self,
        weights: bytes,
        manifest: dict,
        *,
        publication: str | None = None,
        fence: tuple[str, str] | None = None,
    ) -> int:
        """Publish already-encoded weights and manifest as is, without verifying them."""
        name = check_name(manifest.get("model_name"))
        if len(weights) > defaults.MAX_SNAPSHOT_BYTES:
            raise SnapshotError(
                f"weights are {len(weights)} bytes, over the {defaults.MAX_SNAPSHOT_BYTES}-byte "
                "limit"
            )
        body = manifest_json({k: v for k, v in manifest.items() if k != "version"})
        if body == "{}":
            raise SnapshotError("manifest is empty")
        if publication is not None and not (isinstance(publication, str) and publication):
            raise ValueError(f"publication must be a non-empty string, got {publication!r}")
        script_keys = [
            keys.model_next_version(name),
            keys.model_versions(name),
            keys.MODELS,
            keys.model_publications(name),
            keys.MODEL_EVENTS,
            keys.model_aliases(name),
            keys.alias_history(name),
        ]
        token = ""
        if fence is not None:
            fence_key, token = fence
            if not token:
                raise ValueError("a fence needs a non-empty token")
            script_keys.append(fence_key)
        result = self._publish(
            keys=script_keys,
            args=[
                name,
                keys.snapshot_weights(name, _VERSION_MARK),
                keys.snapshot_manifest(name, _VERSION_MARK),
                _VERSION_MARK,
                weights,
                body,
                publication or "",
                token,
                self.events_maxlen,
                self.retention,
            ],
        )
        if result[0] == b"fenced":
            assert fence is not None
            raise PublishFenced(
                f"{fence[0]} no longer holds this worker's token; {name} was not published"
            )
        return int(result[1])

    # --- reading ----------------------------------------------------------------------------

    def models(self) -> list[str]:
        """Names of every published model, sorted."""
        members: Any = self.client.smembers(keys.MODELS)  # redis-py's stubs: see _binary_client
        return sorted(m.decode() for m in members)

    def versions(self, name: str) -> list[int]:
        """The model's retained versions, oldest first (empty for an unknown model)."""
        found: Any = self.client.zrange(keys.model_versions(check_name(name)), 0, -1)
        return [int(v) for v in found]

    def latest_version(self, name: str) -> int | None:
        """The model's highest version, or None if it has none."""
        newest: Any = self.client.zrange(keys.model_versions(check_name(name)), -1, -1)
        return int(newest[0]) if newest else None

    def manifest(self, name: str, version: int | str | None) -> dict:
        """The stored manifest of a version (or alias, or "latest")."""
        version = self.resolve(name, version)
        data = self.client.get(keys.snapshot_manifest(name, version))
        if data is None:
            raise self._missing(name, version)
        return parse_manifest(data)

    def load(self, name: str, version: int | str | None) -> Snapshot:
        """The verified snapshot of a version (or alias, or "latest")."""
        version = self.resolve(name, version)
        with self.client.pipeline(transaction=True) as pipe:
            pipe.get(keys.snapshot_manifest(name, version))
            pipe.get(keys.snapshot_weights(name, version))
            manifest_data, weights = pipe.execute()
        if manifest_data is None or weights is None:
            raise self._missing(name, version)  # pruned since it was resolved
        snapshot = decode_snapshot(weights, parse_manifest(manifest_data))
        if (snapshot.name, snapshot.version) != (name, version):
            raise SnapshotError(
                f"{name} v{version} holds a manifest for {snapshot.name} v{snapshot.version}"
            )
        return snapshot

    def resolve(self, name: str, ref: str | int | None) -> int:
        """The version meant by ``ref``: None or "latest", a version number, or an alias."""
        check_name(name)
        if ref is None or ref == "latest":
            latest = self.latest_version(name)
            if latest is None:
                raise self._missing(name, None)
            return latest
        if (isinstance(ref, int) and not isinstance(ref, bool)) or (
            isinstance(ref, str) and _DIGITS.fullmatch(ref)
        ):
            version = int(ref)
            if self.client.zscore(keys.model_versions(name), str(version)) is None:
                raise self._missing(name, version)
            return version
        alias = check_name(ref, "alias or version")
        target = self.client.hget(keys.model_aliases(name), alias)
        if target is None:
            self._check_model_exists(name)
            raise UnknownVersion(f"model {name!r} has no alias {alias!r}")
        return int(target)

    # --- aliases ----------------------------------------------------------------------------

    def aliases(self, name: str) -> dict[str, int]:
        """Each alias of the model and the version it points to."""
        found: Any = self.client.hgetall(keys.model_aliases(check_name(name)))
        return {alias.decode(): int(version) for alias, version in sorted(found.items())}

    def promote(self, name: str, alias: str, version: int | str, *, reason: str = "") -> None:
        """Point ``alias`` at ``version`` (a number, "latest" or another alias)."""
        target = self.resolve(name, version)
        check_alias(alias)
        if self._run_move("promote", name, alias, target, reason)[0] == "missing":
            raise self._missing(name, target)  # pruned since it was resolved

    def rollback(self, name: str, alias: str, *, reason: str = "") -> int:
        """Move ``alias`` back to the target it had before its latest move; returns that version."""
        check_name(name)
        check_alias(alias)
        status, *rest = self._run_move("rollback", name, alias, None, reason)
        if status == "no-alias":
            self._check_model_exists(name)
            raise UnknownVersion(f"model {name!r} has no alias {alias!r}")
        if status == "nothing-to-undo":
            raise UnknownVersion(
                f"alias {alias!r} of {name!r} has no earlier target to roll back to "
                f"(it points to v{rest[0]})"
            )
        if status == "missing":
            raise UnknownVersion(
                f"cannot roll {alias!r} of {name!r} back: its earlier target v{rest[0]} was pruned"
            )
        return int(rest[0])

    def alias_history(self, name: str) -> list[dict]:
        """Every alias move of the model, oldest first."""
        history = []
        entries: Any = self.client.xrange(keys.alias_history(check_name(name)))
        for entry_id, fields in entries:
            entry = {k.decode(): v.decode() for k, v in fields.items()}
            history.append(
                {
                    "id": entry_id.decode(),
                    "action": entry["action"],
                    "alias": entry["alias"],
                    "from": int(entry["from"]) if entry["from"] else None,
                    "to": int(entry["to"]),
                    "reason": entry["reason"],
                    "at": entry["at"],
                }
            )
        return history

    # --- events -----------------------------------------------------------------------------

    def read_events(
        self, last_id: str = "$", block_ms: int | None = None, count: int = 100
    ) -> list[tuple[str, dict]]:
        """Model events after ``last_id``, waiting up to ``block_ms`` for one if given."""
        answer: Any = self.client.xread({keys.MODEL_EVENTS: last_id}, count=count, block=block_ms)
        events = []
        for _stream, entries in answer or []:
            for entry_id, fields in entries:
                event: dict[str, Any] = {k.decode(): v.decode() for k, v in fields.items()}
                event["version"] = int(event["version"])
                events.append((entry_id.decode(), event))
        return events

    def last_event_id(self) -> str:
        """The id of the newest model event, or "0-0"; read events after it to see only new ones."""
        newest: Any = self.client.xrevrange(keys.MODEL_EVENTS, count=1)
        return newest[0][0].decode() if newest else "0-0"

    # --- internals --------------------------------------------------------------------------

    def _run_move(
        self, action: str, name: str, alias: str, version: int | None, reason: str
    ) -> list[str]:
        result = self._move_alias(
            keys=[
                keys.model_versions(name),
                keys.model_aliases(name),
                keys.alias_history(name),
                keys.MODEL_EVENTS,
            ],
            args=[
                action,
                name,
                alias,
                "" if version is None else str(version),
                reason,
                datetime.now(UTC).isoformat(timespec="milliseconds"),
                self.events_maxlen,
            ],
        )
        return [item.decode() if isinstance(item, bytes) else str(item) for item in result]

    def _check_model_exists(self, name: str) -> None:
        if not self.client.sismember(keys.MODELS, name):
            raise UnknownModel(f"no model named {name!r}")

    def _missing(self, name: str, version: int | None) -> LookupError:
        """The error for a version that is not there: the model's or the version's absence."""
        self._check_model_exists(name)
        if version is None:
            return UnknownVersion(f"model {name!r} has no versions")
        return UnknownVersion(f"model {name!r} has no version {version}")


def check_alias(alias: object) -> str:
    """Return ``alias`` if it can name an alias: a valid name that is not a number or "latest"."""
    check_name(alias, "alias")
    assert isinstance(alias, str)
    if _DIGITS.fullmatch(alias) or alias == "latest":
        raise ValueError(f"alias {alias!r} would be read as a version; choose another name")
    return alias


def _binary_client(client: redis.Redis) -> redis.Redis:
    """``client`` itself, or a sibling without decode_responses: weights are raw bytes.

    Every reply is therefore bytes; redis-py's stubs cannot know that (they type replies as
    str-or-bytes, sync-or-async), so replies are annotated ``Any`` where they are unpacked.
    """
    pool = client.connection_pool
    if not pool.connection_kwargs.get("decode_responses"):
        return client
    kwargs = {**pool.connection_kwargs, "decode_responses": False}
    return redis.Redis(connection_pool=redis.ConnectionPool(pool.connection_class, **kwargs))
