"""The Lua scripts of :class:`~slimta.redisstorage.RedisStorage`.

Each script runs atomically in Redis, so a message and its place in the two
sorted sets always change together, and two processes can never both claim
one message. See the package documentation for the keys.

Conventions shared by every script:

* ``P`` is the key prefix; a message is the hash ``P<id>`` and the sorted
  sets are ``P'scheduled'`` (unclaimed messages, scored by their next
  attempt time on the queue's clock) and ``P'claimed'`` (messages a process
  holds, scored by the end of its lease on the Redis server's clock);
* each stored id is in exactly one of the two sets;
* the hash field ``owner`` names the storage instance holding the claim; it
  is meaningful only while the id is in ``P'claimed'``;
* a move between the sets adds to the new one before it removes from the
  old one: Redis does not undo a script that fails half-way (only if
  someone gave one of our keys another type), and a message in both sets
  may be delivered twice, one in neither would never be again;
* timestamps travel as the strings Python formatted (``repr`` of a float),
  never through a Lua number, so they round-trip exactly; lease ends are
  computed in Lua, where Redis formats numbers with 17 significant digits.

A lease is *live* while its end is later than the server's ``TIME``. A claim
whose lease ran out may be taken by anyone, its holder included.
"""

from __future__ import annotations

__all__ = [
    "CLAIM",
    "DELIVERED",
    "GET",
    "INCREMENT",
    "RELEASE",
    "REMOVE",
    "RENEW",
    "SET_TIMESTAMP",
    "WRITE",
]

# Helpers prepended to the scripts that need them.
_NOW = """
local function server_now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
"""

# True when message `id` (hash `key`) is held by a live lease of someone
# other than `token`.
_HELD_BY_OTHER = """
local function held_by_other(claimed, key, id, token, now)
  local lease_end = redis.call('ZSCORE', claimed, id)
  if not lease_end or tonumber(lease_end) <= now then
    return false
  end
  return redis.call('HGET', key, 'owner') ~= token
end
"""

#: Store a new message.
#: KEYS: message hash, scheduled, claimed.
#: ARGV: id, envelope, timestamp, nonce, token, lease, claim ('1'/'0'), channel.
#: Returns 1 when stored (or already stored by this very call, recognised by
#: its nonce: a retried call must not store the message twice), 0 when the id
#: is taken. With claim '1' the writer holds the message; otherwise it is
#: scheduled and the wake-up channel told.
WRITE = (
    _NOW
    + """
local key, id = KEYS[1], ARGV[1]
if redis.call('EXISTS', key) == 1 then
  if redis.call('HGET', key, 'nonce') == ARGV[4] then
    return 1
  end
  return 0
end
redis.call('HSET', key, 'envelope', ARGV[2], 'timestamp', ARGV[3], 'attempts', 0,
           'delivered_indexes', '[]', 'nonce', ARGV[4])
if ARGV[7] == '1' then
  redis.call('HSET', key, 'owner', ARGV[5])
  redis.call('ZADD', KEYS[3], server_now() + tonumber(ARGV[6]), id)
else
  redis.call('ZADD', KEYS[2], ARGV[3], id)
  redis.call('PUBLISH', ARGV[8], ARGV[3])
end
return 1
"""
)

#: Claim up to a number of messages: first those whose lease ran out (their
#: holder died or lost Redis), then scheduled ones that are due.
#: KEYS: scheduled, claimed.
#: ARGV: token, lease, now (queue clock), limit, prefix.
#: Returns ``{claimed, next_due, next_lease_end}``: ``claimed`` is a flat
#: list ``id, timestamp, id, timestamp ...`` (a message whose lease ran out
#: is due at *now*); ``next_due`` the earliest scheduled time left (queue
#: clock) or nil; ``next_lease_end`` the seconds until the earliest live
#: lease ends, or nil.
CLAIM = (
    _NOW
    + """
local scheduled, claimed = KEYS[1], KEYS[2]
local token, now_arg, prefix = ARGV[1], ARGV[3], ARGV[5]
local limit = tonumber(ARGV[4])
local snow = server_now()
local lease_end = snow + tonumber(ARGV[2])
local out = {}
local count = 0
if limit > 0 then
  local lapsed = redis.call('ZRANGEBYSCORE', claimed, '-inf', snow, 'LIMIT', 0, limit)
  for _, id in ipairs(lapsed) do
    local key = prefix .. id
    if redis.call('EXISTS', key) == 1 then
      redis.call('HSET', key, 'owner', token)
      redis.call('ZADD', claimed, lease_end, id)
      out[#out + 1] = id
      out[#out + 1] = now_arg
      count = count + 1
    else
      redis.call('ZREM', claimed, id)
    end
  end
end
if count < limit then
  local due = redis.call('ZRANGEBYSCORE', scheduled, '-inf', now_arg, 'WITHSCORES',
                         'LIMIT', 0, limit - count)
  for i = 1, #due, 2 do
    local id = due[i]
    local key = prefix .. id
    if redis.call('EXISTS', key) == 1 then
      redis.call('ZADD', claimed, lease_end, id)
      redis.call('ZREM', scheduled, id)
      redis.call('HSET', key, 'owner', token)
      out[#out + 1] = id
      out[#out + 1] = due[i + 1]
    else
      redis.call('ZREM', scheduled, id)
    end
  end
end
local head = redis.call('ZRANGE', scheduled, 0, 0, 'WITHSCORES')
local next_due = head[2] or false
local lease_head = redis.call('ZRANGE', claimed, 0, 0, 'WITHSCORES')
local next_lease_end = false
if lease_head[2] then
  next_lease_end = tostring(tonumber(lease_head[2]) - snow)
end
return {out, next_due, next_lease_end}
"""
)

