"""The Redis session store (`--session-store redis://HOST:PORT/DB`): serving/store.py's Backend
over a Redis server that replicas share.

Keys, all under `nlstm:`:

    session:ID     the session's record (serving/durable.py), expiring after the idle timeout,
                   which every write renews
    lease:ID       the token of the call holding the session, expiring after lease_ttl
    owner:CLIENT   a sorted set of the ids of CLIENT's sessions, each scored by its expiry in
                   milliseconds of Redis's clock: the per-client session count that
                   --max-sessions-per-client bounds across replicas (below)

The per-client count must stay right whatever ends a session: CloseSession removes its id; an
expiry by Redis's own key expiry removes nothing, but the id's score is that same expiry (set
by the script that writes the session, from Redis's clock, in the same step), so the count
drops expired ids first (ZREMRANGEBYSCORE up to now) and then counts; a replica that dies holds
nothing the count depends on. Creating a session is one Lua script (drop the expired ids, count,
refuse at the bound or write the session and add its id), so two replicas creating at once
cannot both take the last slot. Every write of a session (its commits) moves its score to the
new expiry, and the set itself expires no earlier than its last member, so a client that
leaves leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import time
from urllib.parse import urlsplit, urlunsplit

from serving.store import GONE, Backend, StoreUnavailable, valid_id

# Now in milliseconds of Redis's clock (the one its key expiry runs on; one clock for every
# replica). Scripts may write after reading TIME: Redis 5 and later replicate their effects.
_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""
# KEYS[1] session, KEYS[2] its client's set; ARGV data, ttl ms, limit (0: none), session id.
# Drop the ids whose sessions expired, count, and at the limit write nothing; else write the
# session, add its id scored by its expiry, and keep the set at least as long.
_CREATE = (
    _NOW
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
if tonumber(ARGV[3]) > 0 and redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[3]) then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('ZADD', KEYS[2], string.format('%.0f', now + tonumber(ARGV[2])), ARGV[4])
if redis.call('PTTL', KEYS[2]) < tonumber(ARGV[2]) then redis.call('PEXPIRE', KEYS[2], ARGV[2]) end
return 1
"""
)
# KEYS[1] a client's set: how many of its sessions have not expired
_HELD = (
    _NOW
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return redis.call('ZCARD', KEYS[1])
"""
)
# KEYS[1] lease, KEYS[2] session, KEYS[3] its client's set; ARGV owner, lease ms (0: release),
# data ('' : keep the stored bytes), ttl ms, session id. Atomic on the server: nobody can take
# the lease or close the session between the check and the write. (A record is never empty, so
# '' is free to mean "no data".) The session's id in its client's set moves to the new expiry
# (XX: an id the set holds; a session written before owners were recorded is in none).
_COMMIT = (
    """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[3] == '' then
    if redis.call('PEXPIRE', KEYS[2], ARGV[4]) == 0 then return -1 end
else
    if redis.call('EXISTS', KEYS[2]) == 0 then return -1 end
    redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[4])
end
if ARGV[2] == '0' then redis.call('DEL', KEYS[1]) else redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
"""
    + _NOW
    + """
