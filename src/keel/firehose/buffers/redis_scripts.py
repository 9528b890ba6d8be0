"""The Lua scripts of the Redis writer: each does in one atomic call what must not be split."""

from __future__ import annotations

# Acknowledge entries the store now holds: XACK, XDEL, and DECRBY of the events of those entries
# whose XACK took them off the pending list (one another writer already acknowledged counts 0).
ACK_LUA = """
local done = 0
for i = 2, #ARGV, 2 do
  if redis.call('XACK', KEYS[1], ARGV[1], ARGV[i]) == 1 then
    redis.call('XDEL', KEYS[1], ARGV[i])
    done = done + tonumber(ARGV[i + 1])
  end
end
if done > 0 then redis.call('DECRBY', KEYS[2], done) end
return done
"""
# Remove a consumer only if nothing is pending on it: DELCONSUMER drops its pending entries from
# the group, which would strand them unacknowledged forever.
REAP_LUA = """
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2])
if #pending == 0 then return redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2]) end
return -1
"""
# Take entries for this consumer until they hold ARGV[3] events (or ARGV[4] entries): one entry
# at a time, counting each one's ``n``, so a read holds about what the writer asked for however
# big the entries are (a count of entries alone could bring count x max_batch_events). KEYS:
# stream. ARGV: group, consumer, events, entries, then "new" (XREADGROUP >) or min idle ms and a
# cursor (XAUTOCLAIM). Returns {cursor, entries}.
TAKE_LUA = """
local wanted, most = tonumber(ARGV[3]), tonumber(ARGV[4])
local claim, cursor = ARGV[5] ~= 'new', ARGV[6] or '0-0'
local got, events, tries = {}, 0, 0
while #got < most and events < wanted and tries < most do
  tries = tries + 1
  local batch
  if claim then
    local reply = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[5], cursor, 'COUNT', 1)
    cursor, batch = reply[1], reply[2]
  else
    local reply = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', 1,
      'STREAMS', KEYS[1], '>')
    batch = reply and reply[1][2] or {}
  end
  for _, entry in ipairs(batch) do
    got[#got + 1] = entry
    local fields, n = entry[2], 1
    if type(fields) == 'table' then
      for i = 1, #fields, 2 do
        if fields[i] == 'n' then n = tonumber(fields[i + 1]) or 1 end
      end
    end
    events = events + n
  end
  if (claim and cursor == '0-0') or (not claim and #batch == 0) then break end
end
return {cursor, got}
"""