#: Read a message, claiming it (or renewing this storage's claim).
#: KEYS: message hash, scheduled, claimed.
#: ARGV: id, token, lease.
#: Returns nil when the message is not stored, 0 when another storage holds
#: it under a live lease, else ``{envelope, attempts, delivered_indexes}``.
GET = (
    _NOW
    + _HELD_BY_OTHER
    + """
local key, id, token = KEYS[1], ARGV[1], ARGV[2]
local fields = redis.call('HMGET', key, 'envelope', 'attempts', 'delivered_indexes')
if not fields[1] then
  return false
end
local snow = server_now()
if held_by_other(KEYS[3], key, id, token, snow) then
  return 0
end
redis.call('ZADD', KEYS[3], snow + tonumber(ARGV[3]), id)
redis.call('ZREM', KEYS[2], id)
redis.call('HSET', key, 'owner', token)
return fields
"""
)

#: Reschedule a message and release this storage's claim on it.
#: KEYS: message hash, scheduled, claimed.
#: ARGV: id, timestamp, token, channel.
#: Returns 0 when the message is not stored, 2 when another storage holds it
#: under a live lease (nothing is changed then), 1 when rescheduled.
SET_TIMESTAMP = (
    _NOW
    + _HELD_BY_OTHER
    + """
local key, id, token = KEYS[1], ARGV[1], ARGV[3]
if redis.call('EXISTS', key) == 0 then
  return 0
end
if held_by_other(KEYS[3], key, id, token, server_now()) then
  return 2
end
redis.call('ZADD', KEYS[2], ARGV[2], id)
redis.call('ZREM', KEYS[3], id)
redis.call('HSET', key, 'timestamp', ARGV[2])
redis.call('HDEL', key, 'owner')
redis.call('PUBLISH', ARGV[4], ARGV[2])
return 1
"""
)

#: Count one more attempt.
#: KEYS: message hash. Returns the new count, or nil when not stored.
INCREMENT = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  return false
end
return redis.call('HINCRBY', KEYS[1], 'attempts', 1)
"""

#: Mark recipients delivered.
#: KEYS: message hash.
#: ARGV: indexes (JSON list, positions in the envelope of the caller's latest
#: read), base (JSON list of the original indexes already delivered at that
#: read, or '' for "the ones delivered now").
#: Each index is translated to a position in the recipient list as written
#: (the n-th recipient not in *base*) and added to ``delivered_indexes``.
#: Returns 0 when the message is not stored, else 1.
DELIVERED = """
local current = redis.call('HGET', KEYS[1], 'delivered_indexes')
if not current then
  return 0
end
local delivered = cjson.decode(current)
local base = delivered
if ARGV[2] ~= '' then
  base = cjson.decode(ARGV[2])
end
local sorted = {}
for _, i in ipairs(base) do sorted[#sorted + 1] = i end
table.sort(sorted)
local set = {}
for _, i in ipairs(delivered) do set[i] = true end
for _, n in ipairs(cjson.decode(ARGV[1])) do
  if n >= 0 then
    for _, i in ipairs(sorted) do
      if i > n then break end
      n = n + 1
    end
    set[n] = true
  end
end
local out = {}
for i, _ in pairs(set) do out[#out + 1] = i end
table.sort(out)
for i, v in ipairs(out) do out[i] = string.format('%d', v) end
redis.call('HSET', KEYS[1], 'delivered_indexes', '[' .. table.concat(out, ',') .. ']')
return 1
"""

#: Delete a message.
#: KEYS: message hash, scheduled, claimed. ARGV: id.
#: Returns 1 when it was stored, else 0. (One script rather than a MULTI
#: transaction: one reply to read instead of five.)
REMOVE = """
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
return redis.call('DEL', KEYS[1])
"""

#: Extend the leases this storage holds.
#: KEYS: claimed. ARGV: token, lease, prefix, id...
#: Returns the ids no longer held (removed, or claimed by someone else).
RENEW = (
    _NOW
    + """
local claimed, token, prefix = KEYS[1], ARGV[1], ARGV[3]
local lease_end = server_now() + tonumber(ARGV[2])
local lost = {}
for i = 4, #ARGV do
  local id = ARGV[i]
  if redis.call('ZSCORE', claimed, id) and redis.call('HGET', prefix .. id, 'owner') == token then
    redis.call('ZADD', claimed, lease_end, id)
  else
    lost[#lost + 1] = id
  end
end
return lost
"""
)

#: Give claims back: each message held by this storage is scheduled again at
#: its stored next attempt time.
#: KEYS: scheduled, claimed. ARGV: token, prefix, channel, id...
#: Returns how many were released.
RELEASE = """
local scheduled, claimed, token, prefix = KEYS[1], KEYS[2], ARGV[1], ARGV[2]
local count = 0
for i = 4, #ARGV do
  local id = ARGV[i]
  local key = prefix .. id
  if redis.call('ZSCORE', claimed, id) and redis.call('HGET', key, 'owner') == token then
    local timestamp = redis.call('HGET', key, 'timestamp')
    redis.call('ZADD', scheduled, timestamp, id)
    redis.call('ZREM', claimed, id)
    redis.call('HDEL', key, 'owner')
    count = count + 1
  end
end
if count > 0 then
  redis.call('PUBLISH', ARGV[3], 'release')
end
return count
"""