redis.call('ZADD', KEYS[3], 'XX', string.format('%.0f', now + tonumber(ARGV[4])), ARGV[5])
if redis.call('PTTL', KEYS[3]) < tonumber(ARGV[4]) then redis.call('PEXPIRE', KEYS[3], ARGV[4]) end
return 1
"""
)
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def _masked(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


class RedisBackend(Backend):
    """Sessions in Redis, under the keys of the module's docstring.

    The client times out after `timeout` seconds and retries a failed command once, on a new
    connection (a pooled connection is broken after Redis restarts): so a Redis that is down
    costs a call at most about 2 x timeout, and the first command after Redis is back
    reconnects by itself, with no restart of the server. After a failure, commands fail at once
    for `backoff` seconds without trying: a Redis that does not answer (a host that drops
    packets) must not hold every call, or a drain's writes, for 2 x timeout each."""

    PREFIX = "nlstm:"

    def __init__(self, url: str, timeout: float = 1.0, backoff: float = 0.5) -> None:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self.url = _masked(url)
        self._errors = (
            redis.exceptions.ConnectionError,
            redis.exceptions.TimeoutError,
            redis.exceptions.BusyLoadingError,
        )
        self._redis_error = redis.exceptions.RedisError
        try:
            self.r = redis.Redis.from_url(
                url,
                socket_timeout=timeout,
                socket_connect_timeout=timeout,
                retry=Retry(NoBackoff(), 1),
                retry_on_error=list(self._errors),
                health_check_interval=30,
            )
        except ValueError as exc:
            raise ValueError(f"--session-store {self.url}: {exc}") from None
        self._commit = self.r.register_script(_COMMIT)
        self._create = self.r.register_script(_CREATE)
        self._held = self.r.register_script(_HELD)
        self._release = self.r.register_script(_RELEASE)
        self._count = (0.0, 0)  # (when, value): SCAN walks every key, so it is cached a little
        self._backoff = backoff
        self._down: tuple[float, str] = (0.0, "")  # (until when commands fail at once, why)

    def _keys(self, sid: str) -> tuple[str, str]:
        return f"{self.PREFIX}lease:{sid}", f"{self.PREFIX}session:{sid}"

    def _client_key(self, client: str) -> str:
        return f"{self.PREFIX}owner:{client}"

    @contextlib.contextmanager
    def _call(self):
        until, why = self._down
        if time.monotonic() < until:
            raise StoreUnavailable(f"the session store {self.url} is unreachable ({why})")
        try:
            yield
        except self._errors as exc:
            self._down = (time.monotonic() + self._backoff, str(exc))
            raise StoreUnavailable(f"the session store {self.url} is unreachable ({exc})") from None
        except self._redis_error as exc:  # e.g. OOM (maxmemory), READONLY (a replica)
            raise StoreUnavailable(
                f"the session store {self.url} refused the request ({exc})"
            ) from None

    def get(self, sid):
        if not valid_id(sid):
            return None
        with self._call():
            return self.r.get(self._keys(sid)[1])

    def put(self, sid, data, ttl, client="", limit=0) -> bool:
        if not valid_id(sid):
            raise ValueError(f"not a session id: {sid!r}")
        with self._call():
            keys = [self._keys(sid)[1], self._client_key(client)]
            return bool(self._create(keys=keys, args=[data, _ms(ttl), int(limit), sid]))

    def held(self, client: str) -> int:
        with self._call():
            return int(self._held(keys=[self._client_key(client)]))

    def peek(self, sid):
        if not valid_id(sid):
            return None, False
        lease, session = self._keys(sid)
        with self._call():
            pipe = self.r.pipeline(transaction=False)
            pipe.get(session)
            pipe.exists(lease)
            data, held = pipe.execute()
        return data, bool(held) and data is not None

    def commit(self, sid, owner, data, ttl, lease_ttl, client="") -> int:
        if not valid_id(sid):
            return GONE
        lease_ms = 0 if lease_ttl is None else _ms(lease_ttl)
        with self._call():
            keys = [*self._keys(sid), self._client_key(client)]
            return int(self._commit(keys=keys, args=[owner, lease_ms, data or b"", _ms(ttl), sid]))

    def acquire(self, sid, owner, lease_ttl) -> bool:
        if not valid_id(sid):
            return True  # nothing to hold: get() finds no session
        with self._call():
            return bool(self.r.set(self._keys(sid)[0], owner, nx=True, px=_ms(lease_ttl)))

    def release(self, sid, owner) -> bool:
        if not valid_id(sid):
            return False
        with self._call():
            return bool(self._release(keys=[self._keys(sid)[0]], args=[owner]))

    def delete(self, sid, client="") -> bool:
        if not valid_id(sid):
            return False
        lease, session = self._keys(sid)
        with self._call():
            pipe = self.r.pipeline(transaction=True)
            pipe.delete(session)
            pipe.delete(lease)
            pipe.zrem(self._client_key(client), sid)
            return bool(pipe.execute()[0])

    def count(self) -> int:
        when, value = self._count
        if time.monotonic() - when < 1.0:
            return value
        with self._call():
            value = sum(1 for _ in self.r.scan_iter(match=f"{self.PREFIX}session:*", count=1000))
        self._count = (time.monotonic(), value)
        return value

    def ping(self) -> None:
        with self._call():
            self.r.ping()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.r.close()
