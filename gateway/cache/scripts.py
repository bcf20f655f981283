"""The Redis store's Lua scripts (one namespace each: every key carries the namespace's hash tag).

KEYS (every script): 1 meta, 2 seq, 3 exp, 4 size, 5 vec, 6 dels (see redis_store.py for the layout);
put and delete add 7, the entry's own key.
"""

from __future__ import annotations

# Shared by the writing scripts: drop one entry and its index rows, keeping the byte count right.
_DROP = """
local meta, seqz, expz, sizes, vecs, dels = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local function drop(eprefix, k)
  local s = redis.call('HGET', sizes, k)
  redis.call('DEL', eprefix .. k)
  redis.call('ZREM', seqz, k)
  redis.call('ZREM', expz, k)
  redis.call('HDEL', sizes, k)
  redis.call('HDEL', vecs, k)
  if s then
    redis.call('HINCRBY', meta, 'bytes', -tonumber(s))
  end
end
"""

# ARGV: 1 entry key prefix, 2 key, 3 entry (msgpack), 4 vector record or '',
# 5 expires_ms, 6 now_ms, 7 max_entries, 8 max_bytes, 9 a fresh random `born` (used if the namespace
# is new). Returns the entry's sequence number, or 0 when it was not stored.
PUT = (
    _DROP
    + """
local eprefix, key, blob, vec = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local expires, now = tonumber(ARGV[5]), tonumber(ARGV[6])
local max_entries, max_bytes = tonumber(ARGV[7]), tonumber(ARGV[8])
local size = #blob + #vec + #key
if expires <= now or max_entries < 1 or size > max_bytes then
  return 0
end
if redis.call('EXISTS', meta) == 0 then
  -- A new life of the namespace (first put, or all of it expired or was evicted): a new `born` tells
  -- every replica to rebuild its copy; leftovers of an index whose meta went first are cleared.
  redis.call('DEL', seqz, expz, sizes, vecs, dels)
  redis.call('HSET', meta, 'born', ARGV[9], 'removed', 0, 'next', 0, 'floor', 0, 'bytes', 0, 'until', 0)
end
-- Expired entries leave the index (replicas drop them by their own clock: no rebuild needed).
for _, k in ipairs(redis.call('ZRANGEBYSCORE', expz, '-inf', now, 'LIMIT', 0, 64)) do
  drop(eprefix, k)
end
-- An overwrite: the old version leaves; replicas replace the row when they fetch the new sequence.
if redis.call('ZSCORE', seqz, key) then
  drop(eprefix, key)
end
-- Oldest first until the new entry fits; `floor` tells replicas every sequence below it is gone.
local count = redis.call('ZCARD', seqz)
local bytes = tonumber(redis.call('HGET', meta, 'bytes'))
local floor = tonumber(redis.call('HGET', meta, 'floor'))
while count > 0 and (count + 1 > max_entries or bytes + size > max_bytes) do
  local oldest = redis.call('ZRANGE', seqz, 0, 0, 'WITHSCORES')
  drop(eprefix, oldest[1])
  floor = math.max(floor, tonumber(oldest[2]) + 1)
  count = count - 1
  bytes = tonumber(redis.call('HGET', meta, 'bytes'))
end
local seq = redis.call('HINCRBY', meta, 'next', 1)
redis.call('SET', KEYS[7], blob, 'PXAT', expires)
redis.call('ZADD', seqz, seq, key)
redis.call('ZADD', expz, expires, key)
redis.call('HSET', sizes, key, size)
if #vec > 0 then
  redis.call('HSET', vecs, key, vec)
end
redis.call('HINCRBY', meta, 'bytes', size)
redis.call('HSET', meta, 'floor', floor)
-- The index lives exactly as long as its longest-lived entry: moved by puts only, never by reads.
if expires > tonumber(redis.call('HGET', meta, 'until')) then
  redis.call('HSET', meta, 'until', expires)
  for _, k in ipairs({meta, seqz, expz, sizes, vecs, dels}) do
    redis.call('PEXPIREAT', k, expires)
  end
end
return seq
"""
)

# ARGV: 1 entry key prefix, 2 key, 3 how many deletions the log keeps. A deletion bumps `removed` and
# is logged under that number, so replicas remove just that row (deletions are rare: bad-hit feedback).
DELETE = (
    _DROP
    + """
if redis.call('ZSCORE', seqz, ARGV[2]) then
  drop(ARGV[1], ARGV[2])
  local n = redis.call('HINCRBY', meta, 'removed', 1)
  redis.call('ZADD', dels, n, ARGV[2])
  redis.call('ZREMRANGEBYRANK', dels, 0, -tonumber(ARGV[3]) - 1)
  redis.call('PEXPIREAT', dels, redis.call('HGET', meta, 'until'))
end
redis.call('DEL', KEYS[7])
return 1
"""
)

# ARGV: 1 born, 2 removed, 3 highest sequence seen (as the replica last saw them), 4 most rows to return.
# Returns {born, removed, next, floor, full, n, deleted key 1..n, key1, seq1, vec1, ...}:
# - full = 1 when the replica's copy is of another life of the namespace, or predates deletions the log
#   no longer holds: it must start over, and the rows are the first ones of the namespace;
# - else the keys deleted since the replica's `removed`, and rows after the sequence seen.
# At most ARGV[4] rows, oldest first: a replica catches up over several calls, each reply bounded.
# A row whose vector is '' has none (exact tier only; it may overwrite a row that had one).
SYNC = """
local meta, seqz, vecs, dels = KEYS[1], KEYS[2], KEYS[5], KEYS[6]
local m = redis.call('HMGET', meta, 'born', 'removed', 'next', 'floor')
if not m[1] then
  return {'', '', 0, 0, 1, 0}
end
local full = 0
local gone = {}
if m[1] ~= ARGV[1] then
  full = 1
elseif m[2] ~= ARGV[2] then
  local mine = tonumber(ARGV[2])
  local oldest = redis.call('ZRANGE', dels, 0, 0, 'WITHSCORES')
  if mine == nil or #oldest == 0 or tonumber(oldest[2]) > mine + 1 then
    full = 1
  else
    gone = redis.call('ZRANGEBYSCORE', dels, '(' .. mine, '+inf')
  end
elseif m[3] == ARGV[3] then
  return {m[1], m[2], m[3], m[4], 0, 0}
end
local out = {m[1], m[2], m[3], m[4], full, #gone}
for _, k in ipairs(gone) do
  out[#out + 1] = k
end
local after = full == 1 and '-inf' or '(' .. ARGV[3]
local rows = redis.call('ZRANGEBYSCORE', seqz, after, '+inf', 'WITHSCORES', 'LIMIT', 0, tonumber(ARGV[4]))
for i = 1, #rows, 2 do
  out[#out + 1] = rows[i]
  out[#out + 1] = rows[i + 1]
  out[#out + 1] = redis.call('HGET', vecs, rows[i]) or ''
end
return out
"""
