"""The Redis store's Lua scripts (one namespace each: every key carries the namespace's hash tag).

KEYS (every script): 1 meta, 2 seq, 3 exp, 4 size, 5 vec (see redis_store.py for the layout).
"""

from __future__ import annotations

# Shared by the writing scripts: drop one entry and its index rows, keeping the byte count right.
_DROP = """
local meta, seqz, expz, sizes, vecs = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
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

# KEYS[6] the entry's key. ARGV: 1 entry key prefix, 2 key, 3 entry (msgpack), 4 vector record or '',
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
  redis.call('DEL', seqz, expz, sizes, vecs)
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
redis.call('SET', KEYS[6], blob, 'PXAT', expires)
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
  for _, k in ipairs({meta, seqz, expz, sizes, vecs}) do
    redis.call('PEXPIREAT', k, expires)
  end
end
return seq
"""
)

# KEYS[6] the entry's key. ARGV: 1 entry key prefix, 2 key. A deletion bumps `removed`: replicas
# rebuild their copy (deletions are rare: bad-hit feedback).
DELETE = (
    _DROP
    + """
if redis.call('ZSCORE', seqz, ARGV[2]) then
  drop(ARGV[1], ARGV[2])
  redis.call('HINCRBY', meta, 'removed', 1)
end
redis.call('DEL', KEYS[6])
return 1
"""
)

# ARGV: 1 born, 2 removed, 3 highest sequence seen (as the replica last saw them).
# Returns {born, removed, next, floor, full, key1, seq1, vec1, ...}: every row when `full` is 1 (the
# replica's copy is of another life or predates a deletion), else only rows after the sequence seen.
# A row whose vector is '' has none (exact tier only; it may overwrite a row that had one).
SYNC = """
local meta, seqz, vecs = KEYS[1], KEYS[2], KEYS[5]
local m = redis.call('HMGET', meta, 'born', 'removed', 'next', 'floor')
if not m[1] then
  return {'', '', 0, 0, 1}
end
local full = m[1] ~= ARGV[1] or m[2] ~= ARGV[2]
local out = {m[1], m[2], m[3], m[4], full and 1 or 0}
if not full and m[3] == ARGV[3] then
  return out
end
local after = full and '-inf' or '(' .. ARGV[3]
local rows = redis.call('ZRANGEBYSCORE', seqz, after, '+inf', 'WITHSCORES')
for i = 1, #rows, 2 do
  out[#out + 1] = rows[i]
  out[#out + 1] = rows[i + 1]
  out[#out + 1] = redis.call('HGET', vecs, rows[i]) or ''
end
return out
"""
